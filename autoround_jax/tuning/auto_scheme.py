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

import dataclasses
import functools
import warnings
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


@functools.partial(jax.jit, static_argnames=("graphdef", "names"))
def _weight_grads(graphdef, state, ws, ids, *, names):
    """d(mean next-token cross entropy)/d(weight) of each named linear, at the weights ws."""

    def loss_fn(ws):
        m = nnx.merge(graphdef, state)
        for n in names:
            _linear(m, n).weight = FloatWeight(ws[n])
        logits = m(ids[:, :-1]).astype(jnp.float32)
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))

    return jax.grad(loss_fn)(ws)


def delta_loss_scores(model, names: list[str], schemes: list[LayerScheme], ids: np.ndarray,
                      batch_size: int | None = None) -> np.ndarray:
    """[len(schemes), len(names)] DeltaLoss sensitivities on calibration token ids [n, T].

    For each scheme, every named linear of `model` (a float CausalLM) computes with its RTN qdq weight W~, the mean
    next-token cross entropy of each batch is differentiated w.r.t. those weights, and each layer adds
    sum |grad x (W - W~)| per batch (the reference's weight score, accumulated per backward pass). The model is
    left as it was.
    """
    ids = np.asarray(ids)
    bs = batch_size or ids.shape[0]
    names = tuple(names)
    originals = {n: _linear(model, n).weight for n in names}
    scores = np.zeros((len(schemes), len(names)), np.float64)
    try:
        for si, scheme in enumerate(schemes):
            pairs = _qdq_weights(model, names, scheme)
            ws = {n: pairs[n][1].astype(originals[n].w[...].dtype) for n in names}
            for n in names:
                _linear(model, n).weight = FloatWeight(ws[n])
            graphdef, state = nnx.split(model)
            for i in range(0, ids.shape[0], bs):
                grads = _weight_grads(graphdef, state, ws, jnp.asarray(ids[i : i + bs]), names=names)
                for ni, n in enumerate(names):
                    w, wq = pairs[n]
                    scores[si, ni] += float(jnp.sum(jnp.abs(grads[n].astype(jnp.float32) * (w - wq))))
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


# -- the AutoRound side ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class AutoSchemeSpec:
    """The reference's AutoScheme(options, avg_bits, ignore_scale_zp_bits) with our scheme objects."""

    names: tuple[str, ...]
    options: tuple[LayerScheme, ...]
    avg_bits: float
    ignore_scale_zp_bits: bool = False


def AutoScheme(options, avg_bits: float, ignore_scale_zp_bits: bool = False) -> AutoSchemeSpec:  # noqa: N802
    """The reference's `AutoScheme(options=..., avg_bits=...)`, for `AutoRound(model, scheme=AutoScheme(...))`."""
    return parse_spec(options, avg_bits, ignore_scale_zp_bits)


def parse_spec(schemes, avg_bits, ignore_scale_zp_bits: bool = False) -> AutoSchemeSpec:
    """'W2A16G64,W4A16,W8A16' (or a list of names) and the average target bits -> an AutoSchemeSpec; duplicates
    dropped as the reference does (the first kept)."""
    from ..quant.scheme import SCHEMES

    raw = schemes.split(",") if isinstance(schemes, str) else [p for item in schemes for p in str(item).split(",")]
    names, options = [], []
    for name in (p.strip().upper() for p in raw if p.strip()):
        if name not in SCHEMES:
            raise ValueError(f"unknown scheme {name!r} in --schemes: use some of {', '.join(SCHEMES)}")
        if SCHEMES[name] not in options:
            names.append(name)
            options.append(SCHEMES[name])
    if len(options) < 1:
        raise ValueError("--schemes needs at least one candidate scheme, e.g. W2A16G64,W4A16,W8A16")
    if avg_bits is None:
        raise ValueError("please set --bits (the average target bits) for AutoScheme")
    avg_bits = float(avg_bits)
    if not 0 < avg_bits <= 16:
        raise ValueError(f"average bits {avg_bits} is out of range: pass a number in (0, 16]")
    return AutoSchemeSpec(tuple(names), tuple(options), avg_bits, bool(ignore_scale_zp_bits))


@dataclasses.dataclass
class AutoSchemeResult:
    spec: AutoSchemeSpec
    choices: dict[str, LayerScheme]
    avg_bits: float
    scores: np.ndarray
    seconds: float

    def lines(self) -> list[str]:
        """The report: target and achieved average bits, then each block's layer choices."""
        label = {s: n for n, s in zip(self.spec.names, self.spec.options)}
        counts = {n: sum(1 for s in self.choices.values() if label[s] == n) for n in self.spec.names}
        out = [f"AutoScheme: target {self.spec.avg_bits:g} average bits over {len(self.choices)} layers, achieved "
               f"{self.avg_bits:.4f} (scale/zero-point bits {'ignored' if self.spec.ignore_scale_zp_bits else 'counted'}"
               f"); " + ", ".join(f"{n} x {c}" for n, c in counts.items()) + f"; DeltaLoss {self.seconds:.1f} s"]
        blocks: dict[str, list[str]] = {}
        for name, s in self.choices.items():
            block, _, layer = name.partition(".layers.")[2].partition(".")
            blocks.setdefault(block, []).append(f"{layer} {label[s]}")
        out += [f"  block {b}: " + ", ".join(v) for b, v in blocks.items()]
        return out


def run_auto_scheme(model, layer_config: dict[str, LayerScheme | None], spec: AutoSchemeSpec, ids: np.ndarray,
                    batch_size: int) -> AutoSchemeResult:
    """Score every quantized block linear of `model` under each candidate, allocate under spec.avg_bits and return
    the per-layer choices (layers kept float by fp_layers are neither scored nor counted)."""
    import time

    t0 = time.time()
    names = [n for n, s in layer_config.items() if s is not None]
    shapes = {n: tuple(_linear(model, n).weight.shape) for n in names}
    for s in spec.options:
        from .layer_selection import check_scheme

        for n in names:
            check_scheme(s, shapes[n][1], n)
    scores = delta_loss_scores(model, names, list(spec.options), ids, batch_size)
    choices, avg = allocate(shapes, list(spec.options), scores, spec.avg_bits, spec.ignore_scale_zp_bits)
    if avg > spec.avg_bits + 1e-9:
        warnings.warn(f"AutoScheme average bits {avg:.4f} exceed the target {spec.avg_bits}")
    return AutoSchemeResult(spec, choices, avg, scores, time.time() - t0)
