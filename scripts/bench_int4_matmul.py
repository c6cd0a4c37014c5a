"""Benchmark int4 weight-only matmul: Pallas kernel vs XLA fallback vs bf16 dot.

For each layer (K, N) and M, times y = x @ W three ways: `int_matmul(...,
backend="pallas")`, `backend="xla"`, and `jnp.dot` with a bf16 W. Each jitted
call runs the op on R distinct (x, W) sets, so weights are not served from L2
and dispatch cost is spread over R ops; many calls are queued before one
`jax.block_until_ready`, and the median over reps is reported per op.
GB/s counts the bytes the op must move: packed words + scales + zeros + x + y.
The reference rate is the device-to-device copy rate measured at the start
(bytes read + written; `--copy_tbps` overrides it).

Every timed Pallas configuration is first checked against an f32 product of
the same x and the dequantized W (column "rel err": ||y - ref|| / ||ref||; a
bf16 output lands near 2e-3, NaN or > 1e-2 means wrong).

`--variants` also sweeps `kernels.gpu.variants` (split-K, N block width,
prefetch depth, warps, gemv vs dot) at each shape, one row per variant.
`--dry_run` runs tiny shapes once each (Pallas in interpret mode on a CPU):
it proves the script, not the kernel's speed.

usage: python scripts/bench_int4_matmul.py [--markdown PATH] [--quick] [--variants]
       [--layers 5120x27648,...] [--ms 1,4] [--budget_s S] [--dry_run]
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
from autoround_jax.kernels.api import PackedWeight, dequantize, gpu, int_matmul, pallas_matmul, pallas_schedule, prepare  # noqa: E402

LAYERS = [(4096, 4096), (5120, 27648), (27648, 5120)]
MS = [1, 4, 16, 64, 256]
DRY_LAYERS = [(512, 256), (256, 512)]
DRY_MS = [1, 4]
GROUP = 128
SET_BYTES = 256 * 2**20  # int4 bytes per call over all R sets: 5x the 50 MB L2
COPY_TBPS = 3.0          # H100 device-to-device copy rate measured in an earlier session (fallback only)


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


def time_op(op: Callable, xs: list, ws: list, *, calls: int = 10,
            reps: int = 7) -> tuple[float, jax.Array]:
  """(median µs per op over reps, the op's output on the first set); each rep queues `calls` jitted R-op calls."""
  f = jax.jit(lambda xs, ws: [op(x, w) for x, w in zip(xs, ws)])
  first = f(xs, ws)[0]
  jax.block_until_ready(first)
  jax.block_until_ready(f(xs, ws))
  samples = []
  for _ in range(reps):
    t0 = time.perf_counter()
    outs = [f(xs, ws) for _ in range(calls)]
    jax.block_until_ready(outs)
    samples.append((time.perf_counter() - t0) / (calls * len(xs)) * 1e6)
  return statistics.median(samples), first


def time_per_op(op: Callable, xs: list, ws: list, *, calls: int = 10, reps: int = 7) -> float:
  """Median µs per op (see time_op)."""
  return time_op(op, xs, ws, calls=calls, reps=reps)[0]


def copy_tbps(nbytes: int = 2**30, reps: int = 7, calls: int = 10) -> float:
  """Device-to-device copy rate in TB/s, counting bytes read plus bytes written: `calls` queued passes over an
  nbytes buffer per rep, median of reps."""
  n = max(1, nbytes // 4)
  a = jnp.arange(n, dtype=jnp.int32)
  f = jax.jit(lambda a: a ^ 1)  # one read and one write of every word; not elided like a plain copy
  jax.block_until_ready(f(a))
  samples = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready([f(a) for _ in range(calls)])
    samples.append((time.perf_counter() - t0) / calls)
  del a
  return 2 * n * 4 / statistics.median(samples) / 1e12


def weight_bytes(w: PackedWeight) -> int:
  return w.qweight.nbytes + w.scales.nbytes + w.zeros.nbytes


def rel_err(y: jax.Array, ref: jax.Array) -> float:
  y, ref = y.astype(jnp.float32), ref.astype(jnp.float32)
  return float(jnp.linalg.norm(y - ref) / jnp.maximum(jnp.linalg.norm(ref), 1e-30))


def _sched(cfg, params) -> str:
  warps = getattr(params, "num_warps", None)
  extra = (f" pf{cfg.prefetch}" if cfg.prefetch > 1 else "") + (f" w{warps}" if warps else "")
  return f"{cfg.kind} bm{cfg.block_m} bn{cfg.block_n} split{cfg.split_k}{extra}"


def bench_layer(k: int, n: int, ms: list[int], sets: int | None = None, *, variants: bool = False,
                skip: tuple[str, ...] = (), calls: int = 10, reps: int = 7, copy: float = COPY_TBPS,
                emit: Callable[[dict], None] | None = None, deadline: float | None = None,
                baselines: dict | None = None) -> list[dict]:
  """Rows for one layer; `emit` gets each row as soon as it is measured. Past `deadline` (time.monotonic()),
  no new measurement starts. `skip`: variant names not to time; `baselines`: a dict shared between calls that
  caches the XLA and bf16 timings per (K, N, M), so a second pass over the same shape times only the kernels."""
  interpret = jax.default_backend() == "cpu"
  ws = make_weights(k, n, 1)
  count = sets or max(2, -(-SET_BYTES // weight_bytes(ws[0])))
  ws += make_weights(k, n, count - 1, seed=1)
  cache = {} if baselines is None else baselines
  dense = None
  rows = []
  for m in ms:
    if deadline is not None and time.monotonic() > deadline:
      break
    xs = make_xs(m, k, count)
    ref = jnp.dot(xs[0].astype(jnp.float32), dequantize(ws[0], jnp.float32), precision=jax.lax.Precision.HIGHEST)
    if (k, n, m) not in cache:
      if dense is None:
        dense = [jax.random.normal(jax.random.key(200 + i), (k, n), jnp.bfloat16) for i in range(count)]
      t_xla, y_xla = time_op(lambda x, w: int_matmul(x, w, backend="xla"), xs, ws, calls=calls, reps=reps)
      t_bf16, _ = time_op(lambda x, w: jnp.dot(x, w), xs, dense, calls=calls, reps=reps)
      cache[(k, n, m)] = (t_xla, t_bf16, rel_err(y_xla, ref))
    t_xla, t_bf16, xla_err = cache[(k, n, m)]
    moved = weight_bytes(ws[0]) + 2 * m * (k + n)
    auto = "xla" if gpu.prefer_xla(m, ws[0]) else "pallas"
    if variants:
      cands = gpu.variants(m, ws[0])
    else:
      sched = pallas_schedule(m, ws[0], jax.default_backend())
      cands = [("default", *sched)] if sched else []
    if not cands:
      print(f"  {k}x{n} M={m}: no Pallas schedule on {jax.default_backend()}", flush=True)
    for name, cfg, params in [c for c in cands if c[0] not in skip]:
      if deadline is not None and time.monotonic() > deadline and rows and rows[-1]["m"] == m:
        break
      p = None if interpret else params

      def op(x, w, cfg=cfg, p=p):
        return pallas_matmul(x, w, cfg, compiler_params=p, interpret=interpret)

      try:
        t_pallas, y = time_op(op, xs, ws, calls=calls, reps=reps)
        err = rel_err(y, ref)
      except Exception as e:  # a variant that fails to compile or run on this device: one row says so
        print(f"  {k}x{n} M={m} {name}: failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
        continue
      row = dict(k=k, n=n, m=m, variant=name, pallas=t_pallas, xla=t_xla, bf16=t_bf16,
                 gbps=moved / t_pallas / 1e3, sched=_sched(cfg, params), auto=auto, err=err,
                 xla_err=xla_err, copy=copy)
      rows.append(row)
      if emit:
        emit(row)
  del dense
  return rows


def header(copy: float = COPY_TBPS, variants: bool = False) -> str:
  v = " variant |" if variants else ""
  return (f"| K x N | M |{v} Pallas µs | GB/s | % of {copy:.3g} TB/s copy | XLA µs | bf16 dot µs "
          "| vs bf16 | vs XLA | rel err | schedule | auto |\n|---|---|" + ("---|" if variants else "")
          + "---|---|---|---|---|---|---|---|---|---|")


def format_row(r: dict, variants: bool = False) -> str:
  v = f" {r['variant']} |" if variants else ""
  return (f"| {r['k']}x{r['n']} | {r['m']} |{v} {r['pallas']:.1f} | {r['gbps']:.3g} "
          f"| {r['gbps'] / (r['copy'] * 1e3) * 100:.0f}% | {r['xla']:.1f} | {r['bf16']:.1f} "
          f"| {r['bf16'] / r['pallas']:.2f}x | {r['xla'] / r['pallas']:.2f}x | {r['err']:.1e} | {r['sched']} "
          f"| {r['auto']} |")


def parse_layers(s: str) -> list[tuple[int, int]]:
  return [tuple(int(v) for v in part.lower().split("x")) for part in s.split(",") if part.strip()]


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--markdown", type=Path, help="also write the table here (rewritten after every row)")
  parser.add_argument("--quick", action="store_true", help="first layer, M=1 and 64 only")
  parser.add_argument("--variants", action="store_true", help="sweep kernels.gpu.variants, one row each")
  parser.add_argument("--layers", type=parse_layers, help="comma list of KxN (default: the three Qwen layers)")
  parser.add_argument("--ms", type=lambda s: [int(v) for v in s.split(",")], help="comma list of M")
  parser.add_argument("--budget_s", type=float, help="start no new measurement after this many seconds")
  parser.add_argument("--copy_tbps", type=float, help="reference copy rate (default: measured here)")
  parser.add_argument("--dry_run", action="store_true", help="tiny shapes, one call each (interpret mode on CPU)")
  args = parser.parse_args(argv)
  t0 = time.monotonic()
  deadline = t0 + args.budget_s if args.budget_s else None
  if args.dry_run:
    layers, ms, sets, calls, reps = DRY_LAYERS, DRY_MS, 1, 1, 1
  else:
    layers = LAYERS[:1] if args.quick else LAYERS
    ms, sets, calls, reps = ([1, 64] if args.quick else MS), None, 10, 7
  layers, ms = args.layers or layers, args.ms or ms
  copy = args.copy_tbps or copy_tbps(2**20 if args.dry_run else 2**30)
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()}); "
        f"copy {copy:.3f} TB/s (read + write)", flush=True)
  head = header(copy, args.variants)
  print(head, flush=True)
  lines = [head]

  def emit(row):
    lines.append(format_row(row, args.variants))
    print(lines[-1], flush=True)
    if args.markdown:
      args.markdown.write_text("\n".join(lines) + "\n")

  if args.markdown:
    args.markdown.write_text(head + "\n")
  for k, n in layers:
    if deadline is not None and time.monotonic() > deadline:
      print(f"budget of {args.budget_s:.0f} s spent: skipped {k}x{n} and later layers", flush=True)
      break
    bench_layer(k, n, ms, sets, variants=args.variants, calls=calls, reps=reps, copy=copy, emit=emit,
                deadline=deadline)


if __name__ == "__main__":
  main()
