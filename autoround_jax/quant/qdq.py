"""AutoRound's integer quantize-dequantize (int_sym / int_asym) in JAX.

Mirrors auto_round/data_type/int.py (`quant_tensor_sym`, `quant_tensor_asym`) as driven by
auto_round/wrapper.py::WrapperLinear: the same dtype promotions, fp16 scale cast, 1e-5 scale floor, straight-through
rounding and torch's inclusive clamp gradient, so values match bit for bit and gradients to float tolerance.

Layout: a weight is W[N, K] (HF, out x in). Groups run along K; `group_size=-1`, or G >= K, is one group per row.
When K % G != 0 every row is zero-padded to ceil(K/G)*G first (the reference's reshape_pad_tensor_by_group_size).
Grouped tensors are [N*ng, G] with group g of row n at n*ng + g; per-group vectors are [N*ng].
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from .scheme import check_bits

# WrapperLinear.minmax_scale_bound: min_scale/max_scale may only shrink the range.
MINMAX_SCALE_BOUND = (0.0, 1.0)


def round_ste(x: jax.Array) -> jax.Array:
    """Round half to even with an identity gradient (auto_round data_type/utils.py::round_ste)."""
    return x + jax.lax.stop_gradient(jnp.round(x) - x)


@jax.custom_vjp
def _clamp(x, lo, hi):
    return jnp.clip(x, lo, hi)


def _clamp_fwd(x, lo, hi):
    return jnp.clip(x, lo, hi), (x, lo, hi)


def _clamp_bwd(res, g):
    x, lo, hi = res
    inside = (x >= lo) & (x <= hi)
    return jnp.where(inside, g, jnp.zeros_like(g)), jnp.zeros_like(lo), jnp.zeros_like(hi)


_clamp.defvjp(_clamp_fwd, _clamp_bwd)


def clamp_ste(x: jax.Array, lo: float | jax.Array, hi: float | jax.Array) -> jax.Array:
    """torch.clamp: the gradient passes where lo <= x <= hi, bounds included.

    jnp.clip gives 0.5 and lax.clamp 0 at a bound, where STE-rounded values sit very often. The bounds are cast to
    x.dtype (torch casts a Python scalar bound to the tensor dtype) and get no gradient.
    """
    return _clamp(x, jnp.asarray(lo, x.dtype), jnp.asarray(hi, x.dtype))


def group_len(in_features: int, group_size: int) -> int:
    """Elements per group: group_size, or the whole row for -1 or group_size >= in_features."""
    if group_size == -1 or group_size >= in_features:
        return in_features
    if group_size <= 0:
        raise ValueError(f"group_size must be -1 or positive, got {group_size}")
    return group_size


def num_groups(in_features: int, group_size: int) -> int:
    """ceil(K / G): groups per row, counting the zero-padded last group."""
    return -(-in_features // group_len(in_features, group_size))


def group_reshape(w: jax.Array, group_size: int) -> tuple[jax.Array, int]:
    """W[N, K] -> (wg [N*ng, G], pad): rows zero-padded to a multiple of G, then split into groups."""
    k = w.shape[1]
    g = group_len(k, group_size)
    pad = -k % g
    if pad:
        w = jnp.pad(w, ((0, 0), (0, pad)))
    return w.reshape(-1, g), pad


def group_unreshape(wg: jax.Array, n: int, k: int, pad: int) -> jax.Array:
    """Inverse of group_reshape: [N*ng, G] -> [N, K], dropping the padding."""
    return wg.reshape(n, k + pad)[:, :k]


def minmax_init(w: jax.Array, group_size: int) -> tuple[jax.Array, jax.Array]:
    """Per-group (min(min, 0), max(max, 0)) in w.dtype, [N*ng] each: WrapperLinear's weight_min/weight_max.

    The range always contains 0; padding zeros therefore never change it.
    """
    wg, _ = group_reshape(w, group_size)
    return jnp.minimum(wg.min(axis=-1), 0), jnp.maximum(wg.max(axis=-1), 0)


def _exact_div(x: jax.Array, d: jax.Array | int, zero_from: jax.Array | None = None) -> jax.Array:
    """x / d as one IEEE division per element in the promoted dtype, like torch.

    XLA's simplifier turns division by a constant or by a broadcast into multiplication by a reciprocal, which
    rounds differently. Adding a zero that depends on x (x * 0, gradient stopped) makes the divisor an ordinary
    element-wise value the simplifier leaves alone, and it stays inside the consumer's fusion: nothing full-size is
    materialised (an optimization barrier around the broadcast divisor did the same but wrote it out every call).
    The divisor is promoted first (an fp16 scale to f32, exactly, as torch promotes it): adding the zero in fp16
    cost an emulated half-precision add per element. zero_from: an array of the result's shape to take the zero
    from instead of x; inside the tuning loop pass the rounding offset V, which changes every iteration: a zero
    made from the constant weight is hoisted out of the loop and read back in full each iteration.
    """
    d = jnp.asarray(d, x.dtype) if isinstance(d, int) else d
    dt = jnp.result_type(x, d)
    shape = jnp.broadcast_shapes(x.shape, jnp.shape(d))
    src = zero_from if zero_from is not None and jnp.shape(zero_from) == shape else x
    zero = (jax.lax.stop_gradient(src) * 0).astype(dt)
    return x.astype(dt) / (jnp.broadcast_to(jnp.asarray(d).astype(dt), shape) + zero)


def _scale_thresh(scale_dtype) -> float:
    """WrapperLinear.q_scale_thresh: 1e-8 for fp32 scales, else 1e-5."""
    return 1e-8 if jnp.dtype(scale_dtype) == jnp.float32 else 1e-5


def _clip_minmax_scale(p: jax.Array, bound: tuple[float, float] = MINMAX_SCALE_BOUND) -> jax.Array:
    """Value clamped to `bound` ([0, 1]; SignRoundV2: [0, 2]), gradient untouched: the reference clamps `.data` in
    place before each use."""
    lo, hi = bound
    return p + jax.lax.stop_gradient(jnp.clip(p, lo, hi) - p)


def _init_scale_sym(init_scale, max_scale, bits, scale_dtype):
    """SignRoundV2's sym scale (int.py quant_tensor_sym with init_scale): the searched init scale times max_scale,
    cast to scale_dtype, magnitude floored at the threshold; min_scale is not used."""
    scale = (init_scale * max_scale).astype(scale_dtype)
    t = _scale_thresh(scale_dtype)
    scale = jnp.where(scale < 0, clamp_ste(scale, -jnp.inf, -t), clamp_ste(scale, t, jnp.inf))
    return scale, jnp.full_like(scale, 2 ** (bits - 1), dtype=jnp.float32)


def _sym_scale(wmin0, wmax0, min_scale, max_scale, bits, scale_dtype):
    """Full-range sym scale: the larger-magnitude extreme maps to code -2^(b-1), so the scale carries a sign."""
    maxq = 2 ** (bits - 1)
    wmin_abs = -(wmin0 * min_scale)
    wmax_abs = wmax0 * max_scale
    biggest = jnp.maximum(wmax_abs, wmin_abs)
    max_v = jnp.where(wmax_abs < wmin_abs, biggest, -biggest)
    scale = _exact_div(max_v, maxq).astype(scale_dtype)
    t = _scale_thresh(scale_dtype)
    scale = jnp.where(scale < 0, clamp_ste(scale, -jnp.inf, -t), clamp_ste(scale, t, jnp.inf))
    return scale, jnp.full_like(scale, maxq, dtype=jnp.float32)


def _asym_scale(wmin0, wmax0, min_scale, max_scale, bits, scale_dtype):
    """Asym scale and STE-rounded zero point, so gradients reach min_scale through both."""
    wmin = wmin0 * min_scale
    wmax = wmax0 * max_scale
    scale = _exact_div(wmax - wmin, 2**bits - 1).astype(scale_dtype)
    scale = clamp_ste(scale, _scale_thresh(scale_dtype), jnp.inf)
    return scale, round_ste(_exact_div(-wmin, scale))


def _grouped_scales(w, min_scale, max_scale, bits, group_size, sym, scale_dtype, wmin0, wmax0,
                    minmax_bound=MINMAX_SCALE_BOUND, init_scale=None):
    """(wg [M, G], pad, scale [M] in scale_dtype, zp [M]): W grouped (zero-padded to whole groups) and each group's
    scale and zero point (float; 2^(b-1) for sym).

    Sym is written as clamp(round(W/s + V) + 2^(b-1), 0, 2^b - 1) - 2^(b-1), which equals the reference's
    clamp(round(W/s + V), -2^(b-1), 2^(b-1) - 1) exactly (integers in float), with the same clamp gradient.
    """
    check_bits(bits)
    wg, pad = group_reshape(w, group_size)
    if wmin0 is None or wmax0 is None:
        wmin0, wmax0 = minmax_init(w, group_size)
    if init_scale is not None:
        if not sym:
            raise ValueError("init_scale (SignRoundV2's searched scale) exists for sym schemes only")
        scale, zp = _init_scale_sym(init_scale, _clip_minmax_scale(max_scale, minmax_bound), bits, scale_dtype)
    else:
        scale_fn = _sym_scale if sym else _asym_scale
        scale, zp = scale_fn(
            wmin0, wmax0, _clip_minmax_scale(min_scale, minmax_bound), _clip_minmax_scale(max_scale, minmax_bound),
            bits, scale_dtype
        )
    return wg, pad, scale, zp


def _sum_to(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Sum x over the axes a broadcast to x.shape added or stretched (the transpose of that broadcast)."""
    lead = x.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(lead + i for i, n in enumerate(shape) if n == 1 and x.shape[lead + i] != 1)
    return jnp.sum(x, axis=axes, keepdims=True).reshape(shape) if axes else x


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fake_quant_grouped(wg, v, scale, zp, maxq: int):
    """scale * (clamp(round(wg / scale + v) + zp, 0, maxq) - zp) per group row: the tuned qdq's full-size part.

    The same values, dtype promotions and straight-through gradients as composing round_ste and clamp_ste, but
    differentiated by hand: the forward is one fused pass, the backward recomputes the codes and produces dV and
    the per-group scale and zero-point gradients. Autodiff of the composition kept several full-size intermediates
    and, through the fp16 scale's broadcast, rounded every element's scale gradient to fp16 before summing; here
    the scale's gradient is summed in f32 and rounded to the scale's dtype once per group. (Torch rounds each of
    the scale's two uses to fp16 and then adds them, so the two differ at fp16 rounding, where they nearly cancel.)
    """
    s, z = scale[:, None], zp[:, None]
    q = jnp.clip(jnp.round(_exact_div(wg, s, v) + v) + z, 0, maxq)
    return s * (q - z)


