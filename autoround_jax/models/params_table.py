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
    role: str = "float"  # "linear" (a quantizable weight) | "bias" | "float" | "router" (a linear kept in float)
    stack: str | None = None  # an expert's linear: the stacked module holding all experts ("mlp.experts.up_proj")
    expert: int = -1  # ... and this expert's index along its leading axis


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


BLOCK_TENSORS: tuple[TensorSpec, ...] = _block_tensors()  # a dense block's tensors
EXPERT_LINEARS = ("gate_proj", "up_proj", "down_proj")
SHARED_EXPERT = "mlp.shared_expert"
ROUTERS = ("mlp.gate", "mlp.shared_expert_gate")  # MoE linears that are never quantized (vLLM needs them float)


def moe_linears(cfg: ModelConfig) -> list[tuple[str, int, int, str | None, int]]:
    """A sparse block's MLP linears: (name, out, in, stacked module or None, expert index), experts by their
    per-expert checkpoint names (mlp.experts.E.gate_proj), as hub checkpoints and the reference's exports name them."""
    d, i = cfg.hidden_size, cfg.moe_intermediate_size
    shapes = {"gate_proj": (i, d), "up_proj": (i, d), "down_proj": (d, i)}
    out = [(f"mlp.experts.{e}.{lin}", *shapes[lin], f"mlp.experts.{lin}", e)
           for e in range(cfg.num_experts) for lin in EXPERT_LINEARS]
    if cfg.shared_expert_intermediate_size:
        s = cfg.shared_expert_intermediate_size
        out += [(f"{SHARED_EXPERT}.gate_proj", s, d, None, -1), (f"{SHARED_EXPERT}.up_proj", s, d, None, -1),
                (f"{SHARED_EXPERT}.down_proj", d, s, None, -1)]
    return out


def router_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """A sparse block's float routing linears: the router and (qwen2_moe) the shared expert's sigmoid gate."""
    out = {"mlp.gate": (cfg.num_experts, cfg.hidden_size)}
    if cfg.shared_expert_intermediate_size:
        out["mlp.shared_expert_gate"] = (1, cfg.hidden_size)
    return out


@functools.lru_cache(maxsize=None)
def block_tensors(cfg: ModelConfig, i: int) -> tuple[TensorSpec, ...]:
    """Block i's tensors: BLOCK_TENSORS for a dense block; for a sparse MoE block the attention and norms, the router
    and per-expert linears (stacked in the model along a leading expert axis), and the shared expert if any."""
    if not cfg.is_moe_layer(i):
        return BLOCK_TENSORS
    specs = [s for s in BLOCK_TENSORS if not s.name.startswith("mlp.")]
    for name, shape in router_shapes(cfg).items():
        specs.append(TensorSpec(f"{name}.weight", lambda c, sh=shape: sh, _always, "router"))
    for name, n_out, n_in, stack, e in moe_linears(cfg):
        specs.append(TensorSpec(f"{name}.weight", lambda c, sh=(n_out, n_in): sh, _always, "linear", stack, e))
    return tuple(specs)


# Global tensors whose model path is not their HF name without "model." (the embedding is a bare Param).
_GLOBAL_PATHS = {"model.embed_tokens.weight": "embed_tokens", "lm_head.weight": "lm_head.weight.w"}


def model_path(spec: TensorSpec) -> str:
    """The attribute path of a tensor in its scope (the model for GLOBAL_TENSORS, a block for BLOCK_TENSORS): a
    linear's weight lives in its weight leaf ('self_attn.q_proj.weight' -> 'self_attn.q_proj.weight.w'); everything
    else mirrors the HF name without "model."."""
    name = spec.name
    if name in _GLOBAL_PATHS:
        return _GLOBAL_PATHS[name]
    if spec.stack is not None:  # an expert's weight lives in its stacked leaf, at index spec.expert
        return spec.stack + ".weight.w"
    name = name[len("model."):] if name.startswith("model.") else name
    return name + ".w" if spec.role in ("linear", "router") else name


def module_at(root, dotted: str):
    """The submodule at a table path such as "self_attn.q_proj" (module names mirror HF tensor names)."""
    return functools.reduce(getattr, dotted.split("."), root)


def block_prefix(i: int) -> str:
    return f"{BLOCK_PREFIX}.{i}."


def block_linear_names(cfg: ModelConfig, i: int = 0) -> list[str]:
    """Quantizable linear module names inside block i, e.g. 'self_attn.q_proj', 'mlp.experts.3.up_proj'."""
    return [s.name[: -len(".weight")] for s in block_tensors(cfg, i) if s.role == "linear"]


def linear_shape(cfg: ModelConfig, name: str) -> tuple[int, int]:
    """(out_features, in_features) of a block linear (dense, expert, shared expert or router)."""
    for n, out_f, in_f, _ in BLOCK_LINEARS:
        if n == name:
            return out_f(cfg), in_f(cfg)
    if cfg.num_experts:
        if name in router_shapes(cfg):
            return router_shapes(cfg)[name]
        for n, n_out, n_in, *_ in moe_linears(cfg):
            if n == name:
                return n_out, n_in
    raise KeyError(name)


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name the checkpoint must hold, with its shape."""
    out = {s.name: s.shape(cfg) for s in GLOBAL_TENSORS if s.present(cfg)}
    for i in range(cfg.num_layers):
        p = block_prefix(i)
        out.update({p + s.name: s.shape(cfg) for s in block_tensors(cfg, i) if s.present(cfg)})
    return out


def expected_block_tensors(cfg: ModelConfig, i: int = 0) -> dict[str, tuple[int, ...]]:
    """Block i's tensor names (without prefix) and shapes."""
    return {s.name: s.shape(cfg) for s in block_tensors(cfg, i) if s.present(cfg)}
