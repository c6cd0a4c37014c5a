"""AutoRound's optimized RTN ("opt-RTN"): an imatrix-weighted search of each group's sym scale, in JAX.

Mirrors auto_round/data_type/int.py (`search_scales`, `quant_tensor_opt_rtn_sym`, registered as "opt_rtn_int_sym")
and data_type/gguf.py (`_imatrix_handle_zero`), which the reference runs for iters=0 unless disable_opt_rtn. Per
group it tries the full-range scale -group_max / m for m = 2^(b-1) and, in the reference's order, 200 other m
(nmax +/- 0.75 nmax in steps of 0.0075 nmax; 2-bit: 2 +/- 0.9 in steps of 0.01), and keeps the first with the
smallest sum_k imatrix[k] * (s * clamp(round(w_k / s)) - w_k)^2. Asym layers have no such search in the reference
(its iters=0 asym path resolves to plain int_asym), so opt-RTN covers sym only.

Ops follow the reference's dtypes: for a bf16/fp16 weight every step is computed in fp32 and rounded to the weight
dtype, as torch does per op; the loss is fp32. The candidates run in a `lax.scan` that keeps only the best scale and
loss per group, so memory stays at a few copies of the weight whatever the grid size.
Layout as in qdq.py: W[N, K], groups along K, the last group zero-padded when K % G != 0.
"""

from __future__ import annotations

import functools
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from .scheme import check_bits
from .qdq import QuantizedWeight, _exact_div, _scale_thresh, group_len, group_reshape, group_unreshape

IMATRIX_PAD = 1e-5  # reshape_pad_tensor_by_group_size(imatrix, ..., val=1e-5): padded inputs weigh almost nothing
ZERO_IMATRIX_WARNING = (
    "please use more data via setting `nsamples` to improve accuracy as calibration activations contain 0"
)


def default_search_ratio() -> float:
    """The grid's half-width as a fraction of nmax: env AR_SEARCH_SCALE_RATIO (as the reference reads it) or 0.75."""
    raw = os.environ.get("AR_SEARCH_SCALE_RATIO")
    try:
        value = float(raw) if raw is not None else None
    except ValueError:
        raise ValueError(f"AR_SEARCH_SCALE_RATIO={raw!r} is not a number: unset it or use e.g. 0.75") from None
    return value or 0.75  # the reference: `envs.AR_SEARCH_SCALE_RATIO or 0.75`


def search_grid(bits: int, search_ratio: float | None = None) -> np.ndarray:
    """The multipliers m of the candidate inverse scales -m / group_max, in the reference's loop order.

    m = nmax is the initial candidate and is not repeated here. Computed with Python floats exactly as the reference
    does (nmax - step * i, then rounded once to fp32 when torch multiplies it with an fp32 tensor), so the grid is
    bit-identical: 200 values for 3/4/8 bits (201 candidates), 180 for 2 bits (181).
    """
    check_bits(bits)
    nmax = int(2.0 ** (bits - 1))
    if bits == 2:
        search_min, step = 18 * 5, 0.01
    else:
        ratio = search_ratio if search_ratio is not None else default_search_ratio()
        half = nmax * ratio
        step = half / 200 * 2
        search_min = int(half / step)
    return np.asarray([nmax - step * i for i in range(-search_min, search_min + 1) if i != 0], np.float32)


def _rounder(dtype):
    """x (fp32) -> x rounded to `dtype` and kept in fp32: one torch op on a reduced-precision tensor.

    lax.reduce_precision is an explicit op, so XLA cannot drop the rounding as excess precision.
    """
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float32:
        return lambda x: x
    info = jnp.finfo(dtype)
    return lambda x: jax.lax.reduce_precision(x, exponent_bits=info.nexp, mantissa_bits=info.nmant)


def _reciprocal(x: jax.Array, dtype, rd) -> jax.Array:
    """auto_round.utils.get_reciprocal: 1/x, and 0 where |x| < eps (1e-5 for fp16, else 1e-30)."""
    eps = 1e-5 if jnp.dtype(dtype) == jnp.float16 else 1e-30
    safe = jnp.abs(x) >= rd(jnp.float32(eps))
    return jnp.where(safe, rd(1.0 / jnp.where(safe, x, 1.0)), 0.0)


def _weighted_loss(scales, iscales, data, qw, nmax: int, rd):
    """sum_k qw * (s * clamp(round(iscale * w), -nmax, nmax - 1) - w)^2 per group, in fp32 (the reference's loss)."""
    q = jnp.clip(jnp.round(rd(iscales * data)), -nmax, nmax - 1)
    err = jnp.square(rd(rd(scales * q) - data))
    if qw is not None:
        err = err * qw
    return jnp.sum(err, axis=-1, keepdims=True)


