"""Scratch: sweep Pallas schedules on the GPU (temporary, not part of the deliverable)."""
import sys, warnings, time, os
warnings.simplefilter("ignore")
sys.path.insert(0, "scripts"); sys.path.insert(0, ".")
import jax, jax.numpy as jnp
import bench_int4_matmul as b
from kernels import KernelConfig, pallas_matmul, xla_matmul
from kernels.gpu import compiler_params

def v(kind, bm, bn, split, warps=4, stages=3, dq="magic", plane=None):
  return dict(kind=kind, bm=bm, bn=bn, split=split, warps=warps, stages=stages, dq=dq, plane=plane)

def measure(label, op, xs, ws, moved):
  try:
    t = b.time_per_op(op, xs, ws, calls=5, reps=5)
    print(f"{label:60s} {t:9.2f} us {moved / t / 1e3:7.0f} GB/s", flush=True)
    return t
  except Exception as e:
    print(f"{label:60s} ERR {type(e).__name__}: {str(e)[:200]!r}", flush=True)

def sweep(k, n, count, plan, baselines=True):
  wsets = {None: b.make_weights(k, n, count)}
  for m, variants in plan.items():
    xs = b.make_xs(m, k, count)
    moved = b.weight_bytes(wsets[None][0]) + 2 * m * (k + n)
    if baselines:
      dense = [jax.random.normal(jax.random.key(200 + i), (k, n), jnp.bfloat16) for i in range(count)]
      measure(f"{k}x{n} M={m} bf16 dot", lambda x, w: jnp.dot(x, w), xs, dense, moved)
      del dense
      measure(f"{k}x{n} M={m} xla reduce", lambda x, w: xla_matmul(x, w, reduce_max_m=10**9), xs, wsets[None], moved)
      measure(f"{k}x{n} M={m} xla dot", lambda x, w: xla_matmul(x, w, reduce_max_m=0), xs, wsets[None], moved)
    for p in variants:
      if p["plane"] not in wsets:
        wsets[p["plane"]] = b.make_weights(k, n, count, plane=p["plane"])
      cfg = KernelConfig(kind=p["kind"], block_m=p["bm"], block_n=p["bn"], split_k=p["split"], dequant=p["dq"])
      params = compiler_params(p["warps"], p["stages"])
      label = f"{k}x{n} M={m} " + " ".join(f"{a}={c}" for a, c in p.items() if c is not None)
      measure(label, lambda x, w, cfg=cfg, params=params: pallas_matmul(x, w, cfg, compiler_params=params),
              xs, wsets[p["plane"]], moved)

print(jax.__version__, jax.devices()[0].device_kind, getattr(jax.devices()[0], "core_count", None), flush=True)
which = sys.argv[1] if len(sys.argv) > 1 else "A"
if which == "A":
  sweep(5120, 27648, 4, {
    1: [v("gemv", 1, 128, 4), v("gemv", 1, 128, 1), v("gemv", 1, 128, 2), v("gemv", 1, 128, 5), v("gemv", 1, 128, 10),
        v("gemv", 1, 64, 4), v("gemv", 1, 256, 2), v("gemv", 1, 128, 4, warps=2), v("gemv", 1, 128, 4, warps=8),
        v("gemv", 1, 128, 4, stages=1), v("gemv", 1, 128, 4, stages=2), v("gemv", 1, 128, 4, stages=4),
        v("gemv", 1, 128, 4, dq="convert"), v("gemv", 1, 128, 2, plane=64), v("gemv", 1, 128, 5, plane=64),
        v("gemv", 1, 128, 5, plane=128), v("gemm", 16, 128, 4), v("gemm", 16, 64, 4), v("gemm", 16, 128, 4, dq="convert")],
    4: [v("gemv", 4, 128, 4), v("gemv", 4, 128, 4, warps=8), v("gemv", 4, 64, 4), v("gemm", 16, 128, 4), v("gemm", 16, 128, 2)],
    16: [v("gemm", 16, 128, 1), v("gemm", 16, 128, 2), v("gemm", 16, 128, 4), v("gemm", 16, 64, 2), v("gemm", 16, 256, 1, warps=8),
         v("gemm", 16, 128, 4, stages=4), v("gemm", 16, 128, 4, warps=8)],
    64: [v("gemm", 64, 128, 1), v("gemm", 64, 128, 2), v("gemm", 64, 128, 1, warps=8), v("gemm", 32, 128, 1),
         v("gemm", 16, 128, 1), v("gemm", 64, 64, 1), v("gemm", 64, 256, 1, warps=8)],
    256: [v("gemm", 128, 128, 1, warps=8), v("gemm", 128, 128, 1, warps=4), v("gemm", 64, 128, 1), v("gemm", 128, 256, 1, warps=8),
          v("gemm", 64, 256, 1, warps=8), v("gemm", 128, 128, 1, warps=8, stages=4)],
  })
if which in ("A", "B"):
  sweep(4096, 4096, 12, {
    1: [v("gemv", 1, 128, 2), v("gemv", 1, 128, 4), v("gemv", 1, 128, 8), v("gemv", 1, 128, 16), v("gemv", 1, 64, 8)],
    16: [v("gemm", 16, 128, 4), v("gemm", 16, 128, 8), v("gemm", 16, 64, 4)],
    256: [v("gemm", 128, 128, 1, warps=8), v("gemm", 64, 128, 1), v("gemm", 64, 128, 2)],
  })
  sweep(27648, 5120, 4, {
    1: [v("gemv", 1, 128, 6), v("gemv", 1, 128, 12), v("gemv", 1, 128, 27), v("gemv", 1, 64, 12), v("gemv", 1, 128, 54)],
    16: [v("gemm", 16, 128, 6), v("gemm", 16, 128, 12), v("gemm", 16, 64, 12)],
    256: [v("gemm", 128, 128, 1, warps=8), v("gemm", 128, 128, 3, warps=8), v("gemm", 64, 128, 2)],
  })
