"""Portable fallback: unpack + dequantize in XLA, then contract.

Two formulations, picked by M. For decode-sized M a multiply-reduce lets XLA
fuse the unpack and dequant into the reduction's input, so only the packed
words are read from memory. For larger M the dequantized W (in x's dtype)
feeds a regular dot, where XLA may fuse the dequant into its GEMM or else
materializes W once.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from .layout import PackedWeight, dequantize

# Largest M served by the multiply-reduce form (it redoes the dequant per row), on GPUs only.
# H100, 5120x27648: M=1 reduce 218 µs vs dot 247 µs; M=4 reduce 732 µs vs dot 270 µs.
# On a CPU XLA does not vectorize that reduction: at M=1, 512x1536, it took 15.1 ms against 0.64 ms for the
# dequant + dot form (2-core EPYC, jax 0.10.2), and 382 ms against 39 ms on 2048x8192; the outputs are equal.
REDUCE_MAX_M = 1


def xla_matmul(x: jax.Array, w: PackedWeight, *, reduce_max_m: int | None = None) -> jax.Array:
  """y [M, N] = x [M, K] @ W, in x's dtype with f32 accumulation.

  reduce_max_m: rows up to which the multiply-reduce form is used; default REDUCE_MAX_M on GPU, 0 elsewhere.
  """
  if reduce_max_m is None:
    reduce_max_m = REDUCE_MAX_M if jax.default_backend() == "gpu" else 0
  if x.shape[0] <= reduce_max_m:
    wf = dequantize(w, jnp.float32)
    y = jnp.sum(x.astype(jnp.float32)[:, :, None] * wf[None], axis=1)
  else:
    y = jnp.dot(x, dequantize(w, x.dtype), preferred_element_type=jnp.float32)
  return y.astype(x.dtype)
