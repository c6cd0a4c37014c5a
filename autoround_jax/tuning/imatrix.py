"""Imatrix collection for opt-RTN: per quantized linear, the mean over calibration samples of sum_t x_t^2.

The reference (algorithms/quantization/rtn/quantizer.py::OptimizedRTNQuantizer) hooks every quantized Linear while
the float block runs on its float inputs, adds sum(x^2) over all tokens in fp32 for each batch, counts samples
(input.shape[0]) and divides once at the end: imatrix[k] = sum_{samples, tokens} x[k]^2 / nsamples. The block inputs
are the float model's hidden states (opt-RTN feeds each block the previous float block's output, not the quantized
one). Here a probe leaf wraps the weight of each linear and sows each sample's sums; padded rows of the last batch
are dropped before adding.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..models.moe import ExpertSquaredInputs
from ..models.params_table import module_at
from .signround import padded_chunks


class SquaredInputs(nnx.Variable):
    """Per-sample sum over tokens of x^2 [B, K] (fp32), overwritten by each forward."""


class ImatrixProbe(nnx.Module):
    """A weight leaf that computes exactly as the leaf it wraps and records, per sample, sum over tokens of x^2."""

    def __init__(self, inner: nnx.Module, batch_size: int):
        self.inner = inner
        self.x2 = SquaredInputs(jnp.zeros((batch_size, inner.shape[1]), jnp.float32))

    @property
    def shape(self) -> tuple[int, int]:
        return self.inner.shape

    def dequantize(self) -> jax.Array:
        return self.inner.dequantize()

    def __call__(self, x: jax.Array) -> jax.Array:
        sq = jnp.square(x.astype(jnp.float32))  # the reference upcasts the input to fp32 before squaring
        self.x2[...] = jnp.sum(sq, axis=tuple(range(1, x.ndim - 1)))  # [B, K]
        return self.inner(x)


@functools.partial(jax.jit, static_argnames=("graphdef", "names", "moe"))
def _apply_probed(graphdef, state, x, cos, sin, mask, *, names, moe=False):
    block = nnx.merge(graphdef, state)
    y = block(x, cos, sin, mask)[0]
    sums = {n: module_at(block, n).weight.x2[...] for n in names}
    if moe:  # the experts' per-(expert, sample) sums, recorded by the sparse MLP itself (models/moe.py)
        sums.update({"mlp.experts:in": block.mlp.x2_in[...], "mlp.experts:h": block.mlp.x2_h[...]})
    return y, sums


def _expert_sums(sums: dict, names: list[str]) -> dict:
    """{'mlp.experts.E.gate_proj': [K]} from the sparse MLP's [E, K] totals (gate/up read x, down reads h)."""
    out = {}
    for n in names:
        e, lin = n.split(".")[2:4]
        out[n] = sums["mlp.experts:h" if lin == "down_proj" else "mlp.experts:in"][int(e)]
    return out


def collect_block_imatrix(
    block: nnx.Module, names: list[str], x: jax.Array, cos, sin, mask, batch_size: int
) -> tuple[jax.Array, dict[str, np.ndarray]]:
    """Run block(x) over [n, T, D] in batch_size chunks; returns (output, {linear name: sum of x^2 [K] over all
    samples and tokens}). Divide by n for the reference's imatrix. The block is left as it was."""
    experts = [n for n in names if n.startswith("mlp.experts.")]  # MoE: stacked, probed by the sparse MLP
    names = tuple(n for n in names if n not in experts)
    inner = {n: module_at(block, n).weight for n in names}
    for n in names:
        module_at(block, n).weight = ImatrixProbe(inner[n], batch_size)
    if experts:
        mlp = block.mlp
        (n_exp, i, d) = mlp.experts.gate_proj.stacked_weight().shape
        mlp.x2_in = nnx.data(ExpertSquaredInputs(jnp.zeros((n_exp, batch_size, d), jnp.float32)))
        mlp.x2_h = nnx.data(ExpertSquaredInputs(jnp.zeros((n_exp, batch_size, i), jnp.float32)))
    try:
        graphdef, state = nnx.split(block)
        total = {n: jnp.zeros((module_at(block, n).weight.shape[1],), jnp.float32) for n in names}
        outs = []
        for chunk, valid in padded_chunks(x, batch_size):  # the padded rows are not counted
            y, sums = _apply_probed(graphdef, state, chunk, cos, sin, mask, names=names, moe=bool(experts))
            outs.append(y[:valid])
            for n, v in sums.items():
                total[n] = total.get(n, 0) + jnp.sum(v[:valid] if v.ndim == 2 else v[:, :valid], axis=-2)
    finally:
        for n in names:
            module_at(block, n).weight = inner[n]
        if experts:
            block.mlp.x2_in = block.mlp.x2_h = None
    total.update(_expert_sums(total, experts))
    return jnp.concatenate(outs), {n: np.asarray(total[n]) for n in (*names, *experts)}
