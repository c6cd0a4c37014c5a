"""Bit packing of unsigned integer codes into int32 words: the GPTQ and AWQ-GEMM layouts auto_round writes.

GPTQ (auto_round_extension/torch/qlinear_torch*.py): b-bit codes are a little-endian bit stream, code i of a run
at bits [b*i, b*i + b) of consecutive int32 words. For b in {2, 4, 8} that is 32/b codes per word, lowest index in
the lowest bits; for b = 3 it is 32 codes in 3 words, codes 10 and 21 straddling a word boundary (`pack_3bits`).
`qweight` packs along K (rows of codes.T [K, N]), `qzeros` along N (columns of zeros.T [ng, N]).

AWQ GEMM (export_to_awq/utils.py::WQLinear_GEMM, 4-bit): [R, N] codes packed along N, 8 per word, nibble i of
each word holding column AWQ_ORDER[i] of its octet.

Packing is numpy (export side). Unpacking works on numpy and JAX arrays alike (jit-able, bits static).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from .scheme import check_bits

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)


def _run_layout(bits: int) -> tuple[int, int]:
    """(codes, words) of the shortest run that fills whole words: (16, 1) for 2-bit, (32, 3) for 3-bit."""
    check_bits(bits)
    codes = 32 // math.gcd(32, bits)
    return codes, codes * bits // 32


def _placements(bits: int):
    """For code i of a run: (word, shift, spill), spill = bits that continue in the next word (0 if none)."""
    codes, _ = _run_layout(bits)
    for i in range(codes):
        word, shift = divmod(i * bits, 32)
        yield i, word, shift, max(0, shift + bits - 32)


def pack_rows(q: np.ndarray, bits: int) -> np.ndarray:
    """Codes [R, C] (unsigned, < 2^bits) -> int32 [R*bits/32, C], packing consecutive rows into each word.

    GPTQ qweight is pack_rows(codes.T, bits). R must fill whole runs (R*bits % 32 == 0).
    """
    codes_per_run, words_per_run = _run_layout(bits)
    q = np.asarray(q)
    rows, cols = q.shape
    if rows % codes_per_run:
        raise ValueError(f"{rows} rows do not fill whole int32 words at {bits} bits")
    if q.size and (q.min() < 0 or q.max() >= 2**bits):
        raise ValueError(f"codes outside [0, {2**bits - 1}]")
    runs = q.astype(np.uint32).reshape(-1, codes_per_run, cols)
    words = np.zeros((runs.shape[0], words_per_run, cols), np.uint32)
    for i, word, shift, spill in _placements(bits):
        words[:, word] |= runs[:, i] << np.uint32(shift)
        if spill:
            words[:, word + 1] |= runs[:, i] >> np.uint32(bits - spill)
    return words.reshape(-1, cols).view(np.int32)


def pack_cols(z: np.ndarray, bits: int) -> np.ndarray:
    """Codes [R, C] -> int32 [R, C*bits/32], packing consecutive columns (GPTQ qzeros = pack_cols(zeros.T))."""
    return np.ascontiguousarray(pack_rows(np.asarray(z).T, bits).T)


def _as_uint32(x):
    """Reinterpret int32 words as uint32 so that right shifts are logical, in numpy or JAX."""
    if isinstance(x, jax.Array):
        return jax.lax.bitcast_convert_type(x, jnp.uint32) if x.dtype == jnp.int32 else x.astype(jnp.uint32)
    x = np.asarray(x)
    return x.view(np.uint32) if x.dtype == np.int32 else x.astype(np.uint32)


def unpack_rows(packed, bits: int):
    """Inverse of pack_rows: int32 [R*bits/32, C] -> uint8 [R, C]; numpy in, numpy out; JAX in, JAX out."""
    xp = jnp if isinstance(packed, jax.Array) else np
    codes_per_run, words_per_run = _run_layout(bits)
    words = _as_uint32(packed)
    cols = words.shape[1]
    words = words.reshape(-1, words_per_run, cols)
    mask = 2**bits - 1
    codes = []
    for i, word, shift, spill in _placements(bits):
        c = words[:, word] >> shift
        if spill:
            c = c | (words[:, word + 1] << (bits - spill))
        codes.append(c & mask)
    return xp.stack(codes, axis=1).reshape(-1, cols).astype(xp.uint8)


def unpack_cols(packed, bits: int):
    """Inverse of pack_cols: int32 [R, C*bits/32] -> uint8 [R, C]; numpy or JAX."""
    return unpack_rows(packed.T, bits).T


def pack_awq(q: np.ndarray) -> np.ndarray:
    """4-bit codes [R, N] -> int32 [R, N/8] in AWQ GEMM order (qweight from codes.T [K, N]; qzeros from zeros.T)."""
    q = np.asarray(q)
    rows, cols = q.shape
    if cols % 8:
        raise ValueError(f"AWQ packs 8 columns per word; {cols} columns")
    interleaved = q.reshape(rows, -1, 8)[:, :, list(AWQ_ORDER)].reshape(rows, cols)
    return pack_cols(interleaved, 4)


def unpack_awq(packed):
    """Inverse of pack_awq: int32 [R, N/8] -> uint8 [R, N] in natural column order; numpy or JAX."""
    interleaved = unpack_cols(packed, 4)
    rows, cols = interleaved.shape
    return interleaved.reshape(rows, -1, 8)[:, :, list(AWQ_REVERSE_ORDER)].reshape(rows, cols)
