"""`autoround-jax eval`: lm-eval tasks on a float, fake-quant or int checkpoint, through our JAX model.

lm_eval is imported only inside these functions, so `import autoround_jax.cli` stays light (and torch-free).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
from typing import Any, Sequence

DEFAULT_SEED = "0,1234,1234,1234"  # lm-eval's: python random, numpy, torch (here: JAX sampling), fewshot


def parse_seed(value: str) -> list[int | None]:
    """lm-eval's --seed: one integer for all four slots, or four comma-separated integers / None."""
    items = [None if v.strip().lower() == "none" else int(v) for v in value.split(",")]
    if len(items) == 1:
        return items * 4
    if len(items) != 4:
        raise argparse.ArgumentTypeError("--seed takes one integer or four comma-separated integers/None")
    return items


def _bool(value: str) -> bool:
    return value.lower() in ("true", "1", "yes")


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Register `eval` with lm-eval's flag names (--eval_bs is lm-eval's --batch_size)."""
    p = subparsers.add_parser("eval", help="lm-eval tasks (local task YAMLs via --include_path) on a JAX model")
    p.add_argument("--model", "--model_name", "--model_name_or_path", dest="model", default=None,
                   help="HF folder (float, fake, or auto_round/auto_gptq/auto_awq int) or hub id "
                   "(default: the embedded SmolLM2)")
    p.add_argument("--model_dtype", "--dtype", dest="model_dtype", default="auto", help="bf16 | fp16 | fp32 | auto")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task or group names")
    p.add_argument("--eval_bs", "--batch_size", dest="eval_bs", type=int, default=16)
    p.add_argument("--limit", type=float, default=None, help="docs per task (a fraction when below 1)")
    p.add_argument("--num_fewshot", type=int, default=None)
    p.add_argument("--include_path", default=None, help="folder of extra task YAMLs (e.g. local jsonl datasets)")
    p.add_argument("--output_path", default=None, help="results JSON file (a folder gets results.json)")
    p.add_argument("--apply_chat_template", nargs="?", const=True, default=False,
                   help="format prompts with the tokenizer's chat template (optional template name)")
    p.add_argument("--fewshot_as_multiturn", type=_bool, nargs="?", const=True, default=None,
                   help="few-shot examples as chat turns (default: on with --apply_chat_template)")
    p.add_argument("--system_instruction", default=None)
    p.add_argument("--max_length", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--gen_kwargs", default=None,
                   help='generation settings for generate_until tasks, e.g. "max_gen_toks=64,temperature=0"')
    p.add_argument("--log_samples", action="store_true",
                   help="write each document's prompt, response and score beside --output_path")
    p.add_argument("--seed", type=parse_seed, default=parse_seed(DEFAULT_SEED), help=f"default {DEFAULT_SEED}")
    p.set_defaults(func=cmd_eval)
    return p


def require_lm_eval() -> None:
    """lm-eval is the `eval` extra, not a runtime dependency: say how to install it instead of an ImportError."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ValueError("evaluation needs lm-eval, which is not installed: pip install 'autoround-jax[eval]' "
                         "(or pip install 'lm-eval>=0.4')") from None


@functools.lru_cache(maxsize=4)
def task_manager(include_path: str | None = None, include_defaults: bool = True):
    """lm-eval's task index (building it parses every bundled YAML: seconds), once per process."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def resolve_tasks(tasks: str | Sequence[str], include_path: str | None = None, include_defaults: bool = True):
    """(TaskManager, task names); an unknown name raises lm-eval's `Tasks not found: ...` before any model loads."""
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    names = [n for n in names if n]
    if not names:
        raise ValueError("no tasks given: pass --tasks name1,name2")
    tm = task_manager(include_path, include_defaults)
    missing = [n for n in names if not tm.match_tasks([n])]
    if missing:
        raise ValueError(f"Tasks not found: {', '.join(missing)}")
    return tm, names


def evaluate_lm(
    lm,
    tasks: str | Sequence[str],
    *,
    limit: float | None = None,
    num_fewshot: int | None = None,
    include_path: str | None = None,
    include_defaults: bool = True,
    apply_chat_template: bool | str = False,
    fewshot_as_multiturn: bool | None = None,
    system_instruction: str | None = None,
    seed: Sequence[int | None] = (0, 1234, 1234, 1234),
    bootstrap_iters: int = 100000,
    gen_kwargs: str | dict | None = None,
    log_samples: bool = False,
) -> dict:
    """lm_eval.simple_evaluate on any lm-eval LM (ours or lm-eval's own), with the CLI's task and chat rules.

    gen_kwargs: lm-eval's override of every generate_until task's generation settings ("max_gen_toks=64,until=x"
    or a dict). log_samples: keep each document's prompt, response and score under results["samples"].
    """
    from lm_eval import simple_evaluate

    tm, names = resolve_tasks(tasks, include_path, include_defaults)
    if fewshot_as_multiturn is None:
        fewshot_as_multiturn = bool(apply_chat_template)
    elif fewshot_as_multiturn and not apply_chat_template:
        raise ValueError("fewshot_as_multiturn needs apply_chat_template")
    if limit is not None and limit >= 1:
        limit = int(limit)
    return simple_evaluate(
        model=lm, tasks=names, task_manager=tm, limit=limit, num_fewshot=num_fewshot,
        batch_size=getattr(lm, "batch_size", None),
        apply_chat_template=apply_chat_template, fewshot_as_multiturn=fewshot_as_multiturn,
        system_instruction=system_instruction, bootstrap_iters=bootstrap_iters, log_samples=log_samples,
        gen_kwargs=gen_kwargs,
        random_seed=seed[0], numpy_random_seed=seed[1], torch_random_seed=seed[2], fewshot_random_seed=seed[3],
    )


