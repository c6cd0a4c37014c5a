"""Milliseconds per SignRound iteration on one SmolLM2 block: autoround-jax's jitted loop vs the reference's step.

Both tune the same block (block 3 of the embedded SmolLM2, all 7 linears W4G128 sym) on the same random activations
(batch 4 x 256 tokens), each in fp32 and at its amp default (bf16 operands on CPUs with bf16 units), in one run of
interleaved rounds; medians are reported. Ours: `tune_block` (all iterations in one jit call; compile time reported
apart). Reference: auto-round 0.16.1's WrapperLinear-wrapped torch block, forward + backward + SignSGD step per
iteration, as its quantize_block loop does (bookkeeping excluded).
Run: HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_tune_step.py [--iters 20] [--rounds 5]
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (medians are reported)")
    ap.add_argument("--settle", type=float, default=1.0,
                    help="seconds of idle before each timed section: torch's OpenMP workers keep spinning for a "
                         "while after its last op and would otherwise take a core from whatever runs next")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp

    from autoround_jax.default_model import default_model_dir
    from autoround_jax.models.decoder import Rotary, causal_mask, default_positions
    from autoround_jax.models.loading import ModelSource
    from autoround_jax.models.precision import cpu_flag_summary
    from autoround_jax.tuning.autoround import AutoRound
    from autoround_jax.tuning.signround import TuneSettings, tune_block

    path = default_model_dir()
    src = ModelSource(path, dtype="fp32")
    cfg = src.config
    rng = np.random.default_rng(0)
    n, t, d = args.batch * 2, args.seqlen, cfg.hidden_size
    x = jnp.asarray(rng.standard_normal((n, t, d)).astype(np.float32))
    pos = default_positions(None, args.batch, t)
    cos, sin = Rotary(cfg)(pos, jnp.float32)
    mask = causal_mask(None, args.batch, t)

    def run(ar, iters):
        """One tune_block call on block 3 in ar's compute precision (fp32, or bf16 operands under amp)."""
        cd = ar.compute_dtype
        block = ar._load_block(3)
        xc, cs, sn = x.astype(cd), cos.astype(cd), sin.astype(cd)
        y = block(xc[: args.batch], cs, sn, mask)[0]
        y = jnp.concatenate([y, y])
        ar._to_fake_quant(block, ar._block_schemes(3))
        s = TuneSettings(iters, 1.0 / iters, 1.0 / iters, args.batch, 1, False)
        t0 = time.perf_counter()
        tune_block(block, xc, y, cs, sn, mask, s, random.Random(0))
        return time.perf_counter() - t0

    ars = {amp: AutoRound(path, iters=args.iters, progress=False, model_dtype="fp32", amp=amp) for amp in (False, True)}
    first = {amp: run(ar, args.iters) for amp, ar in ars.items()}  # includes the compilation
    dtypes = {amp: jnp.dtype(ar.compute_dtype).name for amp, ar in ars.items()}

    import torch
    import transformers
    from auto_round.wrapper import WrapperLinear

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    block = model.model.layers[3]
    rotary = model.model.rotary_emb
    xt = torch.from_numpy(np.asarray(x[: args.batch]))
    pos_t = torch.arange(t)[None].expand(args.batch, t)
    pe = rotary(xt, pos_t)
    with torch.no_grad():
        yt = block(xt, position_embeddings=pe, attention_mask=None, position_ids=pos_t)
        yt = yt[0] if isinstance(yt, tuple) else yt
    params = []
    for name, mod in list(block.named_modules()):
        if isinstance(mod, torch.nn.Linear):
            parent = block.get_submodule(name.rsplit(".", 1)[0])
            mod.bits, mod.group_size, mod.sym, mod.data_type = 4, 128, True, "int"
            mod.scale_dtype, mod.act_bits = torch.float16, 16
            w = WrapperLinear(mod, enable_minmax_tuning=True, enable_norm_bias_tuning=False, device="cpu")
            setattr(parent, name.rsplit(".", 1)[1], w)
            params += [w.value, w.min_scale, w.max_scale]
    from auto_round.algorithms.quantization.sign_round.sign_sgd import SignSGD

    opt = SignSGD(params, lr=1.0 / args.iters, momentum=0)
    causal = torch.full((t, t), float("-inf")).triu(1)[None, None]

    def step(amp: bool):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):  # the reference's default on a CPU
            out = block(xt, position_embeddings=pe, attention_mask=causal, position_ids=pos_t)
        out = out[0] if isinstance(out, tuple) else out
        loss = torch.nn.functional.mse_loss(out.float(), yt.float()) * 1000
        loss.backward()
        opt.step()
        opt.zero_grad()

    def ref_time(amp: bool) -> float:
        t0 = time.perf_counter()
        for _ in range(args.iters):
            step(amp)
        return 1000 * (time.perf_counter() - t0) / args.iters

    step(False), step(True)  # warm-up
    # Interleaved rounds: each round times all four, so load that comes and goes hits every column alike.
    rounds = {k: [] for k in ("ref32", "ref_amp", "ours32", "ours_amp")}
    def settled(fn, *a):
        time.sleep(args.settle)
        return fn(*a)

    for _ in range(args.rounds):
        rounds["ours32"].append(1000 * settled(run, ars[False], args.iters) / args.iters)
        rounds["ref32"].append(settled(ref_time, False))
        rounds["ours_amp"].append(1000 * settled(run, ars[True], args.iters) / args.iters)
        rounds["ref_amp"].append(settled(ref_time, True))
    med = {k: float(np.median(v)) for k, v in rounds.items()}
    ratio32 = float(np.median(np.array(rounds["ours32"]) / np.array(rounds["ref32"])))
    ratio_amp = float(np.median(np.array(rounds["ours_amp"]) / np.array(rounds["ref_amp"])))
    print(f"SmolLM2 block, W4G128 sym, batch {args.batch}x{t}, {args.iters} iterations, {args.rounds} interleaved "
          f"rounds (medians), torch threads {torch.get_num_threads()}, jax {jax.__version__}, "
          f"CPU flags: {cpu_flag_summary()}")
    print("| implementation | ms per iteration | per round |\n|---|---|---|")
    rows = [("reference (auto-round 0.16.1 WrapperLinear + SignSGD, torch eager fp32)", "ref32"),
            ("reference, bf16 autocast (its default amp=True on a CPU)", "ref_amp"),
            (f"autoround-jax amp=False ({dtypes[False]} matmuls; one jit call per block; first call incl. compile "
             f"{first[False]:.1f} s)", "ours32"),
            (f"autoround-jax amp=True ({dtypes[True]} matmuls; one jit call per block; first call incl. compile "
             f"{first[True]:.1f} s)", "ours_amp")]
    for label, key in rows:
        print(f"| {label} | {med[key]:.1f} | {', '.join(f'{v:.1f}' for v in rounds[key])} |")
    print(f"ours/reference time (median of the per-round ratios), both fp32: {ratio32:.2f}; both at amp=True: "
          f"{ratio_amp:.2f} (goal on a CPU with bf16 units: <= 0.7)")


if __name__ == "__main__":
    main()
