"""Load-time repacking of GPTQ / auto_round int weights into the kernels' layout.

Checkpoints pack codes along K with the lowest k in the lowest bits: word r of
column n holds k = 8r + i in nibble i (4-bit). Unpacking that order in a kernel
needs an interleaving reshape of every weight tile. `prepare` instead stores
*bit-planes*: K is cut into tiles of tile_k = (32 // bits) * plane rows, and
word r of tile t holds k = t*tile_k + i*plane + r in field i. Field i of a
[plane, BN] word block is then the contiguous row range [i*plane, (i+1)*plane)
of the tile, so one broadcast shift + mask unpacks a whole tile in k order and
it multiplies a contiguous slice of x; no interleave, no strided x access.
`plane` is chosen so that tile_k divides the group size: a tile never
straddles two groups and needs a single row of scales / zeros.

K is zero-padded to a multiple of tile_k (x is zero-padded to match in the
kernels); extra padded groups get scale 0. Zero points are stored as uint8
(1 byte per group and column instead of 2-4), except on TPU, where narrow
dynamic row slices are awkward and f32 is used (with f32 scales: no f16 VPU).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

SUPPORTED_BITS = (2, 4, 8)


@dataclasses.dataclass(frozen=True)
class PackedWeight:
  """A quantized [K, N] weight in bit-plane layout (see module docstring).

  qweight: int32 [k_pad * bits // 32, N]; scales: [n_groups, N] float;
  zeros: [n_groups, N] uint8 (f32 on TPU), n_groups = ceil(k_pad / group_size).
  """

  qweight: jax.Array
  scales: jax.Array
  zeros: jax.Array
  bits: int
  group_size: int
  k: int
  n: int
  plane: int

  @property
  def per_word(self) -> int:
    """Codes stored in one int32 word."""
    return 32 // self.bits

  @property
  def tile_k(self) -> int:
    """Rows of K covered by `plane` words."""
    return self.per_word * self.plane

  @property
  def k_pad(self) -> int:
    return self.qweight.shape[0] * self.per_word

  @property
  def n_groups(self) -> int:
    return self.scales.shape[0]


jax.tree_util.register_dataclass(
    PackedWeight,
    data_fields=["qweight", "scales", "zeros"],
    meta_fields=["bits", "group_size", "k", "n", "plane"],
)


def default_plane(group_size: int, bits: int) -> int:
  """Largest power of two <= 32 with (32 // bits) * plane dividing the group.

  32 rows keep a [plane, BN] word block and its unpacked slab in registers.
  Returns 1 for groups that are no multiple of 32 // bits (kernels then
  decline the weight and the XLA path serves it).
  """
  per_word = 32 // bits
  return math.gcd(group_size // per_word, 32) if group_size % per_word == 0 else 1


def prepare(
    qweight: jax.Array | np.ndarray,
    scales: jax.Array | np.ndarray,
    zeros: jax.Array | np.ndarray,
    *,
    bits: int,
    group_size: int,
    plane: int | None = None,
    platform: str | None = None,
) -> PackedWeight:
  """Repack auto_round / GPTQ tensors once, at load time.

  Args:
    qweight: int32 [K * bits / 32, N], codes packed along K, lowest k lowest.
    scales: float [ceil(K / G), N]; may be negative.
    zeros: unsigned integer zero points [ceil(K / G), N], already unpacked.
    bits: 2, 4 or 8.
    group_size: G, or -1 for one group spanning K.
    plane: rows per bit-plane, a power of two. Default: `default_plane`.
    platform: "gpu", "tpu" or "cpu"; default: jax.default_backend().
  """
  if bits not in SUPPORTED_BITS:
    raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
  platform = platform or jax.default_backend()
  per_word = 32 // bits
  k = qweight.shape[0] * per_word
  n = qweight.shape[1]
  group = k if group_size == -1 else group_size
  if group <= 0:
    raise ValueError(f"bad group_size {group_size}")
  n_groups = -(-k // group)
  if scales.shape != (n_groups, n) or zeros.shape != (n_groups, n):
    raise ValueError(
        f"scales {scales.shape} / zeros {zeros.shape} do not match"
        f" ({n_groups}, {n}) for K={k}, group_size={group_size}")
  plane = plane or default_plane(group, bits)
  if plane & (plane - 1):
    raise ValueError(f"plane must be a power of two, got {plane}")

  codes = _unpack_gptq(jnp.asarray(qweight), bits)
  tile_k = per_word * plane
  k_pad = -(-k // tile_k) * tile_k
  codes = jnp.pad(codes, ((0, k_pad - k), (0, 0)))
  words = _pack_planes(codes, bits, plane)

  g_pad = -(-k_pad // group)
  scale_dtype = jnp.float32 if platform == "tpu" else jnp.asarray(scales).dtype
  zero_dtype = jnp.float32 if platform == "tpu" else jnp.uint8
  pad = ((0, g_pad - n_groups), (0, 0))
  return PackedWeight(
      qweight=words,
      scales=jnp.pad(jnp.asarray(scales, scale_dtype), pad),
      zeros=jnp.pad(jnp.asarray(zeros).astype(zero_dtype), pad),
      bits=bits,
      group_size=group,
      k=k,
      n=n,
      plane=plane,
  )


def _unpack_gptq(qweight: jax.Array, bits: int) -> jax.Array:
  """int32 [K*bits/32, N] (k = per_word*r + i in field i) -> int32 codes [K, N]."""
  per_word = 32 // bits
  shifts = (jnp.arange(per_word, dtype=jnp.uint32) * bits)[None, :, None]
  words = jax.lax.bitcast_convert_type(qweight.astype(jnp.int32), jnp.uint32)
  codes = (words[:, None, :] >> shifts) & ((1 << bits) - 1)
  return codes.reshape(-1, qweight.shape[1]).astype(jnp.int32)


def _pack_planes(codes: jax.Array, bits: int, plane: int) -> jax.Array:
  """int32 codes [k_pad, N] -> int32 words [k_pad*bits/32, N] in plane order."""
  per_word = 32 // bits
  k_pad, n = codes.shape
  tiles = codes.astype(jnp.uint32).reshape(k_pad // (per_word * plane), per_word, plane, n)
  shifts = (jnp.arange(per_word, dtype=jnp.uint32) * bits)[None, :, None, None]
  words = jnp.sum(tiles << shifts, axis=1, dtype=jnp.uint32)  # fields are disjoint
  return jax.lax.bitcast_convert_type(words.reshape(-1, n), jnp.int32)


def unpack_codes(w: PackedWeight) -> jax.Array:
  """Integer codes int32 [k_pad, N] in natural k order."""
  words = w.qweight.reshape(-1, 1, w.plane, w.n)
  shifts = (jnp.arange(w.per_word, dtype=jnp.int32) * w.bits)[None, :, None, None]
  codes = jax.lax.shift_right_logical(words, shifts) & ((1 << w.bits) - 1)
  return codes.reshape(w.k_pad, w.n)


def dequantize(w: PackedWeight, dtype: jnp.dtype = jnp.float32) -> jax.Array:
  """Float W [K, N] = (q - zero) * scale, computed in f32 and cast to `dtype`."""
  codes = unpack_codes(w).astype(jnp.float32)
  rows = w.n_groups * w.group_size

  def per_row(a: jax.Array) -> jax.Array:
    full = jnp.broadcast_to(a.astype(jnp.float32)[:, None, :], (w.n_groups, w.group_size, w.n))
    return full.reshape(rows, w.n)[: w.k_pad]

  return ((codes - per_row(w.zeros)) * per_row(w.scales))[: w.k].astype(dtype)
