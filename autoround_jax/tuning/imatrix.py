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


@functools.partial(jax.jit, static_argnames=("graphdef", "names"))
def _apply_probed(graphdef, state, x, cos, sin, mask, *, names):
    block = nnx.merge(graphdef, state)
    y = block(x, cos, sin, mask)[0]
    return y, {n: module_at(block, n).weight.x2[...] for n in names}


def collect_block_imatrix(
    block: nnx.Module, names: list[str], x: jax.Array, cos, sin, mask, batch_size: int
) -> tuple[jax.Array, dict[str, np.ndarray]]:
    """Run block(x) over [n, T, D] in batch_size chunks; returns (output, {linear name: sum of x^2 [K] over all
    samples and tokens}). Divide by n for the reference's imatrix. The block is left as it was."""
    names = tuple(names)
    inner = {n: module_at(block, n).weight for n in names}
    for n in names:
        module_at(block, n).weight = ImatrixProbe(inner[n], batch_size)
    try:
        graphdef, state = nnx.split(block)
        total = {n: jnp.zeros((module_at(block, n).weight.shape[1],), jnp.float32) for n in names}
        outs = []
        for chunk, valid in padded_chunks(x, batch_size):  # the padded rows are not counted
            y, sums = _apply_probed(graphdef, state, chunk, cos, sin, mask, names=names)
            outs.append(y[:valid])
            for n in names:
                total[n] = total[n] + jnp.sum(sums[n][:valid], axis=0)
    finally:
        for n in names:
            module_at(block, n).weight = inner[n]
    return jnp.concatenate(outs), {n: np.asarray(v) for n, v in total.items()}
