"""The SignRound block optimisation as one jit-compiled function per block shape.

All `iters` iterations run inside a single `lax.fori_loop`: mini-batches are gathered on device from precomputed
sample indices, gradients are accumulated over `gradient_accumulate_steps` micro-batches with `lax.scan`, the
update is optax's sign step with linear decay, and best-loss tracking keeps the pre-step parameters of the best
iteration (iteration 0 is RTN). No host round-trip per iteration; one compilation serves every block whose
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
from jax.sharding import NamedSharding, PartitionSpec

from ..models.precision import cpu_tuned_jit
from .fake_quant import ClipScale, Rounding
from .mesh import take_rows
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


def _make_body(graphdef, rest, cos, sin, mask, lr, minmax_lr, fetch, *, iters, batch_size, gas, not_use_best_mse,
               recipe: Recipe = DEFAULT):
    """One SignRound iteration as a fori_loop body; fetch(i, j) -> (x_q, y_fp) rows of iteration i's micro-batch j,
    or (x_q, y_fp, valid) with valid [B, T] the positions the loss counts (per-sample masks, see tune_block).

    recipe (tuning/recipes.py): objective, optimizers, clip range, iteration selection; static and hashable."""
    tx_v, tx_s = recipe.optimizer(lr, iters), recipe.minmax_tx(minmax_lr, iters)
    not_use_best_mse = not_use_best_mse or recipe.select == "last"

    def loss_fn(params, xb, yb, vb=None):
        if vb is None:
            # The reference (0.16) leaves each sample's last position out of the loss: it has no next-token target.
            keep = (jnp.arange(xb.shape[1]) < xb.shape[1] - 1).astype(jnp.float32)[None, :, None]
        else:
            keep = vb.astype(jnp.float32)[:, :, None]
        block = nnx.merge(graphdef, params[0], params[1], rest)
        out = block(xb, cos, sin, mask)[0]
        return recipe.objective(out, yb, keep)

    grad_fn = jax.value_and_grad(loss_fn)

    def counted(batch) -> jax.Array:
        """Tokens the loss counts in a micro-batch (per-sample masks only; 0 otherwise, read as 1 below)."""
        return jnp.sum(batch[2].astype(jnp.float32)) if len(batch) == 3 else jnp.float32(0)

    def body(i, carry):
        params, opt_state, best, (best_loss, best_score), best_iter, loss0 = carry
        if gas == 1:  # no accumulator: saves a zero-fill and an add over every trainable element per iteration
            batch = fetch(i, 0)
            loss, grads = grad_fn(params, *batch)
            tokens = counted(batch)
        else:
            def micro(acc, j):
                batch = fetch(i, j)
                loss, g = grad_fn(params, *batch)
                return jax.tree.map(jnp.add, acc, (loss, g, counted(batch))), None

            zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.float32))
            (loss, grads, tokens), _ = jax.lax.scan(micro, zero, jnp.arange(gas))
            loss = loss / gas
        # With per-sample masks the reference ranks iterations by the loss divided by the tokens it counted in the
        # mini-batch (its logged loss); with the fixed last-position mask that count is constant, so the ranking is
        # the plain loss's (the divisor is then exactly 1). The reports keep the plain loss.
        score = loss / jnp.maximum(tokens, 1.0)
        take = (i == iters - 1) if not_use_best_mse else (score < best_score)
        # Copy the parameters only on the iterations that improve (a select would rewrite every element each time).
        best = jax.lax.cond(take, lambda: params, lambda: best)
        best_loss, best_score = jnp.where(take, loss, best_loss), jnp.where(take, score, best_score)
        best_iter = jnp.where(take, i, best_iter)
        loss0 = jnp.where(i == 0, loss, loss0)
        uv, sv = tx_v.update(grads[0], opt_state[0]), tx_s.update(grads[1], opt_state[1])
        new_params = (optax.apply_updates(params[0], uv[0]), _clip_scales(optax.apply_updates(params[1], sv[0]),
                                                                                   recipe.clip_range))
        return new_params, (uv[1], sv[1]), best, (best_loss, best_score), best_iter, loss0

    def init(rounding, scales):
        params = (rounding, scales)
        opt_state = (tx_v.init(rounding), tx_s.init(scales))
        return (params, opt_state, params, (jnp.float32(jnp.inf), jnp.float32(jnp.inf)), jnp.int32(0),
                jnp.float32(0))

    return body, init


_STATIC = ("graphdef", "iters", "batch_size", "gas", "not_use_best_mse", "mesh", "recipe")


@functools.partial(cpu_tuned_jit, static_argnames=_STATIC)
def _tune(graphdef, rounding, scales, rest, x_q, y_fp, cos, sin, mask, indices, lr, minmax_lr, valid=None, *,
          iters, batch_size, gas, not_use_best_mse, mesh=None, recipe: Recipe = DEFAULT):
    """Every iteration in one fori_loop; mini-batches gathered on device (over the data shards on a mesh)."""
    TRACE_COUNT["tune"] += 1

    def fetch(i, j):
        idx = jax.lax.dynamic_index_in_dim(indices[i].reshape(gas, batch_size), j, keepdims=False)
        rows = (take_rows(x_q, idx, mesh), take_rows(y_fp, idx, mesh))
        return rows if valid is None else rows + (take_rows(valid, idx, mesh),)

    body, init = _make_body(graphdef, rest, cos, sin, mask, lr, minmax_lr, fetch, iters=iters,
                            batch_size=batch_size, gas=gas, not_use_best_mse=not_use_best_mse, recipe=recipe)
    _, _, best, (best_loss, _), best_iter, loss0 = jax.lax.fori_loop(0, iters, body, init(rounding, scales))
    return best, loss0, best_loss, best_iter


@functools.partial(cpu_tuned_jit, static_argnames=_STATIC)
def _tune_chunk(graphdef, carry, rest, xb, yb, start, cos, sin, mask, lr, minmax_lr, vb=None, *,
                iters, batch_size, gas, not_use_best_mse, mesh=None, recipe: Recipe = DEFAULT):
    """Iterations start .. start+k-1 on mini-batches brought from host memory: xb, yb [k, gas, batch_size, T, D]
    (and vb [k, gas, batch_size, T], the loss's positions, with per-sample masks)."""
    TRACE_COUNT["tune"] += 1

    def fetch(i, j):
        def pick(a):
            return jax.lax.dynamic_index_in_dim(jax.lax.dynamic_index_in_dim(a, i - start, keepdims=False), j,
                                                keepdims=False)
        return (pick(xb), pick(yb)) if vb is None else (pick(xb), pick(yb), pick(vb))

    body, _ = _make_body(graphdef, rest, cos, sin, mask, lr, minmax_lr, fetch, iters=iters,
                         batch_size=batch_size, gas=gas, not_use_best_mse=not_use_best_mse, recipe=recipe)
    return jax.lax.fori_loop(start, start + xb.shape[0], body, carry)


@functools.partial(cpu_tuned_jit, static_argnames=_STATIC)
def _tune_init(graphdef, rounding, scales, rest, cos, sin, mask, lr, minmax_lr, *,
               iters, batch_size, gas, not_use_best_mse, mesh=None, recipe: Recipe = DEFAULT):
    _, init = _make_body(graphdef, rest, cos, sin, mask, lr, minmax_lr, None, iters=iters,
                         batch_size=batch_size, gas=gas, not_use_best_mse=not_use_best_mse, recipe=recipe)
    return init(rounding, scales)


def tune_block(block: nnx.Module, x_q, y_fp, cos, sin, mask, settings: TuneSettings, rng: random.Random,
               mesh=None, nsamples: int | None = None, host_chunk: int = 0, recipe: Recipe = DEFAULT,
               valid: np.ndarray | None = None) -> TuneResult:
    """Optimise the fake-quant leaves of `block` in place (V and clip scales end at the best iteration's values).

    x_q, y_fp: [nsamples, T, D] tuned inputs and float targets (device arrays, sharded over `data` on a mesh, maybe
    zero-padded beyond `nsamples` rows), or numpy arrays in host memory (low_gpu_mem_usage): then each chunk of
    host_chunk iterations' mini-batches is gathered on the host and moved to the devices while the previous chunk
    runs. cos/sin/mask: built for batch_size rows. The sampled indices depend only on the seed and nsamples, never
    on the mesh, so a sharded run reproduces a one-device run up to float summation order.
    valid: [nsamples, T] numpy, 1 where the loss counts a position (data/calibration.valid_token_mask: the
    reference's pad-token and last-position mask), or None for every position but each sample's last. With it the
    best iteration is the one with the smallest loss per counted token, as the reference ranks them.
    """
    graphdef, rounding, scales, rest = nnx.split(block, Rounding, ClipScale, ...)
    s = settings
    global_batch = s.batch_size * s.gradient_accumulate_steps
    idx = sample_indices(nsamples or x_q.shape[0], global_batch, s.iters, rng)
    static = dict(iters=s.iters, batch_size=s.batch_size, gas=s.gradient_accumulate_steps,
                  not_use_best_mse=s.not_use_best_mse, mesh=mesh, recipe=recipe)
    lr, minmax_lr = jnp.float32(s.lr), jnp.float32(s.minmax_lr)
    if isinstance(x_q, np.ndarray):
        best, loss0, best_loss, best_iter = _tune_from_host(graphdef, rounding, scales, rest, x_q, y_fp, cos, sin,
                                                            mask, idx, lr, minmax_lr, max(host_chunk, 1), static,
                                                            valid)
    else:
        indices = jnp.asarray(idx)
        vd = None
        if valid is not None:  # zero rows for the padding beyond nsamples, sharded like the activations
            vd = np.zeros((x_q.shape[0], valid.shape[1]), np.float32)
            vd[: valid.shape[0]] = valid
            vd = jnp.asarray(vd) if mesh is None else jax.device_put(vd, NamedSharding(mesh, PartitionSpec("data")))
        if mesh is not None:
            indices = jax.device_put(indices, NamedSharding(mesh, PartitionSpec()))
        best, loss0, best_loss, best_iter = _tune(graphdef, rounding, scales, rest, x_q, y_fp, cos, sin, mask,
                                                  indices, lr, minmax_lr, vd, **static)
    nnx.update(block, best[0], best[1])
    return TuneResult(float(loss0), float(best_loss), int(best_iter))


def _tune_from_host(graphdef, rounding, scales, rest, x_q: np.ndarray, y_fp: np.ndarray, cos, sin, mask,
                    idx: np.ndarray, lr, minmax_lr, chunk: int, static: dict, valid: np.ndarray | None = None):
    """The low_gpu_mem_usage loop: only `chunk` iterations' mini-batches are on the devices at a time."""
    mesh = static["mesh"]
    gas, bs = static["gas"], static["batch_size"]
    sharding = None if mesh is None else NamedSharding(mesh, PartitionSpec(None, None, "data"))

    def batches(start):
        rows = idx[start:start + chunk]
        shape = (rows.shape[0], gas, bs)
        xb = x_q[rows.reshape(-1)].reshape(shape + x_q.shape[1:])
        yb = y_fp[rows.reshape(-1)].reshape(shape + y_fp.shape[1:])
        vb = None if valid is None else valid[rows.reshape(-1)].reshape(shape + valid.shape[1:])
        if sharding:
            return tuple(None if a is None else jax.device_put(a, sharding) for a in (xb, yb, vb))
        return xb, yb, vb

    carry = _tune_init(graphdef, rounding, scales, rest, cos, sin, mask, lr, minmax_lr, **static)
    pending = batches(0)
    for start in range(0, len(idx), chunk):
        xb, yb, vb = pending
        carry = _tune_chunk(graphdef, carry, rest, xb, yb, jnp.int32(start), cos, sin, mask, lr, minmax_lr, vb,
                            **static)
        if start + chunk < len(idx):
            pending = batches(start + chunk)  # on the host while the devices run the chunk just dispatched
    _, _, best, (best_loss, _), best_iter, loss0 = carry
    return best, loss0, best_loss, best_iter
