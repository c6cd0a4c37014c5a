"""The amp element-wise layers (RoPE, SwiGLU, RMSNorm with bf16 inputs): f32 arithmetic with one rounding and
hand-written backwards, checked against autodiff of the plain formulas in float32 on the same bf16-rounded inputs
(an independent implementation: jax.grad of the composition), and fp32 inputs keep the plain composition."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from autoround_jax.models.layers import RMSNorm, apply_rope, swiglu


def _rope_ref(x, cos, sin):
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rot * sin[:, :, None, :]


def _swiglu_ref(a, b):
    return a * jax.nn.sigmoid(a) * b


def _rms_ref(x, w, eps=1e-6):
    return w * x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


def _check(fn_half, fn_ref, args, n_diff, tol=1e-2):
    """Forward and VJP of fn_half on bf16 args against fn_ref on the same values in f32 (first n_diff args)."""
    rng = np.random.default_rng(7)
    half = [jnp.asarray(a, jnp.bfloat16) for a in args]
    f32 = [a.astype(jnp.float32) for a in half]
    out, vjp = jax.vjp(lambda *d: fn_half(*d, *half[n_diff:]), *half[:n_diff])
    assert out.dtype == jnp.bfloat16
    ct = jnp.asarray(rng.standard_normal(out.shape), jnp.bfloat16)
    grads = vjp(ct)
    ref, vjp_ref = jax.vjp(lambda *d: fn_ref(*d, *f32[n_diff:]), *f32[:n_diff])
    refs = vjp_ref(ct.astype(jnp.float32))
    # forward: within one bf16 rounding of the f32 value
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), rtol=tol, atol=tol * float(jnp.abs(ref).max()))
    for g, r in zip(grads, refs):
        assert g.dtype == jnp.bfloat16 and g.shape == r.shape
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r), rtol=tol, atol=tol * float(jnp.abs(r).max()))
        assert float(jnp.abs(r).max()) > 0  # a zero gradient would pass any tolerance


def test_rope_half_matches_autodiff_of_the_formula():
    rng = np.random.default_rng(0)
    b, t, h, d = 2, 16, 3, 8
    pos = np.arange(t)[None, :, None] * (1.0 / 10000 ** (np.arange(d // 2) / (d // 2)))[None, None]
    emb = np.concatenate([pos, pos], -1).repeat(b, 0)
    _check(apply_rope, _rope_ref, [rng.standard_normal((b, t, h, d)), np.cos(emb), np.sin(emb)], 1)


def test_swiglu_half_matches_autodiff_of_the_formula():
    rng = np.random.default_rng(1)
    _check(swiglu, _swiglu_ref, [3 * rng.standard_normal((64, 48)), rng.standard_normal((64, 48))], 2)


def test_rms_norm_half_matches_autodiff_of_the_formula():
    rng = np.random.default_rng(2)
    w = rng.uniform(0.5, 1.5, 40).astype(np.float32)
    norm = RMSNorm(jnp.asarray(w), 1e-6)
    x = rng.standard_normal((3, 5, 40)) * rng.uniform(0.1, 30, (3, 5, 1))
    _check(lambda x: norm(x), lambda x: _rms_ref(x, jnp.asarray(jnp.asarray(w, jnp.bfloat16), jnp.float32)), [x], 1)


@pytest.mark.parametrize("fn, args", [
    (swiglu, [(4, 6), (4, 6)]),
    (apply_rope, [(1, 4, 2, 8), (1, 4, 8), (1, 4, 8)]),
])
def test_fp32_inputs_keep_the_plain_composition(fn, args):
    """amp=False stays exact fp32: the same values as the plain formula, bit for bit."""
    rng = np.random.default_rng(3)
    a = [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in args]
    ref = _swiglu_ref if fn is swiglu else _rope_ref
    got = jax.jit(fn)(*a)
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jax.jit(lambda *z: jax.nn.silu(z[0]) * z[1] if fn is swiglu else ref(*z))(*a)))
