"""Torch-free safetensors reading and writing with numpy (bf16 through ml_dtypes).

We parse the format ourselves (8-byte header length, JSON header, raw data) so that:
- bf16 tensors load without torch (safetensors' numpy backend has no bf16);
- a truncated or corrupt file gives a one-line error naming the file, instead of a deep traceback;
- tensors are read lazily (pread), one at a time, so a block's weights can be read without the whole model.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Mapping

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "U16": np.dtype(np.uint16),
    "U32": np.dtype(np.uint32),
    "U64": np.dtype(np.uint64),
    "BOOL": np.dtype(np.bool_),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_NAMES = {v: k for k, v in DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt or inconsistent."""


class SafetensorsFile:
    """One .safetensors file: the header parsed and checked at open; tensors are read on request."""

    def __init__(self, path: str):
        self.path = path
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: file not found")
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100_000_000:
                raise CheckpointError(f"{path}: corrupt or truncated safetensors header (length {n}, file {size} bytes)")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{path}: corrupt safetensors header ({e.__class__.__name__})") from None
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._entries: dict[str, dict] = header
        self._data_start = 8 + n
        data_len = size - self._data_start
        for name, e in header.items():
            if not isinstance(e, dict) or "dtype" not in e or "data_offsets" not in e or "shape" not in e:
                raise CheckpointError(f"{path}: corrupt header entry for {name}")
            if e["dtype"] not in DTYPES:
                raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {e['dtype']}")
            begin, end = e["data_offsets"]
            expect = int(np.prod(e["shape"], dtype=np.int64)) * DTYPES[e["dtype"]].itemsize
            if end - begin != expect:
                raise CheckpointError(f"{path}: tensor {name} byte length {end - begin} != shape {e['shape']}")
            if end > data_len:
                raise CheckpointError(
                    f"{path}: truncated file: tensor {name} ends at byte {end} but only {data_len} data bytes exist; "
                    "re-download or re-export the checkpoint"
                )

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return DTYPES[self._entries[name]["dtype"]]

    def get(self, name: str) -> np.ndarray:
        """Return the tensor as a fresh read-only array.

        Read with pread into private memory, not viewed through an mmap: mapped file pages stay in the process's
        resident set after use, so walking a model block by block through an mmap grows the RSS to the whole
        checkpoint; a private buffer is freed with the array (the page cache is the kernel's, not ours)."""
        e = self._entries[name]
        begin, end = e["data_offsets"]
        out = np.empty(end - begin, np.uint8)
        with open(self.path, "rb", buffering=0) as f:
            view, pos = memoryview(out), 0
            while pos < len(out):
                got = os.preadv(f.fileno(), [view[pos:]], self._data_start + begin + pos)
                if got <= 0:
                    raise CheckpointError(f"{self.path}: truncated while reading {name}")
                pos += got
        arr = out.view(DTYPES[e["dtype"]]).reshape(e["shape"])
        arr.flags.writeable = False
        return arr


def save_file(tensors: Mapping[str, np.ndarray], path: str, metadata: Mapping[str, str] | None = None) -> None:
    """Write tensors like torch's safetensors.save_file: sorted by (dtype alignment desc, name), 8-byte aligned header."""
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    for k, v in arrays.items():
        if v.dtype not in _NAMES:
            raise CheckpointError(f"cannot save tensor {k}: dtype {v.dtype} has no safetensors name")
    order = sorted(arrays, key=lambda k: (-arrays[k].dtype.itemsize, k))
    header: dict[str, object] = {}
    if metadata is not None:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for k in order:
        nbytes = arrays[k].nbytes
        header[k] = {"dtype": _NAMES[arrays[k].dtype], "shape": list(arrays[k].shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for k in order:
            f.write(arrays[k].tobytes())


def load_file(path: str) -> dict[str, np.ndarray]:
    """Read every tensor of one file (copies, so the file can be closed or replaced)."""
    f = SafetensorsFile(path)
    return {k: np.array(f.get(k)) for k in f.keys()}


def dtype_name(dtype: np.dtype) -> str:
    return _NAMES[np.dtype(dtype)]

