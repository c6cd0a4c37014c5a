"""The packed-int weight leaf: a Linear's weight held as GPTQ-packed integer codes, for inference.

It stands in for FloatWeight inside a Linear (`__call__(x) -> x @ W.T`, `shape`, `dequantize()`), so a model
loaded from an auto_round / GPTQ / AWQ checkpoint keeps its weights at b bits per value in memory.

W[n, k] = fp16((q[k, n] - zero[k // G, n]) * scale[k // G, n]): the product is rounded to float16 before the
cast to the activation dtype, exactly as the reference's torch QuantLinear computes it.

When the `kernels` package (Pallas int matmul with an XLA fallback) is importable, the leaf stores its weights in
that package's layout and calls `kernels.int_matmul`, which multiplies in float32 without the float16 rounding (a
difference below one fp16 ulp of W); otherwise, and for 3-bit weights, which the kernels do not take, it keeps the
GPTQ arrays and dequantizes with jnp before a plain matmul.
"""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .pack import pack_rows, unpack_rows
from .qdq import QuantizedWeight, dequantize_codes, group_len

BACKENDS = ("auto", "pallas", "xla")


class Packed(nnx.Variable):
    """Packed words, scales and zeros: constants, never trained."""


def _kernels(bits: int):
    """The kernels package if it is importable and takes this bit width, else None."""
    try:
        kernels = importlib.import_module("autoround_jax.kernels.api")
    except ImportError:
        return None
    if not (hasattr(kernels, "prepare") and hasattr(kernels, "int_matmul")):
        return None
    return kernels if bits in getattr(getattr(kernels, "layout", None), "SUPPORTED_BITS", (2, 4, 8)) else None


class PackedWeight(nnx.Module):
    """x @ W.T with W [N, K] stored as packed b-bit codes, fp16 scales and integer zero points per group."""

    def __init__(self, qweight, scales, zeros, *, bits: int, group_size: int, backend: str = "auto"):
        """qweight: int32 [K*bits/32, N] (GPTQ layout, packed along K); scales: [ceil(K/G), N] (float16);
        zeros: raw integer zero points [ceil(K/G), N] (not GPTQ's zero - 1)."""
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}: use one of {', '.join(BACKENDS)}")
        self.bits, self.group_size, self.backend = bits, group_size, backend
        self.in_features, self.out_features = qweight.shape[0] * 32 // bits, qweight.shape[1]
        kernels = _kernels(bits)
        if kernels is None and backend == "pallas":
            raise ValueError(f"backend 'pallas' needs the kernels package with {bits}-bit support: use 'auto' or 'xla'")
        self.use_kernels = kernels is not None
        if self.use_kernels:
            p = kernels.prepare(jnp.asarray(qweight), jnp.asarray(scales), jnp.asarray(zeros), bits=bits,
                                group_size=group_size)
            self.plane, self.kernel_group = p.plane, p.group_size
            qweight, scales, zeros = p.qweight, p.scales, p.zeros
        self.qweight = Packed(jnp.asarray(qweight))
        self.scales = Packed(jnp.asarray(scales))
        self.zeros = Packed(jnp.asarray(zeros) if self.use_kernels else jnp.asarray(zeros, jnp.uint8))

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, backend: str = "auto") -> "PackedWeight":
        """From integer codes [N, K], scales [N, ng] and raw zeros [N, ng] (the exporter's convention)."""
        return cls(pack_rows(np.asarray(qw.codes).T, qw.bits), np.asarray(qw.scales).T,
                   np.asarray(qw.zeros).T.astype(np.uint8), bits=qw.bits, group_size=qw.group_size, backend=backend)

    @property
    def shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    def _kernel_weight(self):
        kernels = importlib.import_module("autoround_jax.kernels.api")
        return kernels.PackedWeight(self.qweight[...], self.scales[...], self.zeros[...], bits=self.bits,
                                    group_size=self.kernel_group, k=self.in_features,
                                    n=self.out_features, plane=self.plane)

    def _codes_scales_zeros(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Codes [K, N] and the per-group scales and zeros [ng, N], whatever the storage layout."""
        ng = -(-self.in_features // group_len(self.in_features, self.group_size))
        if self.use_kernels:
            codes = importlib.import_module("autoround_jax.kernels.api").unpack_codes(self._kernel_weight())[: self.in_features]
        else:
            codes = unpack_rows(self.qweight[...], self.bits)
        return codes, self.scales[...][:ng], self.zeros[...][:ng]

    def dequantize_kn(self) -> jax.Array:
        """W.T [K, N] in float16."""
        return dequantize_codes(*self._codes_scales_zeros(), self.group_size, axis=0).astype(jnp.float16)

    def dequantize(self) -> jax.Array:
        """W [N, K] in float16 (HF layout, like FloatWeight.dequantize)."""
        return self.dequantize_kn().T

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.use_kernels:
            kernels = importlib.import_module("autoround_jax.kernels.api")
            return kernels.int_matmul(x, self._kernel_weight(), backend=self.backend)
        return jnp.einsum("...k,kn->...n", x, self.dequantize_kn().astype(x.dtype))
