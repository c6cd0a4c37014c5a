"""Flax NNX decoder models (Qwen2, Qwen3, Llama), their config and checkpoint loading."""

from .config import ModelConfig, UnsupportedModelError
from .decoder import CausalLM, DecoderBlock, KVCache
from .loading import CheckpointReader, ModelSource, load_block, load_model

__all__ = ["ModelConfig", "UnsupportedModelError", "CausalLM", "DecoderBlock", "KVCache", "CheckpointReader",
           "ModelSource", "load_block", "load_model"]
