"""A quantized model as plain data: what the tuner produces and what every exporter, the report writer and the
importer exchange. Integer codes are fetched one layer at a time (a Mapping), float tensors from a reader.

It sits below tuning/ and formats/ so that neither imports the other: the tuner fills one in, the exporters read it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from ..quant.qdq import QuantizedWeight
from ..quant.scheme import LayerScheme
from .config import ModelConfig
from .params_table import BLOCK_PREFIX


PHASES = ("io", "forward", "step", "compile", "finalize")  # a block's time split (tuning/timing.py measures it)


@dataclasses.dataclass
class BlockReport:
    """One block of a quantization run: its loss at iteration 0 (RTN) and at the kept iteration, and its time."""

    index: int
    loss_rtn: float | None
    loss_best: float | None
    best_iter: int | None
    seconds: float
    split: dict[str, float] = dataclasses.field(default_factory=dict)  # io/forward/step/compile/finalize seconds


@dataclasses.dataclass
class QuantizedModel:
    """What an exporter writes, from a tuning run or an imported checkpoint; codes are fetched one layer at a time."""

    config: ModelConfig
    hf_config: dict[str, Any]  # config.json without quantization_config
    reader: Any  # .get(name): float tensors and biases
    dtype: np.dtype  # float tensors are written in this dtype
    scheme: LayerScheme  # the global scheme
    layer_config: dict[str, LayerScheme | None]  # every block linear -> its scheme, None for float
    quantized: Mapping[str, QuantizedWeight]
    settings: dict[str, Any]  # tuning keys for quantization_config (unfiltered for a run, as read for an import)
    files_dir: str | None  # tokenizer, chat template and generation config are copied from here
    block_name: str = BLOCK_PREFIX
    reports: list[BlockReport] = dataclasses.field(default_factory=list)  # empty for an imported checkpoint
    summary: str = ""  # the run's summary lines (report.md)
    compute_dtype: str = ""  # the matmul precision of the run, e.g. "bfloat16"
