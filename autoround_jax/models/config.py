"""Model configuration: one frozen dataclass for the Qwen2, Qwen3 and Llama decoder families.

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
}
SUPPORTED_MODEL_TYPES = {"qwen2": "qwen2", "qwen3": "qwen3", "llama": "llama"}


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

    family: str  # "qwen2" | "qwen3" | "llama"
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
            qkv_bias=True if family == "qwen2" else attention_bias,
            o_bias=attention_bias if family != "qwen2" else False,
            mlp_bias=bool(d.get("mlp_bias", False)),
            qk_norm=family == "qwen3",
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=d.get("pad_token_id"),
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