def _fake_quant_grouped_fwd(wg, v, scale, zp, maxq):
    return _fake_quant_grouped(wg, v, scale, zp, maxq), (wg, v, scale, zp)


def _fake_quant_grouped_bwd(maxq, res, g):
    wg, v, scale, zp = res
    s, z = scale[:, None], zp[:, None]
    t = _exact_div(wg, s, v)
    u = jnp.round(t + v) + z
    inside = (u >= 0) & (u <= maxq)  # torch.clamp passes the gradient at the bounds too
    gq = g * s  # d out / d q
    du = jnp.where(inside, gq, jnp.zeros_like(gq))
    # scale's two uses, in scale * (q - zp) and in wg / scale (-du * wg / scale^2 = -inside * g * t), summed in f32
    # in one reduction (each reduction writes its full-size input out first on XLA:CPU)
    d_scale = jnp.sum(g * ((jnp.clip(u, 0, maxq) - z) - jnp.where(inside, t, jnp.zeros_like(t))), axis=1)
    d_zp = jnp.sum(jnp.where(inside, jnp.zeros_like(gq), -gq), axis=1)  # zp's uses: + du and - g * scale
    return None, _sum_to(du, jnp.shape(v)).astype(v.dtype), d_scale.astype(scale.dtype), d_zp.astype(zp.dtype)


