"""A block applied to all cached activations, in mini-batches: on one device, over a mesh's data shards, or from
host memory (low_gpu_mem_usage). Every route compiles one shape (the batch) and returns rows in input order."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .mesh import axis_size
from .signround import padded_chunks


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _apply(graphdef, state, x, cos, sin, mask):
    return nnx.merge(graphdef, state)(x, cos, sin, mask)[0]


def apply_block(block: nnx.Module, x: jax.Array, cos, sin, mask, batch_size: int) -> jax.Array:
    """block(x) over [n, T, D] in chunks of batch_size rows (the last chunk padded to keep one compiled shape)."""
    graphdef, state = nnx.split(block)
    return jnp.concatenate([_apply(graphdef, state, chunk, cos, sin, mask)[:valid]
                            for chunk, valid in padded_chunks(x, batch_size)])


@functools.partial(jax.jit, static_argnames=("graphdef", "mesh", "batch_size"))
def _apply_sharded(graphdef, state, x, cos, sin, mask, *, mesh: Mesh, batch_size: int):
    d = axis_size(mesh, "data")
    local = batch_size // d
    n, rest = x.shape[0], x.shape[1:]
    # Chunk c takes rows c*local .. c*local+local-1 of every data shard: no row leaves its device.
    chunks = x.reshape((d, n // d // local, local) + rest).swapaxes(0, 1)
    chunks = jax.lax.with_sharding_constraint(chunks, NamedSharding(mesh, P(None, "data")))
    block = nnx.merge(graphdef, state)

    def one(xc):
        out = block(xc.reshape((batch_size,) + rest), cos, sin, mask)[0]
        return out.reshape((d, local) + out.shape[1:])

    out = jax.lax.map(one, chunks).swapaxes(0, 1).reshape((n,) + rest)
    return jax.lax.with_sharding_constraint(out, NamedSharding(mesh, P("data")))


def apply_block_sharded(block: nnx.Module, x: jax.Array, cos, sin, mask, batch_size: int, mesh: Mesh) -> jax.Array:
    """block(x) for x [rows, T, D] sharded over `data` (rows a multiple of batch_size, which divides by `data`):
    each device runs its own rows batch_size/data at a time, in one compiled loop."""
    graphdef, state = nnx.split(block)
    return _apply_sharded(graphdef, state, x, cos, sin, mask, mesh=mesh, batch_size=batch_size)


def apply_block_host(block: nnx.Module, x: np.ndarray, cos, sin, mask, batch_size: int,
                     mesh: Mesh | None = None) -> np.ndarray:
    """block(x) for activations in host memory: one mini-batch at a time goes to the devices and back."""
    graphdef, state = nnx.split(block)
    sharding = None if mesh is None else NamedSharding(mesh, P("data"))
    out = np.empty(x.shape, x.dtype)
    for start in range(0, x.shape[0], batch_size):
        chunk = x[start:start + batch_size]
        valid = chunk.shape[0]
        if valid < batch_size:
            chunk = np.concatenate([chunk, np.zeros((batch_size - valid,) + chunk.shape[1:], chunk.dtype)])
        y = _apply(graphdef, state, chunk if sharding is None else jax.device_put(chunk, sharding), cos, sin, mask)
        out[start:start + valid] = to_host(y)[:valid]
    return out


def to_host(x: jax.Array) -> np.ndarray:
    """A (maybe multi-process) array as numpy on this host: every process gets the whole value."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
