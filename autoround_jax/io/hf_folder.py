"""Writing HF model folders safely: a temporary sibling folder renamed into place when complete, sharded weights.

Nothing is lost: a non-empty output folder is refused unless overwrite is asked for, and an interrupted write leaves
the previous state untouched (at worst a `.tmp-<pid>-*` sibling, which the next write into the same folder removes).
Nothing bad is written either: every float tensor is checked for NaN and inf on its way to disk.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import sys
import tempfile
import time
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np

from ..validation import check_finite

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "chat_template.json",
    "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json", "generation_config.json",
)
MAX_SHARD_BYTES = 5 * 1000**3  # transformers' "5GB"


class OutputExistsError(ValueError):
    """The output folder already holds files."""


def check_output_path(out_dir: str, overwrite: bool = False, flag: str = "--output_dir") -> str:
    """Refuse, before any slow work, an output folder that cannot be written: the path (or a folder above it) is a
    file, the nearest existing folder above it is not writable, or it holds files and overwrite is not asked for.
    Returns the absolute path."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise OutputExistsError(f"output path {out_dir} ({flag}) is a file: remove it or choose a folder path")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise OutputExistsError(
            f"output folder {out_dir} is not empty: remove it, choose another, or pass --overwrite (overwrite=True)"
        )
    above = os.path.dirname(out_dir)
    while not os.path.exists(above):
        above = os.path.dirname(above)
    if not os.path.isdir(above):
        raise OutputExistsError(f"output path {out_dir} ({flag}) lies under {above}, which is a file: remove that file "
                                "or choose another folder path")
    if not os.access(above, os.W_OK | os.X_OK):
        raise OutputExistsError(f"cannot write under {above} (permission denied) for {out_dir} ({flag}): choose a "
                                "folder you can write to")
    return out_dir


# Temporary siblings carry the writing process's id: <name>.tmp-<pid>-<random> (the new folder being written) and
# <name>.old-<pid>-<random> (the replaced folder, deleted once the new one is in place).
_LEFTOVER = re.compile(r"\.(tmp|old)-(?:(\d+)-)?[A-Za-z0-9_]+$")
_STARTED = time.time()  # leftovers without a pid (older versions) count as stale when older than this process


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_leftovers(out_dir: str) -> list[str]:
    """Remove `<out_dir>.tmp-*` / `.old-*` siblings left by a killed run into the same folder, with a one-line
    notice each: those whose writing process is dead, or (without a pid in the name) that predate this process.
    A live process's folder is kept. Returns the removed paths."""
    out_dir = os.path.abspath(out_dir)
    parent, base = os.path.dirname(out_dir), os.path.basename(out_dir)
    removed = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        path = os.path.join(parent, name)
        m = _LEFTOVER.match(name[len(base):]) if name.startswith(base + ".") else None
        if m is None or not os.path.isdir(path) or os.path.islink(path):
            continue
        pid = int(m.group(2)) if m.group(2) else None
        if pid is not None:
            stale = pid != os.getpid() and not _pid_alive(pid)
        else:
            try:
                stale = os.path.getmtime(path) < _STARTED
            except OSError:
                stale = False
        if stale and m.group(1) == "old" and not os.path.isdir(out_dir):
            # Killed between the two renames of an overwrite: this holds the only copy of the previous folder.
            print(f"autoround-jax: kept {path}: it holds the previous {base} from an interrupted overwrite; restore "
                  f"it with `mv {os.path.join(path, 'x')} {out_dir}` or delete it with `rm -r {path}`", file=sys.stderr)
            continue
        if stale:
            shutil.rmtree(path, ignore_errors=True)
            if not os.path.exists(path):
                removed.append(path)
                print(f"autoround-jax: removed {path}, left by an interrupted run", file=sys.stderr)
    return removed


@contextlib.contextmanager
def atomic_folder(out_dir: str, overwrite: bool = False) -> Iterator[str]:
    """Yield a temporary sibling folder; on success it replaces out_dir, on failure it is removed.

    A non-empty out_dir is refused up front (before any slow work) unless overwrite; with overwrite the old folder
    is swapped aside and deleted only once the new one is in place. If another process fills out_dir meanwhile,
    OutputExistsError says so and the other process's folder is kept. Folders above out_dir created here are
    removed again on failure, and temporary siblings left by a killed earlier run are removed first.
    """
    out_dir = check_output_path(out_dir, overwrite)
    parent = os.path.dirname(out_dir)
    created = []
    p = parent
    while not os.path.exists(p):
        created.append(p)
        p = os.path.dirname(p)
    os.makedirs(parent, exist_ok=True)
    remove_leftovers(out_dir)
    tmp = tempfile.mkdtemp(prefix=f"{os.path.basename(out_dir)}.tmp-{os.getpid()}-", dir=parent)
    os.chmod(tmp, 0o755)  # mkdtemp makes 0700 folders; an export is an ordinary folder
    ok = False
    try:
        yield tmp
        _move_into_place(tmp, out_dir, overwrite)
        ok = True
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        if not ok:
            for folder in created:  # deepest first; only while empty
                with contextlib.suppress(OSError):
                    os.rmdir(folder)


