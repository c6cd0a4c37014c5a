"""The "fake" format: an ordinary float HF folder whose quantized linears hold their dequantized values.

Any float loader (ours, transformers) reads it; it is what the reference calls format="fake".
"""

from __future__ import annotations

import json
import os
from typing import Iterator

import ml_dtypes
import numpy as np

from ..models.params_table import GLOBAL_TENSORS, block_prefix, expected_block_tensors
from ..quant.qdq import dequantize
from ..io.hf_folder import atomic_folder, copy_tokenizer_files, write_json, write_sharded

_NP_DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32}


def _tensors(ar, np_dtype) -> Iterator[tuple[str, np.ndarray]]:
    cfg, reader = ar.config, ar.source.reader
    for spec in GLOBAL_TENSORS:
        if spec.present(cfg):
            yield spec.name, np.asarray(reader.get(spec.name)).astype(np_dtype)
    for i in range(cfg.num_layers):  # block by block: one block's tensors in memory at a time
        p = block_prefix(i)
        for name in expected_block_tensors(cfg):
            full = p + name
            module = full.rsplit(".", 1)[0]
            if full.endswith(".weight") and module in ar.quantized:
                yield full, np.asarray(dequantize(ar.quantized[module])).astype(np_dtype)
            else:
                yield full, np.asarray(reader.get(full)).astype(np_dtype)


def save_fake(ar, output_dir: str, overwrite: bool = False) -> str:
    """Write the quantized model of an AutoRound run as a float HF folder."""
    if ar.source.path is None:
        raise ValueError("saving needs a model loaded from a folder (pass a path or hub id to AutoRound)")
    dtype_name = {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}[np.dtype(ar.model_dtype).name]
    with atomic_folder(output_dir, overwrite) as tmp:
        write_sharded(_tensors(ar, _NP_DTYPES[dtype_name]), tmp)
        with open(os.path.join(ar.source.path, "config.json")) as f:
            config = json.load(f)
        config["torch_dtype"] = dtype_name
        write_json(config, os.path.join(tmp, "config.json"))
        copy_tokenizer_files(ar.source.path, tmp)
        ar.write_report(tmp)
    return os.path.abspath(output_dir)
