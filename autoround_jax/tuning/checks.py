"""The tuner's own checks: everything AutoRound.quantize can refuse before the first block is loaded, and each
block's loss, scales and codes before anything is written (the numeric checks themselves are in validation.py)."""

from __future__ import annotations

import math

import numpy as np

from ..data.calibration import check_dataset
from ..validation import NonFiniteError, check_finite, check_ids_fit, check_quantized, check_tokenizer_fits


def check_block(ar, i: int) -> None:
    """After block i of an AutoRound run: its loss is finite and its quantized layers are exportable."""
    r = ar.reports[-1] if ar.reports else None
    if r is not None and r.index == i:
        for label, v in (("RTN (iteration 0)", r.loss_rtn), ("best", r.loss_best)):
            if v is not None and not math.isfinite(v):
                raise NonFiniteError(
                    f"block {i} (model.layers.{i}): the {label} tuning loss is {v}: the block's outputs overflow or "
                    "its inputs are not finite; load the model in fp32 (--model_dtype fp32) or check the checkpoint"
                )
    prefix = f"model.layers.{i}."
    for name, qw in ar.quantized.items():
        if name.startswith(prefix):
            check_quantized(qw, name)


def validate_before_tuning(ar) -> None:
    """Everything AutoRound.quantize can check before any block is loaded: the embedding, final norm and lm_head
    are finite; the tokenizer and any given token ids fit the model's vocabulary; the dataset spec is readable."""
    cfg = ar.config
    reader = getattr(ar.source, "reader", None)
    names = ["model.embed_tokens.weight", "model.norm.weight"] + ([] if cfg.tie_word_embeddings else ["lm_head.weight"])
    if reader is not None:
        for name in names:
            reader.get(name)  # the reader checks every float tensor it hands out
    else:  # a model already in memory
        check_finite(ar.source.tensor("model.embed_tokens.weight"), "model.embed_tokens.weight")
    if not (ar.iters > 0 or ar._needs_imatrix()):
        return  # plain RTN reads no calibration data and never uses the tokenizer
    if isinstance(ar.dataset, np.ndarray):
        check_ids_fit(ar.dataset, cfg.vocab_size, "calibration token ids")
        return
    if ar.tokenizer is not None and not (isinstance(ar.dataset, str) and ar.dataset.strip() == "self"):
        check_tokenizer_fits(ar.tokenizer, cfg.vocab_size, ar.model_path)  # text calibration: ids must fit
    if isinstance(ar.dataset, str) or ar.dataset is None:
        check_dataset(ar.dataset)