def _search(data, qw, bits: int, grid: np.ndarray, dtype):
    """search_scales on [..., G] (fp32 holding values of `dtype`, the weight dtype): best scale per group, [..., 1]."""
    rd = _rounder(dtype)
    nmax = int(2.0 ** (bits - 1))
    imax = jnp.argmax(jnp.abs(data), axis=-1, keepdims=True)  # first of equal maxima, like torch.argmax
    group_max = jnp.take_along_axis(data, imax, axis=-1)
    recip = _reciprocal(group_max, dtype, rd)
    iscales = rd(-nmax * recip)
    scales = _reciprocal(iscales, dtype, rd)
    best_loss = _weighted_loss(scales, iscales, data, qw, nmax, rd)

    def step(carry, m):
        best_scale, best_loss = carry
        isc = rd(-m * recip)
        s = _reciprocal(isc, dtype, rd)
        loss = _weighted_loss(s, isc, data, qw, nmax, rd)
        take = loss < best_loss  # strict: ties keep the earlier candidate, as the reference's in-place replace
        return (jnp.where(take, s, best_scale), jnp.where(take, loss, best_loss)), None

    (scales, _), _ = jax.lax.scan(step, (scales, best_loss), jnp.asarray(grid))
    return scales


def _handle_zero(imatrix, w, bits: int, group_size: int, rd):
    """_imatrix_handle_zero for an imatrix known to contain an exact 0 (fp32 [..., G], broadcast to w's shape).

    Groups where more than group_size // 2 inputs have (near-)zero energy fall back to |w| (<= 3 bits) or
    |w| + sqrt(sum w^2 / 32); zeros elsewhere get their group's mean. Quirks kept: `group_size` is the layer's
    setting (so -1 makes every group fall back), and the mean fill also runs over fallback rows, but only if some
    group qualified for it.
    """
    imatrix = jnp.broadcast_to(imatrix, w.shape)
    zero_cnt = jnp.sum(imatrix <= 1e-30, axis=-1, keepdims=True)
    half = group_size // 2
    if bits <= 3:
        fallback = jnp.abs(w)
    else:
        sigma2 = rd(rd(jnp.sum(rd(w * w), axis=-1, keepdims=True)) / 32)
        fallback = rd(jnp.abs(w) + rd(jnp.sqrt(sigma2)))
    imatrix = jnp.where(zero_cnt > half, fallback, imatrix)
    mean_rows = (zero_cnt > 0) & (zero_cnt <= half)
    mean = jnp.sum(imatrix, axis=-1, keepdims=True) / (imatrix.shape[-1] - zero_cnt).astype(jnp.float32)
    filled = jnp.where(imatrix == 0, mean, imatrix)
    return jnp.where(jnp.any(mean_rows), filled, imatrix)


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "search_ratio", "zero_check", "q_scale_thresh"))
def _opt_rtn_core(w, imatrix, *, bits, group_size, search_ratio, zero_check, q_scale_thresh):
    """-> (q [N, ng, G] in [-nmax, nmax-1] as fp32, scale [N, ng, 1] fp32 holding w.dtype values)."""
    n, k = w.shape
    rd = _rounder(w.dtype)
    wg, pad = group_reshape(w.astype(jnp.float32), group_size)
    g = wg.shape[-1]
    data = wg.reshape(n, -1, g)
    qw = None
    if imatrix is not None:
        imat = imatrix.astype(jnp.float32).reshape(-1)
        if pad:
            imat = jnp.pad(imat, (0, pad), constant_values=IMATRIX_PAD)
        qw = imat.reshape(1, -1, g)
        if zero_check:
            qw = jnp.where(jnp.min(imat) == 0, _handle_zero(qw, data, bits, group_size, rd), qw)
    scale = _search(data, qw, bits, search_grid(bits, search_ratio), w.dtype)
    t = rd(jnp.float32(q_scale_thresh))
    scale = jnp.where(scale < 0, jnp.minimum(scale, -t), jnp.maximum(scale, t))
    nmax = int(2.0 ** (bits - 1))
    q = jnp.clip(jnp.round(rd(_exact_div(data, scale))), -nmax, nmax - 1)
    return q, scale


def _pad(k: int, group_size: int) -> int:
    return -k % group_len(k, group_size)


def _ratio(search_ratio: float | None) -> float:
    """Resolved before jit (a static argument), so a changed AR_SEARCH_SCALE_RATIO is not hidden by the cache."""
    return default_search_ratio() if search_ratio is None else float(search_ratio)


def _prepare_imatrix(imatrix, k: int) -> tuple[jax.Array | None, bool]:
    """(imatrix as fp32 [K], whether the zero handling may be needed); warns like the reference when it is."""
    if imatrix is None:
        return None, False
    imatrix = jnp.asarray(imatrix, jnp.float32)
    if imatrix.shape != (k,):
        raise ValueError(f"imatrix has shape {tuple(imatrix.shape)}, expected ({k},): one value per input feature")
    try:
        has_zero = bool(jnp.min(imatrix) == 0)
    except jax.errors.ConcretizationTypeError:  # traced: decided inside the graph
        return imatrix, True
    if has_zero:
        warnings.warn(ZERO_IMATRIX_WARNING)
    return imatrix, has_zero


