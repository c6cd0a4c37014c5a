"""The SignRound block optimisation as one jit-compiled function per block shape.

All `iters` iterations run inside a single `lax.fori_loop`: mini-batches are gathered on device from precomputed
sample indices, gradients are accumulated over `gradient_accumulate_steps` micro-batches with `lax.scan`, the
update is the recipe's optimizer (tuning/recipes.py; default: the sign step with linear decay), and best-loss
tracking keeps the pre-step parameters of the best iteration (iteration 0 is RTN). No host round-trip per iteration; one compilation serves every block whose
structure and shapes match (the graphdef is a static argument and hashes by structure).
"""

from __future__ import annotations

import dataclasses
import functools
import random

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from .fake_quant import ClipScale, Rounding
from .recipes import DEFAULT, Recipe

TRACE_COUNT = {"tune": 0}  # incremented at trace time only: tests use it to prove one compile per block shape


@dataclasses.dataclass(frozen=True)
class TuneSettings:
    iters: int = 200
    lr: float = 5e-3
    minmax_lr: float = 5e-3
    batch_size: int = 8
    gradient_accumulate_steps: int = 1
    not_use_best_mse: bool = False


@dataclasses.dataclass
class TuneResult:
    loss_rtn: float  # iteration 0 (V = 0, scales = 1)
    loss_best: float
    best_iter: int


def sample_indices(nsamples: int, global_batch: int, iters: int, rng: random.Random) -> np.ndarray:
    """The reference's IndexSampler: shuffled permutation cut into consecutive slices; reshuffle when short."""
    if global_batch > nsamples:
        raise ValueError(f"batch_size x gradient_accumulate_steps = {global_batch} exceeds nsamples {nsamples}")
    out, perm, pos = [], [], 0
    for _ in range(iters):
        if pos + global_batch > len(perm):
            perm = list(range(nsamples))
            rng.shuffle(perm)
            pos = 0
        out.append(perm[pos : pos + global_batch])
        pos += global_batch
    return np.asarray(out, np.int32).reshape(iters, global_batch)


def padded_chunks(x: jax.Array, batch_size: int):
    """Yield (chunk [batch_size, ...], valid rows) over x's rows; the last chunk is zero-padded so that one compiled
    shape serves every chunk."""
    for i in range(0, x.shape[0], batch_size):
        chunk = x[i : i + batch_size]
        valid = chunk.shape[0]
        if valid < batch_size:
            chunk = jnp.concatenate([chunk, jnp.zeros((batch_size - valid,) + chunk.shape[1:], chunk.dtype)])
        yield chunk, valid


def _clip_scales(params, bound=(0.0, 1.0)):
    """min/max scales live in [0, 1] (the recipe's clip_range): the reference clamps them in place before every use."""
    return jax.tree.map(lambda p: jnp.clip(p, *bound), params)


@functools.partial(jax.jit, static_argnames=("graphdef", "iters", "batch_size", "gas", "not_use_best_mse", "recipe"))
def _tune(graphdef, rounding, scales, rest, x_q, y_fp, cos, sin, mask, indices, lr, minmax_lr, *,
          iters, batch_size, gas, not_use_best_mse, recipe: Recipe = DEFAULT):
    TRACE_COUNT["tune"] += 1
    # recipe (tuning/recipes.py): objective, optimizers, clip range, iteration selection; static and hashable.
    tx_v, tx_s = recipe.optimizer(lr, iters), recipe.minmax_tx(minmax_lr, iters)
    not_use_best_mse = not_use_best_mse or recipe.select == "last"

    # The reference (0.16) leaves each sample's last position out of the loss: it has no next-token target.
    keep = (jnp.arange(x_q.shape[1]) < x_q.shape[1] - 1).astype(jnp.float32)[None, :, None]

    def loss_fn(params, xb, yb):
        block = nnx.merge(graphdef, params[0], params[1], rest)
        out = block(xb, cos, sin, mask)[0]
        return recipe.objective(out, yb, keep)

    grad_fn = jax.value_and_grad(loss_fn)

    def body(i, carry):
        params, opt_state, best, best_loss, best_iter, loss0 = carry
        idx = indices[i].reshape(gas, batch_size)

        if gas == 1:  # no accumulator: saves a zero-fill and an add over every trainable element per iteration
            loss, grads = grad_fn(params, x_q[idx[0]], y_fp[idx[0]])
        else:
            def micro(acc, j):
                loss, g = grad_fn(params, x_q[j], y_fp[j])
                return jax.tree.map(jnp.add, acc, (loss, g)), None

            zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
            (loss, grads), _ = jax.lax.scan(micro, zero, idx)
            loss = loss / gas
        take = (i == iters - 1) if not_use_best_mse else (loss < best_loss)
        # Copy the parameters only on the iterations that improve (a select would rewrite every element each time).
        best = jax.lax.cond(take, lambda: params, lambda: best)
        best_loss = jnp.where(take, loss, best_loss)
        best_iter = jnp.where(take, i, best_iter)
        loss0 = jnp.where(i == 0, loss, loss0)
        uv, sv = tx_v.update(grads[0], opt_state[0]), tx_s.update(grads[1], opt_state[1])
        new_params = (optax.apply_updates(params[0], uv[0]), _clip_scales(optax.apply_updates(params[1], sv[0]),
                                                                                   recipe.clip_range))
        return new_params, (uv[1], sv[1]), best, best_loss, best_iter, loss0

    params = (rounding, scales)
    opt_state = (tx_v.init(rounding), tx_s.init(scales))
    init = (params, opt_state, params, jnp.float32(jnp.inf), jnp.int32(0), jnp.float32(0))
    _, _, best, best_loss, best_iter, loss0 = jax.lax.fori_loop(0, iters, body, init)
    return best, loss0, best_loss, best_iter


def tune_block(block: nnx.Module, x_q, y_fp, cos, sin, mask, settings: TuneSettings, rng: random.Random,
               recipe: Recipe = DEFAULT) -> TuneResult:
    """Optimise the fake-quant leaves of `block` in place (V and clip scales end at the best iteration's values).

    x_q, y_fp: [nsamples, T, D] tuned inputs and float targets; cos/sin/mask: built for batch_size rows.
    """
    graphdef, rounding, scales, rest = nnx.split(block, Rounding, ClipScale, ...)
    s = settings
    global_batch = s.batch_size * s.gradient_accumulate_steps
    idx = sample_indices(x_q.shape[0], global_batch, s.iters, rng)
    best, loss0, best_loss, best_iter = _tune(
        graphdef, rounding, scales, rest, x_q, y_fp, cos, sin, mask, jnp.asarray(idx),
        jnp.float32(s.lr), jnp.float32(s.minmax_lr), iters=s.iters, batch_size=s.batch_size,
        gas=s.gradient_accumulate_steps, not_use_best_mse=s.not_use_best_mse, recipe=recipe,
    )
    nnx.update(block, best[0], best[1])
    return TuneResult(float(loss0), float(best_loss), int(best_iter))
