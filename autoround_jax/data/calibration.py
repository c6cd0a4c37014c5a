"""Calibration token ids [nsamples, seqlen] with the reference's dataset syntax and selection rules.

`dataset` accepts: hub ids (`org/name`, e.g. NeelNanda/pile-10k) read through `datasets` when installed, else from
the dataset's data files via huggingface_hub (its cache works offline); local .txt/.jsonl/.json/.parquet files; a list of strings; "fortunes" (Debian's fortunes, the offline default); "self" (text sampled from the model
itself). Options follow the reference: `name:num=N:concat=True`, comma-separated mixtures. Rules: seeded shuffle,
each text tokenized with truncation to seqlen, samples shorter than seqlen dropped, samples whose last token repeats
more than seqlen//2 times dropped; `concat=True` joins texts into one stream cut into seqlen pieces.
"""

from __future__ import annotations

import json
import os
import random
import re
import warnings
from typing import Callable, Sequence

import numpy as np

DEFAULT_DATASET = "NeelNanda/pile-10k"
OFFLINE_DEFAULT = "fortunes"


class DatasetError(ValueError):
    """A dataset that cannot be read or yields too few samples."""


OPTIONS = ("num", "concat", "split")
LOCAL_EXTENSIONS = (".txt", ".jsonl", ".json", ".parquet")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _parse(spec: str) -> tuple[str, dict[str, str]]:
    """'name:num=N:concat=True' -> (name, options), every option checked (one line naming the bad one)."""
    name, *opts = spec.split(":")
    name = name.strip()
    kv = {}
    for o in opts:
        k, _, v = o.partition("=")
        k, v = k.strip(), (v.strip() if v else "True")
        if k not in OPTIONS:
            raise DatasetError(f"unknown dataset option {k!r} in --dataset {spec!r}: use {', '.join(OPTIONS)} "
                               "(e.g. 'fortunes:num=64:concat=True')")
        if k == "num" and not (v.isdigit() and int(v) > 0):
            raise DatasetError(f"dataset option num={v} in --dataset {spec!r} is not a positive integer: write e.g. "
                               f"'{name}:num=64'")
        if k == "concat" and v.lower() not in ("true", "false"):
            raise DatasetError(f"dataset option concat={v} in --dataset {spec!r} must be True or False")
        kv[k] = v
    if not name:
        raise DatasetError(f"--dataset {spec!r} has no dataset name before its options")
    return name, kv


def is_hub_id(name: str) -> bool:
    """'org/name' that is not an existing path and has no local file extension: a Hugging Face hub dataset."""
    return (not os.path.exists(name) and bool(_HUB_ID.match(name))
            and os.path.splitext(name)[1].lower() not in LOCAL_EXTENSIONS)


def _read_utf8(path: str) -> str:
    from ..io.files import read_text

    try:
        return read_text(path, "text dataset")
    except ValueError as e:
        raise DatasetError(str(e)) from None


