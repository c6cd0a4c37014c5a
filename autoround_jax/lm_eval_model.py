"""lm-eval's LM interface for our JAX CausalLM (float, fake-quant or packed int): no torch model in the loop.

Requests are scored the way lm-eval's `hf` model scores them (same tokenization, truncation, rolling windows and
one-token-continuation sharing), but batches are left-padded to a few bucketed shapes [eval_bs, T] so that the
jit-compiled forward and decode functions compile a handful of times per run. Importing this module imports lm_eval.
"""

from __future__ import annotations

import functools
import json
from collections import defaultdict
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import jinja2
import numpy as np
from flax import nnx
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import (
    _add_special_kwargs,
    configure_pad_token,
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from .generation import decode, left_pad
from .models.decoder import CausalLM


def _pow2(n: int, floor: int) -> int:
    return max(floor, 1 << (n - 1).bit_length())


def bucket(n: int, cap: int | None = None) -> int:
    """Padded length for n tokens: powers of two (at least 16) up to 512, then multiples of 512, at most cap
    rounded up to 64 (never below n), so a whole evaluation compiles only a few shapes."""
    b = _pow2(n, 16) if n <= 512 else -(-n // 512) * 512
    if cap is not None:
        b = min(b, -(-cap // 64) * 64)
    return max(b, n)


def _last_logits(model: CausalLM, ids: jax.Array, mask: jax.Array, c: int) -> jax.Array:
    """Logits [B, c, V] of the last c positions only: projecting all T positions would cost [B, T, V] memory."""
    return model.logits(model.hidden(ids, mask)[:, -c:])


@functools.partial(jax.jit, static_argnames=("graphdef", "c"))
def _score(graphdef, state, ids, mask, targets, *, c):
    """Per position of the last c: log p(target), the greedy token; plus the whole last row of log-probs."""
    logp = jax.nn.log_softmax(_last_logits(nnx.merge(graphdef, state), ids, mask, c), axis=-1)
    picked = jnp.take_along_axis(logp, targets[:, -c:, None], axis=-1)[..., 0]
    return picked, jnp.argmax(logp, axis=-1).astype(jnp.int32), logp[:, -1]


def _chunks(items: Sequence, n: int) -> Iterator[Sequence]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


class JaxLM(TemplateLM):
    """lm-eval model around a CausalLM and its HF tokenizer: loglikelihood, loglikelihood_rolling, generate_until."""

    def __init__(
        self,
        model: CausalLM,
        tokenizer,
        batch_size: int = 16,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        add_bos_token: bool | None = None,
        prefix_token_id: int | None = None,
        seed: int = 1234,
    ):
        super().__init__()
        self.model = model
        self.tokenizer = configure_pad_token(tokenizer)
        self._batch_size = int(batch_size)
        self._max_length = max_length or model.config.max_position_embeddings
        self._max_gen_toks = max_gen_toks
        self.add_bos_token = add_bos_token
        self.custom_prefix_token_id = prefix_token_id
        self._graphdef, self._state = nnx.split(model)
        self._key = jax.random.PRNGKey(seed)
        self._eos_ids = set(model.config.eos_token_ids) | (
            {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        )

    # ---- properties lm-eval reads
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context conditions on: bos, else eos (as lm-eval's hf model)."""
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def get_model_info(self) -> dict:
        """Recorded in the results' config block."""
        n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self._state))
        return {"model_num_parameters": n, "model_dtype": str(self.model.dtype), "backend": "autoround_jax"}

    # ---- tokenization (same rules as lm-eval's hf model)
    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        special = _add_special_kwargs(add_special_tokens, self.add_bos_token)
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            special["add_special_tokens"] = False
        return self.tokenizer.encode(string, **special)

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """As lm-eval's hf model: the tokenizer's template, retried without the system turn if the template
        rejects one."""
        kw = dict(tokenize=False, add_generation_prompt=add_generation_prompt,
                  continue_final_message=not add_generation_prompt)
        try:
            return self.tokenizer.apply_chat_template(chat_history, **kw)
        except jinja2.exceptions.TemplateError:
            return self.tokenizer.apply_chat_template([m for m in chat_history if m["role"] != "system"], **kw)

    @property
    def _pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    # ---- loglikelihood
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """Requests sharing context + continuation[:-1] share one forward (lm-eval's one-token-continuation cache);
        inputs longer than max_length + 1 lose tokens on the left, as in lm-eval."""
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, (_, ctx, cont) in enumerate(requests):
            assert ctx and cont and len(cont) <= self.max_length
            groups[tuple(ctx + cont[:-1])].append(i)
        keys = sorted(groups, key=len, reverse=True)
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="Running loglikelihood requests")
        for chunk in _chunks(keys, self.batch_size):
            members = [[requests[i][2] for i in groups[k]] for k in chunk]
            for k, conts, scores in zip(chunk, members, self._score_batch(chunk, members)):
                for i, s in zip(groups[k], scores):
                    out[i] = s
                bar.update(len(conts))
        bar.close()
        return out

    def _score_batch(self, keys: Sequence[tuple[int, ...]], members: list[list[list[int]]]):
        """(logprob, is_greedy) for every continuation of every shared input, from one jitted call."""
        windows = [list(k[-self.max_length :]) for k in keys]
        targets = [w[1:] + [m[0][-1]] for w, m in zip(windows, members)]
        t = bucket(max(map(len, windows)), self.max_length)
        c = min(t, _pow2(max(len(cont) for m in members for cont in m), 8))
        ids, mask = left_pad(windows, t, self.batch_size, self._pad_id)
        tgt, _ = left_pad(targets, t, self.batch_size, 0)
        picked, greedy, last = (np.asarray(x) for x in _score(self._graphdef, self._state, ids, mask, tgt, c=c))
        return [[_cont_score(picked[r], greedy[r], last[r], cont) for cont in conts] for r, conts in enumerate(members)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-document log-likelihood over lm-eval's disjoint max_length windows (prefix token first)."""
        windows, owner = [], []
        for i, (text,) in enumerate(r.args for r in requests):
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[i] += logprob
        return totals

    # ---- generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Batches of equal gen_kwargs, longest prompt first; each row ends at its first stop string, at eos or
        after max_gen_toks, and its text is cut before the stop string (lm-eval's postprocessing)."""
        groups: dict[str, list[int]] = defaultdict(list)
        for i, r in enumerate(requests):
            groups[json.dumps(r.args[1], sort_keys=True, default=str)].append(i)
        out: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="Running generate_until requests")
        for idx in groups.values():
            kwargs = normalize_gen_kwargs(requests[idx[0]].args[1], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=self.tok_decode(
                self.eot_token_id, skip_special_tokens=False))
            max_ctx = self.max_length - kwargs["max_gen_toks"]
            if max_ctx <= 0:
                raise ValueError(f"max_gen_toks {kwargs['max_gen_toks']} must be below max_length {self.max_length}")
            prompts = {i: self.tok_encode(requests[i].args[0])[-max_ctx:] for i in idx}
            order = sorted(idx, key=lambda i: -len(prompts[i]))
            for chunk in _chunks(order, self.batch_size):
                for i, toks in zip(chunk, self._generate_batch([prompts[i] for i in chunk], until, kwargs)):
                    out[i] = postprocess_generated_text(self.tok_decode(toks), until, None)
                bar.update(len(chunk))
        bar.close()
        return out

    def _generate_batch(self, prompts: list[list[int]], until: list[str], kwargs: dict[str, Any]) -> list[list[int]]:
        """New tokens per prompt, decoded in jitted chunks until every row is done."""
        max_new = kwargs["max_gen_toks"]
        t = bucket(max(map(len, prompts)), self.max_length)
        ids, mask = left_pad(prompts, t, self.batch_size, self._pad_id)
        sampling = dict(temperature=float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0,
                        top_k=int(kwargs.get("top_k") or 0), top_p=float(kwargs.get("top_p") or 1.0))
        self._key, key = jax.random.split(self._key)
        rows: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        for new in decode(self._graphdef, self._state, ids, mask, key, max_new_tokens=max_new,
                          chunk=min(32, _pow2(max_new, 1)), eos_token_ids=sorted(self._eos_ids),
                          pad_token_id=self._pad_id, **sampling):
            for r in range(len(prompts)):
                if not done[r]:
                    rows[r], done[r] = self._extend(rows[r], new[r].tolist(), until, max_new)
            if all(done):
                break
        return rows

    def _extend(self, row: list[int], new: list[int], until: list[str], max_new: int) -> tuple[list[int], bool]:
        """Append a chunk; cut at the first eos, or right after the token that completes the first stop string
        (searched on the raw text, special tokens included, as lm-eval's stopping criteria do)."""
        start = len(row)
        row = (row + new)[:max_new]
        eos = next((k for k in range(start, len(row)) if row[k] in self._eos_ids), None)
        if eos is not None:
            row = row[:eos]
        hit = lambda k: any(s and s in self.tok_decode(row[:k], skip_special_tokens=False) for s in until)  # noqa: E731
        if hit(len(row)):
            return row[: next(k for k in range(start + 1, len(row) + 1) if hit(k))], True
        return row, eos is not None or len(row) >= max_new


def _cont_score(picked: np.ndarray, greedy: np.ndarray, last: np.ndarray, cont: list[int]) -> tuple[float, bool]:
    """One continuation of a shared input: shared positions from the row, its own last token from the last row."""
    c, m = len(picked), len(cont)
    head = slice(c - m, c - 1)
    logprob = float(np.sum(picked[head], dtype=np.float64) + last[cont[-1]])
    return logprob, bool(np.array_equal(greedy[head], cont[:-1]) and greedy[-1] == cont[-1])
