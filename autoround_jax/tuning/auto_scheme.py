"""AutoScheme (mixed bits under an average-bits budget), the parts of the reference 0.16.1 ported so far.

- `layer_bits`: auto_scheme/utils.py compute_layer_bits for an int weight-only linear: bits x params plus, per
  group, a 16-bit scale and a bits-wide zero point (counted for sym int too, as the reference does), unless
  ignore_scale_zp_bits.
- `choose_schemes`: auto_scheme/delta_loss.py choose_bits_per_layer_with_path, the dynamic program over layers:
  state = total bits so far -> (smallest summed loss, path); Pareto pruning after each layer; the budget is
  P = int(total_params x target_avg_bits) minus the bits of fixed layers.
- `delta_loss_scores`: DeltaLoss, sum over a layer of |dL/dW~ x (W - W~)| with W~ the RTN qdq of W under a
  candidate scheme and L the model's next-token loss on calibration tokens, every candidate layer quantized with
  that scheme at once (one forward + backward per scheme, as the reference's scoring pass).
- `allocate`: scores -> budget -> DP -> {layer name: scheme}.

Not done yet (see docs/research.md): the AutoRound / CLI wiring (--schemes, --bits as a float target,
--avg_bits/--options aliases), the reference's activation term, its embedding and lm_head special rules.
"""

from __future__ import annotations

from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..models.layers import FloatWeight
from ..models.params_table import module_at
from ..quant.qdq import num_groups, rtn, dequantize
from ..quant.scheme import LayerScheme


def layer_bits(out_features: int, in_features: int, scheme: LayerScheme | None,
               ignore_scale_zp_bits: bool = False) -> int:
    """compute_layer_bits for an int linear W[out, in] (None or >= 16 bits: a float layer, 16 bits a weight)."""
    n = out_features * in_features
    if scheme is None or scheme.bits >= 16:
        return 16 * n
    if ignore_scale_zp_bits:
        return scheme.bits * n
    g = scheme.group_size
    n_group = out_features * (1 if g == 0 else num_groups(in_features, g) if g > 0 else 1)
    if g == 0:
        n_group = 1
    zp_bits = scheme.bits  # `bits if not sym or "int" in data_type`: int schemes always pay for a zero point
    return scheme.bits * n + n_group * (16 + zp_bits)


def choose_schemes(layers: dict[str, list[tuple[int, int, float]]], budget: int):
    """The reference's DP: layers {name: [(scheme index, bits, loss), ...]} in order; the smallest total loss with
    total bits <= budget. Returns (loss, {name: scheme index}) or (None, None) when nothing fits."""
    dp: dict[int, tuple[float, tuple]] = {0: (0.0, ())}
    for name, opts in layers.items():
        new: dict[int, tuple[float, tuple]] = {}
        for bits_so_far, (loss_so_far, path) in dp.items():
            for idx, bits, loss in opts:
                total = bits_so_far + bits
                if total > budget:
                    continue
                cand = loss_so_far + loss
                if total not in new or cand < new[total][0]:
                    new[total] = (cand, (path, name, idx))
        if not new:
            return None, None
        pruned, best = {}, float("inf")
        for total, (loss, path) in sorted(new.items(), key=lambda kv: kv[0]):
            if loss < best:
                pruned[total], best = (loss, path), loss
        dp = pruned
    best_total = min(dp, key=lambda k: dp[k][0])
    loss, node = dp[best_total]
    chosen = {}
    while node:
        node, name, idx = node
        chosen[name] = idx
    return loss, dict(reversed(list(chosen.items())))


def _linear(model, name: str):
    """The linear module of a CausalLM at an HF name such as model.layers.3.mlp.up_proj."""
    parts = name.split(".")
    if parts[:2] != ["model", "layers"]:
        raise ValueError(f"{name} is not a block linear (names look like model.layers.3.mlp.up_proj)")
    return module_at(model.layers[int(parts[2])], ".".join(parts[3:]))


def _qdq_weights(model, names: Iterable[str], scheme: LayerScheme):
    """{name: (W, W~)} for the named block linears of a float model (W~: plain RTN under scheme, fp32)."""
    out = {}
    for name in names:
        w = _linear(model, name).weight.w[...].astype(jnp.float32)
        out[name] = (w, dequantize(rtn(w, scheme.bits, scheme.group_size, scheme.sym)))
    return out


def delta_loss_scores(model, names: list[str], schemes: list[LayerScheme], ids: np.ndarray) -> np.ndarray:
    """[len(schemes), len(names)] DeltaLoss sensitivities on calibration token ids [n, T] (one batch).

    For each scheme, every named linear of `model` (a float CausalLM whose linears hold FloatWeight leaves) is set to
    its RTN qdq weight, the mean next-token cross entropy is differentiated w.r.t. those weights, and each layer
    scores sum |grad x (W - W~)|. The model is restored afterwards.
    """
    ids = jnp.asarray(ids)
    originals = {n: _linear(model, n).weight for n in names}
    scores = np.zeros((len(schemes), len(names)), np.float64)
    try:
        for si, scheme in enumerate(schemes):
            pairs = _qdq_weights(model, names, scheme)
            for n in names:
                _linear(model, n).weight = FloatWeight(pairs[n][1].astype(originals[n].w[...].dtype))
            graphdef, state = nnx.split(model)

            def loss_fn(ws):
                m = nnx.merge(graphdef, state)
                for n, w in ws.items():
                    _linear(m, n).weight = FloatWeight(w)
                logits = m(ids[:, :-1]).astype(jnp.float32)
                logp = jax.nn.log_softmax(logits, axis=-1)
                return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))

            ws = {n: _linear(model, n).weight.w[...] for n in names}
            grads = jax.grad(loss_fn)(ws)
            for ni, n in enumerate(names):
                w, wq = pairs[n]
                scores[si, ni] = float(jnp.sum(jnp.abs(grads[n].astype(jnp.float32) * (w - wq))))
    finally:
        for n in names:
            _linear(model, n).weight = originals[n]
    return scores


def allocate(shapes: dict[str, tuple[int, int]], schemes: list[LayerScheme], scores: np.ndarray, target_bits: float,
             ignore_scale_zp_bits: bool = False) -> tuple[dict[str, LayerScheme], float]:
    """({layer: chosen scheme}, achieved average bits) for layers {name: (out, in)} under target_bits on average."""
    total_params = sum(o * i for o, i in shapes.values())
    budget = int(total_params * target_bits)
    layers = {n: [(si, layer_bits(o, i, s, ignore_scale_zp_bits), float(scores[si, ni]))
                  for si, s in enumerate(schemes)] for ni, (n, (o, i)) in enumerate(shapes.items())}
    _, chosen = choose_schemes(layers, budget)
    if chosen is None:
        cheapest = min(sum(min(b for _, b, _ in opts) for opts in layers.values()) / total_params, 99)
        raise ValueError(f"average bits {target_bits} is too small for these candidate schemes: the cheapest "
                         f"assignment needs {cheapest:.3f} bits per weight; raise --bits or add a lower-bit scheme")
    result = {n: schemes[i] for n, i in chosen.items()}
    used = sum(layer_bits(*shapes[n], s, ignore_scale_zp_bits) for n, s in result.items())
    return result, used / total_params