def _check(w, bits: int) -> None:
    check_bits(bits)
    if w.ndim != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {tuple(w.shape)}")


def search_scales(
    data: jax.Array, bits: int, qw: jax.Array | None = None, search_ratio: float | None = None
) -> jax.Array:
    """The reference's search_scales on grouped data [M, G]: the best sym scale per group, [M, 1] in data.dtype.

    qw: loss weights broadcastable to [M, G] (the expanded imatrix), or None for an unweighted search. Exposed on
    its own so tests can compare it with the reference's function on the same inputs.
    """
    check_bits(bits)
    return _search_jit(jnp.asarray(data), None if qw is None else jnp.asarray(qw, jnp.float32), bits=bits,
                       search_ratio=_ratio(search_ratio))


@functools.partial(jax.jit, static_argnames=("bits", "search_ratio"))
def _search_jit(data, qw, *, bits, search_ratio):
    return _search(data.astype(jnp.float32), qw, bits, search_grid(bits, search_ratio), data.dtype).astype(data.dtype)


def opt_rtn_qdq(
    w: jax.Array,
    imatrix: jax.Array | None,
    bits: int,
    group_size: int,
    q_scale_thresh: float = 1e-5,
    search_ratio: float | None = None,
) -> tuple[jax.Array, jax.Array, int]:
    """quant_tensor_opt_rtn_sym: (W~ [N, K] in w.dtype, scale [N, ng] in w.dtype, signed, zp = 2^(b-1)).

    imatrix: [K] per input feature, sum over tokens of x^2 averaged over samples (None: unweighted search); zeros
    get the reference's _imatrix_handle_zero treatment (with its warning). The scale is not cast to the scale
    dtype: the reference keeps it in the weight dtype for the qdq weight (the exporter halves it).
    """
    w = jnp.asarray(w)
    _check(w, bits)
    n, k = w.shape
    imatrix, zero_check = _prepare_imatrix(imatrix, k)
    q, scale = _opt_rtn_core(w, imatrix, bits=bits, group_size=group_size, search_ratio=_ratio(search_ratio),
                             zero_check=zero_check, q_scale_thresh=q_scale_thresh)
    rd = _rounder(w.dtype)
    w_qdq = rd(q * scale).reshape(-1, q.shape[-1])
    w_qdq = group_unreshape(w_qdq, n, k, _pad(k, group_size)).astype(w.dtype)
    return w_qdq, scale.reshape(n, -1).astype(w.dtype), 2 ** (bits - 1)


def opt_rtn(
    w: jax.Array,
    imatrix: jax.Array | None,
    bits: int,
    group_size: int,
    scale_dtype=jnp.float16,
    search_ratio: float | None = None,
) -> QuantizedWeight:
    """Opt-RTN of one sym layer as the exporter writes it: the counterpart of qdq.rtn for disable_opt_rtn=False.

    Codes are derived as QuantLinear.pack does, round(W~ / s + 2^(b-1)) with the layer's (weight-dtype) scale s,
    and the scale is stored in scale_dtype (float16: what the packer writes). q_scale_thresh follows WrapperLinear:
    1e-8 for fp32 scales, else 1e-5.
    """
    w = jnp.asarray(w)
    _check(w, bits)
    n, k = w.shape
    imatrix, zero_check = _prepare_imatrix(imatrix, k)
    return _opt_rtn_codes(w, imatrix, bits=bits, group_size=group_size, search_ratio=_ratio(search_ratio),
                          zero_check=zero_check, scale_dtype=jnp.dtype(scale_dtype))


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "search_ratio", "zero_check", "scale_dtype"))
def _opt_rtn_codes(w, imatrix, *, bits, group_size, search_ratio, zero_check, scale_dtype):
    n, k = w.shape
    q, scale = _opt_rtn_core(w, imatrix, bits=bits, group_size=group_size, search_ratio=search_ratio,
                             zero_check=zero_check, q_scale_thresh=_scale_thresh(scale_dtype))
    rd = _rounder(w.dtype)
    nmax = 2 ** (bits - 1)
    w_qdq = rd(q * scale)
    codes = jnp.clip(jnp.round(rd(rd(_exact_div(w_qdq, scale)) + nmax)), 0, 2**bits - 1)
    ng = q.shape[1]
    return QuantizedWeight(
        codes=group_unreshape(codes.reshape(-1, q.shape[-1]).astype(jnp.uint8), n, k, _pad(k, group_size)),
        scales=scale.reshape(n, ng).astype(w.dtype).astype(scale_dtype),
        zeros=jnp.full((n, ng), nmax, jnp.int32),
        bits=bits,
        group_size=group_size,
        sym=True,
    )