def run_eval(model, tokenizer, tasks: str | Sequence[str], *, batch_size: int = 16, max_length: int | None = None,
             **kwargs: Any) -> dict:
    """lm-eval results for a CausalLM already in memory (e.g. right after quantization); kwargs: evaluate_lm's."""
    from .lm_eval_model import JaxLM

    seed = kwargs.get("seed") or (0, 1234, 1234, 1234)
    sampling_seed = seed[2] if seed[2] is not None else 1234
    lm = JaxLM(model, tokenizer, batch_size=batch_size, max_length=max_length, seed=sampling_seed)
    return evaluate_lm(lm, tasks, **kwargs)


def load_for_eval(path: str, dtype: str = "auto"):
    """(model, tokenizer); int checkpoints (a quantization_config) stay packed via load_quantized."""
    from .formats.quantized_import import load_any
    from .tokenizer import load_tokenizer
    from .validation import check_tokenizer_fits

    model, tok = load_any(path, dtype=dtype), load_tokenizer(path)
    check_tokenizer_fits(tok, model.config.vocab_size, path)
    return model, tok


def results_markdown(float_results: dict, quant_results: dict, float_name: str = "BF16",
                     quant_name: str = "INT4") -> str:
    """`| Metric | BF16 | INT4 |`: one row per task and metric ("name,filter" keys) of the float run, no stderr."""
    lines = [f"| Metric | {float_name} | {quant_name} |", "|---|---|---|"]
    for task, metrics in sorted(float_results["results"].items()):
        for key, value in metrics.items():
            name, comma, filt = key.partition(",")
            if not comma or name.endswith("_stderr"):
                continue
            other = quant_results.get("results", {}).get(task, {}).get(key)
            label = f"{task} {name}" + (f" ({filt})" if filt != "none" else "")
            lines.append(f"| {label} | {_cell(value)} | {_cell(other)} |")
    return "\n".join(lines)


def _cell(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"


def write_results(results: dict, output_path: str) -> str:
    """lm-eval's results JSON at output_path (a .json file, else output_path/results.json).

    Logged samples (results["samples"], from log_samples) go beside it, one `samples_<task>.jsonl` per task (one
    document per line, as lm-eval writes them), not into the results JSON.
    """
    from lm_eval.utils import handle_non_serializable

    path = output_path if output_path.endswith(".json") else os.path.join(output_path, "results.json")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    samples = results.get("samples") or {}
    with open(path, "w", encoding="utf-8") as f:
        json.dump({k: v for k, v in results.items() if k != "samples"}, f, indent=2,
                  default=handle_non_serializable, ensure_ascii=False)
    for task, docs in samples.items():
        with open(os.path.join(folder, f"samples_{task}.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(d, default=handle_non_serializable, ensure_ascii=False) + "\n" for d in docs)
    return path


def cmd_eval(args: argparse.Namespace) -> None:
    require_lm_eval()
    from lm_eval.utils import make_table

    t0 = time.time()
    if args.log_samples and not args.output_path:
        raise ValueError("--log_samples needs --output_path (where the samples files go)")
    resolve_tasks(args.tasks, args.include_path)  # fail on a bad task name before loading the model
    if args.model:
        path = args.model
    else:
        from .default_model import default_model_dir

        path = default_model_dir()
    model, tok = load_for_eval(path, args.model_dtype)
    results = run_eval(
        model, tok, args.tasks, batch_size=args.eval_bs, max_length=args.max_length, limit=args.limit,
        num_fewshot=args.num_fewshot, include_path=args.include_path, apply_chat_template=args.apply_chat_template,
        fewshot_as_multiturn=args.fewshot_as_multiturn, system_instruction=args.system_instruction, seed=args.seed,
        gen_kwargs=args.gen_kwargs, log_samples=args.log_samples,
    )
    print(f"{path} ({args.model_dtype}), limit: {args.limit}, num_fewshot: {args.num_fewshot}, "
          f"batch_size: {args.eval_bs}")
    print(make_table(results))
    if "groups" in results:
        print(make_table(results, "groups"))
    if args.output_path:
        print(f"results written to {write_results(results, args.output_path)}")
    print(f"total {time.time() - t0:.1f} s")
