"""One Pallas kernel body for GPU (Triton), TPU (Mosaic) and CPU (interpret).

Grid (m_blocks, n_blocks, split_k). A program owns a [block_m, block_n]
output tile and one K chunk of `tiles` bit-plane tiles (see kernels.layout).
Per tile it reads one [plane, block_n] int32 word block plus the tile's
single group row of scales and zeros. The next tile's words and group rows
are loaded before the current tile is computed (carried through the loop), so
their latency overlaps the dequant math; `KernelConfig.prefetch` > 1 keeps that
many tiles' loads in flight instead of one. Codes become floats by OR-ing them
into the mantissa of 2**23 (integer-pipe ops, no int->float conversion); the
zero point is subtracted per element and the scale is applied once per tile
to the partial product, not per weight.

* "gemm": all 32 // bits fields unpacked at once into a [tile_k, block_n]
  slab (one broadcast shift), cast to x's dtype, one f32-accumulated dot with
  the [block_m, tile_k] slice of x (tensor cores / MXU). M is padded to block_m.
* "gemv": no dot; each field's [plane, block_n] slab is FMA'd with a column of
  x (x is passed transposed, shaped like the slabs) into one f32 accumulator
  per row, reduced once at the end. For M of one or two rows.

K chunks (split_k > 1) give decode enough programs to fill the GPU: they write
f32 partials [split_k, M, N] summed by XLA ("partials"), or, on TPU where the
grid runs in order, accumulate into one resident f32 output block ("revisit").
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from .layout import PackedWeight

# f32 bits of 2**23: OR-ing a code q < 2**23 into the mantissa gives exactly
# 2**23 + q, avoiding int->float conversions (quarter-rate on GPUs).
_MAGIC = 0x4B000000


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Schedule of one pallas_call; chosen per platform in kernels.gpu / kernels.tpu."""

  kind: Literal["gemm", "gemv"]
  block_m: int
  block_n: int
  split_k: int = 1
  split_mode: Literal["partials", "revisit"] = "partials"
  # Tiles whose words and group rows are loaded ahead of the one being computed: 1 (the default) carries the next
  # tile through the loop; 2 or more keep that many loads in flight (a variant for latency-bound decode shapes).
  prefetch: int = 1


