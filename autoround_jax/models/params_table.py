"""The one declarative table from HF tensor names to model paths and shapes.

The loader, the tuner's layer selection and every exporter read this table, so a tensor's name, shape and role are
written down exactly once. Block tensors are listed without their "model.layers.{i}." prefix; the model path of
a tensor is its HF name without the leading "model." (the NNX attributes mirror HF module names).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

from .config import ModelConfig

BLOCK_PREFIX = "model.layers"


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One tensor: its name (relative to its scope), shape rule, presence rule and role."""

    name: str
    shape: Callable[[ModelConfig], tuple[int, ...]]
    present: Callable[[ModelConfig], bool] = lambda c: True
    role: str = "float"  # "linear" (a quantizable weight) | "bias" | "float"


def _always(c: ModelConfig) -> bool:
    return True


GLOBAL_TENSORS: tuple[TensorSpec, ...] = (
    TensorSpec("model.embed_tokens.weight", lambda c: (c.vocab_size, c.hidden_size)),
    TensorSpec("model.norm.weight", lambda c: (c.hidden_size,)),
    TensorSpec("lm_head.weight", lambda c: (c.vocab_size, c.hidden_size), lambda c: not c.tie_word_embeddings, "linear"),
)

# (module, out_features, in_features, bias rule) for every Linear of a decoder block, in execution order.
BLOCK_LINEARS: tuple[tuple[str, Callable[[ModelConfig], int], Callable[[ModelConfig], int], Callable[[ModelConfig], bool]], ...] = (
    ("self_attn.q_proj", lambda c: c.q_size, lambda c: c.hidden_size, lambda c: c.qkv_bias),
    ("self_attn.k_proj", lambda c: c.kv_size, lambda c: c.hidden_size, lambda c: c.qkv_bias),
    ("self_attn.v_proj", lambda c: c.kv_size, lambda c: c.hidden_size, lambda c: c.qkv_bias),
    ("self_attn.o_proj", lambda c: c.hidden_size, lambda c: c.q_size, lambda c: c.o_bias),
    ("mlp.gate_proj", lambda c: c.intermediate_size, lambda c: c.hidden_size, lambda c: c.mlp_bias),
    ("mlp.up_proj", lambda c: c.intermediate_size, lambda c: c.hidden_size, lambda c: c.mlp_bias),
    ("mlp.down_proj", lambda c: c.hidden_size, lambda c: c.intermediate_size, lambda c: c.mlp_bias),
)


def _block_tensors() -> tuple[TensorSpec, ...]:
    specs = [
        TensorSpec("input_layernorm.weight", lambda c: (c.hidden_size,)),
        TensorSpec("post_attention_layernorm.weight", lambda c: (c.hidden_size,)),
        TensorSpec("self_attn.q_norm.weight", lambda c: (c.head_dim,), lambda c: c.qk_norm),
        TensorSpec("self_attn.k_norm.weight", lambda c: (c.head_dim,), lambda c: c.qk_norm),
    ]
    for name, out_f, in_f, has_bias in BLOCK_LINEARS:
        specs.append(TensorSpec(f"{name}.weight", lambda c, o=out_f, i=in_f: (o(c), i(c)), _always, "linear"))
        specs.append(TensorSpec(f"{name}.bias", lambda c, o=out_f: (o(c),), has_bias, "bias"))
    return tuple(specs)


BLOCK_TENSORS: tuple[TensorSpec, ...] = _block_tensors()


# Global tensors whose model path is not their HF name without "model." (the embedding is a bare Param).
_GLOBAL_PATHS = {"model.embed_tokens.weight": "embed_tokens", "lm_head.weight": "lm_head.weight.w"}


def model_path(spec: TensorSpec) -> str:
    """The attribute path of a tensor in its scope (the model for GLOBAL_TENSORS, a block for BLOCK_TENSORS): a
    linear's weight lives in its weight leaf ('self_attn.q_proj.weight' -> 'self_attn.q_proj.weight.w'); everything
    else mirrors the HF name without "model."."""
    name = spec.name
    if name in _GLOBAL_PATHS:
        return _GLOBAL_PATHS[name]
    name = name[len("model."):] if name.startswith("model.") else name
    return name + ".w" if spec.role == "linear" else name


def module_at(root, dotted: str):
    """The submodule at a table path such as "self_attn.q_proj" (module names mirror HF tensor names)."""
    return functools.reduce(getattr, dotted.split("."), root)


def block_prefix(i: int) -> str:
    return f"{BLOCK_PREFIX}.{i}."


def block_linear_names(cfg: ModelConfig) -> list[str]:
    """Linear module names inside a block, e.g. 'self_attn.q_proj'."""
    return [name for name, *_ in BLOCK_LINEARS]


def linear_shape(cfg: ModelConfig, name: str) -> tuple[int, int]:
    """(out_features, in_features) of a block linear."""
    for n, out_f, in_f, _ in BLOCK_LINEARS:
        if n == name:
            return out_f(cfg), in_f(cfg)
    raise KeyError(name)


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name the checkpoint must hold, with its shape."""
    out = {s.name: s.shape(cfg) for s in GLOBAL_TENSORS if s.present(cfg)}
    for i in range(cfg.num_layers):
        p = block_prefix(i)
        out.update({p + s.name: s.shape(cfg) for s in BLOCK_TENSORS if s.present(cfg)})
    return out


def expected_block_tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """A block's tensor names (without prefix) and shapes."""
    return {s.name: s.shape(cfg) for s in BLOCK_TENSORS if s.present(cfg)}
