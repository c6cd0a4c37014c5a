"""Calibration token ids [nsamples, seqlen] with the reference's dataset syntax and selection rules.

`dataset` accepts: hub names (NeelNanda/pile-10k, ...) when a hub is reachable; local .txt/.jsonl/.json/.parquet
files; a list of strings; "fortunes" (Debian's fortunes, the offline default); "self" (text sampled from the model
itself). Options follow the reference: `name:num=N:concat=True`, comma-separated mixtures. Rules: seeded shuffle,
each text tokenized with truncation to seqlen, samples shorter than seqlen dropped, samples whose last token repeats
more than seqlen//2 times dropped; `concat=True` joins texts into one stream cut into seqlen pieces.
"""

from __future__ import annotations

import json
import os
import random
import warnings
from typing import Callable, Sequence

import numpy as np

DEFAULT_DATASET = "NeelNanda/pile-10k"
OFFLINE_DEFAULT = "fortunes"


class DatasetError(ValueError):
    """A dataset that cannot be read or yields too few samples."""


def _parse(spec: str) -> tuple[str, dict[str, str]]:
    name, *opts = spec.split(":")
    kv = {}
    for o in opts:
        k, _, v = o.partition("=")
        kv[k.strip()] = v.strip() if v else "True"
    return name.strip(), kv


def _read_local(path: str) -> list[str]:
    ext = os.path.splitext(path)[1].lower()
    if ext == ".txt":
        with open(path, encoding="utf-8") as f:
            paragraphs = f.read().split("\n\n")
        return [p.strip() for p in paragraphs if p.strip()]
    if ext in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as f:
            raw = f.read()
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
        table = pq.read_table(path)
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


def _read_hub(name: str, split: str) -> list[str]:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise DatasetError(f"dataset {name} needs the hub but HF_HUB_OFFLINE=1")
    try:
        import datasets
    except ImportError:
        raise DatasetError(f"dataset {name} needs the `datasets` package (pip install datasets)") from None
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:
        raise DatasetError(f"cannot load {name} from the hub ({e.__class__.__name__}); pass a local file or 'fortunes'") from None
    column = "text" if "text" in ds.column_names else ds.column_names[0]
    return [str(t) for t in ds[column]]


def _texts(name: str, opts: dict[str, str]) -> list[str]:
    if name == "fortunes":
        from .texts import calibration_texts

        return calibration_texts()
    if os.path.splitext(name)[1] or os.path.sep in name:
        if not os.path.isfile(name):
            raise DatasetError(f"dataset file {name} not found: pass an existing .txt/.jsonl/.json/.parquet file")
        return _read_local(name)
    return _read_hub(name, opts.get("split", "train").replace("+", "+"))


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
