"""Load HF checkpoints (local folder or hub id) into the NNX decoder, block by block, without torch.

`load_block` reads one decoder block so the tuner can walk a model of any size holding one block at a time;
`load_model` assembles a whole model for inference. Both go through models/builder.py (shape-only construction, then
each tensor shape-checked and assigned); name-level file access is io/checkpoint.py's CheckpointReader.
"""

from __future__ import annotations

import os
import re
from typing import Iterable

import jax.numpy as jnp

from ..io.checkpoint import CheckpointReader, resolve_model_path
from ..io.safetensors_io import CheckpointError
from ..io.files import read_json
from .builder import WeightLeaf, build_block, build_model
from .config import ModelConfig
from .decoder import CausalLM, DecoderBlock
from .fused_experts import unfused
from .params_table import expected_tensors

_DTYPES = {
    "bf16": jnp.bfloat16, "bfloat16": jnp.bfloat16,
    "fp16": jnp.float16, "float16": jnp.float16, "half": jnp.float16,
    "fp32": jnp.float32, "float32": jnp.float32, "float": jnp.float32,
}
# Tensors some exporters write that the model rebuilds itself.
_IGNORABLE = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def parse_dtype(dtype, config_dtype: str | None = None):
    """'auto' follows the checkpoint's torch_dtype (bf16 if unknown)."""
    if dtype is None or dtype == "auto":
        return _DTYPES.get(str(config_dtype or "bfloat16").replace("torch.", ""), jnp.bfloat16)
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}: use one of bf16, fp16, fp32 or auto")
        return _DTYPES[dtype]
    return dtype


def check_tensors(reader: CheckpointReader, cfg: ModelConfig) -> None:
    """Missing, unexpected or misshapen tensors -> one error listing the first few."""
    tied_head = {"lm_head.weight": (cfg.vocab_size, cfg.hidden_size)} if cfg.tie_word_embeddings else {}
    check_against(reader, expected_tensors(cfg), optional=tied_head)


def check_against(reader: CheckpointReader, want: dict, optional: dict | None = None) -> None:
    """Compare a checkpoint with the expected {name: shape} (plus optional tensors); one error naming the first few
    missing, unexpected and shape-mismatched tensors. Shared by the float loader and the quantized importer."""
    shapes = {**(optional or {}), **want}
    have = set(reader.keys())
    missing = sorted(set(want) - have)
    unexpected = sorted(k for k in have - set(shapes) if not _IGNORABLE.search(k))
    bad = [f"{k} {reader.shape(k)} != {shapes[k]}" for k in sorted(have & set(shapes)) if reader.shape(k) != shapes[k]]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensors (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensors (e.g. {', '.join(unexpected[:3])})")
    if bad:
        problems.append(f"misshapen (shapes disagree with the config): {'; '.join(bad[:3])}")
    if problems:
        raise CheckpointError(f"{reader.path}: checkpoint does not match its config.json: {' | '.join(problems)}")


def load_block(reader: CheckpointReader, cfg: ModelConfig, i: int, dtype=jnp.float32,
               weight_leaf: WeightLeaf | None = None, mesh=None) -> DecoderBlock:
    """One decoder block, for block-by-block tuning (models/builder.py: abstract, then filled tensor by tensor)."""
    return build_block(cfg, i, reader.get, dtype, weight_leaf, mesh, reader.path)


class ModelSource:
    """A checkpoint opened once: config, reader and dtype, for reading any part of the model on demand."""

    def __init__(self, name_or_path: str, dtype="auto", check: bool = True):
        self.path = resolve_model_path(name_or_path)
        self.config = ModelConfig.from_pretrained(self.path)
        self.hf_config = read_json(os.path.join(self.path, "config.json"))
        self.dtype = parse_dtype(dtype, self.hf_config.get("torch_dtype") or self.hf_config.get("dtype"))
        self.reader = unfused(CheckpointReader(self.path))  # MoE experts stored fused: read per expert
        if check:
            try:
                check_tensors(self.reader, self.config)
            except CheckpointError:
                qc = self.hf_config.get("quantization_config")
                if isinstance(qc, dict):  # a packed export: say so rather than list its "missing" float weights
                    method = qc.get("packing_format") or qc.get("quant_method") or "quantized"
                    raise CheckpointError(
                        f"{self.path} is a quantized checkpoint ({method}), not a float one: load it with "
                        "load_quantized (generate, perplexity and eval do so), or dequantize it first with "
                        f"`autoround-jax convert {self.path} DST --to float`"
                    ) from None
                raise

    def block(self, i: int, dtype=None, weight_leaf: WeightLeaf | None = None, mesh=None) -> DecoderBlock:
        return load_block(self.reader, self.config, i, dtype or self.dtype, weight_leaf, mesh)

    def tensor(self, name: str, dtype=None) -> jnp.ndarray:
        return jnp.asarray(self.reader.get(name), dtype or self.dtype)

    def model(self, blocks: Iterable[DecoderBlock] | None = None, dtype=None, weight_leaf: WeightLeaf | None = None,
              mesh=None) -> CausalLM:
        """The full model (optionally from blocks already built, e.g. quantized ones), optionally on a mesh."""
        return build_model(self.config, self.reader.get, dtype or self.dtype, weight_leaf, mesh, self.path, blocks)


def load_model(name_or_path: str, dtype="auto") -> CausalLM:
    """Load a Qwen2/Qwen3/Llama checkpoint as a CausalLM: call it on int32 ids [B, T] for fp32 logits [B, T, V]."""
    return ModelSource(name_or_path, dtype).model()


__all__ = ["CheckpointReader", "ModelSource", "load_model", "load_block", "resolve_model_path"]
