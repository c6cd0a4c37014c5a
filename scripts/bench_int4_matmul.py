"""Benchmark int4 weight-only matmul: Pallas kernel vs XLA fallback vs bf16 dot.

For each layer (K, N) and M, times y = x @ W three ways: `int_matmul(...,
backend="pallas")`, `backend="xla"`, and `jnp.dot` with a bf16 W. Each jitted
call runs the op on R distinct (x, W) sets, so weights are not served from L2
and dispatch cost is spread over R ops; many calls are queued before one
`jax.block_until_ready`, and the median over reps is reported per op.
GB/s counts the bytes the op must move: packed words + scales + zeros + x + y.

usage: python scripts/bench_int4_matmul.py [--markdown PATH] [--quick]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels import PackedWeight, gpu, int_matmul, pallas_schedule, prepare  # noqa: E402

LAYERS = [(4096, 4096), (5120, 27648), (27648, 5120)]
MS = [1, 4, 16, 64, 256]
GROUP = 128
SET_BYTES = 256 * 2**20  # int4 bytes per call over all R sets: 5x the 50 MB L2
COPY_TBPS = 3.0          # measured H100 device-to-device copy rate


def make_weights(k: int, n: int, count: int, *, plane: int | None = None,
                 seed: int = 0) -> list[PackedWeight]:
  """`count` random int4 g128 asym weights, built through `prepare`."""
  ws = []
  for i in range(count):
    kq, ks, kz = jax.random.split(jax.random.key(seed + i), 3)
    qweight = jax.lax.bitcast_convert_type(jax.random.bits(kq, (k // 8, n), jnp.uint32), jnp.int32)
    scales = (jax.random.normal(ks, (k // GROUP, n)) * 0.01).astype(jnp.float16)
    zeros = jax.random.randint(kz, (k // GROUP, n), 0, 16)
    ws.append(prepare(qweight, scales, zeros, bits=4, group_size=GROUP, plane=plane))
  return ws


def make_xs(m: int, k: int, count: int, seed: int = 100) -> list[jax.Array]:
  return [jax.random.normal(jax.random.key(seed + i), (m, k), jnp.bfloat16)
          for i in range(count)]


def time_per_op(op: Callable, xs: list, ws: list, *, calls: int = 10, reps: int = 7) -> float:
  """Median µs per op over reps; each rep queues `calls` jitted R-op calls."""
  f = jax.jit(lambda xs, ws: [op(x, w) for x, w in zip(xs, ws)])
  jax.block_until_ready(f(xs, ws))
  jax.block_until_ready(f(xs, ws))
  samples = []
  for _ in range(reps):
    t0 = time.perf_counter()
    outs = [f(xs, ws) for _ in range(calls)]
    jax.block_until_ready(outs)
    samples.append((time.perf_counter() - t0) / (calls * len(xs)) * 1e6)
  return statistics.median(samples)


def weight_bytes(w: PackedWeight) -> int:
  return w.qweight.nbytes + w.scales.nbytes + w.zeros.nbytes


def bench_layer(k: int, n: int, ms: list[int], sets: int | None = None) -> list[dict]:
  ws = make_weights(k, n, 1)
  count = sets or max(2, -(-SET_BYTES // weight_bytes(ws[0])))
  ws += make_weights(k, n, count - 1, seed=1)
  dense = [jax.random.normal(jax.random.key(200 + i), (k, n), jnp.bfloat16) for i in range(count)]
  rows = []
  for m in ms:
    xs = make_xs(m, k, count)
    t_pallas = time_per_op(lambda x, w: int_matmul(x, w, backend="pallas"), xs, ws)
    t_xla = time_per_op(lambda x, w: int_matmul(x, w, backend="xla"), xs, ws)
    t_bf16 = time_per_op(lambda x, w: jnp.dot(x, w), xs, dense)
    moved = weight_bytes(ws[0]) + 2 * m * (k + n)
    cfg, _ = pallas_schedule(m, ws[0], jax.default_backend())
    auto = "xla" if gpu.prefer_xla(m, ws[0]) else "pallas"
    rows.append(dict(k=k, n=n, m=m, pallas=t_pallas, xla=t_xla, bf16=t_bf16,
                     gbps=moved / t_pallas / 1e3, cfg=cfg, auto=auto))
    print(format_row(rows[-1]), flush=True)
  del dense
  return rows


HEADER = ("| K x N | M | Pallas µs | GB/s | % of 3.0 TB/s | XLA µs | bf16 dot µs "
          "| vs bf16 | vs XLA | schedule | auto |\n|---|---|---|---|---|---|---|---|---|---|---|")


def format_row(r: dict) -> str:
  c = r["cfg"]
  sched = f"{c.kind} bm{c.block_m} bn{c.block_n} split{c.split_k}"
  return (f"| {r['k']}x{r['n']} | {r['m']} | {r['pallas']:.1f} | {r['gbps']:.0f} "
          f"| {r['gbps'] / (COPY_TBPS * 1e3) * 100:.0f}% | {r['xla']:.1f} | {r['bf16']:.1f} "
          f"| {r['bf16'] / r['pallas']:.2f}x | {r['xla'] / r['pallas']:.2f}x | {sched} "
          f"| {r['auto']} |")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--markdown", type=Path, help="also write the table here")
  parser.add_argument("--quick", action="store_true", help="first layer, M=1 and 64 only")
  args = parser.parse_args()
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}", flush=True)
  print(HEADER, flush=True)
  layers = LAYERS[:1] if args.quick else LAYERS
  rows = [r for k, n in layers for r in bench_layer(k, n, [1, 64] if args.quick else MS)]
  if args.markdown:
    args.markdown.write_text("\n".join([HEADER, *map(format_row, rows)]) + "\n")


if __name__ == "__main__":
  main()
