"""Tuning time of a Qwen3-MoE block: ours against the torch reference (auto-round 0.16.1) on the same CPU and
settings, and against a dense Qwen3 block with the same active parameter count (intermediate = top_k x
moe_intermediate). Random checkpoints (torch, test-only) and random calibration ids: speed and block loss only.

Run: HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_moe.py [--hidden 256 --experts 8 --top_k 2 --moe_inter 128]
     [--iters 20 --nsamples 8 --seqlen 128 --batch_size 4] [--skip_reference]
Both sides run fp32 (amp=False) so the figures do not depend on the CPU's bf16 units.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build(folder: str, moe: bool, a) -> str:
    import torch
    import transformers

    common = dict(vocab_size=512, hidden_size=a.hidden, num_hidden_layers=a.layers, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=a.hidden // 4, max_position_embeddings=4096, tie_word_embeddings=True,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if moe:
        cfg = transformers.Qwen3MoeConfig(intermediate_size=a.top_k * a.moe_inter, moe_intermediate_size=a.moe_inter,
                                          num_experts=a.experts, num_experts_per_tok=a.top_k, norm_topk_prob=True,
                                          **common)
    else:
        cfg = transformers.Qwen3Config(intermediate_size=a.top_k * a.moe_inter, **common)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0, 0.05)
    model.save_pretrained(folder)
    return folder


def ours(folder: str, ids: np.ndarray, a) -> tuple[float, float, float]:
    from autoround_jax.tuning.autoround import AutoRound

    ar = AutoRound(folder, tokenizer=object(), dataset=ids, iters=a.iters, nsamples=a.nsamples, seqlen=a.seqlen,
                   batch_size=a.batch_size, bits=4, group_size=a.group_size, sym=True, model_dtype="fp32", amp=False,
                   progress=False)
    ar.quantize()
    steady = [r.seconds for r in ar.reports[1:]] or [ar.reports[0].seconds]  # block 0 pays the compilations
    r0 = ar.reports[0]
    return r0.seconds, float(np.mean(steady)), f"block 0 loss iter 0 {r0.loss_rtn:.4g} -> best {r0.loss_best:.4g}"


def reference(folder: str, ids: np.ndarray, a) -> float:
    import torch
    import transformers
    from auto_round import AutoRound

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)

    class Tok:
        pass

    ar = AutoRound(model, tokenizer=Tok(), iters=a.iters, nsamples=a.nsamples, seqlen=a.seqlen,
                   batch_size=a.batch_size, bits=4, group_size=a.group_size, sym=True, amp=False, device_map="cpu",
                   enable_torch_compile=False, dataset=[torch.from_numpy(r[None].astype(np.int64)) for r in ids])
    t0 = time.time()
    ar.quantize()  # it logs each block's loss at iteration 0 and at its best iteration
    return (time.time() - t0) / a.layers


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top_k", type=int, default=2)
    ap.add_argument("--moe_inter", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--batch_size", type=int, default=4)
    ap.add_argument("--group_size", type=int, default=128)
    ap.add_argument("--skip_reference", action="store_true")
    ap.add_argument("--skip_ours", action="store_true")
    ap.add_argument("--kinds", default="moe,dense", help="which checkpoints to run: moe, dense or both")
    a = ap.parse_args()
    from autoround_jax.models.precision import cpu_flag_summary

    ids = np.random.default_rng(0).integers(3, 512, size=(a.nsamples, a.seqlen)).astype(np.int32)
    with tempfile.TemporaryDirectory() as tmp:
        moe = build(os.path.join(tmp, "moe"), True, a)
        dense = build(os.path.join(tmp, "dense"), False, a)
        print(f"CPU flags: {cpu_flag_summary()}; hidden {a.hidden}, {a.experts} experts of {a.moe_inter}, top "
              f"{a.top_k}; dense intermediate {a.top_k * a.moe_inter}; iters {a.iters}, {a.nsamples} x {a.seqlen}, "
              f"batch {a.batch_size}, W4G{a.group_size} sym, fp32")
        kinds = [(n, f) for n, f in (("moe", moe), ("dense", dense)) if n in a.kinds.split(",")]
        for name, folder in kinds if not a.skip_ours else ():
            first, steady, loss = ours(folder, ids, a)
            print(f"ours {name}: block 0 {first:.2f} s (with compilation), later blocks {steady:.2f} s, "
                  f"{loss}")
        if not a.skip_reference:
            for name, folder in kinds:
                print(f"reference {name}: {reference(folder, ids, a):.2f} s per block")


if __name__ == "__main__":
    main()
