"""Scale-out figures: seconds per block and peak device/host memory of mesh tuning for 1, 2, 4, 8 devices, with and
without low_gpu_mem_usage, on one random Qwen3-shaped model; and the streaming RTN of a model larger than the host
memory the process uses (weights on disk vs peak RSS).

Every configuration runs in its own subprocess (so its peak memory is its own: /proc VmHWM) with 8 devices visible;
on a CPU they are XLA's simulated host devices sharing the same cores, so the times measure the cost of sharding,
not a speed-up (that needs real devices: a GPU/TPU machine). Shape: a Qwen3-8B block (hidden 4096, intermediate
12288, 32 heads, 8 KV heads, head_dim 128) where --full is given, else scaled down by 4 in width.
Run: HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_scale.py [--full] [--iters 20] [--nsamples 32] [--seqlen 256]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

_RUN = """
import json, sys, time
import numpy as np
from autoround_jax.tuning.autoround import AutoRound
from autoround_jax.tuning.mesh import per_device_memory
from autoround_jax.tuning.timing import peak_host_gb
path, mesh, low, iters, nsamples, seqlen, bs = sys.argv[1], sys.argv[2], sys.argv[3] == "1", *map(int, sys.argv[4:8])
ids = np.random.default_rng(0).integers(3, 500, (nsamples, seqlen)).astype(np.int32)
ar = AutoRound(path, iters=iters, nsamples=nsamples, seqlen=seqlen, batch_size=bs, dataset=ids, mesh=mesh,
               low_gpu_mem_usage=low, progress=False)
t = time.time()
ar.quantize_and_save(sys.argv[8])
r = ar.reports
print("RESULT " + json.dumps({"block_s": [x.seconds for x in r], "step_s": [x.split.get("step", 0) for x in r],
      "compile_s": [x.split.get("compile", 0) for x in r], "loss": [x.loss_best for x in r],
      "host_gb": peak_host_gb(), "device_gb": [m[2] for m in per_device_memory()]}))
"""

_RTN = """
import sys
from autoround_jax.tuning.autoround import AutoRound
from autoround_jax.tuning.timing import peak_host_gb
AutoRound(sys.argv[1], iters=0, disable_opt_rtn=True, progress=False).quantize_and_save(sys.argv[2])
print("RESULT", peak_host_gb())
"""


def _run(code: str, args: list[str], devices: int = 8) -> str:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", HF_HUB_OFFLINE="1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    if proc.returncode or not lines:
        raise SystemExit(proc.stderr[-3000:])
    return lines[-1][len("RESULT "):]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--full", action="store_true", help="the Qwen3-8B block shape (needs memory and time)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--rtn_blocks", type=int, default=16, help="blocks of the streaming-RTN model (0: skip)")
    args = ap.parse_args()

    from autoround_jax.models.precision import cpu_flag_summary
    from tests.random_checkpoint import write_random_qwen3

    div = 1 if args.full else 4
    shape = dict(hidden=4096 // div, intermediate=12288 // div, heads=32 // div, kv_heads=8 // min(div, 4),
                 head_dim=128)
    print(f"{time.strftime('%Y-%m-%d')}, cpu flags: {cpu_flag_summary()}, {os.cpu_count()} cores")
    print(f"block shape {shape}, {args.blocks} blocks, nsamples {args.nsamples} x seqlen {args.seqlen}, "
          f"batch {args.batch_size}, iters {args.iters}")
    with tempfile.TemporaryDirectory() as tmp:
        model = os.path.join(tmp, "model")
        write_random_qwen3(model, args.blocks, vocab=1024, **shape)
        print("| mesh | low_gpu_mem_usage | s per block (last) | step s | compile s | peak host GB | "
              "peak device GB | last block loss |")
        print("|---|---|---|---|---|---|---|---|")
        for mesh, low in (("data=1", 0), ("data=2", 0), ("data=4", 0), ("data=8", 0), ("data=4,fsdp=2", 0),
                          ("data=1", 1), ("data=2", 1)):
            out = os.path.join(tmp, f"out-{mesh}-{low}")
            r = json.loads(_run(_RUN, [model, mesh, str(low), str(args.iters), str(args.nsamples), str(args.seqlen),
                                       str(args.batch_size), out]))
            dev = "/".join(f"{g:.2f}" for g in r["device_gb"]) or "n/a (CPU)"
            print(f"| {mesh} | {'yes' if low else 'no'} | {r['block_s'][-1]:.2f} | {r['step_s'][-1]:.2f} | "
                  f"{r['compile_s'][-1]:.2f} | {r['host_gb']:.2f} | {dev} | {r['loss'][-1]:.6g} |", flush=True)
        if args.rtn_blocks:
            big = os.path.join(tmp, "big")
            size = write_random_qwen3(big, args.rtn_blocks, hidden=1024, intermediate=5632, heads=8, kv_heads=8,
                                      head_dim=128)
            t = time.time()
            peak = float(_run(_RTN, [big, os.path.join(tmp, "big-out")], devices=1))
            print(f"streaming RTN (W4G128) of a {args.rtn_blocks}-block model: {size / 1e9:.2f} GB of weights on "
                  f"disk, peak RSS {peak:.2f} GB (weights / peak RSS = {size / 1e9 / peak:.2f}), "
                  f"{time.time() - t:.1f} s")


if __name__ == "__main__":
    main()