def _read_local(path: str) -> list[str]:
    ext = os.path.splitext(path)[1].lower()
    if ext == ".txt":
        paragraphs = _read_utf8(path).split("\n\n")
        return [p.strip() for p in paragraphs if p.strip()]
    if ext in (".jsonl", ".json"):
        raw = _read_utf8(path)
        try:
            rows = json.loads(raw) if ext == ".json" else [json.loads(line) for line in raw.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}: invalid JSON ({e.msg} at line {e.lineno}); use one {{\"text\": ...}} per line") from None
        return [_text_of(r, path) for r in (rows if isinstance(rows, list) else [rows])]
    if ext == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DatasetError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow's ArrowInvalid and OSError on a damaged or non-parquet file
            raise DatasetError(f"{path}: not a readable parquet file ({e.__class__.__name__}); pass the right file") from None
        if "text" not in table.column_names:
            raise DatasetError(f"{path}: parquet file has no 'text' column (columns: {table.column_names})")
        return [str(t) for t in table.column("text").to_pylist()]
    raise DatasetError(f"{path}: unsupported dataset file type {ext!r}: use .txt, .jsonl, .json or .parquet")


def _text_of(row, path: str) -> str:
    if isinstance(row, str):
        return row
    if isinstance(row, dict) and "text" in row:
        return str(row["text"])
    raise DatasetError(f"{path}: each record needs a 'text' field")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub_error(name: str, e: Exception) -> DatasetError:
    why = "offline: HF_HUB_OFFLINE=1 and not in the local cache" if _offline() else e.__class__.__name__
    return DatasetError(f"cannot load dataset {name} from the Hugging Face hub ({why}): pass a local "
                        ".txt/.jsonl/.json/.parquet file or 'fortunes', or download it where the hub is reachable")


def _read_hub(name: str, split: str) -> list[str]:
    """A hub dataset's text column: through `datasets` when it is installed, else the dataset's data files
    (parquet, jsonl, json, txt) fetched with huggingface_hub (or found in its cache when offline)."""
    try:
        import datasets
    except ImportError:
        datasets = None
    if datasets is not None:
        try:
            ds = datasets.load_dataset(name, split=split)
        except Exception as e:
            raise _hub_error(name, e) from None
        column = "text" if "text" in ds.column_names else ds.column_names[0]
        return [str(t) for t in ds[column]]
    return [t for f in _hub_files(name, split) for t in _read_local(f)]


def _hub_files(name: str, split: str) -> list[str]:
    """The local paths of a hub dataset's data files for one split (all data files if none is named after it)."""
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(name, repo_type="dataset", allow_patterns=[f"*{e}" for e in LOCAL_EXTENSIONS])
    except Exception as e:
        raise _hub_error(name, e) from None
    files = []
    for root, _, names in os.walk(folder):
        files += [os.path.join(root, n) for n in names if os.path.splitext(n)[1].lower() in LOCAL_EXTENSIONS
                  and not n.startswith(("dataset_info", "dataset_infos", "README"))]
    rel = {f: os.path.relpath(f, folder) for f in files}
    chosen = sorted(f for f in files if re.search(rf"(^|[/_.-]){re.escape(split)}([/_.-]|$)", rel[f]))
    chosen = chosen or sorted(files)
    if not chosen:
        raise DatasetError(f"dataset {name} on the Hugging Face hub has no .parquet/.jsonl/.json/.txt data files: pass "
                           "a local file or 'fortunes'")
    return chosen


def _texts(name: str, opts: dict[str, str]) -> list[str]:
    if name == "fortunes":
        from .texts import calibration_texts

        return calibration_texts()
    if is_hub_id(name):
        return _read_hub(name, opts.get("split", "train"))
    if os.path.splitext(name)[1] or os.path.sep in name or os.path.exists(name):
        if not os.path.isfile(name):
            raise DatasetError(f"dataset file {name} not found: pass an existing .txt/.jsonl/.json/.parquet file, "
                               "'fortunes', or a hub dataset id like NeelNanda/pile-10k")
        return _read_local(name)
    return _read_hub(name, opts.get("split", "train"))


def check_dataset(dataset: str | None) -> None:
    """Before any work: every spec of a dataset string parses, and every local file named exists (hub datasets
    are read when calibration starts; the default falls back to fortunes offline)."""
    if dataset is None or dataset.strip() == "self":
        return
    for spec in [s for s in dataset.split(",") if s.strip()]:
        name, _ = _parse(spec)
        if name == "fortunes" or is_hub_id(name):
            continue
        if (os.path.splitext(name)[1] or os.path.sep in name) and not os.path.isfile(name):
            raise DatasetError(f"dataset file {name} not found: pass an existing .txt/.jsonl/.json/.parquet file, "
                               "'fortunes', or a hub dataset id like NeelNanda/pile-10k")
        if os.path.isfile(name) and os.path.splitext(name)[1].lower() not in LOCAL_EXTENSIONS:
            raise DatasetError(f"{name}: unsupported dataset file type {os.path.splitext(name)[1]!r}: use .txt, "
                               ".jsonl, .json or .parquet")


def tokenize_samples(texts: Sequence[str], tokenizer, seqlen: int, concat: bool) -> list[np.ndarray]:
    """Token rows of exactly seqlen, by the reference's filter (or by chunking a joined stream with concat)."""
    if concat:
        sep = tokenizer.eos_token or "\n\n"
        ids = tokenizer(sep.join(texts), add_special_tokens=False)["input_ids"]
        n = len(ids) // seqlen
        return [np.asarray(ids[i * seqlen : (i + 1) * seqlen], np.int32) for i in range(n)]
    rows = []
    for t in texts:
        ids = tokenizer(t, truncation=True, max_length=seqlen)["input_ids"]
        if len(ids) < seqlen or ids.count(ids[-1]) > seqlen // 2:
            continue
        rows.append(np.asarray(ids, np.int32))
    return rows


def calibration_ids(
    dataset: str | Sequence[str] | None,
    tokenizer,
    nsamples: int,
    seqlen: int,
    seed: int = 42,
    sample_from_model: Callable[[int, int, int], np.ndarray] | None = None,
) -> np.ndarray:
    """[nsamples, seqlen] int32 calibration ids."""
    if nsamples <= 0 or seqlen <= 1:
        raise DatasetError(f"nsamples ({nsamples}) must be >= 1 and seqlen ({seqlen}) >= 2")
    if dataset is None:
        dataset = DEFAULT_DATASET
    if isinstance(dataset, np.ndarray):  # token ids given directly, as the reference accepts tensors
        if dataset.ndim != 2 or dataset.shape[1] < seqlen or dataset.shape[0] < nsamples:
            raise DatasetError(
                f"only {dataset.shape[0]} calibration samples of {dataset.shape[-1]} tokens available, "
                f"{nsamples} x {seqlen} requested: lower --nsamples or --seqlen"
            )
        return np.asarray(dataset[:nsamples, :seqlen], np.int32)
    if isinstance(dataset, str) and dataset.strip() == "self":
        if sample_from_model is None:
            raise DatasetError("dataset 'self' needs a model to sample from")
        return sample_from_model(nsamples, seqlen, seed)
    if not isinstance(dataset, str):
        sources = [("<list>", {}, list(dataset))]
    else:
        sources = []
        for spec in [s for s in dataset.split(",") if s.strip()]:
            name, opts = _parse(spec)
            try:
                texts = _texts(name, opts)
            except DatasetError as e:
                if name != DEFAULT_DATASET:
                    raise
                warnings.warn(f"{e}; falling back to the offline '{OFFLINE_DEFAULT}' text")
                name, opts, texts = OFFLINE_DEFAULT, {"concat": "True"}, _texts(OFFLINE_DEFAULT, {})
            if name == OFFLINE_DEFAULT:
                opts.setdefault("concat", "True")  # fortunes are short: join them
            sources.append((name, opts, texts))
    if tokenizer is None:  # checked after the sources, so a missing file is reported first
        raise DatasetError("text calibration data needs a tokenizer: pass tokenizer=... or a model folder with one")
    rng = random.Random(seed)
    per_source = []
    for name, opts, texts in sources:
        if not texts:
            raise DatasetError(f"dataset {name} is empty")
        texts = list(texts)
        rng.shuffle(texts)
        rows = tokenize_samples(texts, tokenizer, seqlen, opts.get("concat", "False").lower() == "true")
        if "num" in opts:
            rows = rows[: int(opts["num"])]
        per_source.append(rows)
    if len(per_source) > 1:  # balanced mixture, then shuffled
        share = -(-nsamples // len(per_source))
        rows = [r for src in per_source for r in src[:share]]
        rng.shuffle(rows)
    else:
        rows = per_source[0]
    if len(rows) < nsamples:
        raise DatasetError(
            f"only {len(rows)} calibration samples of {seqlen} tokens available, {nsamples} requested: lower "
            "--nsamples or --seqlen, add ':concat=True' to the dataset, or use more text"
        )
    return np.stack(rows[:nsamples])


def valid_token_mask(ids: np.ndarray, pad_token_id: int | None) -> np.ndarray | None:
    """The positions the reference's block loss counts, [nsamples, T] float32 (1 = counted), or None when that is
    every position but the last of every sample (the tuner's fixed mask then serves).

    As auto-round's LLMCalibrator marks them with -100: tokens equal to the tokenizer's pad id (SmolLM2's and Qwen's
    pad token is also their EOS, which separates concatenated documents), or, when the tokenizer has no pad id,
    each sample's trailing run of repeats of its last token; and always the last position (no next-token target).
    """
    ids = np.asarray(ids)
    keep = np.ones(ids.shape, np.float32)
    if pad_token_id is not None:
        keep[ids == pad_token_id] = 0.0
    else:
        for r, row in enumerate(ids):
            j = row.shape[0] - 2
            while j >= 0 and row[j] == row[-1]:
                keep[r, j] = 0.0
                j -= 1
    keep[:, -1] = 0.0
    if keep[:, :-1].all():
        return None
    return keep
