"""The sparse mixture-of-experts MLP of Qwen3-MoE and Qwen2-MoE: a float router, experts stored stacked, a grouped
matmul over tokens sorted by expert, and (Qwen2-MoE) a shared expert behind a sigmoid gate.

Each of the experts' three projections is one `StackedLinear` whose weight leaf holds all E experts along a leading
axis ([E, out, in]). Any leaf type works stacked (float, fake-quant, packed int): a leaf built for one expert is
stacked with `stack_leaves` (the arrays of E equal-structured leaves stacked along a new axis), and
`stacked_weight` dequantizes all experts at once by vmapping the leaf's own `dequantize`. So a fake-quant leaf of
shape [E, out, in] quantizes each expert exactly as E separate [out, in] linears (groups along the input axis).

The grouped matmul: on GPU/TPU `jax.lax.ragged_dot_general` (XLA has a native ragged dot there). XLA:CPU lowers a
ragged dot to a masked dense product over all experts (E times the FLOPs of the routed tokens, then E/k times a
dense MLP's), so on CPU `tiled` pads each expert's rows to whole tiles, gathers one expert's weight per tile and runs
one batched matmul (about 1.5x the routed FLOPs; its weight gradient is a scatter-add per expert).
"""

from __future__ import annotations

import os
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from .layers import FloatWeight, Linear, swiglu
from .precision import mixed_einsum

GROUPED_ENV = "AUTOROUND_JAX_MOE_MATMUL"  # "ragged" | "tiled" to override the per-backend choice (tests, benches)

# x [M, in] against w [E, out, in] with rows of x grouped by expert: contract x's dim 1 with w's dim 2.
_RAGGED = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(([1], [2]), ([], [])),
                                            lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])


class MixedExpertSchemes(ValueError):
    """The experts of one stacked projection got different quantization schemes (one leaf holds them all)."""


class StackedLinear(nnx.Module):
    """One projection of all experts: a weight leaf whose arrays carry a leading expert axis."""

    def __init__(self, weight: nnx.Module):
        self.weight = weight

    @property
    def num_experts(self) -> int:
        return int(jax.tree.leaves(nnx.state(self.weight))[0].shape[0])

    def stacked_weight(self) -> jax.Array:
        """All experts' weights [E, out, in] as the leaf computes them (qdq for fake-quant, decoded for packed)."""
        if isinstance(self.weight, FloatWeight):
            return self.weight.w[...]
        graphdef, state = nnx.split(self.weight)
        return jax.vmap(lambda s: nnx.merge(graphdef, s).dequantize())(state)

    def selected_weight(self, idx: jax.Array) -> jax.Array:
        """The weights [P, out, in] of experts idx [P] only: the stored arrays (packed words for an int leaf) are
        gathered before dequantizing, so a decode step touches k experts per token, not all E."""
        if isinstance(self.weight, FloatWeight):
            return self.weight.w[...][idx]
        graphdef, state = nnx.split(self.weight)
        state = jax.tree.map(lambda a: a[idx], state)
        return jax.vmap(lambda s: nnx.merge(graphdef, s).dequantize())(state)


def stack_leaves(leaves: Sequence[nnx.Module], name: str = "experts") -> nnx.Module:
    """E leaves of one structure (one per expert) -> one leaf whose arrays are stacked along a new leading axis."""
    if any(leaf is None for leaf in leaves):
        raise MixedExpertSchemes(f"{name}: some experts of one projection are quantized and some float; quantize all "
                                 "experts of a layer or none (fp_layers/layer_config on every expert)")
    splits = [nnx.split(leaf) for leaf in leaves]
    graphdef = splits[0][0]
    if any(g != graphdef for g, _ in splits[1:]):
        raise MixedExpertSchemes(f"{name}: every expert of one projection must share one quantization scheme (and "
                                 "all be quantized or all float); give all experts of a layer the same layer_config")
    state = jax.tree.map(lambda *xs: jnp.stack(xs), *[s for _, s in splits])
    return nnx.merge(graphdef, state)


def unstack_leaf(leaf: nnx.Module, e: int) -> nnx.Module:
    """Expert e's own leaf out of a stacked one (the inverse of stack_leaves for one index)."""
    graphdef, state = nnx.split(leaf)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[e], state))