_fake_quant_grouped.defvjp(_fake_quant_grouped_fwd, _fake_quant_grouped_bwd)


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "sym", "scale_dtype", "minmax_bound"))
def qdq(
    w: jax.Array,
    v: jax.Array,
    min_scale: jax.Array,
    max_scale: jax.Array,
    *,
    bits: int,
    group_size: int,
    sym: bool,
    scale_dtype=jnp.float16,
    wmin0: jax.Array | None = None,
    wmax0: jax.Array | None = None,
    minmax_bound: tuple[float, float] = MINMAX_SCALE_BOUND,
    init_scale: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Fake-quantize W[N, K] as the reference's tuned WrapperLinear does; differentiable in v, min/max_scale.

    v: [N*ng, G] rounding offset (init 0); min_scale, max_scale: [N*ng] (init 1), clamped to [0, 1] in value only.
    Dtypes promote as in torch: pass float32 params (as WrapperLinear does). wmin0/wmax0 default to
    minmax_init(w) and should be that, computed once from the float weight, while tuning. minmax_bound: the value
    range of the clip scales; init_scale [N*ng] (sym only): SignRoundV2's searched scale, then scale =
    init_scale * max_scale and wmin0/wmax0/min_scale are unused.
    Returns (W~ [N, K] in w.dtype, scale [N, ng] float32 (scale_dtype values, signed for sym),
    zp [N, ng] float32 (2^(b-1) for sym)).
    """
    n, k = w.shape
    wg, pad, scale, zp = _grouped_scales(w, min_scale, max_scale, bits, group_size, sym, scale_dtype, wmin0, wmax0,
                                         minmax_bound, init_scale)
    w_qdq = _fake_quant_grouped(wg, v, scale, zp, 2**bits - 1).astype(w.dtype)
    return (
        group_unreshape(w_qdq, n, k, pad),
        scale.astype(jnp.float32).reshape(n, -1),
        zp.reshape(n, -1),
    )


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["codes", "scales", "zeros"],
    meta_fields=["bits", "group_size", "sym"],
)
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """Integer form of a quantized W[N, K], in the exporter's convention: W~ = (codes - zeros) * scales per group.

    codes: uint8 [N, K], unsigned in [0, 2^b - 1] (sym: q + 2^(b-1); asym: q including zp).
    scales: [N, ng] in scale_dtype (float16 by default), negative allowed for sym.
    zeros: int32 [N, ng] (sym: 2^(b-1) everywhere; asym: zp). Raw zero; GPTQ's "zero - 1" is a packing matter.
    """

    codes: jax.Array
    scales: jax.Array
    zeros: jax.Array
    bits: int
    group_size: int
    sym: bool


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "sym", "scale_dtype", "minmax_bound"))
def quantize_to_codes(
    w: jax.Array,
    v: jax.Array,
    min_scale: jax.Array,
    max_scale: jax.Array,
    *,
    bits: int,
    group_size: int,
    sym: bool,
    scale_dtype=jnp.float16,
    wmin0: jax.Array | None = None,
    wmax0: jax.Array | None = None,
    minmax_bound: tuple[float, float] = MINMAX_SCALE_BOUND,
    init_scale: jax.Array | None = None,
) -> QuantizedWeight:
    """Same quantization as qdq (same arguments), as the integer codes, scales and zeros the exporter writes.

    Like QuantLinear.pack, codes are re-derived from the qdq weight in w.dtype: clamp(round(W~ / s + zero)). That
    is the clamped q itself except where rounding W~ to bf16 moved it by more than s/2, which happens (rarely) for
    8-bit asym bf16 weights, where the reference's stored code then differs by one from its tuning-time q.
    """
    n, k = w.shape
    wg, pad, scale, zp = _grouped_scales(w, min_scale, max_scale, bits, group_size, sym, scale_dtype, wmin0, wmax0,
                                         minmax_bound, init_scale)
    w_qdq = _fake_quant_grouped(wg, v, scale, zp, 2**bits - 1).astype(w.dtype)
    codes = jnp.clip(jnp.round(_exact_div(w_qdq, scale[:, None]) + zp[:, None]), 0, 2**bits - 1)
    return QuantizedWeight(
        codes=group_unreshape(codes.astype(jnp.uint8), n, k, pad),
        scales=scale.reshape(n, -1),
        zeros=zp.astype(jnp.int32).reshape(n, -1),
        bits=bits,
        group_size=group_size,
        sym=sym,
    )


def rtn(w: jax.Array, bits: int, group_size: int, sym: bool, scale_dtype=jnp.float16) -> QuantizedWeight:
    """Plain round-to-nearest: the reference with iters=0 and disable_opt_rtn=True (rtn_int_sym / int_asym).

    v = 0 and min/max_scale = 1 held in w.dtype, as the reference's untuned 0-dim float32 tensors do not promote a
    bf16/fp16 weight: for asym bf16 weights the range (wmax - wmin) / maxq is then computed in bf16, as there.
    """
    one = jnp.ones((), w.dtype)
    zero = jnp.zeros((), jnp.float32)
    return quantize_to_codes(w, zero, one, one, bits=bits, group_size=group_size, sym=sym, scale_dtype=scale_dtype)


def dequantize_codes(codes, scales, zeros, group_size: int, axis: int = -1) -> jax.Array:
    """The one dequantization: (codes - zeros) * scales in float32, groups of group_size running along `axis` of
    codes (K elements there), scales and raw zeros holding one entry per group (ceil(K/G)) along that axis.

    A float16 scale times an integer below 2^8 is exact in float32, so casting the result to float16 afterwards
    rounds it exactly as torch's float16 multiply in the reference's QuantLinear.forward does.
    """
    codes = jnp.asarray(codes)
    axis = axis % codes.ndim
    k = codes.shape[axis]
    g = group_len(k, group_size)
    rows = lambda a: jax.lax.slice_in_dim(jnp.repeat(jnp.asarray(a), g, axis=axis), 0, k, axis=axis)  # noqa: E731
    diff = codes.astype(jnp.int32) - rows(zeros).astype(jnp.int32)
    return diff.astype(jnp.float32) * rows(scales).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("dtype",))
def dequantize(qw: QuantizedWeight, dtype=jnp.float32) -> jax.Array:
    """(codes - zeros) * scales per group, [N, K] in float32 (the value a packed checkpoint decodes to), then cast to
    dtype (float16: what the reference's QuantLinear computes)."""
    return dequantize_codes(qw.codes, qw.scales, qw.zeros, qw.group_size, axis=1).astype(dtype)


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "sym", "scale_dtype"))
def rtn_quantize(w: jax.Array, *, bits: int, group_size: int, sym: bool, scale_dtype=jnp.float16) -> QuantizedWeight:
    """Plain RTN of W[N, K] (V = 0, clip scales 1): the codes iteration 0 of tuning starts from, in one compiled
    function, so that the zero V and unit scales are never materialised (RTN of a large model stays near the size of
    one weight in memory)."""
    n, k = w.shape
    rows = n * num_groups(k, group_size)
    wmin0, wmax0 = minmax_init(w, group_size)
    v = jnp.zeros((rows, group_len(k, group_size)), jnp.float32)
    ones = jnp.ones((rows,), jnp.float32)
    return quantize_to_codes(w, v, ones, ones, bits=bits, group_size=group_size, sym=sym, scale_dtype=scale_dtype,
                             wmin0=wmin0, wmax0=wmax0)
