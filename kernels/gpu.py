"""GPU schedules for the Pallas kernel, lowered through the Triton backend.

Pallas' Triton backend is deprecated from JAX 0.11 in favour of Mosaic GPU but
still ships (0.11.2); its import is guarded so the module loads on any JAX.
Numbers behind the defaults: docs/benchmarks.md (H100).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax

from .layout import PackedWeight
from .pallas_kernel import KernelConfig, supports

try:
  from jax.experimental.pallas import triton as _triton
except ImportError:  # a JAX without the Triton backend
  _triton = None

GEMV_MAX_M = 2         # at most this many rows use the dot-free "gemv" kernel
MIN_TILE_K = 16        # tensor-core dots need K >= 16
DECODE_PROGRAMS = 1024  # programs wanted for M <= 16: many small K chunks in flight
GEMM_PROGRAMS_PER_SM = 2
_FALLBACK_SMS = 132    # H100 SXM


def available() -> bool:
  return _triton is not None


def _pow2_divisor(n: int, cap: int) -> int:
  """Largest power of two <= cap dividing n."""
  d = 1
  while d * 2 <= cap and n % (d * 2) == 0:
    d *= 2
  return d


def _num_sms() -> int:
  try:
    return int(jax.devices()[0].core_count) or _FALLBACK_SMS
  except (AttributeError, RuntimeError, TypeError):
    return _FALLBACK_SMS


def _split(w: PackedWeight, programs: int, target: int, rows: int) -> int:
  """Fewest K chunks (a divisor of the tile count) giving >= target programs.

  Capped so the f32 partials (split * rows * N * 4 bytes, written and read
  back) stay under a quarter of the packed weight bytes (k_pad * N * bits / 8).
  """
  tiles = w.k_pad // w.tile_k
  cap = max(1, w.k_pad * w.bits // (128 * rows))
  divisors = [s for s in range(1, tiles + 1) if tiles % s == 0 and s <= cap]
  return next((s for s in divisors if programs * s >= target), divisors[-1])


def choose(m: int, w: PackedWeight) -> tuple[KernelConfig, Any] | None:
  """(config, Triton compiler params) for an [m, K] x W product, or None.

  Measured on H100 (docs/benchmarks.md): up to M = 64 the work wants ~1000
  programs via split-K and 64-wide N blocks (32 for the gemv on short K); the
  dot-free "gemv" wins at M <= 2, a 16-row dot from M = 3; M > 64 wants
  128-row blocks and 8 warps.
  """
  if w.tile_k < MIN_TILE_K:
    return None
  tiles = w.k_pad // w.tile_k
  if m <= GEMV_MAX_M:
    kind, block_m = "gemv", 1 << (m - 1).bit_length()
    # Narrower N blocks when K is too short to split into >= 4 tiles per program.
    block_n = 64 if w.n // 64 * tiles >= 4 * DECODE_PROGRAMS else 32
    warps, target = 4, DECODE_PROGRAMS
  elif m <= 64:
    kind, block_m, block_n, warps, target = "gemm", 16 if m <= 16 else 64, 64, 4, DECODE_PROGRAMS
  else:
    kind, block_m, block_n, warps = "gemm", 128, 64, 8
    target = GEMM_PROGRAMS_PER_SM * _num_sms()
  block_n = _pow2_divisor(w.n, block_n)
  if block_n < 16:
    return None
  rows = -(-m // block_m) * block_m
  cfg = KernelConfig(kind=kind, block_m=block_m, block_n=block_n,
                     split_k=_split(w, rows // block_m * (w.n // block_n), target, rows))
  if not supports(w, cfg):
    return None
  return cfg, compiler_params(warps, 3)


def prefer_xla(m: int, w: PackedWeight) -> bool:
  """Whether "auto" should skip the kernel: large, compute-bound products.

  Past M ~ 128 a big layer is compute-bound; one dequant pass plus a cuBLAS
  bf16 GEMM (the XLA path) then beats dequantizing inside the Triton K loop
  (H100, M = 256: 0.61x on 27648x5120, 1.02x on 5120x27648, 1.16x on 4096^2).
  """
  return m > 128 and w.k * w.n >= 2**26


def compiler_params(num_warps: int, num_stages: int) -> Any:
  return _triton.CompilerParams(num_warps=num_warps, num_stages=num_stages) if _triton else None


def variants(m: int, w: PackedWeight) -> list[tuple[str, KernelConfig, Any]]:
  """Named (config, compiler params) candidates around `choose`'s pick, for benchmark sweeps.

  The first entry is `choose` itself ("default"); the others change one knob each: split-K doubled or halved,
  N blocks twice as wide, two tiles' loads in flight (`prefetch=2`), 8 warps, and at M <= 2 the 16-row dot path
  instead of the dot-free gemv. Each is kept only if it tiles the weight (`supports`); none is used by
  `int_matmul` unless `choose` is changed to pick it.
  """
  base = choose(m, w)
  if base is None:
    return []
  cfg, params = base
  warps = 8 if m > 64 else 4
  tiles = w.k_pad // w.tile_k
  out = [("default", cfg, params)]

  def add(name, c, p=params):
    if supports(w, c) and c.block_n >= 16 and all(c != o[1] or p != o[2] for o in out):
      out.append((name, c, p))

  if tiles % (cfg.split_k * 2) == 0:
    add(f"split{cfg.split_k * 2}", dataclasses.replace(cfg, split_k=cfg.split_k * 2))
  if cfg.split_k > 1:
    add(f"split{cfg.split_k // 2}", dataclasses.replace(cfg, split_k=cfg.split_k // 2))
  if w.n % (cfg.block_n * 2) == 0:
    add(f"bn{cfg.block_n * 2}", dataclasses.replace(cfg, block_n=cfg.block_n * 2))
  add("prefetch2", dataclasses.replace(cfg, prefetch=2))
  add("warps8" if warps != 8 else "warps4", cfg, compiler_params(4 if warps == 8 else 8, 3))
  if cfg.kind == "gemv":
    add("gemm bm16", dataclasses.replace(cfg, kind="gemm", block_m=16))
  return out
