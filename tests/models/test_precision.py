"""Compute precision: amp's dtype choice per host, and the bf16-operand / f32-accumulation contractions against a
float64 numpy oracle of the same bf16-rounded operands."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from autoround_jax.models import precision
from autoround_jax.models.precision import CPU_BF16_ENV, compute_dtype, linear, mixed_einsum


@pytest.mark.parametrize("flags, machine, want", [
    ({"avx2", "fma"}, "x86_64", False),
    ({"avx2", "avx512f"}, "x86_64", False),
    ({"avx2", "avx512f", "avx512_bf16"}, "x86_64", True),
    ({"avx2", "amx_bf16", "amx_tile"}, "x86_64", True),
    ({"asimd", "sve"}, "aarch64", False),
    ({"asimd", "bf16"}, "aarch64", True),
])
def test_bf16_units_detected_from_cpu_flags(monkeypatch, flags, machine, want):
    monkeypatch.delenv(CPU_BF16_ENV, raising=False)
    monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
    monkeypatch.setattr(precision.platform, "machine", lambda: machine)
    assert precision.cpu_has_bf16() is want
    assert compute_dtype(True, "cpu") == (jnp.bfloat16 if want else jnp.float32)


def test_amp_resolution_follows_the_reference(monkeypatch):
    monkeypatch.setenv(CPU_BF16_ENV, "1")
    assert compute_dtype(True, "cpu") == jnp.bfloat16
    assert compute_dtype(False, "cpu") == jnp.float32  # amp=False is exact fp32 everywhere
    monkeypatch.setenv(CPU_BF16_ENV, "0")
    assert compute_dtype(True, "cpu") == jnp.float32
    assert compute_dtype(True, "gpu") == compute_dtype(True, "tpu") == jnp.bfloat16
    assert compute_dtype(False, "gpu") == jnp.float32


def _bf16(a):
    return np.asarray(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32), np.float64)


def test_linear_forward_and_gradients_are_bf16_operands_with_f32_accumulation():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 48)).astype(np.float32)
    w = rng.standard_normal((40, 48)).astype(np.float32)
    g = rng.standard_normal((2, 5, 40)).astype(np.float32)
    xb = jnp.asarray(x, jnp.bfloat16)

    y, vjp = jax.vjp(lambda x, w: linear(x, w), xb, jnp.asarray(w))
    dx, dw = vjp(jnp.asarray(g, jnp.bfloat16))
    assert y.dtype == jnp.bfloat16 and dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32

    xr, wr, gr = _bf16(x), _bf16(w), _bf16(g)
    want_y = xr @ wr.T
    want_dx = gr @ wr
    want_dw = np.einsum("btn,btk->nk", gr, xr)
    # y and dx are rounded to bf16 once (8 bits of mantissa); dw stays f32-accumulated.
    np.testing.assert_allclose(np.asarray(y, np.float64), want_y, rtol=1e-2, atol=1e-2 * np.abs(want_y).max())
    np.testing.assert_allclose(np.asarray(dx, np.float64), want_dx, rtol=1e-2, atol=1e-2 * np.abs(want_dx).max())
    np.testing.assert_allclose(np.asarray(dw, np.float64), want_dw, rtol=1e-5, atol=1e-5 * np.abs(want_dw).max())


def test_linear_in_fp32_is_the_plain_einsum():
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal((3, 7, 16)).astype(np.float32), rng.standard_normal((8, 16)).astype(np.float32)
    got = jax.jit(linear)(jnp.asarray(x), jnp.asarray(w))
    want = jax.jit(lambda x, w: jnp.einsum("...k,nk->...n", x, w))(jnp.asarray(x), jnp.asarray(w))
    assert got.dtype == jnp.float32 and np.array_equal(np.asarray(got), np.asarray(want))


def test_attention_einsum_gradients_match_the_oracle():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((2, 6, 3, 2, 8)).astype(np.float32)  # b t k g d
    b = rng.standard_normal((2, 6, 3, 8)).astype(np.float32)  # b s k d
    g = rng.standard_normal((2, 3, 2, 6, 6)).astype(np.float32)  # b k g t s
    spec = "btkgd,bskd->bkgts"
    out, vjp = jax.vjp(lambda a, b: mixed_einsum(spec, a, b), jnp.asarray(a, jnp.bfloat16), jnp.asarray(b, jnp.bfloat16))
    da, db = vjp(jnp.asarray(g, jnp.bfloat16))
    ar, br, gr = _bf16(a), _bf16(b), _bf16(g)
    for got, want in ((out, np.einsum(spec, ar, br)), (da, np.einsum("bkgts,bskd->btkgd", gr, br)),
                      (db, np.einsum("btkgd,bkgts->bskd", ar, gr))):
        assert got.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-2, atol=1e-2 * np.abs(want).max())


def test_materialized_transpose_is_the_transpose_under_jit():
    a = jnp.asarray(np.arange(12 * 5, dtype=np.float32).reshape(12, 5), jnp.bfloat16)
    assert np.array_equal(np.asarray(jax.jit(lambda a: precision.physical_transpose(a, (1, 0)))(a)), np.asarray(a).T)


def _attention_oracle(q, k, v, mask, kv_heads):
    """float64 numpy softmax attention (GQA) on the bf16-rounded inputs, and its gradients for cotangent r."""
    b, t, h, d = q.shape
    g = h // kv_heads
    qg = q.reshape(b, t, kv_heads, g, d)
    s = np.einsum("btkgd,bskd->bkgts", qg, k) / np.sqrt(d)
    s = np.where(mask[:, None, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return p, qg


def test_attention_custom_vjp_matches_the_float64_oracle():
    """models/decoder._softmax_attention (amp): forward and hand-written backward against float64 softmax attention
    on the same bf16-rounded q, k, v (causal mask, 2 query heads per KV head)."""
    from autoround_jax.models.decoder import _attend, causal_mask

    rng = np.random.default_rng(3)
    b, t, kvh, g, d = 2, 7, 2, 2, 8
    q, k, v = (_bf16(rng.standard_normal(s)) for s in ((b, t, kvh * g, d), (b, t, kvh, d), (b, t, kvh, d)))
    r = _bf16(rng.standard_normal((b, t, kvh * g, d)))
    mask = np.asarray(causal_mask(None, b, t))
    j = lambda a: jnp.asarray(a, jnp.bfloat16)  # noqa: E731
    out, vjp = jax.vjp(lambda q, k, v: _attend(q, k, v, jnp.asarray(mask), kvh), j(q), j(k), j(v))
    dq, dk, dv = vjp(j(r))

    p, qg = _attention_oracle(q, k, v, mask, kvh)
    want = np.einsum("bkgts,bskd->btkgd", p, v).reshape(out.shape)
    rg = r.reshape(b, t, kvh, g, d)
    dp = np.einsum("btkgd,bskd->bkgts", rg, v)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True)) / np.sqrt(d)
    wants = (want, np.einsum("bkgts,bskd->btkgd", ds, k).reshape(dq.shape), np.einsum("bkgts,btkgd->bskd", ds, qg),
             np.einsum("bkgts,btkgd->bskd", p, rg))
    for got, ref in zip((out, dq, dk, dv), wants):
        assert got.dtype == jnp.bfloat16 and got.shape == ref.shape
        np.testing.assert_allclose(np.asarray(got, np.float64), ref, rtol=2e-2, atol=2e-2 * np.abs(ref).max())


def test_cpu_tuned_jit_compiles_half_float_calls_with_ynn_dots_only(monkeypatch):
    """Calls with bf16 arguments compile with YNN_DOTS_ONLY (where this jaxlib has the option), fp32 calls with
    XLA's defaults; under the option XLA:CPU no longer hands reductions to YNNPACK."""
    options = precision.cpu_compiler_options()  # decided before jax.jit is spied on
    seen = []
    real_jit = jax.jit
    monkeypatch.setattr(precision.jax, "jit", lambda fn, **kw: seen.append(kw.get("compiler_options")) or real_jit(fn, **kw))
    f = precision.cpu_tuned_jit(lambda x: jnp.sum(jnp.sin(x.astype(jnp.float32)), axis=-1))
    f32, bf16 = jnp.ones((64, 256), jnp.float32), jnp.ones((64, 256), jnp.bfloat16)
    np.testing.assert_allclose(np.asarray(f(f32)), np.asarray(f(bf16)), rtol=1e-6)
    f(bf16)
    assert seen == [None, options]  # one plain jit, one half-float jit, each built once
    if options is None:
        pytest.skip("this backend or jaxlib has no YNNPACK fusion option")
    assert options == precision.YNN_DOTS_ONLY
    x = jnp.ones((64, 256), jnp.float32)
    red = lambda x: jnp.sum(jnp.sin(x), axis=-1)  # noqa: E731
    assert "__ynn_fusion" not in real_jit(red, compiler_options=options).lower(x).compile().as_text()


