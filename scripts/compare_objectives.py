"""Several tuning recipes (tuning/recipes.py) on the same model and calibration tokens, in one run.

Prints a Markdown table (mean block output MSE against the float model, measured the same way for every recipe; the
recipe's own loss; held-out perplexity; CPU seconds of the quantize call) and writes a per-block MSE plot (PNG with matplotlib, else a CSV) plus the raw figures as JSON. By default it runs the
embedded SmolLM2-135M, quantizing only the first --blocks blocks (the rest stay float) so that one run takes a few
CPU minutes; the perplexity is over held-out fortunes text the calibration never sees.

Run: HF_HUB_OFFLINE=1 .venv/bin/python scripts/compare_objectives.py [--scheme W2A16G64] [--blocks 4] [--iters 50]
     [--recipes default,alg_ext,cosine,adam] [--out out/compare_objectives]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

# name -> AutoRound keyword arguments (objective / optimizer / recipe / enable_alg_ext, and lr where a recipe needs it)
RECIPES = {
    "default": {},
    "alg_ext": dict(enable_alg_ext=True),
    "cosine": dict(optimizer="signsgd_cosine"),
    "momentum": dict(optimizer="signsgd_momentum"),
    "adam": dict(optimizer="adam"),
    "l1": dict(objective="l1"),
    "token_norm": dict(objective="token_normalized_mse"),
    "drop_outliers": dict(objective="mse_drop_outliers"),
    "alg_ext_cosine": dict(enable_alg_ext=True, optimizer="signsgd_cosine"),
    "alg_ext_token_norm": dict(enable_alg_ext=True, objective="token_normalized_mse"),
    "alg_ext_token_norm_cosine": dict(enable_alg_ext=True, objective="token_normalized_mse",
                                      optimizer="signsgd_cosine"),
    # Spend our cheaper iterations: the same CPU budget as the reference's default buys more SignSGD steps (the
    # reference's own auto-round-best preset runs 1000 iterations for 2-bit). iters_scale multiplies --iters.
    "long": dict(iters_scale=2.0),
    "long_token_norm": dict(iters_scale=2.0, objective="token_normalized_mse"),
    # Half the iterations: reach the reference's quality sooner (lr stays 1/iters, so V can still move by 0.5).
    "half": dict(iters_scale=0.5),
    "half_cosine": dict(iters_scale=0.5, optimizer="signsgd_cosine"),
    "half_alg_ext": dict(iters_scale=0.5, enable_alg_ext=True),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="HF folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--scheme", default="W2A16G64")
    p.add_argument("--blocks", type=int, default=4, help="quantize the first N blocks only (the rest stay float)")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--eval_tokens", type=int, default=4096)
    p.add_argument("--recipes", default="default,alg_ext,cosine,adam,token_norm")
    p.add_argument("--out", default="out/compare_objectives")
    p.add_argument("--amp", action="store_true", help="both sides at their amp default (bf16 matmul operands on "
                   "a CPU with bf16 units, as each runs out of the box there) instead of exact fp32")
    p.add_argument("--reference", default="", help="also run the torch reference (auto-round 0.16.1) for these "
                   "comma-separated recipes among default,alg_ext, on the same tokens and blocks")
    args = p.parse_args()
    names = [r.strip() for r in args.recipes.split(",") if r.strip()]
    unknown = [r for r in names if r not in RECIPES]
    if unknown:
        raise SystemExit(f"unknown recipe {', '.join(unknown)}: use some of {', '.join(RECIPES)}")

    from autoround_jax import load_model, load_tokenizer
    from autoround_jax.data.calibration import calibration_ids
    from autoround_jax.data.texts import eval_text
    from autoround_jax.default_model import default_model_dir
    from autoround_jax.evaluation import perplexity_of_windows, token_windows
    from autoround_jax.tuning.autoround import AutoRound

    path = args.model or default_model_dir()
    tok = load_tokenizer(path)
    ids = calibration_ids("fortunes", tok, args.nsamples, args.seqlen, seed=42)  # the same tokens for every recipe
    windows = token_windows(tok(eval_text(), add_special_tokens=False)["input_ids"], 512, args.eval_tokens)
    float_model = load_model(path, dtype="fp32")
    n_layers = float_model.config.num_layers
    fp_layers = ",".join(f"model.layers.{i}." for i in range(args.blocks, n_layers)) or None
    ppl_float = perplexity_of_windows(float_model, windows)
    del float_model
    common = dict(scheme=args.scheme, iters=args.iters, nsamples=args.nsamples, seqlen=args.seqlen,
                  batch_size=args.batch_size, dataset=ids, fp_layers=fp_layers, model_dtype="fp32", amp=args.amp,
                  progress=False)

    rows, per_block = [], {}
    rtn = AutoRound(path, **{**common, "iters": 0, "disable_opt_rtn": True})
    ppl_rtn = perplexity_of_windows(rtn.quantize()[0], windows)
    for name in names:
        kw = dict(RECIPES[name])
        scale = kw.pop("iters_scale", 1.0)
        ar = AutoRound(path, **{**common, "iters": int(round(args.iters * scale)), **kw})
        c0, w0 = time.process_time(), time.time()
        model, _ = ar.quantize()
        cpu, wall = time.process_time() - c0, time.time() - w0
        tuned = [r for r in ar.reports if r.loss_best is not None]
        per_block[name] = block_mse(ar, args.blocks)
        ppl = perplexity_of_windows(model, windows)
        rows.append(dict(recipe=name, own_loss=float(np.mean([r.loss_best for r in tuned])),
                         loss=float(np.mean(per_block[name])), ppl=ppl, cpu_s=cpu, wall_s=wall))
        print(f"{name}: mean block MSE {rows[-1]['loss']:.6g}, perplexity {ppl:.3f}, CPU {cpu:.1f} s", flush=True)

    for name in [r.strip() for r in args.reference.split(",") if r.strip()]:
        if name not in ("default", "alg_ext"):
            raise SystemExit(f"--reference runs default and alg_ext only, not {name}")
        ppl, cpu, wall = _run_reference(path, tok, ids, windows, args, n_layers, enable_alg_ext=name == "alg_ext")
        rows.append(dict(recipe=f"reference {name}", own_loss=float("nan"), loss=float("nan"), ppl=ppl, cpu_s=cpu,
                         wall_s=wall))
        print(f"reference {name}: perplexity {ppl:.3f}, CPU {cpu:.1f} s", flush=True)

    os.makedirs(args.out, exist_ok=True)
    head = (f"{os.path.basename(os.path.normpath(path))}, {args.scheme}, first {args.blocks} of {n_layers} blocks "
            f"quantized, iters {args.iters}, nsamples {args.nsamples} x seqlen {args.seqlen}, batch {args.batch_size}, "
            f"{'amp (both sides at their default)' if args.amp else 'fp32'}; held-out perplexity over {windows.size} "
            f"tokens: float {ppl_float:.3f}, RTN {ppl_rtn:.3f}")
    rtn_mse = float(np.mean(block_mse(rtn, args.blocks)))
    lines = [head, "", f"mean block MSE: each quantized block's output against the float block's, both fed the "
             f"previous blocks' outputs of their own model, last positions masked (RTN: {rtn_mse:.5g}); own loss: "
             "the recipe's objective at its best iteration", "",
             "| recipe | mean block MSE | own loss | perplexity | gap to float vs default | CPU s |",
             "|---|---|---|---|---|---|"]
    base_gap = next((r["ppl"] - ppl_float for r in rows if r["recipe"] == "default"), None)
    for r in rows:
        gap = "" if base_gap in (None, 0) else f"{100 * ((r['ppl'] - ppl_float) / base_gap - 1):+.1f}%"
        lines.append(f"| {r['recipe']} | {r['loss']:.5g} | {r['own_loss']:.5g} | {r['ppl']:.3f} | {gap} | "
                     f"{r['cpu_s']:.1f} |")
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(dict(settings=vars(args), ppl_float=ppl_float, ppl_rtn=ppl_rtn, rows=rows, per_block=per_block), f,
                  indent=1)
    _plot(per_block, args.out)


def block_mse(ar, blocks: int) -> list[float]:
    """Per quantized block, mean over the calibration tokens (last positions masked, as the tuner) of
    (block_q(x_q) - block_fp(x_fp))^2, where x_q / x_fp are the previous blocks' outputs of the quantized / float
    model: one metric for every recipe, whatever objective it tuned."""
    import jax.numpy as jnp

    from autoround_jax.tuning.autoround import apply_block

    x_fp, cos, sin, mask = ar._block_inputs()
    x_q, keep = x_fp, (jnp.arange(x_fp.shape[1]) < x_fp.shape[1] - 1)[None, :, None]
    out = []
    for i in range(blocks):
        x_fp = apply_block(ar.source.block(i, jnp.float32), x_fp, cos, sin, mask, ar.batch_size)
        x_q = apply_block(ar.quantized_block(i, jnp.float32), x_q, cos, sin, mask, ar.batch_size)
        out.append(float(jnp.mean(jnp.square((x_q - x_fp) * keep))))
    return out


def _run_reference(path, tok, ids, windows, args, n_layers: int, enable_alg_ext: bool):
    """(perplexity, CPU s, wall s) of the reference on the same tokens, blocks >= args.blocks kept float; its export
    is dequantized by hand and evaluated by the same JAX forward (scripts/compare_reference.py's route)."""
    import sys
    import tempfile

    import torch
    import transformers
    from auto_round import AutoRound as RefAutoRound

    from autoround_jax import load_model
    from autoround_jax.evaluation import perplexity_of_windows
    from autoround_jax.quant.scheme import SCHEMES

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from compare_reference import dequantize_reference_export

    s = SCHEMES[args.scheme.upper()]
    torch.manual_seed(42)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n
             and int(n.split(".layers.")[1].split(".")[0]) >= args.blocks]
    data = [torch.from_numpy(row[None].astype(np.int64)) for row in np.asarray(ids)]
    ar = RefAutoRound(model, tokenizer=tok, bits=s.bits, group_size=s.group_size, sym=s.sym, iters=args.iters,
                      nsamples=args.nsamples, seqlen=args.seqlen, batch_size=args.batch_size, dataset=data,
                      device_map="cpu", enable_torch_compile=False, amp=args.amp, enable_alg_ext=enable_alg_ext,
                      layer_config={n: {"bits": 16} for n in names})
    c0, w0 = time.process_time(), time.time()
    ar.quantize()
    cpu, wall = time.process_time() - c0, time.time() - w0
    with tempfile.TemporaryDirectory() as tmp:
        export = os.path.join(tmp, "ref")
        ar.save_quantized(export, format="auto_round")
        sub = next((os.path.join(export, d) for d in os.listdir(export) if os.path.isdir(os.path.join(export, d))),
                   export)
        folder = sub if os.path.isfile(os.path.join(sub, "config.json")) else export
        deq = dequantize_reference_export(folder, path, os.path.join(tmp, "f"))
        return perplexity_of_windows(load_model(deq, dtype="fp32"), windows), cpu, wall


def _plot(per_block: dict[str, list[float]], out: str) -> None:
    """Tuned loss per block and recipe: loss.png with matplotlib, else loss.csv (one column per recipe)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        with open(os.path.join(out, "loss.csv"), "w") as f:
            f.write("block," + ",".join(per_block) + "\n")
            for i in range(max(map(len, per_block.values()))):
                f.write(f"{i}," + ",".join(f"{v[i]:.6g}" for v in per_block.values()) + "\n")
        print(f"matplotlib not installed: wrote {out}/loss.csv")
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, losses in per_block.items():
        ax.plot(range(len(losses)), losses, marker="o", label=name)
    ax.set_xlabel("block")
    ax.set_xticks(range(max(map(len, per_block.values()))))
    ax.set_ylabel("block output MSE vs float")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "loss.png"), dpi=110)
    print(f"wrote {out}/loss.png")


if __name__ == "__main__":
    main()
