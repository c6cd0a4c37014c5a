"""Jit-compiled autoregressive decoding with a KV cache: greedy or sampling (temperature, top-k, top-p).

The one decoding loop of the package: `left_pad` lays out a batch of prompts, `prefill` runs them into a fresh
cache, `decode_steps` samples and feeds back up to `steps` tokens per row (a row is done at its first eos; the loop
ends early once every row is done), and `decode` drives them chunk by chunk. `generate_ids` decodes in one chunk;
lm-eval's JaxLM decodes in chunks and checks its stop strings on the host between them.
"""

from __future__ import annotations

import functools
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .models.decoder import CausalLM, KVCache, default_positions
from .tokenizer import format_prompt
from .validation import check_ids_fit


def sample_logits(logits: jax.Array, key: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """Draw one token per row; temperature 0 means greedy."""
    if temperature <= 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p  # always keeps the top token
        threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def left_pad(rows: Sequence[Sequence[int]], width: int | None = None, batch: int | None = None,
             pad: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """ids int32 and mask bool [batch, width] with the rows right-aligned (left padding). width defaults to the
    longest row, batch to the number of rows; rows beyond them repeat row 0 (their results are to be discarded)."""
    width = max(map(len, rows)) if width is None else width
    batch = len(rows) if batch is None else batch
    ids = np.full((batch, width), pad, np.int32)
    mask = np.zeros((batch, width), bool)
    for r in range(batch):
        row = rows[r] if r < len(rows) else rows[0]
        ids[r, width - len(row):] = row
        mask[r, width - len(row):] = True
    return ids, mask


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len"))
def prefill(graphdef, state, ids, mask, *, cache_len):
    """Left-padded prompts [B, T] into a fresh cache of cache_len slots: (next-token logits [B, V], the cache, the
    next positions [B])."""
    model: CausalLM = nnx.merge(graphdef, state)
    b, t = ids.shape
    cache = KVCache.init(model.config, b, cache_len, model.dtype)
    positions = default_positions(mask, b, t)
    logits, cache = model.forward_cached(ids, positions, mask, cache)
    return logits[:, -1], cache, positions[:, -1] + 1


@functools.partial(jax.jit, static_argnames=("graphdef", "steps", "temperature", "top_k", "top_p"),
                   donate_argnames=("cache",))
def decode_steps(graphdef, state, logits, cache, pos, key, done, eos_ids, pad_id, *, steps, temperature, top_k,
                 top_p):
    """Up to `steps` tokens per row: each is sampled from the carried next-token logits and run into the cache.

    A row is done after its first token in eos_ids (that token is kept, later ones read pad_id), and the loop ends
    early once every row is done (the tokens not reached read pad_id). Returns the tokens [B, steps] and the state
    to continue from: (tokens, logits, cache, pos, key, done).
    """
    model: CausalLM = nnx.merge(graphdef, state)
    b = logits.shape[0]
    ones = jnp.ones((b, 1), bool)

    def cond(c):
        i, done = c[0], c[-1]
        return (i < steps) & ~jnp.all(done)

    def body(c):
        i, out, logits, cache, pos, key, done = c
        key, sub = jax.random.split(key)
        tok = sample_logits(logits, sub, temperature, top_k, top_p)
        out = out.at[:, i].set(jnp.where(done, pad_id, tok))
        done = done | jnp.isin(tok, eos_ids)
        logits, cache = model.forward_cached(tok[:, None], pos[:, None], ones, cache)
        return i + 1, out, logits[:, -1], cache, pos + 1, key, done

    out = jnp.full((b, steps), pad_id, jnp.int32)
    init = (jnp.zeros((), jnp.int32), out, logits, cache, pos, key, done)
    return jax.lax.while_loop(cond, body, init)[1:]


def decode(graphdef, state, ids: np.ndarray, mask: np.ndarray, key: jax.Array, *, max_new_tokens: int,
           chunk: int | None = None, eos_token_ids=(), pad_token_id: int = 0, temperature: float = 0.0,
           top_k: int = 0, top_p: float = 1.0) -> Iterator[np.ndarray]:
    """Prefill left-padded prompts, then yield the new tokens [B, chunk] chunk by chunk (chunk defaults to
    max_new_tokens: one chunk) until max_new_tokens are covered or every row has reached an eos. The cache holds
    the prompt plus whole chunks; a caller may stop iterating at any chunk."""
    chunk = chunk or max_new_tokens
    n_chunks = -(-max_new_tokens // chunk) if max_new_tokens > 0 else 0
    logits, cache, pos = prefill(graphdef, state, ids, mask, cache_len=ids.shape[1] + n_chunks * chunk)
    done = jnp.zeros((ids.shape[0],), bool)
    eos = jnp.asarray(list(eos_token_ids) or [-1], jnp.int32)
    sampling = dict(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p))
    for _ in range(n_chunks):
        toks, logits, cache, pos, key, done = decode_steps(graphdef, state, logits, cache, pos, key, done, eos,
                                                           jnp.int32(pad_token_id), steps=chunk, **sampling)
        yield np.asarray(toks)
        if bool(jnp.all(done)):
            return


def generate_ids(
    model: CausalLM,
    input_ids: np.ndarray,
    attention_mask: np.ndarray | None = None,
    *,
    max_new_tokens: int = 64,
    eos_token_ids=(),
    pad_token_id: int = 0,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
) -> np.ndarray:
    """New token ids [B, max_new_tokens] (pad after a row's eos); prompts must be left-padded."""
    ids = np.asarray(input_ids, np.int32)
    mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask, bool)
    graphdef, state = nnx.split(model)
    chunks = decode(graphdef, state, ids, mask, jax.random.PRNGKey(seed), max_new_tokens=max_new_tokens,
                    eos_token_ids=eos_token_ids, pad_token_id=pad_token_id, temperature=temperature, top_k=top_k,
                    top_p=top_p)
    return np.concatenate([np.zeros((ids.shape[0], 0), np.int32), *chunks], axis=1)


def generate(
    model: CausalLM,
    tokenizer,
    prompt_or_messages,
    max_new_tokens: int = 128,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    chat: bool | None = None,
    enable_thinking: bool | None = None,
) -> str | list[str]:
    """Generate from a string, a list of chat messages, or a list of either (batched with left padding).

    Strings go through the tokenizer's chat template when it has one (chat=False sends them raw), as in
    `apply_chat_template(messages, add_generation_prompt=True)`; Qwen3's `enable_thinking` is passed through.
    """
    single = isinstance(prompt_or_messages, str) or (
        isinstance(prompt_or_messages, list) and prompt_or_messages and isinstance(prompt_or_messages[0], dict)
    )
    batch = [prompt_or_messages] if single else list(prompt_or_messages)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens is {max_new_tokens}: generate at least 1 token")
    texts = [format_prompt(tokenizer, p, chat, enable_thinking) for p in batch]
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    if not encoded or any(len(e) == 0 for e in encoded):
        raise ValueError("the prompt is empty (no tokens): pass some text")
    for e in encoded:
        check_ids_fit(e, model.config.vocab_size, "the prompt's token ids")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids, mask = left_pad(encoded, pad=pad)
    eos = set(model.config.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    new = generate_ids(model, ids, mask, max_new_tokens=max_new_tokens, eos_token_ids=sorted(eos),
                       pad_token_id=pad, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    outs = []
    for row in new:
        row = list(row)
        for i, t in enumerate(row):
            if t in eos:
                row = row[:i]
                break
        outs.append(tokenizer.decode(row, skip_special_tokens=True))
    return outs[0] if single else outs
