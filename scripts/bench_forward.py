"""Forward speed of autoround-jax vs transformers (torch) on the embedded SmolLM2, measured side by side.

Prints tokens/s for prefill (batch 1 x 512 tokens) and for cached greedy decode, and the ratio ours/torch.
Decode speed is taken as the slope between two generation lengths, so prefill and compile time cancel out.
Run: HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_forward.py [--model DIR] [--dtype fp32|bf16]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np


def _median_time(fn, reps: int) -> float:
    fn()  # warm-up / compile
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import torch
    import transformers
    from flax import nnx

    from autoround_jax import load_model
    from autoround_jax.default_model import default_model_dir
    from autoround_jax.generation import generate_ids

    path = args.model or default_model_dir()
    ids = np.random.default_rng(0).integers(100, 40000, size=(1, args.prefill)).astype(np.int32)
    short, long = 16, 80

    ours = load_model(path, dtype=args.dtype)
    graphdef, state = nnx.split(ours)
    fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x), donate_argnums=())
    x = jnp.asarray(ids)
    t_ours_prefill = _median_time(lambda: jax.block_until_ready(fwd(state, x)), args.reps)
    gen = lambda n: generate_ids(ours, ids[:, :32], max_new_tokens=n)  # noqa: E731
    t_ours_s, t_ours_l = _median_time(lambda: gen(short), args.reps), _median_time(lambda: gen(long), args.reps)

    tdtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=tdtype).eval()
    tx = torch.from_numpy(ids).long()

    def ref_prefill():
        with torch.no_grad():
            ref(tx)

    def ref_gen(n):
        with torch.no_grad():
            ref.generate(tx[:, :32], max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    t_ref_prefill = _median_time(ref_prefill, args.reps)
    t_ref_s, t_ref_l = _median_time(lambda: ref_gen(short), args.reps), _median_time(lambda: ref_gen(long), args.reps)

    ours_pf, ref_pf = args.prefill / t_ours_prefill, args.prefill / t_ref_prefill
    ours_dec, ref_dec = (long - short) / (t_ours_l - t_ours_s), (long - short) / (t_ref_l - t_ref_s)
    print(f"machine: {platform.processor() or platform.machine()}, jax {jax.__version__} ({jax.default_backend()}), "
          f"torch {torch.__version__} (threads {torch.get_num_threads()}), dtype {args.dtype}")
    print("| phase | autoround-jax tok/s | transformers tok/s | ratio ours/torch |")
    print("|---|---|---|---|")
    print(f"| prefill 1x{args.prefill} | {ours_pf:.0f} | {ref_pf:.0f} | {ours_pf / ref_pf:.2f} |")
    print(f"| decode (cached, batch 1) | {ours_dec:.1f} | {ref_dec:.1f} | {ours_dec / ref_dec:.2f} |")


if __name__ == "__main__":
    main()
