"""Load HF checkpoints (local folder or hub id) into the NNX decoder, block by block, without torch.

`CheckpointReader` gives name-level access across shards; `load_block` reads one decoder block so the tuner can
walk a model of any size holding one block at a time; `load_model` assembles a whole model for inference.
"""

from __future__ import annotations

import os
import re
from typing import Iterable

import jax.numpy as jnp
import numpy as np

from ..io.safetensors_io import CheckpointError, SafetensorsFile
from ..validation import check_finite, read_json
from .config import ModelConfig
from .decoder import CausalLM, DecoderBlock
from .layers import FloatWeight, Linear
from .params_table import block_prefix, expected_block_tensors, expected_tensors

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


def resolve_model_path(name_or_path: str) -> str:
    """A local folder as is; otherwise a hub id downloaded (or found in the cache) through huggingface_hub."""
    if os.path.isdir(name_or_path):
        return name_or_path
    if os.path.exists(name_or_path):
        raise FileNotFoundError(f"{name_or_path} is a file: pass the model folder that holds config.json")
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1:
        raise FileNotFoundError(f"model folder {name_or_path} not found: pass an existing folder or a hub id like Qwen/Qwen3-8B")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(
            name_or_path,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"],
        )
    except Exception as e:  # offline or unknown repo: one line, with the fix
        raise FileNotFoundError(
            f"cannot fetch {name_or_path} from the hub ({e.__class__.__name__}): download it elsewhere and pass "
            "the local folder, or unset HF_HUB_OFFLINE"
        ) from None


class CheckpointReader:
    """Name-level access to the tensors of an HF folder (model.safetensors or an indexed set of shards)."""

    def __init__(self, path: str):
        self.path = path
        index = os.path.join(path, "model.safetensors.index.json")
        single = os.path.join(path, "model.safetensors")
        if os.path.isfile(index):
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
                raise CheckpointError(f"{index}: no \"weight_map\" object of tensor name -> shard file; restore or "
                                      "re-download the index file")
            files = {}
            for fname in sorted(set(weight_map.values())):
                fpath = os.path.join(path, fname)
                if not os.path.isfile(fpath):
                    raise CheckpointError(f"{fpath}: shard listed in model.safetensors.index.json is missing")
                files[fname] = SafetensorsFile(fpath)
            self._where = {}
            for name, fname in weight_map.items():
                if name not in files[fname].keys():
                    raise CheckpointError(f"{fname}: the index lists tensor {name} but the shard does not hold it")
                self._where[name] = files[fname]
        elif os.path.isfile(single):
            f = SafetensorsFile(single)
            self._where = {k: f for k in f.keys()}
        else:
            raise CheckpointError(
                f"{path}: no model.safetensors or model.safetensors.index.json (only safetensors checkpoints load)"
            )

        self._checked: set[str] = set()

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name].shape(name)

    def get(self, name: str) -> np.ndarray:
        """The tensor as stored; a float tensor holding NaN or inf is refused (checked once per tensor)."""
        if name not in self._where:
            raise CheckpointError(f"{self.path}: tensor {name} is missing from the checkpoint")
        arr = self._where[name].get(name)
        if name not in self._checked:
            check_finite(arr, name, self._where[name].path)
            self._checked.add(name)
        return arr


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


def read_block_tensors(reader: CheckpointReader, cfg: ModelConfig, i: int) -> dict[str, np.ndarray]:
    """Block i's tensors keyed without prefix, shape-checked."""
    p = block_prefix(i)
    out = {}
    for name, shape in expected_block_tensors(cfg).items():
        arr = reader.get(p + name)
        if arr.shape != shape:
            raise CheckpointError(f"{reader.path}: {p + name} has shape {arr.shape}, config.json implies {shape}")
        out[name] = arr
    return out


def load_block(reader: CheckpointReader, cfg: ModelConfig, i: int, dtype=jnp.float32) -> DecoderBlock:
    """One decoder block, for block-by-block tuning."""
    return DecoderBlock(cfg, read_block_tensors(reader, cfg, i), dtype)


class ModelSource:
    """A checkpoint opened once: config, reader and dtype, for reading any part of the model on demand."""

    def __init__(self, name_or_path: str, dtype="auto", check: bool = True):
        self.path = resolve_model_path(name_or_path)
        self.config = ModelConfig.from_pretrained(self.path)
        self.hf_config = read_json(os.path.join(self.path, "config.json"))
        self.dtype = parse_dtype(dtype, self.hf_config.get("torch_dtype") or self.hf_config.get("dtype"))
        self.reader = CheckpointReader(self.path)
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

    def block(self, i: int, dtype=None) -> DecoderBlock:
        return load_block(self.reader, self.config, i, dtype or self.dtype)

    def tensor(self, name: str, dtype=None) -> jnp.ndarray:
        return jnp.asarray(self.reader.get(name), dtype or self.dtype)

    def model(self, blocks: Iterable[DecoderBlock] | None = None, dtype=None) -> CausalLM:
        """Assemble the full model (optionally from blocks already built, e.g. quantized ones)."""
        cfg, dtype = self.config, dtype or self.dtype
        if blocks is None:
            blocks = [self.block(i, dtype) for i in range(cfg.num_layers)]
        head = None if cfg.tie_word_embeddings else Linear(FloatWeight(self.tensor("lm_head.weight", dtype)))
        return CausalLM(
            cfg, self.tensor("model.embed_tokens.weight", dtype), list(blocks), self.tensor("model.norm.weight", dtype), head
        )


def load_model(name_or_path: str, dtype="auto") -> CausalLM:
    """Load a Qwen2/Qwen3/Llama checkpoint as a CausalLM: call it on int32 ids [B, T] for fp32 logits [B, T, V]."""
    return ModelSource(name_or_path, dtype).model()


__all__ = ["CheckpointReader", "ModelSource", "load_model", "load_block", "resolve_model_path"]