def _move_into_place(tmp: str, out_dir: str, overwrite: bool) -> None:
    if overwrite and os.path.isdir(out_dir) and os.listdir(out_dir):
        old = tempfile.mkdtemp(prefix=f"{os.path.basename(out_dir)}.old-{os.getpid()}-", dir=os.path.dirname(out_dir))
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


class ShardedWriter:
    """Safetensors shards written as tensors arrive, holding at most one tensor in memory.

    A shard's tensors are appended to a spill file; when the shard is full (or at close) its header is written and
    the bytes are copied over in safetensors order. The result is byte-identical to collecting every tensor and
    calling save_file: same shard split (at most max_shard_bytes, in arrival order), same names, same index.
    """

    _COPY = 64 << 20  # bytes per copy step

    def __init__(self, folder: str, max_shard_bytes: int = MAX_SHARD_BYTES):
        self.folder, self.max_shard_bytes = folder, max_shard_bytes
        self._written: list[tuple[str, list[str]]] = []  # (temporary shard path, its tensor names)
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}  # name -> dtype, shape, spill span
        self._spill = None
        self._size = 0
        self.total = 0

    def add(self, name: str, arr: np.ndarray) -> None:
        arr = np.ascontiguousarray(arr)
        check_finite(arr, name, fix="nothing was written; check the source checkpoint, or keep the layer in float "
                                    "(--fp_layers) if its values overflow the export dtype")
        if self._size and self._size + arr.nbytes > self.max_shard_bytes:
            self._flush()
        if self._spill is None:
            self._spill = open(os.path.join(self.folder, f"spill-{len(self._written):05d}.tmp"), "w+b")
        start = self._spill.tell()
        self._spill.write(memoryview(arr).cast("B"))
        self._entries[name] = (arr.dtype, tuple(arr.shape), start, arr.nbytes)
        self._size += arr.nbytes
        self.total += arr.nbytes

    def add_all(self, tensors: Iterable[tuple[str, np.ndarray]]) -> None:
        for name, arr in tensors:
            self.add(name, arr)

    def _flush(self) -> None:
        from .safetensors_io import dtype_name

        path = os.path.join(self.folder, f"shard-{len(self._written):05d}.tmp")
        entries = self._entries
        order = sorted(entries, key=lambda k: (-entries[k][0].itemsize, k))  # save_file's order
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for k in order:
            dtype, shape, _, nbytes = entries[k]
            header[k] = {"dtype": dtype_name(dtype), "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        spill = self._spill
        with open(path, "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for k in order:
                _, _, start, nbytes = entries[k]
                spill.seek(start)
                while nbytes:
                    part = spill.read(min(nbytes, self._COPY))
                    f.write(part)
                    nbytes -= len(part)
        if spill is not None:
            spill.close()
            os.remove(spill.name)
        self._written.append((path, list(entries)))
        self._entries, self._spill, self._size = {}, None, 0

    def close(self) -> None:
        """Write the last shard and name the files: model.safetensors, or model-i-of-n plus the index."""
        self._flush()
        n = len(self._written)
        if n == 1:
            os.replace(self._written[0][0], os.path.join(self.folder, "model.safetensors"))
            return
        weight_map = {}
        for i, (path, keys) in enumerate(self._written):
            fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(path, os.path.join(self.folder, fname))
            weight_map.update({k: fname for k in keys})
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(self.folder, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)


def write_sharded(tensors: Iterable[tuple[str, np.ndarray]], folder: str, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Stream (name, array) pairs into shards of at most max_shard_bytes; one shard is named model.safetensors."""
    writer = ShardedWriter(folder, max_shard_bytes)
    writer.add_all(tensors)
    writer.close()


def copy_tokenizer_files(src: str | None, dst: str) -> None:
    """Tokenizer, chat template and generation config travel with every export."""
    if not src:
        return
    for name in TOKENIZER_FILES:
        path = os.path.join(src, name)
        if os.path.isfile(path):
            shutil.copy2(path, os.path.join(dst, name))


def write_json(obj, path: str, sort_keys: bool = True, ensure_ascii: bool = True) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=sort_keys, ensure_ascii=ensure_ascii)
        f.write("\n")


def write_float_files(folder: str, tensors: Iterable[tuple[str, np.ndarray]], hf_config: Mapping[str, Any],
                      files_dir: str | None = None, sort_keys: bool = True) -> None:
    """The files of a float HF folder, into an existing (temporary) folder: the (name, array) stream as sharded
    safetensors (write_sharded: each array checked finite), config.json, and the tokenizer, chat template and
    generation config files of files_dir. sort_keys=False writes config.json in the mapping's own key order."""
    write_sharded(tensors, folder)
    write_json(dict(hf_config), os.path.join(folder, "config.json"), sort_keys=sort_keys)
    copy_tokenizer_files(files_dir, folder)


def write_float_folder(tensors: Iterable[tuple[str, np.ndarray]], hf_config: Mapping[str, Any], output_dir: str, *,
                       files_dir: str | None = None, overwrite: bool = False,
                       extra: Callable[[str], None] | None = None) -> str:
    """The one writer of float HF folders (a fake-quant export, a dequantized checkpoint): write_float_files into an
    atomic folder, then extra(folder) may add files. Returns the absolute output path."""
    with atomic_folder(output_dir, overwrite) as tmp:
        write_float_files(tmp, tensors, hf_config, files_dir)
        if extra is not None:
            extra(tmp)
    return os.path.abspath(output_dir)
