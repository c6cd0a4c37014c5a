"""The "fake" format: an ordinary float HF folder whose quantized linears hold their dequantized values.

Any float loader (ours, transformers) reads it; it is what the reference calls format="fake".
"""

from __future__ import annotations

from typing import Iterator

import ml_dtypes
import numpy as np

from ..models.params_table import GLOBAL_TENSORS, block_prefix, expected_block_tensors
from ..models.quantized import QuantizedModel
from ..quant.qdq import dequantize
from ..io.hf_folder import write_float_folder
from .report import write_report

_NP_DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32}


def _tensors(qm: QuantizedModel, np_dtype) -> Iterator[tuple[str, np.ndarray]]:
    cfg, reader = qm.config, qm.reader
    for spec in GLOBAL_TENSORS:
        if spec.present(cfg):
            yield spec.name, np.asarray(reader.get(spec.name)).astype(np_dtype)
    for i in range(cfg.num_layers):  # block by block: one block's tensors in memory at a time
        p = block_prefix(i)
        for name in expected_block_tensors(cfg, i):
            full = p + name
            module = full.rsplit(".", 1)[0]
            if full.endswith(".weight") and module in qm.quantized:
                yield full, np.asarray(dequantize(qm.quantized[module])).astype(np_dtype)
            else:
                yield full, np.asarray(reader.get(full)).astype(np_dtype)


def save_fake(qm: QuantizedModel, output_dir: str, overwrite: bool = False) -> str:
    """Write a run's quantized model as a float HF folder (report.md and loss.png beside it)."""
    dtype_name = {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}[np.dtype(qm.dtype).name]
    config = dict(qm.hf_config)
    config["torch_dtype"] = dtype_name
    return write_float_folder(_tensors(qm, _NP_DTYPES[dtype_name]), config, output_dir, files_dir=qm.files_dir,
                              overwrite=overwrite, extra=lambda folder: write_report(qm, folder))
