"""Streaming export (the reference's low_cpu_mem_usage / immediate saving): each block's packed tensors go into the
output's shards as soon as the block is quantized, so host memory stays near one block whatever the model size.

Everything is written inside the temporary sibling folder that is renamed into place only when the run completes
(io/hf_folder.atomic_folder), and the files are byte-identical to a write at the end (formats/auto_round.py): the
same tensor order (global tensors first, then block by block), the same shard split, the same metadata.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

import numpy as np

from ..io.hf_folder import ShardedWriter, atomic_folder
from ..models.quantized import QuantizedModel
from .auto_round import (
    FORMATS, block_export_tensors, check_format_fits, global_tensors, linear_packer, tuning_settings, write_metadata,
)
from .report import write_report


class StreamingExport:
    """An export written while the tuner runs: open() before block 0, block(i) after each block, finish() at the end.

    `qm` is the run's QuantizedModel: its layer_config, config and reader are fixed before tuning; its `quantized`
    mapping must hold block i's codes when block(i) is called (they may be dropped afterwards). Leaving the `with`
    without finish() (an error, a kill) leaves no output folder.
    """

    def __init__(self, output_dir: str, fmt: str = "auto_round", overwrite: bool = False):
        if fmt not in FORMATS:
            raise ValueError(f"streaming export writes one of {', '.join(FORMATS)}, not {fmt!r}")
        self.output_dir, self.fmt, self.overwrite = output_dir, fmt, overwrite
        self._stack = contextlib.ExitStack()
        self._writer: ShardedWriter | None = None
        self._linear = None
        self._next = 0
        self.folder: str | None = None

    def __enter__(self) -> "StreamingExport":
        self.folder = self._stack.enter_context(atomic_folder(self.output_dir, self.overwrite))
        return self

    def __exit__(self, *exc) -> bool:
        return self._stack.__exit__(*exc)

    def start(self, qm: QuantizedModel) -> None:
        """Check that the format holds qm's schemes, then write the tensors outside the blocks (they come first, as
        in a write at the end)."""
        check_format_fits(qm, self.fmt)
        self._linear = linear_packer(qm, self.fmt)
        self._writer = ShardedWriter(self.folder)
        self._writer.add_all(global_tensors(qm))

    def block(self, qm: QuantizedModel, i: int) -> None:
        """Block i's tensors, packed from qm.quantized; blocks must come in order."""
        if i != self._next:
            raise RuntimeError(f"streaming export got block {i}, expected block {self._next}")
        self._writer.add_all(block_export_tensors(qm, i, self._linear, np.float16))
        self._next += 1

    @property
    def blocks_written(self) -> int:
        return self._next

    def finish(self, qm: QuantizedModel) -> str:
        """Close the shards, write config, quantization config, tokenizer and report; the folder is renamed into
        place when the `with` block ends."""
        if self._next != qm.config.num_layers:
            raise RuntimeError(f"streaming export has {self._next} of {qm.config.num_layers} blocks")
        self._writer.close()
        exported = dataclasses.replace(qm, settings=tuning_settings(qm))
        write_metadata(exported, self.folder, self.fmt, report=lambda folder: write_report(qm, folder))
        return os.path.abspath(self.output_dir)
