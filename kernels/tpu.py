"""TPU schedules for the Pallas kernel (Mosaic TPU).

Weights stay packed in int32 words (Mosaic has no int4 dtype) and are unpacked
on the VPU; slabs feed the MXU as bf16. Decode takes all of K in one block;
larger M accumulates K chunks into a resident f32 output block.
Not yet run on TPU hardware: only its interpret-mode semantics are tested.
"""
from __future__ import annotations

from typing import Any

from jax.experimental.pallas import tpu as pltpu

from .layout import PackedWeight
from .pallas_kernel import KernelConfig, supports

LANES = 128
VMEM_LIMIT = 64 * 1024 * 1024
X_BLOCK_BYTES = 4 * 1024 * 1024  # cap on the [block_m, K chunk] activation block


def choose(m: int, w: PackedWeight) -> tuple[KernelConfig, Any] | None:
  """(config, Mosaic compiler params) for an [m, K] x W product, or None."""
  if w.tile_k % LANES or w.plane % 8 or w.n % LANES:
    return None
  block_m = min(256, -(-m // 8) * 8)
  block_n = 256 if w.n % 256 == 0 else LANES
  tiles = w.k_pad // w.tile_k
  split = next(s for s in range(1, tiles + 1)
               if tiles % s == 0 and block_m * w.k_pad // s * 2 <= X_BLOCK_BYTES
               or s == tiles)
  cfg = KernelConfig(kind="gemm", block_m=block_m, block_n=block_n, split_k=split,
                     split_mode="revisit")
  if not supports(w, cfg):
    return None
  params = pltpu.CompilerParams(
      dimension_semantics=("parallel", "parallel", "arbitrary"),
      vmem_limit_bytes=VMEM_LIMIT)
  return cfg, params
