"""Tiny random HF models (torch, test-only) saved as ordinary HF folders: the oracle side of parity tests."""

from __future__ import annotations

import os

FAMILIES = {
    # name: (family, kwargs) -- sizes deliberately not powers of two; GQA ratios 1, 2 and 4.
    "qwen2_gqa2_untied": ("qwen2", dict(hidden_size=96, intermediate_size=160, num_attention_heads=6,
                                        num_key_value_heads=3, tie_word_embeddings=False)),
    "qwen2_gqa1_tied": ("qwen2", dict(hidden_size=80, intermediate_size=144, num_attention_heads=5,
                                       num_key_value_heads=5, tie_word_embeddings=True)),
    "qwen3_gqa4_tied": ("qwen3", dict(hidden_size=96, intermediate_size=176, num_attention_heads=8,
                                       num_key_value_heads=2, head_dim=24, tie_word_embeddings=True)),
    "qwen3_gqa2_untied": ("qwen3", dict(hidden_size=112, intermediate_size=192, num_attention_heads=4,
                                         num_key_value_heads=2, head_dim=40, tie_word_embeddings=False)),
    "llama_gqa4_untied": ("llama", dict(hidden_size=96, intermediate_size=160, num_attention_heads=8,
                                         num_key_value_heads=2, tie_word_embeddings=False)),
    "llama_bias_scaled_tied": ("llama", dict(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                              num_key_value_heads=4, attention_bias=True, tie_word_embeddings=True,
                                              rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                            "original_max_position_embeddings": 64})),
}

# Quantizable tiny models: every linear dimension divisible by 32.
TUNE_FAMILIES = {
    "qwen3_tune": ("qwen3", dict(hidden_size=128, intermediate_size=256, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=32, tie_word_embeddings=True)),
    "qwen2_tune": ("qwen2", dict(hidden_size=128, intermediate_size=320, num_attention_heads=4,
                                 num_key_value_heads=2, tie_word_embeddings=False)),
}
# Mixture-of-experts models: odd expert counts, top-k 1 and 2, a shared expert, a dense layer via mlp_only_layers;
# every linear dimension divisible by 32 so they quantize too (the routers stay float by rule).
MOE_FAMILIES = {
    "qwen3_moe_e5k2": ("qwen3_moe", dict(hidden_size=128, intermediate_size=192, moe_intermediate_size=64,
                                         num_experts=5, num_experts_per_tok=2, norm_topk_prob=True,
                                         mlp_only_layers=[1], num_attention_heads=4, num_key_value_heads=2,
                                         head_dim=32, tie_word_embeddings=True)),
    "qwen2_moe_e7k1": ("qwen2_moe", dict(hidden_size=128, intermediate_size=192, moe_intermediate_size=64,
                                         shared_expert_intermediate_size=96, num_experts=7, num_experts_per_tok=1,
                                         norm_topk_prob=False, num_attention_heads=4, num_key_value_heads=2,
                                         tie_word_embeddings=False)),
}
FAMILIES_ALL = {**FAMILIES, **TUNE_FAMILIES, **MOE_FAMILIES}


def hf_config(name: str, num_layers: int = 2, vocab_size: int = 301):
    import transformers

    family, kw = FAMILIES_ALL[name]
    cls = {"qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config,
           "llama": transformers.LlamaConfig, "qwen3_moe": transformers.Qwen3MoeConfig,
           "qwen2_moe": transformers.Qwen2MoeConfig}[family]
    extra = {"rope_theta": 10000.0 if family == "llama" else 1e6}
    return cls(vocab_size=vocab_size, num_hidden_layers=num_layers, max_position_embeddings=256,
               rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0, **extra, **kw)


def build_model(name: str, seed: int = 0, num_layers: int = 2, vocab_size: int = 301):
    """A torch fp32 model with random weights, non-zero biases and non-trivial norm weights."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(name, num_layers, vocab_size), dtype=torch.float32)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("bias"):
                p.normal_(0, 0.5)
            elif "norm" in pname:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.08)
    return model.eval()


def save_model(model, folder: str) -> str:
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    return folder