def _fields(words: jax.Array, zero: jax.Array, bits: int):
  """Yield (i, unscaled f32 [plane, bn] slab q_i - zero) for each field i of a word block."""
  zc = zero.astype(jnp.float32) + float(2**23)
  for i in range(32 // bits):
    shift = bits * i
    if shift + bits == 32:
      q = jax.lax.shift_right_logical(words, shift)  # top field: no mask needed
    else:
      q = (words >> shift if shift else words) & ((1 << bits) - 1)
    yield i, jax.lax.bitcast_convert_type(q | _MAGIC, jnp.float32) - zc


def _slab(words: jax.Array, zero: jax.Array, bits: int) -> jax.Array:
  """[plane, bn] words -> unscaled f32 [32 // bits, plane, bn] slab q - zero."""
  per_word = 32 // bits
  shifts = jax.lax.broadcasted_iota(jnp.int32, (per_word, 1, 1), 0) * bits
  q = (words[None] >> shifts) & ((1 << bits) - 1)
  f = jax.lax.bitcast_convert_type(q | _MAGIC, jnp.float32)
  return f - (zero.astype(jnp.float32) + float(2**23))[None]


def _kernel(x_ref, w_ref, s_ref, z_ref, o_ref, *, bits: int, group_size: int, plane: int,
            cfg: KernelConfig, tiles: int):
  chunk = pl.program_id(2)
  per_word = 32 // bits
  tile_k = per_word * plane
  bm, bn = cfg.block_m, cfg.block_n

  def fetch(t):
    """Words and group rows of tile t (clamped: the last prefetch is a dummy)."""
    t = jnp.minimum(t, tiles - 1)
    g = (chunk * tiles + t) * tile_k // group_size
    words = w_ref[pl.ds(pl.multiple_of(t * plane, plane), plane), :]
    return words, s_ref[pl.ds(g, 1), :].astype(jnp.float32), z_ref[pl.ds(g, 1), :]

  def gemm_tile(t, acc, words, scale, zero):
    xs = x_ref[:, pl.ds(pl.multiple_of(t * tile_k, tile_k), tile_k)]
    w = _slab(words, zero, bits).reshape(tile_k, bn).astype(xs.dtype)
    return acc + jnp.dot(xs, w, preferred_element_type=jnp.float32) * scale

  def gemv_tile(t, accs, words, scale, zero):
    parts = [None] * bm
    for i, d in _fields(words, zero, bits):
      for r in range(bm):
        p = x_ref[t * per_word + i, :, pl.ds(r, 1)].astype(jnp.float32) * d
        parts[r] = p if parts[r] is None else parts[r] + p
    return tuple(acc + p * scale for acc, p in zip(accs, parts))

  tile_fn = gemm_tile if cfg.kind == "gemm" else gemv_tile
  if cfg.kind == "gemm":
    acc0 = jnp.zeros((bm, bn), jnp.float32)
  else:
    acc0 = tuple(jnp.zeros((plane, bn), jnp.float32) for _ in range(bm))

  if cfg.prefetch <= 1:
    def body(t, carry):
      acc, (words, scale, zero) = carry
      nxt = fetch(t + 1)
      return tile_fn(t, acc, words, scale, zero), nxt

    acc, _ = jax.lax.fori_loop(0, tiles, body, (acc0, fetch(0)))
  else:
    depth = cfg.prefetch

    def body(t, carry):
      acc, pending = carry  # pending[j] holds tile t + j
      nxt = fetch(t + depth)
      return tile_fn(t, acc, *pending[0]), (*pending[1:], nxt)

    acc, _ = jax.lax.fori_loop(0, tiles, body, (acc0, tuple(fetch(j) for j in range(depth))))

  if cfg.kind == "gemm":
    _store(o_ref, slice(None), acc, cfg, chunk)
  else:
    for r, a in enumerate(acc):
      _store(o_ref, r, jnp.sum(a, axis=0), cfg, chunk)


def _store(o_ref, rows, value: jax.Array, cfg: KernelConfig, chunk: jax.Array) -> None:
  """Write (or, in "revisit" mode, accumulate) one output row or tile."""
  if cfg.split_k > 1 and cfg.split_mode == "revisit":
    @pl.when(chunk == 0)
    def _():
      o_ref[rows, :] = jnp.zeros_like(value)
    o_ref[rows, :] += value
  else:
    o_ref[rows, :] = value.astype(o_ref.dtype)


def supports(w: PackedWeight, cfg: KernelConfig) -> bool:
  """Whether `cfg` tiles `w` exactly (every K tile inside one group)."""
  tiles = w.k_pad // w.tile_k
  return (w.n % cfg.block_n == 0 and tiles % cfg.split_k == 0
          and w.group_size % w.tile_k == 0)


def pallas_matmul(x: jax.Array, w: PackedWeight, cfg: KernelConfig, *,
                  compiler_params: Any = None, interpret: bool = False) -> jax.Array:
  """y [M, N] = x [M, K] @ W with the Pallas kernel; x's dtype out."""
  if not supports(w, cfg):
    raise ValueError(f"{cfg} does not tile K={w.k} N={w.n} G={w.group_size} tile_k={w.tile_k}")
  m, k = x.shape
  if k != w.k:
    raise ValueError(f"x has K={k}, weight has K={w.k}")
  bm, bn, split = cfg.block_m, cfg.block_n, cfg.split_k
  m_pad = -(-m // bm) * bm
  if (m_pad, w.k_pad) != (m, k):
    x = jnp.pad(x, ((0, m_pad - m), (0, w.k_pad - k)))
  tiles = w.k_pad // w.tile_k // split
  chunk_k = tiles * w.tile_k
  if cfg.kind == "gemm":
    x_spec = pl.BlockSpec((bm, chunk_k), lambda i, j, s: (i, s))
  else:  # x^T as [k_pad / plane, plane, M]: loads already shaped like the slab
    x = x.T.reshape(w.k_pad // w.plane, w.plane, m_pad)
    x_spec = pl.BlockSpec((tiles * w.per_word, w.plane, bm), lambda i, j, s: (s, 0, i))

  if split == 1:
    out_shape = jax.ShapeDtypeStruct((m_pad, w.n), x.dtype)
    out_spec = pl.BlockSpec((bm, bn), lambda i, j, s: (i, j))
  elif cfg.split_mode == "revisit":
    out_shape = jax.ShapeDtypeStruct((m_pad, w.n), jnp.float32)
    out_spec = pl.BlockSpec((bm, bn), lambda i, j, s: (i, j))
  else:
    out_shape = jax.ShapeDtypeStruct((split, m_pad, w.n), jnp.float32)
    out_spec = pl.BlockSpec((None, bm, bn), lambda i, j, s: (s, i, j))

  group_spec = pl.BlockSpec((w.n_groups, bn), lambda i, j, s: (0, j))
  y = pl.pallas_call(
      functools.partial(_kernel, bits=w.bits, group_size=w.group_size, plane=w.plane,
                        cfg=cfg, tiles=tiles),
      out_shape=out_shape,
      grid=(m_pad // bm, w.n // bn, split),
      in_specs=[x_spec, pl.BlockSpec((tiles * w.plane, bn), lambda i, j, s: (s, j)),
                group_spec, group_spec],
      out_specs=out_spec,
      compiler_params=compiler_params,
      interpret=interpret,
      name=f"int{w.bits}_{cfg.kind}",
  )(x, w.qweight, w.scales, w.zeros)
  if y.ndim == 3:
    y = jnp.sum(y, axis=0)
  return y[:m].astype(x.dtype)
