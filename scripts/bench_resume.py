"""Cost of the resume checkpoint (tuning/resume.py) per block: seconds and bytes, against the block's tuning time.

1. SmolLM2 (the embedded model): a real AutoRound run over its first --blocks blocks (W4G128 sym, amp default,
   --nsamples x --seqlen calibration tokens of fortunes, batch 8, --iters), checkpointing after each block; the
   time of each Resumer.save is measured apart from the block's own time, and the bytes it wrote are counted.
   The block time at 200 iterations is extrapolated from the measured per-iteration step time.
2. A Qwen3-8B-shaped block (hidden 4096, intermediate 12288, 32/8 heads): Resumer.save of bf16 activations
   [--big_nsamples, 2048, 4096] (x_fp and x_q) and the block's W4G128 codes (random), timed and sized; its tuning
   time cannot be measured on this CPU, so the fraction is left to the reader's own block time.

Run: HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python scripts/bench_resume.py [--iters 50 --blocks 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import shutil
import tempfile
import time

import numpy as np


def _du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def smollm2(args) -> None:
    from autoround_jax.default_model import default_model_dir
    from autoround_jax.tuning import resume
    from autoround_jax.tuning.autoround import AutoRound

    tmp = tempfile.mkdtemp(prefix="bench-resume-")
    ar = AutoRound(default_model_dir(), iters=args.iters, nsamples=args.nsamples, seqlen=args.seqlen, batch_size=8,
                   dataset="fortunes", progress=False, resume_dir=os.path.join(tmp, "resume"))
    ar.config = dataclasses.replace(ar.config, num_layers=args.blocks)  # the first blocks only
    saves = []
    save = resume.Resumer.save

    def timed(self, i, *a, **kw):
        t0 = time.perf_counter()
        save(self, i, *a, **kw)
        sec = time.perf_counter() - t0
        self.wait()  # (not counted) so that the sizes below are final
        saves.append((i, sec, _du(os.path.join(self.directory, "blocks", str(i))),
                      _du(os.path.join(self.directory, "state", str(i + 1)))))

    resume.Resumer.save = timed
    try:
        ar.quantize()
        ar._resume.wait()
    finally:
        resume.Resumer.save = save
    background = ar._resume.background_seconds
    print(f"SmolLM2, {args.nsamples} x {args.seqlen} tokens, batch 8, iters {args.iters}, compute "
          f"{np.dtype(ar.compute_dtype).name}")
    print("| block | block s (iters %d) | step ms/iter | block s at 200 iters (extrapolated) | save() blocking s | "
          "background write s | codes MB | activations MB | blocking / block | background / block at 200 iters |"
          % args.iters)
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r, (i, sec, codes, state), bg in zip(ar.reports, saves, background):
        step = r.split.get("step", 0.0)
        per_iter = step / args.iters
        at200 = r.seconds - step + per_iter * 200
        print(f"| {i} | {r.seconds:.2f} | {per_iter * 1e3:.1f} | {at200:.1f} | {sec:.3f} | {bg:.2f} | "
              f"{codes / 1e6:.1f} | {state / 1e6:.1f} | {sec / r.seconds:.2%} | {bg / at200:.2%} |")
    shutil.rmtree(tmp, ignore_errors=True)


def qwen3_8b_block(args) -> None:
    import jax.numpy as jnp

    from autoround_jax.quant.qdq import QuantizedWeight
    from autoround_jax.tuning.resume import Resumer

    d, f, q, kv = 4096, 12288, 4096, 1024
    shapes = {"self_attn.q_proj": (q, d), "self_attn.k_proj": (kv, d), "self_attn.v_proj": (kv, d),
              "self_attn.o_proj": (d, q), "mlp.gate_proj": (f, d), "mlp.up_proj": (f, d), "mlp.down_proj": (d, f)}
    rng = np.random.default_rng(0)
    codes = {f"model.layers.0.{n}": QuantizedWeight(
        codes=rng.integers(0, 16, (o, i), dtype=np.uint8), scales=rng.normal(0, 0.01, (o, i // 128)).astype(np.float16),
        zeros=np.full((o, i // 128), 8, np.int32), bits=4, group_size=128, sym=True) for n, (o, i) in shapes.items()}
    n = args.big_nsamples
    x_fp = jnp.asarray(rng.standard_normal((n, 2048, d), np.float32), jnp.bfloat16)
    x_q = x_fp + jnp.asarray(0.01, jnp.bfloat16)
    tmp = tempfile.mkdtemp(prefix="bench-resume-8b-")
    r = Resumer(os.path.join(tmp, "resume"))
    r.begin({"bench": 1}, {"x_fp": x_fp, "x_q": x_q}, 36)
    print(f"\nQwen3-8B-shaped block, activations bf16 [{n}, 2048, 4096] x 2 + W4G128 codes")
    print("| save | save() blocking s | background write s (codes, then activations) | codes MB | activations MB |\n"
          "|---|---|---|---|---|")
    for i in range(2):
        t0 = time.perf_counter()
        r.save(i, {"x_fp": x_fp, "x_q": x_q}, random.Random(0), {k.replace(".0.", f".{i}."): v for k, v in codes.items()},
               {}, [])
        sec = time.perf_counter() - t0
        r.wait()
        print(f"| block {i} | {sec:.2f} | {r.background_seconds[-1]:.2f} | "
              f"{_du(os.path.join(tmp, 'resume', 'blocks', str(i))) / 1e6:.0f} | "
              f"{_du(os.path.join(tmp, 'resume', 'state', str(i + 1))) / 1e6:.0f} |")
    shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--blocks", type=int, default=3)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--big_nsamples", type=int, default=32)
    ap.add_argument("--skip_8b", action="store_true")
    ap.add_argument("--only_8b", action="store_true")
    args = ap.parse_args()
    from autoround_jax.models.precision import cpu_flag_summary

    print(f"cpu flags: {cpu_flag_summary()}")
    if not args.only_8b:
        smollm2(args)
    if not args.skip_8b:
        qwen3_8b_block(args)


if __name__ == "__main__":
    main()
