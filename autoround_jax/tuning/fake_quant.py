"""The fake-quant weight leaf: a float weight plus trainable rounding offset V and min/max clip scales.

It is a drop-in replacement for FloatWeight inside a Linear, so block code is unchanged while tuning. Variable
types separate what the optimizer trains (Rounding, ClipScale) from constants (Frozen).
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
from flax import nnx

from ..models.precision import linear
from ..quant.scheme import LayerScheme
from ..quant.qdq import (MINMAX_SCALE_BOUND, QuantizedWeight, group_len, minmax_init, num_groups, qdq,
                         quantize_to_codes)


class Frozen(nnx.Variable):
    """A constant carried by a module: never differentiated, never updated."""


class Rounding(nnx.Param):
    """V, the per-weight rounding offset (init 0), trained with lr."""


class ClipScale(nnx.Param):
    """min/max clip scales per group (init 1, kept in [0, 1] by default), trained with minmax_lr."""


class FakeQuantWeight(nnx.Module):
    """x @ qdq(W, V, min_scale, max_scale).T, differentiable in V and the clip scales."""

    def __init__(self, w: jax.Array, scheme: LayerScheme, scale_dtype=jnp.float16, tune_minmax: bool = True,
                 clip_range: tuple[float, float] = MINMAX_SCALE_BOUND, clip_init: float = 1.0,
                 init_scale: jax.Array | None = None):
        """clip_range, clip_init: the clip scales' value range and initial value (tuning/recipes.py); init_scale
        [N*ng]: SignRoundV2's searched sym scale (the scale is then init_scale x max_scale)."""
        n, k = w.shape
        rows = n * num_groups(k, scheme.group_size)
        wmin0, wmax0 = minmax_init(w, scheme.group_size)
        self.w = Frozen(w)
        self.wmin0, self.wmax0 = Frozen(wmin0), Frozen(wmax0)
        self.v = Rounding(jnp.zeros((rows, group_len(k, scheme.group_size)), jnp.float32))
        scale_var = ClipScale if tune_minmax else Frozen
        self.min_scale = scale_var(jnp.full((rows,), clip_init, jnp.float32))
        self.max_scale = scale_var(jnp.full((rows,), clip_init, jnp.float32))
        self.init_scale = None if init_scale is None else Frozen(jnp.asarray(init_scale, jnp.float32))
        self.clip_range = tuple(float(b) for b in clip_range)
        self.scheme = scheme
        self.scale_dtype = jnp.dtype(scale_dtype)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.w.shape)

    def _args(self):
        s = self.scheme
        return (self.w[...], self.v[...], self.min_scale[...], self.max_scale[...]), dict(
            bits=s.bits, group_size=s.group_size, sym=s.sym, scale_dtype=self.scale_dtype,
            wmin0=self.wmin0[...], wmax0=self.wmax0[...], minmax_bound=self.clip_range,
            init_scale=None if self.init_scale is None else self.init_scale[...],
        )

    def dequantize(self) -> jax.Array:
        args, kw = self._args()
        return qdq(*args, **kw)[0]

    def quantized(self) -> QuantizedWeight:
        """Integer codes, scales and zeros of the current parameters (what the exporters pack)."""
        args, kw = self._args()
        return quantize_to_codes(*args, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return linear(x, self.dequantize())  # qdq in fp32; bf16 operands only inside the dot under amp
