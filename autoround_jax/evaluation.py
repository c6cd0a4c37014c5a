"""Perplexity over non-overlapping windows with a fixed token budget: the yardstick for every quantized model."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .models.decoder import CausalLM
from .validation import check_ids_fit


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _window_nll(graphdef, state, ids):
    """Summed next-token NLL of each window [B, T] (positions 1..T-1 are predicted)."""
    model = nnx.merge(graphdef, state)
    logits = model(ids)[:, :-1].astype(jnp.float32)
    target = jnp.take_along_axis(logits, ids[:, 1:, None], axis=-1)[..., 0]
    return (jax.nn.logsumexp(logits, axis=-1) - target).sum(axis=-1)


def token_windows(token_ids, seqlen: int, max_tokens: int | None) -> np.ndarray:
    """Non-overlapping windows [n, seqlen] from the first max_tokens tokens (a short text gives one window)."""
    ids = np.asarray(token_ids, np.int32)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise ValueError(f"text too short for perplexity: {len(ids)} token(s), at least 2 are needed; pass a longer "
                         "text (--text FILE)")
    if len(ids) < seqlen:
        return ids[None]
    n = len(ids) // seqlen
    return ids[: n * seqlen].reshape(n, seqlen)


def perplexity_of_windows(model: CausalLM, windows: np.ndarray, batch_size: int = 1) -> float:
    graphdef, state = nnx.split(model)
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        chunk = windows[i : i + batch_size]
        total += float(np.sum(np.asarray(_window_nll(graphdef, state, jnp.asarray(chunk)), np.float64)))
        count += chunk.shape[0] * (chunk.shape[1] - 1)
    return math.exp(total / count)


def perplexity_and_count(
    model: CausalLM,
    tokenizer,
    text: str,
    *,
    seqlen: int = 1024,
    max_tokens: int | None = 20480,
    batch_size: int = 1,
) -> tuple[float, int, np.ndarray]:
    """(perplexity, number of tokens scored, the windows [n, T]): each window's first token is context only, so
    n * (T - 1) tokens are scored."""
    if seqlen < 2:
        raise ValueError(f"seqlen {seqlen} is too short for perplexity: use windows of at least 2 tokens")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    check_ids_fit(ids, model.config.vocab_size, "the text's token ids")
    windows = token_windows(ids, seqlen, max_tokens)
    return perplexity_of_windows(model, windows, batch_size), windows.shape[0] * (windows.shape[1] - 1), windows


def perplexity(
    model: CausalLM,
    tokenizer,
    text: str,
    *,
    seqlen: int = 1024,
    max_tokens: int | None = 20480,
    batch_size: int = 1,
) -> float:
    """exp(mean NLL) over non-overlapping seqlen windows of the first max_tokens tokens of text."""
    return perplexity_and_count(model, tokenizer, text, seqlen=seqlen, max_tokens=max_tokens, batch_size=batch_size)[0]
