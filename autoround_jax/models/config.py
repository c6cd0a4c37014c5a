"""Model configuration: one frozen dataclass for the Qwen2, Qwen3, Llama and Qwen2/Qwen3-MoE decoder families.

Built from a `transformers` config (which we use for configs only) so that everything downstream reads plain
Python fields and never touches the HF object again.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

SUPPORTED_ARCHITECTURES = {
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "LlamaForCausalLM": "llama",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "Qwen2MoeForCausalLM": "qwen2_moe",
}
SUPPORTED_MODEL_TYPES = {"qwen2": "qwen2", "qwen3": "qwen3", "llama": "llama", "qwen3_moe": "qwen3_moe",
                         "qwen2_moe": "qwen2_moe"}
MOE_FAMILIES = ("qwen3_moe", "qwen2_moe")


class UnsupportedModelError(ValueError):
    """Raised for an architecture this package does not implement."""


class ConfigError(ValueError):
    """config.json lacks a field the decoder needs, or holds a value of the wrong type."""


# field -> (required, smallest value); every one an integer
_INT_FIELDS = {"vocab_size": (True, 1), "hidden_size": (True, 1), "intermediate_size": (True, 1),
               "num_hidden_layers": (True, 1), "num_attention_heads": (True, 1), "num_key_value_heads": (False, 1),
               "head_dim": (False, 1), "max_position_embeddings": (False, 1)}


def _check_fields(d: Mapping[str, Any]) -> None:
    """Required integer fields present and positive, so no KeyError or ZeroDivisionError surfaces later."""
    for key, (required, low) in _INT_FIELDS.items():
        v = d.get(key)
        if v is None:
            if required:
                raise ConfigError(f"missing required key {key!r}: restore the model's original config.json")
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ConfigError(f"{key} is {v!r}: expected an integer >= {low}; restore the model's original config.json")
    heads, kv = d["num_attention_heads"], d.get("num_key_value_heads") or d["num_attention_heads"]
    if heads % kv:
        raise ConfigError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}: restore the "
                          "model's original config.json")
    if not d.get("head_dim") and d["hidden_size"] % heads:
        raise ConfigError(f"hidden_size {d['hidden_size']} is not a multiple of num_attention_heads {heads} and no "
                          "head_dim is given: restore the model's original config.json")
    eps = d.get("rms_norm_eps", 1e-6)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ConfigError(f"rms_norm_eps is {eps!r}: expected a positive number; restore the model's original "
                          "config.json")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters: theta plus the optional scaling used by these families."""

    theta: float = 10000.0
    rope_type: str = "default"  # default | linear | dynamic | llama3 | yarn
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything the decoder needs, for all three families."""

    family: str  # "qwen2" | "qwen3" | "llama" | "qwen3_moe" | "qwen2_moe"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: True; Llama: attention_bias
    o_bias: bool = False  # Llama attention_bias also covers o_proj
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    # mixture of experts (qwen3_moe, qwen2_moe); num_experts 0 for dense families
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    shared_expert_intermediate_size: int = 0  # qwen2_moe: a shared expert with a sigmoid gate; 0 for none

    def is_moe_layer(self, i: int) -> bool:
        """Whether block i has a sparse MoE MLP (transformers' rule: not in mlp_only_layers and every
        decoder_sparse_step-th layer)."""
        return (self.num_experts > 0 and i not in self.mlp_only_layers
                and (i + 1) % self.decoder_sparse_step == 0)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf_config(cls, hf: Any) -> "ModelConfig":
        """Translate a transformers PretrainedConfig (or its dict) for Qwen2/Qwen3/Llama."""
        d = hf.to_dict() if hasattr(hf, "to_dict") else dict(hf)
        family = _family(d)
        _check_fields(d)
        heads = d["num_attention_heads"]
        hidden = d["hidden_size"]
        head_dim = d.get("head_dim") or hidden // heads
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        attention_bias = bool(d.get("attention_bias", False))
        moe = _moe_fields(d, family)
        qkv_bias = bool(d.get("qkv_bias", True)) if family == "qwen2_moe" else (
            True if family == "qwen2" else attention_bias)
        return cls(
            family=family,
            vocab_size=d["vocab_size"],
            hidden_size=hidden,
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope=_rope(d),
            max_position_embeddings=d.get("max_position_embeddings", 32768),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=attention_bias if family not in ("qwen2", "qwen2_moe") else False,
            mlp_bias=bool(d.get("mlp_bias", False)),
            qk_norm=family in ("qwen3", "qwen3_moe"),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=d.get("pad_token_id"),
            **moe,
        )

    @classmethod
    def from_pretrained(cls, path: str) -> "ModelConfig":
        """Read config.json from a local folder (or resolved hub snapshot)."""
        import os

        from ..io.files import read_json

        cfg_file = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_file):
            raise FileNotFoundError(f"{cfg_file} not found: point --model at a folder with config.json")
        try:
            return cls.from_hf_config(read_json(cfg_file))
        except ConfigError as e:
            raise ConfigError(f"{cfg_file}: {e}") from None


def _family(d: Mapping[str, Any]) -> str:
    archs = d.get("architectures") or []
    for arch in archs:
        if arch in SUPPORTED_ARCHITECTURES:
            return SUPPORTED_ARCHITECTURES[arch]
    model_type = d.get("model_type")
    if model_type in SUPPORTED_MODEL_TYPES:
        return SUPPORTED_MODEL_TYPES[model_type]
    name = ", ".join(archs) or str(model_type)
    raise UnsupportedModelError(
        f"unsupported architecture {name}: autoround-jax supports {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def _moe_fields(d: Mapping[str, Any], family: str) -> dict[str, Any]:
    """The MoE fields of a qwen3_moe / qwen2_moe config.json, checked; {} for dense families."""
    if family not in MOE_FAMILIES:
        return {}
    out: dict[str, Any] = {}
    for key, low in (("num_experts", 1), ("num_experts_per_tok", 1), ("moe_intermediate_size", 1),
                     ("decoder_sparse_step", 1)):
        v = d.get(key, 1 if key == "decoder_sparse_step" else None)
        if key == "num_experts" and v is None:
            v = d.get("num_local_experts")  # transformers 5 writes num_experts under this name
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ConfigError(f"{key} is {v!r}: expected an integer >= {low}; restore the model's original config.json")
        out[key] = v
    if out["num_experts_per_tok"] > out["num_experts"]:
        raise ConfigError(f"num_experts_per_tok {out['num_experts_per_tok']} exceeds num_experts "
                          f"{out['num_experts']}: restore the model's original config.json")
    layers = d.get("mlp_only_layers") or []
    if not isinstance(layers, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise ConfigError(f"mlp_only_layers is {layers!r}: expected a list of layer indices; restore the model's "
                          "original config.json")
    out["mlp_only_layers"] = tuple(layers)
    out["norm_topk_prob"] = bool(d.get("norm_topk_prob", False))
    if family == "qwen2_moe":
        shared = d.get("shared_expert_intermediate_size")
        if isinstance(shared, bool) or not isinstance(shared, int) or shared < 1:
            raise ConfigError(f"shared_expert_intermediate_size is {shared!r}: expected an integer >= 1; restore "
                              "the model's original config.json")
        out["shared_expert_intermediate_size"] = shared
    return out


def _rope(d: Mapping[str, Any]) -> RopeConfig:
    # transformers 5 keeps everything in `rope_parameters`; 4.x used rope_theta + rope_scaling.
    params = dict(d.get("rope_parameters") or {})
    scaling = d.get("rope_scaling") or {}
    merged = {**scaling, **params}
    theta = merged.get("rope_theta", d.get("rope_theta", 10000.0))
    rope_type = merged.get("rope_type", merged.get("type", "default")) or "default"
    if rope_type not in ("default", "linear", "dynamic", "llama3", "yarn"):
        raise UnsupportedModelError(
            f"unsupported rope_type {rope_type!r}: use one of default, linear, dynamic, llama3, yarn"
        )
    return RopeConfig(
        theta=float(theta),
        rope_type=rope_type,
        factor=float(merged.get("factor", 1.0) or 1.0),
        low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
        high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=merged.get("original_max_position_embeddings"),
        beta_fast=float(merged.get("beta_fast", 32.0) or 32.0),
        beta_slow=float(merged.get("beta_slow", 1.0) or 1.0),
        attention_factor=merged.get("attention_factor"),
    )