def grouped_impl() -> str:
    """'tiled' on CPU, 'ragged' elsewhere, unless AUTOROUND_JAX_MOE_MATMUL says otherwise."""
    forced = os.environ.get(GROUPED_ENV)
    if forced in ("ragged", "tiled"):
        return forced
    return "tiled" if jax.default_backend() == "cpu" else "ragged"


def _ragged(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    y = jax.lax.ragged_dot_general(x, w.astype(x.dtype), group_sizes, _RAGGED, preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


def _tile_rows(m: int, n_exp: int) -> int:
    """Rows per tile: about half the mean group (so padding costs about half the routed rows), a multiple of 8."""
    return max(8, -(-max(m // (2 * n_exp), 1) // 8) * 8)


def _tiled(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """Each expert's rows padded to whole tiles (static count: M + E*(tile-1) rows at most), one weight per tile."""
    m, k = x.shape
    n_exp = w.shape[0]
    tile = _tile_rows(m, n_exp)
    n_tiles = -(-(m + n_exp * (tile - 1)) // tile)
    padded = (group_sizes + tile - 1) // tile * tile
    padded_end = jnp.cumsum(padded)
    start = jnp.cumsum(group_sizes) - group_sizes
    row_expert = jnp.repeat(jnp.arange(n_exp), group_sizes, total_repeat_length=m)
    dest = (padded_end - padded)[row_expert] + jnp.arange(m) - start[row_expert]
    xp = jnp.zeros((n_tiles * tile, k), x.dtype).at[dest].set(x, unique_indices=True)
    tile_expert = jnp.minimum(jnp.searchsorted(padded_end, jnp.arange(n_tiles) * tile, side="right"), n_exp - 1)
    y = mixed_einsum("tbk,tnk->tbn", xp.reshape(n_tiles, tile, k), w[tile_expert])
    return y.reshape(n_tiles * tile, -1)[dest]


def _grouped(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """x [M, in] (rows sorted by expert) @ w[e].T for each row's expert e; f32 accumulation, result in x's dtype."""
    return (_tiled if grouped_impl() == "tiled" else _ragged)(x, w, group_sizes)


def route(logits: jax.Array, top_k: int, norm_topk_prob: bool, route_all: bool = False):
    """(expert indices [T, k], weights [T, k] in logits' dtype) as transformers' TopKRouter: softmax in fp32, top-k,
    optional renormalization. route_all: the reference's AR_FORCE_MOE_ROUTING_ALL_EXPERTS, token-slot pair p goes
    to expert p mod E (every expert sees tokens) with its softmax probability as weight (renormalized likewise)."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    t, n_exp = probs.shape
    if route_all:
        idx = (jnp.arange(t * top_k, dtype=jnp.int32) % n_exp).reshape(t, top_k)
        w = jnp.take_along_axis(probs, idx, axis=-1)
        if norm_topk_prob:
            w = w / (w.sum(axis=-1, keepdims=True) + 1e-20)
        return idx, w.astype(logits.dtype)
    w, idx = jax.lax.top_k(probs, top_k)
    if norm_topk_prob:
        w = w / w.sum(axis=-1, keepdims=True)
    return idx, w.astype(logits.dtype)


class ExpertSquaredInputs(nnx.Variable):
    """opt-RTN's imatrix probe of the experts: per (expert, sample) sum over routed tokens of x^2, fp32."""


def experts_forward(x: jax.Array, idx: jax.Array, weights: jax.Array, gate: jax.Array, up: jax.Array,
                    down: jax.Array, samples: int | None = None):
    """sum_k weights[t, k] * down_e(silu(gate_e(x_t)) * up_e(x_t)) with e = idx[t, k]: the T*k (token, expert)
    pairs sorted by expert, three grouped matmuls, then gathered back and summed over k. x [T, D].

    samples: x's tokens are `samples` rows of T/samples tokens; then also returns, per expert and sample, the sums
    of squared inputs of gate/up ([E, samples, D]) and of down ([E, samples, I]) over the tokens routed there."""
    t, k = idx.shape
    n_exp = gate.shape[0]
    flat = idx.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    group_sizes = jnp.bincount(flat, length=n_exp).astype(jnp.int32)
    xs = x[order // k]
    h = swiglu(_grouped(xs, gate, group_sizes), _grouped(xs, up, group_sizes))
    ys = _grouped(h, down, group_sizes) * weights.reshape(-1)[order][:, None]
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(t * k, dtype=order.dtype))
    out = ys[inverse].reshape(t, k, -1).sum(axis=1)
    if samples is None:
        return out
    seg = flat[order] * samples + (order // k) // (t // samples)
    sums = lambda a: jax.ops.segment_sum(jnp.square(a.astype(jnp.float32)), seg, n_exp * samples).reshape(  # noqa
        n_exp, samples, -1)
    return out, sums(xs), sums(h)


def pairs_forward(x: jax.Array, weights: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array) -> jax.Array:
    """The same sum for few tokens (decode): one matvec per (token, slot) pair with that pair's expert weights
    (gate/up [T*k, I, D], down [T*k, D, I], gathered), no sort. x [T, D], weights [T, k]."""
    t, k = weights.shape
    xp = jnp.repeat(x, k, axis=0)  # pair p = (token p // k, slot p % k), as idx.reshape(-1)
    h = swiglu(mixed_einsum("pd,pid->pi", xp, gate), mixed_einsum("pd,pid->pi", xp, up))
    y = mixed_einsum("pi,pdi->pd", h, down) * weights.reshape(-1)[:, None]
    return y.reshape(t, k, -1).sum(axis=1)


class Experts(nnx.Module):
    """The experts' three projections, each stacked over experts (named as transformers names the module)."""

    def __init__(self, e: int, d: int, i: int, dtype):
        self.gate_proj = StackedLinear(FloatWeight(jnp.zeros((e, i, d), dtype)))
        self.up_proj = StackedLinear(FloatWeight(jnp.zeros((e, i, d), dtype)))
        self.down_proj = StackedLinear(FloatWeight(jnp.zeros((e, d, i), dtype)))


class SparseMoE(nnx.Module):
    """Router (mlp.gate, float), stacked experts (mlp.experts.{gate,up,down}_proj), optional shared expert."""

    def __init__(self, cfg, dtype, shared_expert: nnx.Module | None = None):
        e, d, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.num_experts, self.top_k, self.norm_topk_prob = e, cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.route_all = False  # set by the tuner for --moe_route_all_experts (calibration only)
        self.x2_in = self.x2_h = None  # ExpertSquaredInputs while opt-RTN collects the experts' imatrix
        self.gate = Linear(FloatWeight(jnp.zeros((e, d), dtype)))
        self.experts = Experts(e, d, i, dtype)
        self.shared_expert = shared_expert
        self.shared_expert_gate = (Linear(FloatWeight(jnp.zeros((1, d), dtype))) if shared_expert is not None
                                   else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        idx, w = route(self.gate(x2), self.top_k, self.norm_topk_prob, self.route_all)
        ex = self.experts
        if self.x2_in is None and x2.shape[0] * self.top_k < self.num_experts:  # decode: gather the k experts of each token
            flat = idx.reshape(-1)
            out = pairs_forward(x2, w, ex.gate_proj.selected_weight(flat), ex.up_proj.selected_weight(flat),
                                ex.down_proj.selected_weight(flat))
            return self._with_shared(out, x2).reshape(shape)
        weights = (ex.gate_proj.stacked_weight(), ex.up_proj.stacked_weight(), ex.down_proj.stacked_weight())
        if self.x2_in is None:
            out = experts_forward(x2, idx, w, *weights)
        else:  # [B, T, D] input: per-sample sums, as the dense probes record them
            out, self.x2_in[...], self.x2_h[...] = experts_forward(x2, idx, w, *weights, samples=shape[0])
        return self._with_shared(out, x2).reshape(shape)

    def _with_shared(self, out: jax.Array, x2: jax.Array) -> jax.Array:
        if self.shared_expert is not None:
            out = out + jax.nn.sigmoid(self.shared_expert_gate(x2)) * self.shared_expert(x2)
        return out


__all__ = ["ExpertSquaredInputs", "MixedExpertSchemes", "SparseMoE", "StackedLinear", "experts_forward",
           "pairs_forward", "route", "stack_leaves", "unstack_leaf"]
