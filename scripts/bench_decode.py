"""Decode speed of the int4 (packed, kernels) and float models, measured side by side in one run.

Quantizes a model with RTN (W4G128 sym), exports it in the auto_round format, loads it back packed
(`load_quantized`, kernels chosen by --backend) and times cached greedy decode against the float model. Decode
speed is the slope between two generation lengths, so prefill and compile cancel out.
Run: HF_HUB_OFFLINE=1 python scripts/bench_decode.py [--model DIR | --random 1b] [--dtype bf16] [--backend auto]
`--random` writes a random-weight Qwen3 checkpoint of that size first (for machines without the embedded model).
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

RANDOM = {  # Qwen3-shaped random checkpoints: (layers, hidden, intermediate, heads, kv heads)
    "tiny": (2, 256, 768, 4, 2),
    "1b": (16, 2048, 6144, 16, 8),
    "4b": (36, 2560, 9728, 32, 8),
}


def write_random_qwen3(folder: str, size: str) -> str:
    import ml_dtypes

    from autoround_jax.formats.safetensors_io import save_file
    from autoround_jax.models.config import ModelConfig
    from autoround_jax.models.params_table import expected_tensors

    layers, hidden, inter, heads, kv = RANDOM[size]
    hf = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=32000, hidden_size=hidden,
              intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
              head_dim=128, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=4096,
              tie_word_embeddings=True, torch_dtype="bfloat16", eos_token_id=2, bos_token_id=1)
    os.makedirs(folder, exist_ok=True)
    json.dump(hf, open(os.path.join(folder, "config.json"), "w"))
    rng = np.random.default_rng(0)
    tensors = {}
    for name, shape in expected_tensors(ModelConfig.from_hf_config(hf)).items():
        scale = 1.0 if name.endswith("norm.weight") else 0.02
        base = np.ones(shape, np.float32) if scale == 1.0 else rng.standard_normal(shape, np.float32) * scale
        tensors[name] = base.astype(ml_dtypes.bfloat16)
    save_file(tensors, os.path.join(folder, "model.safetensors"), {"format": "pt"})
    return folder


def decode_tok_s(model, prompt, short: int, long: int, reps: int) -> float:
    from autoround_jax.generation import generate_ids

    def t(n):
        generate_ids(model, prompt, max_new_tokens=n)  # compile / warm-up
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            generate_ids(model, prompt, max_new_tokens=n)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    return (long - short) / (t(long) - t(short))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--random", choices=sorted(RANDOM), default=None)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--backend", default="auto", choices=["auto", "pallas", "xla"])
    ap.add_argument("--group_size", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--short", type=int, default=16)
    ap.add_argument("--long", type=int, default=80)
    args = ap.parse_args()

    import jax

    from autoround_jax import load_model, load_quantized
    from autoround_jax.tuning.autoround import AutoRound

    with tempfile.TemporaryDirectory() as tmp:
        if args.random:
            path = write_random_qwen3(os.path.join(tmp, "random"), args.random)
        else:
            from autoround_jax.default_model import default_model_dir

            path = args.model or default_model_dir()
        ar = AutoRound(path, iters=0, disable_opt_rtn=True, bits=4, group_size=args.group_size, sym=True, model_dtype=args.dtype,
                       progress=False)
        ar.quantize()
        qpath = ar.save_quantized(os.path.join(tmp, "int4"), format="auto_round")
        prompt = np.random.default_rng(0).integers(5, 1000, size=(1, 32)).astype(np.int32)
        float_model = load_model(path, dtype=args.dtype)
        fp = decode_tok_s(float_model, prompt, args.short, args.long, args.reps)
        del float_model
        int4 = decode_tok_s(load_quantized(qpath, dtype=args.dtype, backend=args.backend), prompt, args.short,
                            args.long, args.reps)
        nbytes = lambda d: sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(".safetensors"))  # noqa: E731
        print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
              f"{platform.machine()}; model {args.random or path}; dtype {args.dtype}; int4 backend {args.backend}")
        print("| model | checkpoint MB | decode tok/s (batch 1) |\n|---|---|---|")
        print(f"| float ({args.dtype}) | {nbytes(path) / 1e6:.0f} | {fp:.1f} |")
        print(f"| int4 W4G{args.group_size} (auto_round, packed) | {nbytes(qpath) / 1e6:.0f} | {int4:.1f} |")
        print(f"int4 / float decode speed: {int4 / fp:.2f}x")


if __name__ == "__main__":
    main()
