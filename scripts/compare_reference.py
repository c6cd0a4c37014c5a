"""Quality and speed against the torch reference (auto-round 0.16.1), side by side in one run.

Quantizes the embedded SmolLM2 with the reference and with autoround-jax on the same calibration token ids
(W4G128 sym, iters 50, nsamples 32, seqlen 256, batch 4 by default) and prints held-out perplexity for float, plain
RTN, opt-RTN (iters 0) of both, the reference's AutoRound and ours (all evaluated by the same JAX forward; the reference export is dequantized
by hand, since transformers + auto-round cannot load K % G != 0 layers on a CPU), plus seconds per block for both.
Each precision in --precisions runs both sides: "default" is amp=True for both (the reference autocasts to bf16 where
the CPU has bf16 units, ours uses bf16 matmul operands there; both fall back to fp32 on AVX2-only CPUs), "fp32" is
amp=False for both. The CPU's flags are printed with the figures.
Run: HF_HUB_OFFLINE=1 .venv/bin/python scripts/compare_reference.py [--iters 50] [--eval_tokens 8192] [--precisions default,fp32]
On a GPU machine without the fortunes text or the embedded model (not yet run on one):
  python scripts/compare_reference.py --device cuda --model HF_FOLDER --speed_only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import numpy as np


def dequantize_reference_export(folder: str, src: str, dst: str) -> str:
    """The reference's packed export -> float32 HF folder with src's config and tokenizer files: W = (q - zero) * scale
    unrounded (quant/qdq.py's dequantize; not convert's float16 QuantLinear values), float tensors in float32."""
    from autoround_jax.formats.auto_round import iter_tensors
    from autoround_jax.formats.quantized_import import open_quantized
    from autoround_jax.io.hf_folder import write_float_folder
    from autoround_jax.quant.qdq import dequantize

    qm = open_quantized(folder)
    weight = lambda qw: {"weight": np.asarray(dequantize(qw))}  # noqa: E731
    tensors = ((name, arr.astype(np.float32)) for name, arr in iter_tensors(qm, weight, np.float32))
    return write_float_folder(tensors, json.load(open(os.path.join(src, "config.json"))), dst, files_dir=src)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--batch_size", type=int, default=4)
    ap.add_argument("--group_size", type=int, default=128)
    ap.add_argument("--eval_tokens", type=int, default=8192)
    ap.add_argument("--precisions", default="default,fp32",
                    help="comma list of 'default' (amp=True on both sides, each resolving it as it does on this host) "
                    "and 'fp32' (amp=False on both)")
    ap.add_argument("--model", default=None, help="HF folder (default: the embedded SmolLM2)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="where the reference runs; ours runs on JAX's default backend, which must match")
    ap.add_argument("--skip_opt_rtn", action="store_true", help="skip the iters=0 (opt-RTN) runs of both")
    ap.add_argument("--speed_only", action="store_true",
                    help="random calibration token ids and no perplexities (for machines without the fortunes text, "
                    "or a randomly initialised model)")
    args = ap.parse_args()
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    if not precisions or set(precisions) - {"default", "fp32"}:
        raise SystemExit("--precisions takes a comma list of 'default' and 'fp32'")

    import torch
    import transformers
    from auto_round import AutoRound as RefAutoRound

    from autoround_jax import load_model, load_tokenizer
    from autoround_jax.data.calibration import calibration_ids
    from autoround_jax.data.texts import eval_text
    from autoround_jax.default_model import default_model_dir
    from autoround_jax.evaluation import perplexity_of_windows, token_windows
    from autoround_jax.models.precision import cpu_flag_summary
    from autoround_jax.tuning.autoround import AutoRound

    import jax

    backend = jax.default_backend()
    if (backend == "cpu") != (args.device == "cpu"):
        raise SystemExit(f"--device {args.device} but JAX runs on {backend}: compare on the same machine kind")
    path = args.model or default_model_dir()
    tok = load_tokenizer(path)
    if args.speed_only:
        vocab = json.load(open(os.path.join(path, "config.json")))["vocab_size"]
        ids = np.random.default_rng(42).integers(0, vocab, (args.nsamples, args.seqlen)).astype(np.int32)
        ppl = lambda m: float("nan")  # noqa: E731
    else:
        ids = calibration_ids("fortunes", tok, args.nsamples, args.seqlen, seed=42)
        windows = token_windows(tok(eval_text(), add_special_tokens=False)["input_ids"], 1024, args.eval_tokens)
        ppl = lambda m: perplexity_of_windows(m, windows)  # noqa: E731
    common = dict(bits=4, group_size=args.group_size, sym=True)
    results, timing = {}, {}

    if not args.speed_only:
        results["float"] = ppl(load_model(path, dtype="fp32"))
        results["RTN"] = ppl(AutoRound(path, tok, iters=0, disable_opt_rtn=True, model_dtype="fp32", progress=False,
                                   **common).quantize()[0])

    def run_ours(iters: int, amp: bool) -> tuple[float, AutoRound, float]:
        """(perplexity, the quantizer, CPU seconds) for one of our runs on the shared calibration ids."""
        ar = AutoRound(path, tok, iters=iters, nsamples=args.nsamples, seqlen=args.seqlen,
                       batch_size=args.batch_size, dataset=ids, model_dtype="fp32", progress=False, amp=amp, **common)
        cpu0 = time.process_time()
        model, _ = ar.quantize()
        cpu = time.process_time() - cpu0
        return ppl(model), ar, cpu

    def run_reference(iters: int, ref_amp: bool) -> tuple[float, float, float]:
        """(perplexity, wall s, CPU s) for the reference on the same ids; iters=0 is its default opt-RTN."""
        torch.manual_seed(42)
        ref_model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        data = [torch.from_numpy(row[None].astype(np.int64)) for row in np.asarray(ids)]
        ar = RefAutoRound(ref_model, tokenizer=tok, iters=iters, nsamples=args.nsamples, seqlen=args.seqlen,
                          batch_size=args.batch_size, dataset=data, device_map=args.device, enable_torch_compile=False,
                          amp=ref_amp, **common)
        t0, cpu0 = time.time(), time.process_time()
        ar.quantize()
        if args.device == "cuda":
            torch.cuda.synchronize()
        wall, cpu = time.time() - t0, time.process_time() - cpu0
        if args.speed_only:
            return float("nan"), wall, cpu
        with tempfile.TemporaryDirectory() as tmp:
            export = os.path.join(tmp, "ref")
            ar.save_quantized(export, format="auto_round")
            sub = next((os.path.join(export, d) for d in os.listdir(export)
                        if os.path.isdir(os.path.join(export, d))), export)
            folder = sub if os.path.isfile(os.path.join(sub, "config.json")) else export
            dequantized = dequantize_reference_export(folder, path, os.path.join(tmp, "f"))
            return ppl(load_model(dequantized, dtype="fp32")), wall, cpu

    steps = {}  # precision -> (ours ms per iteration in the step, ours s/block, reference s/block)
    for prec in precisions:
        amp = prec == "default"
        tag = "amp=True" if amp else "fp32"
        if not args.skip_opt_rtn:  # iters=0 as both run it by default: the imatrix-weighted scale search
            results[f"opt-RTN ours, {tag}"], ar0, cpu = run_ours(0, amp)
            timing[f"opt-RTN ours, {tag}"] = (ar0.seconds / ar0.config.num_layers, 0.0, ar0.seconds, cpu)
            results[f"opt-RTN reference, {tag}"], wall, cpu = run_reference(0, amp)
            timing[f"opt-RTN reference, {tag}"] = (wall / ar0.config.num_layers, 0.0, wall, cpu)
        results[f"autoround-jax, {tag}"], ours, ours_cpu = run_ours(args.iters, amp)
        secs = [r.seconds for r in ours.reports]
        steady = statistics.median(secs[1:])
        timing[f"ours, {tag} ({jax.numpy.dtype(ours.compute_dtype).name} matmuls)"] = (
            steady, sum(r.split.get("compile", 0.0) for r in ours.reports), ours.seconds, ours_cpu)
        step_ms = 1000 * statistics.median(r.split["step"] for r in ours.reports[1:]) / args.iters
        results[f"reference AutoRound, {tag}"], ref_wall, ref_cpu = run_reference(args.iters, amp)
        timing[f"reference, {tag}"] = (ref_wall / ours.config.num_layers, 0.0, ref_wall, ref_cpu)
        steps[prec] = (step_ms, steady, ref_wall / ours.config.num_layers, ours.seconds, ref_wall)

    where = jax.devices()[0].device_kind if args.device == "cuda" else f"{platform.machine()}, {os.cpu_count()} cores"
    print(f"machine: {where}; CPU flags: {cpu_flag_summary()}; reference on {args.device}; "
          f"W4G{args.group_size} sym, iters {args.iters}, "
          f"{args.nsamples}x{args.seqlen} calibration tokens, batch {args.batch_size}"
          + ("; random calibration ids, no perplexity" if args.speed_only else f"; eval {windows.size} tokens"))
    if not args.speed_only:
        print("| model | perplexity (held-out fortunes) |\n|---|---|")
        for k, v in results.items():
            print(f"| {k} | {v:.3f} |")
    print("\n| quantizer | s/block (steady) | compile s (all blocks) | wall s | CPU s |\n|---|---|---|---|---|")
    for k, (per, comp, wall, cpu) in timing.items():
        print(f"| {k} | {per:.2f} | {comp:.1f} | {wall:.1f} | {cpu:.1f} |")
    for prec, (step_ms, ours_block, ref_block, ours_wall, ref_wall) in steps.items():
        tag = "amp=True" if prec == "default" else "fp32"
        line = (f"\n{tag}: ours {step_ms:.1f} ms per iteration in the step; per block reference/ours "
                f"{ref_block / ours_block:.2f}x, end to end (quantize wall) {ref_wall / ours_wall:.2f}x")
        if not args.speed_only:
            r, o = results[f"reference AutoRound, {tag}"], results[f"autoround-jax, {tag}"]
            line += f"; perplexity ours vs reference {100 * (o / r - 1):+.2f}% (goal <= +1%)"
        print(line)
        if not args.skip_opt_rtn and not args.speed_only:
            r0, o0 = results[f"opt-RTN reference, {tag}"], results[f"opt-RTN ours, {tag}"]
            print(f"{tag} opt-RTN (iters 0): ours vs reference perplexity {100 * (o0 / r0 - 1):+.2f}%, wall-time ratio "
                  f"reference/ours {timing[f'opt-RTN reference, {tag}'][2] / timing[f'opt-RTN ours, {tag}'][2]:.2f}x")

if __name__ == "__main__":
    main()
