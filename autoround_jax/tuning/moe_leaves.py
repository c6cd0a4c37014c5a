"""The tuner's view of stacked experts: layer_config names each expert's linear (mlp.experts.E.gate_proj, as the
reference does), the model stores each projection of all experts in one stacked leaf (models/moe.py). These helpers
map between the two: turn a stacked float leaf into a stacked fake-quant leaf, read its per-expert integer codes,
and write per-expert weights back. One scheme per stacked projection (all experts quantized alike, or all float).
"""

from __future__ import annotations

import re
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..models.layers import FloatWeight
from ..models.moe import MixedExpertSchemes, StackedLinear, stack_leaves, unstack_leaf
from ..models.params_table import module_at
from ..quant.qdq import QuantizedWeight
from ..quant.scheme import LayerScheme

_EXPERT = re.compile(r"^(?P<head>.*mlp\.experts)\.(?P<e>\d+)\.(?P<lin>gate_proj|up_proj|down_proj)$")


def expert_of(name: str) -> tuple[str, int] | None:
    """'mlp.experts.3.up_proj' -> ('mlp.experts.up_proj', 3); None for a name that is not an expert's linear."""
    m = _EXPERT.match(name)
    return (f"{m['head']}.{m['lin']}", int(m["e"])) if m else None


def split_schemes(block: nnx.Module, schemes: dict[str, LayerScheme]) -> tuple[dict[str, LayerScheme],
                                                                                dict[str, LayerScheme]]:
    """(plain linears -> scheme, stacked projections -> their one scheme). Raises MixedExpertSchemes when the experts
    of one projection differ (some float, or different schemes)."""
    plain: dict[str, LayerScheme] = {}
    stacks: dict[str, dict[int, LayerScheme]] = {}
    for name, scheme in schemes.items():
        ex = expert_of(name)
        if ex is None:
            plain[name] = scheme
        else:
            stacks.setdefault(ex[0], {})[ex[1]] = scheme
    out = {}
    for stack, per_expert in stacks.items():
        n = module_at(block, stack).num_experts
        if len(per_expert) != n or len(set(per_expert.values())) != 1:
            raise MixedExpertSchemes(
                f"{stack}: {len(per_expert)} of {n} experts quantized with {len(set(per_expert.values()))} scheme(s); "
                "autoround-jax stores the experts of a projection stacked, so give all of them one scheme "
                "(fp_layers/layer_config on every expert of a layer, e.g. the regex 'mlp.experts.*.up_proj')")
        out[stack] = next(iter(per_expert.values()))
    return plain, out


def to_fake_quant(block: nnx.Module, stack: str, make_leaf: Callable[[jax.Array], nnx.Module]) -> None:
    """Replace a stacked float projection by E fake-quant leaves (make_leaf(w [out, in]) each), stacked."""
    sl: StackedLinear = module_at(block, stack)
    w = sl.weight.w[...].astype(jnp.float32)
    sl.weight = stack_leaves([make_leaf(w[e]) for e in range(w.shape[0])], stack)


def stacked_codes(block: nnx.Module, stack: str) -> list[QuantizedWeight]:
    """Per-expert integer codes of a stacked fake-quant projection, as numpy: one expert at a time through the same
    jitted quantize_to_codes as a plain linear (under vmap, XLA:CPU rounded a few fp16 scales one ulp apart from
    the reference's per-expert division)."""
    sl: StackedLinear = module_at(block, stack)
    return [jax.tree.map(np.asarray, unstack_leaf(sl.weight, e).quantized()) for e in range(sl.num_experts)]


def to_float(block: nnx.Module, stack: str, dtype) -> None:
    """The stacked leaf back to a float one holding what it computes (the qdq weights)."""
    sl: StackedLinear = module_at(block, stack)
    w = jnp.stack([unstack_leaf(sl.weight, e).dequantize() for e in range(sl.num_experts)])  # as stacked_codes
    sl.weight = FloatWeight(w.astype(dtype))


def set_weight(block: nnx.Module, name: str, w: jax.Array) -> None:
    """Set one linear's float weight by its layer_config name: a plain Linear's leaf, or one expert's slice of the
    stacked leaf."""
    ex = expert_of(name)
    if ex is None:
        module_at(block, name).weight = FloatWeight(w)
        return
    sl: StackedLinear = module_at(block, ex[0])
    sl.weight.w.set_value(sl.weight.w[...].at[ex[1]].set(w.astype(sl.weight.w.dtype)))


def float_weight(block: nnx.Module, name: str) -> jax.Array:
    """One linear's current float weight [out, in] by its layer_config name (an expert's slice for experts)."""
    ex = expert_of(name)
    if ex is None:
        return module_at(block, name).weight.dequantize()
    return module_at(block, ex[0]).stacked_weight()[ex[1]]
