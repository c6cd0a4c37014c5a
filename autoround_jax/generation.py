"""Jit-compiled autoregressive decoding with a KV cache: greedy or sampling (temperature, top-k, top-p)."""

from __future__ import annotations

import functools

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


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_k", "top_p"))
def _decode(graphdef, state, ids, mask, key, eos_ids, pad_id, *, max_new_tokens, temperature, top_k, top_p):
    model: CausalLM = nnx.merge(graphdef, state)
    b, t = ids.shape
    cache = KVCache.init(model.config, b, t + max_new_tokens, model.dtype)
    positions = default_positions(mask, b, t)
    logits, cache = model.forward_cached(ids, positions, mask, cache)
    key, sub = jax.random.split(key)
    tok = sample_logits(logits[:, -1], sub, temperature, top_k, top_p)
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32)
    done = jnp.zeros((b,), bool)
    pos = positions[:, -1] + 1

    def cond(c):
        i, _, _, _, done, _, _ = c
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(c):
        i, tok, cache, pos, done, out, key = c
        out = out.at[:, i].set(jnp.where(done, pad_id, tok))
        done = done | jnp.isin(tok, eos_ids)
        logits, cache = model.forward_cached(tok[:, None], pos[:, None], jnp.ones((b, 1), bool), cache)
        key, sub = jax.random.split(key)
        nxt = sample_logits(logits[:, -1], sub, temperature, top_k, top_p)
        return i + 1, nxt, cache, pos + 1, done, out, key

    init = (jnp.zeros((), jnp.int32), tok, cache, pos, done, out, key)
    return jax.lax.while_loop(cond, body, init)[5]


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
    ids = jnp.asarray(input_ids, jnp.int32)
    mask = jnp.ones_like(ids, bool) if attention_mask is None else jnp.asarray(attention_mask, bool)
    eos = jnp.asarray(list(eos_token_ids) or [-1], jnp.int32)
    graphdef, state = nnx.split(model)
    out = _decode(
        graphdef, state, ids, mask, jax.random.PRNGKey(seed), eos, jnp.int32(pad_token_id),
        max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
    )
    return np.asarray(out)


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
    width = max(len(e) for e in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = np.full((len(encoded), width), pad, np.int32)
    mask = np.zeros((len(encoded), width), bool)
    for r, e in enumerate(encoded):
        ids[r, width - len(e):] = e
        mask[r, width - len(e):] = True
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
