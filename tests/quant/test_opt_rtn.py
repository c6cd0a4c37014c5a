"""Opt-RTN (imatrix-weighted sym scale search) against the torch reference's quant_tensor_opt_rtn_sym.

Scales and qdq values are bit-equal except at near-ties: two grid candidates whose fp32 losses differ by less than
the rounding of the loss sum (torch and XLA add the group's terms in different orders). For every differing group
the test recomputes both candidates' losses in float64 and requires them equal to 1e-6 relative.
"""

import warnings

import jax.numpy as jnp
import numpy as np
import pytest

from autoround_jax.quant import group_len, num_groups, opt_rtn, opt_rtn_qdq, search_scales
from autoround_jax.quant.opt_rtn import search_grid

torch = pytest.importorskip("torch")
ref_int = pytest.importorskip("auto_round.data_type.int")

N, K = 64, 576  # K = 4.5 groups of 128: exercises the zero padding (imatrix padded with 1e-5)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The reference's 200-step loop of small torch ops is 100x slower with threads contending on a busy 2-core box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _weight(seed: int) -> np.ndarray:
    rs = np.random.RandomState(seed)
    w = rs.randn(N, K) * 0.02 * rs.uniform(0.3, 3.0, size=(N, 1))
    w[rs.rand(N, K) < 0.002] *= 20
    w[0] = 0.0  # an all-zero row: scale floor
    w[1] = np.abs(w[1])
    w[2] *= 1e-6
    return w.astype(np.float32)


def _imatrix(seed: int) -> np.ndarray:
    return (np.random.RandomState(seed + 1).rand(K) ** 3 * 10).astype(np.float32)


def _reference(w: np.ndarray, im: np.ndarray | None, bits: int, group_size: int, dtype=torch.float32):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q, s, zp = ref_int.quant_tensor_opt_rtn_sym(torch.from_numpy(w).to(dtype), bits=bits, group_size=group_size,
                                                    imatrix=None if im is None else torch.from_numpy(im))
    return q.float().numpy(), s.float().numpy().reshape(N, -1), zp


def _group_loss64(w, im, bits, group_size, n, g, scale):
    """Float64 imatrix-weighted loss of one group under `scale` (the quantity the search minimises)."""
    gl = group_len(K, group_size)
    wg = np.pad(w.astype(np.float64), ((0, 0), (0, -K % gl)))[n, g * gl:(g + 1) * gl]
    ig = np.ones(K + -K % gl) if im is None else np.pad(im.astype(np.float64), (0, -K % gl), constant_values=1e-5)
    ig = ig[g * gl:(g + 1) * gl]
    nmax = 2 ** (bits - 1)
    q = np.clip(np.round(wg / scale), -nmax, nmax - 1)
    return float(np.sum(ig * (q * scale - wg) ** 2))


