"""Writing HF model folders safely: a temporary sibling folder renamed into place when complete, sharded weights.

Nothing is lost: a non-empty output folder is refused unless overwrite is asked for, and an interrupted write leaves
the previous state untouched (at worst a `.tmp-*` sibling).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from typing import Iterable, Iterator

import numpy as np

from .safetensors_io import save_file

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "chat_template.json",
    "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json", "generation_config.json",
)
MAX_SHARD_BYTES = 5 * 1000**3  # transformers' "5GB"


class OutputExistsError(ValueError):
    """The output folder already holds files."""


@contextlib.contextmanager
def atomic_folder(out_dir: str, overwrite: bool = False) -> Iterator[str]:
    """Yield a temporary sibling folder; on success it replaces out_dir, on failure it is removed.

    A non-empty out_dir is refused up front (before any slow work) unless overwrite; with overwrite the old folder
    is swapped aside and deleted only once the new one is in place. If another process fills out_dir meanwhile,
    OutputExistsError says so and the other process's folder is kept.
    """
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise OutputExistsError(f"output path {out_dir} is a file: remove it or choose a folder path")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise OutputExistsError(
            f"output folder {out_dir} is not empty: remove it, choose another, or pass --overwrite (overwrite=True)"
        )
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".tmp-", dir=parent)
    os.chmod(tmp, 0o755)  # mkdtemp makes 0700 folders; an export is an ordinary folder
    try:
        yield tmp
        _move_into_place(tmp, out_dir, overwrite)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def _move_into_place(tmp: str, out_dir: str, overwrite: bool) -> None:
    if overwrite and os.path.isdir(out_dir) and os.listdir(out_dir):
        old = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".old-", dir=os.path.dirname(out_dir))
        os.replace(out_dir, os.path.join(old, "x"))
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        os.replace(tmp, out_dir)
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise OutputExistsError(
                f"output folder {out_dir} was filled by another process: remove it or pass --overwrite (overwrite=True)"
            ) from None
        raise


def write_sharded(tensors: Iterable[tuple[str, np.ndarray]], folder: str, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Stream (name, array) pairs into shards of at most max_shard_bytes; one shard is named model.safetensors."""
    shards: list[dict[str, np.ndarray]] = [{}]
    sizes = [0]
    written: list[str] = []
    total = 0

    def flush() -> None:
        path = os.path.join(folder, f"shard-{len(written):05d}.tmp")
        save_file(shards[-1], path, metadata={"format": "pt"})
        written.append(path)

    names: list[list[str]] = [[]]
    for name, arr in tensors:
        arr = np.ascontiguousarray(arr)
        if sizes[-1] and sizes[-1] + arr.nbytes > max_shard_bytes:
            flush()
            shards[-1], sizes[-1] = {}, 0
            names.append([])
        shards[-1][name] = arr
        names[-1].append(name)
        sizes[-1] += arr.nbytes
        total += arr.nbytes
    flush()
    n = len(written)
    if n == 1:
        os.replace(written[0], os.path.join(folder, "model.safetensors"))
        return
    weight_map = {}
    for i, (path, keys) in enumerate(zip(written, names)):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(path, os.path.join(folder, fname))
        weight_map.update({k: fname for k in keys})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)


def copy_tokenizer_files(src: str | None, dst: str) -> None:
    """Tokenizer, chat template and generation config travel with every export."""
    if not src:
        return
    for name in TOKENIZER_FILES:
        path = os.path.join(src, name)
        if os.path.isfile(path):
            shutil.copy2(path, os.path.join(dst, name))


def write_json(obj, path: str) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
