"""Decode speed of the int4 (packed, kernels) and float models, measured side by side in one run.

Quantizes a model with RTN (W4G128 sym), exports it in the auto_round format, loads it back packed
(`load_quantized`, kernels chosen by --backend) and times cached greedy decode against the float model. Decode
speed is the slope between two generation lengths, so prefill and compile cancel out.
Run: HF_HUB_OFFLINE=1 python scripts/bench_decode.py [--model DIR | --random 1b] [--dtype bf16] [--backend auto]
`--random` writes a random-weight Qwen3 checkpoint of that size first (for machines without the embedded model).

`--random_int4 32b` instead builds a Qwen2.5-32B-shaped int4 W4G128 model with random packed weights directly on the
device (no checkpoint, no float model, no download) and times batch-1 decode against the bandwidth floor: the bytes a
decode step must read over the device-to-device copy rate measured in the same run. `--random_int4 tiny` is the
same on a 2-layer model (a dry run on a CPU).
Run: python scripts/bench_decode.py --random_int4 32b [--backend auto] [--steps 32] [--markdown OUT.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_int4_matmul (copy rate)
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # autoround_jax, kernels

RANDOM = {  # Qwen3-shaped random checkpoints: (layers, hidden, intermediate, heads, kv heads)
    "tiny": (2, 256, 768, 4, 2),
    "1b": (16, 2048, 6144, 16, 8),
    "4b": (36, 2560, 9728, 32, 8),
}


def write_random_qwen3(folder: str, size: str) -> str:
    import ml_dtypes

    from autoround_jax.io.safetensors_io import save_file
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


# Qwen2.5-shaped int4 models built on the device: (layers, hidden, intermediate, heads, kv heads, vocab); untied head,
# q/k/v biases, head_dim 128 (hidden / heads). "32b" is Qwen2.5-32B's config.json shape.
RANDOM_INT4 = {
    "tiny": (2, 256, 512, 2, 1, 1024),
    "32b": (64, 5120, 27648, 40, 8, 152064),
}


def qwen25_config(size: str) -> dict:
    layers, hidden, inter, heads, kv, vocab = RANDOM_INT4[size]
    return dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=vocab, hidden_size=hidden,
                intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=32768, tie_word_embeddings=False,
                torch_dtype="bfloat16", eos_token_id=2, bos_token_id=1)


def build_random_int4(size: str, dtype: str = "bf16", backend: str = "auto", group_size: int = 128, seed: int = 0,
                      layers: int | None = None):
    """A CausalLM whose block linears are int4 PackedWeight leaves (sym, zero 8, fp16 scales) with random codes, the
    embedding, head, norms and biases random floats; everything made on the default device, nothing on disk.
    Returns (model, bytes): bytes splits what one decode step reads into 'int4' (packed words + scales + zeros of
    every quantized linear, as stored for the kernels) and 'float' (head, norms, biases). layers: fewer blocks of
    the same shape than the named model has."""
    import functools

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from autoround_jax.models.builder import build_model
    from autoround_jax.models.config import ModelConfig
    from autoround_jax.models.loading import parse_dtype
    from autoround_jax.models.params_table import expected_tensors
    from autoround_jax.quant.packed_weight import PackedWeight

    hf = qwen25_config(size)
    if layers:
        hf["num_hidden_layers"] = layers
    cfg = ModelConfig.from_hf_config(hf)
    dt = parse_dtype(dtype)
    keys = iter(jax.random.split(jax.random.key(seed), 16 + cfg.num_layers * 32))
    normal = lambda shape, std: (jax.random.normal(next(keys), shape, jnp.float32) * std).astype(dt)  # noqa: E731
    nbytes = {"int4": 0, "float": 0}

    @functools.partial(jax.jit, static_argnums=(1, 2))
    def int4_leaf_arrays(key, k, n):
        kq, ks = jax.random.split(key)
        qweight = jax.lax.bitcast_convert_type(jax.random.bits(kq, (k * 4 // 32, n), jnp.uint32), jnp.int32)
        # codes - 8 in [-8, 7] (std ~4.6) times ~0.0045: weights of std ~0.02, like the float layers here
        scales = (0.0045 * (1 + 0.1 * jax.random.normal(ks, (k // group_size, n)))).astype(jnp.float16)
        return qweight, scales, jnp.full((k // group_size, n), 8, jnp.uint8)

    shapes = expected_tensors(cfg)

    def get(name):  # float tensors made on demand on the device (the builder shape-checks them)
        if name.endswith("norm.weight"):
            return jnp.ones(shapes[name], dt)
        nbytes["float"] += int(np.prod(shapes[name])) * jnp.dtype(dt).itemsize
        return normal(shapes[name], 0.02)

    def packed(module, read_float):  # every block linear: a random int4 leaf (its float weight is never made)
        if ".layers." not in module:
            return None
        out_f, in_f = shapes[module + ".weight"]
        q, sc, z = int4_leaf_arrays(next(keys), in_f, out_f)
        leaf = PackedWeight(q, sc, z, bits=4, group_size=group_size, backend=backend)
        nbytes["int4"] += sum(v[...].nbytes for v in (leaf.qweight, leaf.scales, leaf.zeros))
        return leaf

    model = build_model(cfg, get, dt, packed, source="random")
    jax.block_until_ready(jax.tree.leaves(nnx.state(model)))
    return model, nbytes


def decode_loop_tok_s(model, steps: int = 32, reps: int = 3) -> tuple[float, float]:
    """(tokens/s, first call's seconds incl. compile) of batch-1 greedy decode: `steps` cached decode steps
    (model.forward_cached, as generate's loop runs them) from an empty cache inside one jit call, median of reps."""
    import functools

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from autoround_jax.models.decoder import KVCache

    graphdef, state = nnx.split(model)

    @functools.partial(jax.jit, static_argnames=("n",))
    def run(state, tok, *, n):
        m = nnx.merge(graphdef, state)
        cache = KVCache.init(m.config, 1, n, m.dtype)

        def body(i, c):
            tok, cache = c
            logits, cache = m.forward_cached(tok[:, None], jnp.full((1, 1), i, jnp.int32), jnp.ones((1, 1), bool),
                                             cache)
            return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache

        return jax.lax.fori_loop(0, n, body, (tok, cache))[0]

    tok = jnp.ones((1,), jnp.int32)
    t0 = time.perf_counter()
    jax.block_until_ready(run(state, tok, n=steps))
    first = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(run(state, tok, n=steps))
        times.append(time.perf_counter() - t0)
    return steps / statistics.median(times), first


def random_int4_report(size: str, backend: str = "auto", steps: int = 32, reps: int = 3,
                       copy_tbps: float | None = None, layers: int | None = None) -> str:
    """Build the random int4 model, time its decode and return a markdown report against the bandwidth floor.
    layers: fewer blocks of the same shape (a shallower model of the same layers, with its own floor)."""
    import gc

    import jax

    from bench_int4_matmul import copy_tbps as measure_copy

    copy = copy_tbps or measure_copy(2**30 if jax.default_backend() != "cpu" else 2**22)
    t0 = time.perf_counter()
    model, nbytes = build_random_int4(size, backend=backend, layers=layers)
    built = time.perf_counter() - t0
    tok_s, first = decode_loop_tok_s(model, steps, reps)
    cfg = model.config
    del model
    gc.collect()
    total = nbytes["int4"] + nbytes["float"]
    floor_int4 = copy * 1e12 / nbytes["int4"]  # tokens/s if a step only streamed the int4 weights at the copy rate
    floor_all = copy * 1e12 / total
    lines = [
        f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}; random "
        f"Qwen2.5-{size}-shaped int4 W4G128 sym model built on the device ({cfg.num_layers} layers, hidden "
        f"{cfg.hidden_size}, intermediate {cfg.intermediate_size}, {cfg.num_heads}/{cfg.num_kv_heads} heads, vocab "
        f"{cfg.vocab_size}, bf16 activations, head bf16); int4 backend {backend}; batch 1, {steps} cached decode "
        f"steps per jit call from an empty cache, median of {reps}; build {built:.1f} s, first call (compile) "
        f"{first:.1f} s; copy rate {copy:.3f} TB/s (read + write, measured in this run)",
        "",
        "| int4 weight bytes (words + scales + zeros) | + float bytes read per step (head, norms, biases) "
        "| floor tok/s, int4 bytes only | floor tok/s, all bytes | decode tok/s | % of int4 floor "
        "| % of all-bytes floor |",
        "|---|---|---|---|---|---|---|",
        f"| {nbytes['int4'] / 1e9:.3f} GB | {nbytes['float'] / 1e9:.3f} GB | {floor_int4:.1f} | {floor_all:.1f} "
        f"| {tok_s:.1f} | {100 * tok_s / floor_int4:.0f}% | {100 * tok_s / floor_all:.0f}% |",
    ]
    return "\n".join(lines)


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
    ap.add_argument("--random_int4", choices=sorted(RANDOM_INT4), default=None,
                    help="build a random int4 model of this shape on the device; time it against the bandwidth floor")
    ap.add_argument("--steps", type=int, default=32, help="decode steps per timed call (--random_int4)")
    ap.add_argument("--markdown", default=None, help="also write the --random_int4 report here")
    args = ap.parse_args()

    if args.random_int4:
        report = random_int4_report(args.random_int4, backend=args.backend, steps=args.steps, reps=args.reps)
        print(report)
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(report + "\n")
        return

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