def _assert_equal_up_to_ties(ours_q, ours_s, ref_q, ref_s, w, im, bits, group_size):
    diff = np.argwhere(ours_s != ref_s)
    assert len(diff) <= max(1, ours_s.size // 100), f"{len(diff)} of {ours_s.size} group scales differ"
    for n, g in diff:
        a = _group_loss64(w, im, bits, group_size, n, g, float(ours_s[n, g]))
        b = _group_loss64(w, im, bits, group_size, n, g, float(ref_s[n, g]))
        assert abs(a - b) <= 1e-6 * max(a, b), (n, g, a, b)
    gl = group_len(K, group_size)
    same = np.repeat(ours_s == ref_s, gl, axis=1)[:, :K]
    np.testing.assert_array_equal(ours_q[same], ref_q[same])


@pytest.mark.parametrize("group_size", [32, 128, -1])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_qdq_matches_reference(bits, group_size):
    w, im = _weight(bits * 100 + group_size), _imatrix(bits * 100 + group_size)
    ref_q, ref_s, ref_zp = _reference(w, im, bits, group_size)
    q, s, zp = opt_rtn_qdq(jnp.asarray(w), jnp.asarray(im), bits, group_size)
    assert q.shape == (N, K) and s.shape == (N, num_groups(K, group_size)) and zp == ref_zp == 2 ** (bits - 1)
    _assert_equal_up_to_ties(np.asarray(q), np.asarray(s), ref_q, ref_s, w, im, bits, group_size)


@pytest.mark.parametrize("bits, group_size", [(4, 128)])
def test_bf16_weights_follow_the_reference_per_op_rounding(bits, group_size):
    w, im = _weight(7), _imatrix(7)
    w = torch.from_numpy(w).to(torch.bfloat16).float().numpy()  # bf16-representable values
    ref_q, ref_s, _ = _reference(w, im, bits, group_size, dtype=torch.bfloat16)
    q, s, _ = opt_rtn_qdq(jnp.asarray(w, jnp.bfloat16), jnp.asarray(im), bits, group_size)
    assert q.dtype == jnp.bfloat16 and s.dtype == jnp.bfloat16
    _assert_equal_up_to_ties(np.asarray(q, np.float32), np.asarray(s, np.float32), ref_q, ref_s, w, im, bits,
                             group_size)


@pytest.mark.parametrize("pattern, bits, group_size", [
    ("few", 4, 32), ("many", 2, 32), ("many", 4, 32), ("many", 4, -1), ("all", 3, 128),
])
def test_zero_imatrix_handling_matches_reference(pattern, bits, group_size):
    """_imatrix_handle_zero: mean fill (few zeros), |w| or |w| + sqrt(sum w^2/32) fallback (many), -1's quirk."""
    w, im = _weight(3), _imatrix(3)
    w[5, :40] = 0.0
    if pattern == "few":
        im[np.random.RandomState(0).rand(K) < 0.1] = 0
    elif pattern == "many":
        im[:100] = 0
        im[200:210] = 0
    else:
        im[:] = 0
    ref_q, ref_s, _ = _reference(w, im, bits, group_size)
    with pytest.warns(UserWarning, match="calibration activations contain 0"):
        q, s, _ = opt_rtn_qdq(jnp.asarray(w), jnp.asarray(im), bits, group_size)
    assert np.isfinite(np.asarray(s)).all()
    np.testing.assert_array_equal(np.asarray(s), ref_s)
    np.testing.assert_array_equal(np.asarray(q), ref_q)


def test_unweighted_search_and_search_scales_alone():
    w = _weight(11)
    ref_q, ref_s, _ = _reference(w, None, 4, 32)
    q, s, _ = opt_rtn_qdq(jnp.asarray(w), None, 4, 32)
    _assert_equal_up_to_ties(np.asarray(q), np.asarray(s), ref_q, ref_s, w, None, 4, 32)

    data = w.reshape(-1, 32)
    qw = np.random.RandomState(1).rand(*data.shape).astype(np.float32)
    ref = ref_int.search_scales(torch.from_numpy(data), 3, qw=torch.from_numpy(qw)).numpy()
    ours = np.asarray(search_scales(jnp.asarray(data), 3, jnp.asarray(qw)))
    assert ours.shape == ref.shape == (data.shape[0], 1)
    assert (ours != ref).sum() <= 2


def test_codes_and_scales_as_the_exporter_writes_them():
    """opt_rtn's integer form: codes round(W~/s + 2^(b-1)) from the layer's fp32 scale, scales stored as fp16."""
    w, im = _weight(5), _imatrix(5)
    ref_q, ref_s, _ = _reference(w, im, 4, 128)
    qw = opt_rtn(jnp.asarray(w), jnp.asarray(im), 4, 128)
    assert qw.codes.dtype == jnp.uint8 and qw.scales.dtype == jnp.float16 and qw.sym
    assert (np.asarray(qw.zeros) == 8).all()
    rep = np.repeat(ref_s, 128, axis=1)[:, :K]
    ref_codes = np.clip(np.round(ref_q / rep + 8), 0, 15)
    same_groups = np.asarray(qw.scales) == ref_s.astype(np.float16)
    assert same_groups.mean() > 0.99
    same = np.repeat(same_groups, 128, axis=1)[:, :K]
    np.testing.assert_array_equal(np.asarray(qw.codes)[same], ref_codes[same])
    q32 = opt_rtn(jnp.asarray(w), jnp.asarray(im), 4, 128, scale_dtype=jnp.float32)
    assert q32.scales.dtype == jnp.float32


def test_grid_sizes_and_bad_input():
    assert len(search_grid(4)) == len(search_grid(8)) == len(search_grid(3)) == 200  # 201 candidates
    assert len(search_grid(2)) == 180  # 181: 2-bit steps by 0.01
    assert search_grid(4)[0] == np.float32(8 + 6.0) and search_grid(2)[-1] == np.float32(2 - 0.9)
    with pytest.raises(ValueError, match="bits must be 2, 3, 4 or 8"):
        opt_rtn_qdq(jnp.zeros((4, 32)), None, 5, 32)
    with pytest.raises(ValueError, match="expected \\(32,\\)"):
        opt_rtn(jnp.zeros((4, 32)), jnp.ones(16), 4, 32)