def test_attention_causal_halves_match_the_float64_oracle():
    """With a causal mask over T = S the amp attention runs its queries in two halves (the first half against the
    first half of the keys): forward and all three gradients against the float64 oracle, and equal (up to the
    dots' f32 summation order) to the unsplit computation."""
    from autoround_jax.models.decoder import _attend, causal_mask

    rng = np.random.default_rng(4)
    b, t, kvh, g, d = 2, 64, 2, 3, 16
    q, k, v = (_bf16(rng.standard_normal(s)) for s in ((b, t, kvh * g, d), (b, t, kvh, d), (b, t, kvh, d)))
    r = _bf16(rng.standard_normal((b, t, kvh * g, d)))
    mask = np.asarray(causal_mask(None, b, t))
    j = lambda a: jnp.asarray(a, jnp.bfloat16)  # noqa: E731

    def run(causal):
        out, vjp = jax.vjp(lambda q, k, v: _attend(q, k, v, jnp.asarray(mask), kvh, causal=causal), j(q), j(k), j(v))
        return (out,) + vjp(j(r))

    halves, whole = run(True), run(False)
    p, qg = _attention_oracle(q, k, v, mask, kvh)
    rg = r.reshape(b, t, kvh, g, d)
    dp = np.einsum("btkgd,bskd->bkgts", rg, v)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True)) / np.sqrt(d)
    wants = (np.einsum("bkgts,bskd->btkgd", p, v).reshape(q.shape), np.einsum("bkgts,bskd->btkgd", ds, k).reshape(q.shape),
             np.einsum("bkgts,btkgd->bskd", ds, qg), np.einsum("bkgts,btkgd->bskd", p, rg))
    for got, other, ref in zip(halves, whole, wants):
        assert got.dtype == jnp.bfloat16 and got.shape == ref.shape
        np.testing.assert_allclose(np.asarray(got, np.float64), ref, rtol=2e-2, atol=2e-2 * np.abs(ref).max())
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(other, np.float32), rtol=1e-2,
                                   atol=1e-2 * np.abs(ref).max())
