"""Random float HF checkpoints of any size written with numpy only (no torch): for memory tests and benchmarks whose
models are too large to build as torch modules first."""

from __future__ import annotations

import json
import os

import numpy as np


def write_random_qwen3(folder: str, num_layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int,
                       head_dim: int, vocab: int = 512, dtype=np.float32, seed: int = 0) -> int:
    """A random Qwen3 checkpoint (config.json + sharded safetensors, written block by block). Returns the bytes of
    its weights on disk."""
    from autoround_jax.io.hf_folder import ShardedWriter
    from autoround_jax.models.config import ModelConfig
    from autoround_jax.models.params_table import expected_tensors

    os.makedirs(folder, exist_ok=True)
    config = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": vocab,
              "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": num_layers,
              "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
              "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 1e6, "tie_word_embeddings": False,
              "hidden_act": "silu", "attention_bias": False, "bos_token_id": 1, "eos_token_id": 2,
              "torch_dtype": {np.float32: "float32", np.float16: "float16"}.get(dtype, "bfloat16")}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    # A pool of random values tiled with a shift per tensor: fast to write at gigabyte sizes, and no two tensors equal.
    pool = (np.random.default_rng(seed).standard_normal(1 << 20, dtype=np.float32) * np.float32(0.05))
    writer = ShardedWriter(folder, max_shard_bytes=512 << 20)
    for name, shape in expected_tensors(ModelConfig.from_pretrained(folder)).items():
        if name.endswith("norm.weight"):
            arr = np.ones(shape, np.float32)
        else:
            shift = hash(name) % pool.size
            arr = np.resize(np.roll(pool, shift), shape)
        writer.add(name, arr.astype(dtype))
    writer.close()
    return writer.total
