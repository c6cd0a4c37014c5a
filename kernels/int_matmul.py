"""`int_matmul`: weight-only int matmul with backend dispatch."""
from __future__ import annotations

from typing import Any, Literal

import jax

from . import gpu, tpu
from .layout import PackedWeight
from .pallas_kernel import KernelConfig, pallas_matmul
from .xla import xla_matmul

Backend = Literal["auto", "xla", "pallas"]


def pallas_schedule(m: int, w: PackedWeight, platform: str) -> tuple[KernelConfig, Any] | None:
  """The Pallas schedule for this platform and shape, or None if unsupported.

  CPU has no compiled Pallas backend: it runs the GPU schedule in interpret mode.
  """
  if platform == "tpu":
    return tpu.choose(m, w)
  return gpu.choose(m, w)


def int_matmul(x: jax.Array, w: PackedWeight, *, backend: Backend = "auto",
               interpret: bool | None = None) -> jax.Array:
  """y [..., N] = x [..., K] @ dequantize(w), in x's dtype (f32 accumulation).

  backend: "xla" (unpack + dequant + contract in XLA), "pallas" (the Pallas
  kernel; raises if the shape is unsupported), "auto" (Pallas on GPU / TPU when
  supported and not a large compute-bound product on GPU, see
  `gpu.prefer_xla`; else XLA). interpret: run Pallas in interpret mode; default: on
  CPU only.
  """
  platform = jax.default_backend()
  lead, k = x.shape[:-1], x.shape[-1]
  x2 = x.reshape(-1, k)
  schedule = None
  if backend == "pallas" or (backend == "auto" and platform in ("gpu", "tpu")):
    schedule = pallas_schedule(x2.shape[0], w, platform)
    if schedule is None and backend == "pallas":
      raise ValueError(f"no Pallas schedule for M={x2.shape[0]} K={w.k} N={w.n} "
                       f"plane={w.plane} on {platform}")
    if platform == "gpu" and backend == "auto" and (
        not gpu.available() or gpu.prefer_xla(x2.shape[0], w)):
      schedule = None
  elif backend not in ("auto", "xla"):
    raise ValueError(f"unknown backend {backend!r}")
  if schedule is None:
    y = xla_matmul(x2, w)
  else:
    cfg, params = schedule
    if interpret is None:
      interpret = platform == "cpu"
    y = pallas_matmul(x2, w, cfg, compiler_params=None if interpret else params,
                      interpret=interpret)
  return y.reshape(*lead, w.n)
