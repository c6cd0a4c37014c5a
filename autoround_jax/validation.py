"""Checks that keep bad input from becoming a bad model: non-finite values and token ids beyond the vocabulary.

The base of the layering: it imports nothing of the package. Every check raises a ValueError subclass whose first
line names the problem, the tensor, and the fix; the command line prints it as `autoround-jax: error: ...` (exit 2).
They are called from one place each: the checkpoint reader (every float tensor read from disk), the folder writer
(every float tensor written), and the tuner's checks (tuning/checks.py: each block's loss, scales and codes, and
everything before the first block). Metadata files are read with one-line errors by io/files.py.
"""

from __future__ import annotations

import re

import ml_dtypes
import numpy as np


_FLOAT_DTYPES = {np.dtype(ml_dtypes.bfloat16), np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2)}
_CHUNK = 1 << 24  # elements per isfinite pass: bounds the temporary boolean array on huge tensors
_BLOCK = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class NonFiniteError(ValueError):
    """A weight, scale or loss is NaN or infinite: the model would be garbage."""


class VocabularyError(ValueError):
    """Token ids (or a tokenizer) that do not fit the model's embedding."""


def is_float(dtype) -> bool:
    dtype = np.dtype(dtype)
    return dtype.kind == "f" or dtype in _FLOAT_DTYPES


def describe(name: str) -> str:
    """'model.layers.3.mlp.up_proj.weight' -> 'model.layers.3.mlp.up_proj.weight (block 3)'."""
    m = _BLOCK.search(name)
    return f"{name} (block {m.group(1)})" if m else name


def count_nonfinite(a) -> tuple[int, int]:
    """(number of NaNs, number of infinities) in a float array (numpy or JAX); (0, 0) for integer arrays."""
    if not isinstance(a, np.ndarray):
        a = np.asarray(a)
    if not is_float(a.dtype) or a.size == 0:
        return 0, 0
    flat = a.reshape(-1)
    if all(bool(np.isfinite(flat[i : i + _CHUNK]).all()) for i in range(0, flat.size, _CHUNK)):
        return 0, 0  # the common case: one cheap pass, no counting
    nan = sum(int(np.isnan(flat[i : i + _CHUNK]).sum()) for i in range(0, flat.size, _CHUNK))
    return nan, sum(int(np.isinf(flat[i : i + _CHUNK]).sum()) for i in range(0, flat.size, _CHUNK))


def check_finite(a, name: str, source: str = "", fix: str | None = None) -> None:
    """Raise NonFiniteError if the float array a (tensor `name`, read from or written to `source`) holds NaN/inf."""
    nan, inf = count_nonfinite(a)
    if nan or inf:
        where = f" in {source}" if source else ""
        fix = fix or "the checkpoint is damaged or was saved after a diverged run: re-download or re-export it"
        raise NonFiniteError(f"non-finite values in {describe(name)}{where}: {nan} NaN, {inf} inf of "
                             f"{np.size(a)} values; {fix}")


def check_quantized(qw, name: str) -> None:
    """A quantized layer's scales (finite in scale_dtype: a float16 scale overflows to inf) and codes/zeros (within
    [0, 2^bits - 1]) before anything is written. Packed exports store scales in float16 whatever scale_dtype was;
    an fp32 scale beyond float16 is caught when its tensor is written (hf_folder.write_sharded)."""
    scales = np.asarray(qw.scales).astype(np.float32)
    nan, inf = count_nonfinite(scales)
    keep = f"keep it in float (--fp_layers {name})"
    if nan or inf:
        raise NonFiniteError(f"non-finite quantization scales for {describe(name)}: {nan} NaN, {inf} inf; the layer's "
                             f"weights or calibration activations overflow: check the checkpoint, or {keep}")
    top = 2**qw.bits - 1
    for what, arr in (("codes", qw.codes), ("zeros", qw.zeros)):
        arr = np.asarray(arr)
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) > top):
            raise NonFiniteError(f"{what} of {describe(name)} leave [0, {top}] for {qw.bits} bits "
                                 f"(range {int(arr.min())}..{int(arr.max())}): this is a bug, please report it")


# -- token ids -------------------------------------------------------------------------------------------------------
def tokenizer_max_id(tokenizer) -> int | None:
    """The largest id a tokenizer can produce (its vocabulary and added tokens), or None if it cannot say."""
    get_vocab = getattr(tokenizer, "get_vocab", None)
    if get_vocab is None:
        return None
    try:
        vocab = get_vocab()
    except Exception:  # a tokenizer-like object without a real vocabulary
        return None
    return max(vocab.values()) if vocab else None


def check_tokenizer_fits(tokenizer, vocab_size: int, model: str | None = None) -> None:
    """The tokenizer's ids must all index the model's embedding (vocab_size rows). A tokenizer smaller than a padded
    embedding is normal; a larger one belongs to another model."""
    top = tokenizer_max_id(tokenizer)
    if top is not None and top >= vocab_size:
        where = f" of {model}" if model else ""
        raise VocabularyError(
            f"the tokenizer produces token ids up to {top} but the model{where} has vocab_size {vocab_size} "
            "(config.json): the tokenizer belongs to another model; use the model's own tokenizer files"
        )


def check_ids_fit(ids, vocab_size: int, what: str = "token ids") -> None:
    """Token ids in [0, vocab_size): out-of-range ids give NaN logits, not an error, in JAX."""
    ids = np.asarray(ids)
    if ids.size == 0:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        raise VocabularyError(
            f"{what} range over {lo}..{hi} but the model's vocab_size is {vocab_size}: the tokenizer (or the ids) "
            "belong to another model; use the model's own tokenizer"
        )


