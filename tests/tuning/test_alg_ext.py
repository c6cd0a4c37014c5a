"""SignRoundV2 (enable_alg_ext) piece by piece against the reference 0.16.1's own functions on the same tensors
(torch and auto_round as oracles), then end to end on a tiny model."""

import types

import numpy as np
import pytest

import jax.numpy as jnp

from autoround_jax.quant.qdq import qdq
from autoround_jax.quant.scheme import LayerScheme
from autoround_jax.tuning import alg_ext, recipes
from autoround_jax.tuning.autoround import AutoRound
from tests.tiny_models import build_model, save_model

torch = pytest.importorskip("torch")


def _weight(n, k, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.05, (n, k)).astype(np.float32)
    w[:, 3] *= 8  # an outlier input channel, where the imatrix weighting matters
    return w


@pytest.mark.parametrize("bits, group_size, k", [(2, 32, 96), (4, 32, 80), (3, 64, 80), (4, -1, 64)])
def test_init_scale_search_equals_reference(bits, group_size, k):
    from auto_round.data_type.utils import (reshape_imatrix_for_weight, reshape_pad_tensor_by_group_size,
                                            search_optimized_init_scale)

    w = _weight(24, k)
    imatrix = np.random.default_rng(1).uniform(0, 50, k).astype(np.float32) ** 2
    wt = torch.from_numpy(w)
    wr, _, _ = reshape_pad_tensor_by_group_size(wt, group_size)
    ref = search_optimized_init_scale(wr, "int_sym", bits, reshape_imatrix_for_weight(torch.from_numpy(imatrix), wr,
                                                                                       group_size), 1e-5)
    ours = alg_ext.init_scale(jnp.asarray(w), imatrix, LayerScheme(bits, group_size, True), jnp.float16)
    np.testing.assert_array_equal(np.asarray(ours), ref.reshape(-1).numpy())
    # the imatrix really weights the search (otherwise this test could not tell it apart from plain search)
    plain = alg_ext.init_scale(jnp.asarray(w), None, LayerScheme(bits, group_size, True), jnp.float16)
    assert not np.array_equal(np.asarray(plain), np.asarray(ours))


def test_outlier_dropping_loss_equals_reference():
    from auto_round.algorithms.quantization.sign_roundv2.quantizer import SignRoundV2Quantizer

    rng = np.random.default_rng(2)
    b, t, d = 3, 17, 40
    pred = rng.normal(0, 1, (b, t, d)).astype(np.float32)
    ref_out = pred + rng.standard_t(2, (b, t, d)).astype(np.float32) * 0.1  # heavy tails: outliers to drop
    valid = [torch.cat([torch.ones(1, t - 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long)], 1)
             for _ in range(b)]
    fake_self = types.SimpleNamespace(_use_outlier_suppressed_loss=True, amp=False)
    expected = SignRoundV2Quantizer._get_loss(fake_self, torch.from_numpy(pred), torch.from_numpy(ref_out),
                                              list(range(b)), None, "cpu", valid).item()
    keep = (jnp.arange(t) < t - 1).astype(jnp.float32)[None, :, None]
    ours = float(recipes.mse_drop_outliers(jnp.asarray(pred), jnp.asarray(ref_out), keep))
    np.testing.assert_allclose(ours, expected, rtol=1e-6)
    assert ours < float(recipes.mse(jnp.asarray(pred), jnp.asarray(ref_out), keep)) * 0.95  # something was dropped


def test_clip_range_and_init_scale_qdq_equal_reference():
    from auto_round.algorithms.quantization.sign_roundv2.quantizer import SignRoundOptimizedWrapperLinear
    from auto_round.data_type.int import quant_tensor_sym

    assert SignRoundOptimizedWrapperLinear.minmax_scale_bound == alg_ext.CLIP_RANGE
    bits, g = 2, 32
    w = _weight(16, 96, seed=3)
    rng = np.random.default_rng(4)
    init = np.array(alg_ext.init_scale(jnp.asarray(w), None, LayerScheme(bits, g, True), jnp.float16))
    rows = init.size
    v = rng.uniform(-0.5, 0.5, (rows, g)).astype(np.float32)
    max_scale = rng.uniform(0, 2.6, rows).astype(np.float32)  # some above the bound: clamped in value
    min_scale = rng.uniform(0, 1, rows).astype(np.float32)  # unused on this path
    lo, hi = SignRoundOptimizedWrapperLinear.minmax_scale_bound
    ref, ref_scale, _ = quant_tensor_sym(torch.from_numpy(w), bits, g, v=torch.from_numpy(v),
                                         max_scale=torch.from_numpy(max_scale).clamp(lo, hi),
                                         scale_dtype=torch.float16, init_scale=torch.from_numpy(init)[:, None])
    ours, scale, _ = qdq(jnp.asarray(w), jnp.asarray(v), jnp.asarray(min_scale), jnp.asarray(max_scale), bits=bits,
                         group_size=g, sym=True, scale_dtype=jnp.float16, minmax_bound=alg_ext.CLIP_RANGE,
                         init_scale=jnp.asarray(init))
    np.testing.assert_array_equal(np.asarray(ours), ref.numpy())
    np.testing.assert_array_equal(np.asarray(scale).reshape(-1), ref_scale.float().reshape(-1).numpy())


def test_recipe_follows_the_reference_conditions():
    base = recipes.DEFAULT
    w2 = alg_ext.alg_ext_recipe(base, LayerScheme(2, 64, True))
    assert (w2.clip_range, w2.init, w2.objective) == ((0.0, 2.0), "search", recipes.mse_drop_outliers)
    w4 = alg_ext.alg_ext_recipe(base, LayerScheme(4, 128, True))
    assert (w4.clip_range, w4.init, w4.objective) == ((0.0, 2.0), "search", recipes.mse)
    assert alg_ext.alg_ext_recipe(base, LayerScheme(2, 64, False)) == base  # asym: the plain SignRound path
    kept = alg_ext.alg_ext_recipe(base.__class__(objective=recipes.l1), LayerScheme(2, 64, True), keep_objective=True)
    assert kept.objective is recipes.l1


def test_enable_alg_ext_end_to_end(tmp_path):
    folder = save_model(build_model("qwen3_tune", num_layers=2), str(tmp_path / "m"))
    ids = np.random.default_rng(0).integers(3, 301, size=(8, 40)).astype(np.int32)
    kw = dict(dataset=ids, bits=2, group_size=32, iters=10, nsamples=8, seqlen=40, batch_size=4, model_dtype="fp32",
              progress=False)
    ar = AutoRound(folder, enable_alg_ext=True, **kw)
    ar.quantize()
    assert ar.recipe.init == "search" and ar.recipe.objective is recipes.mse_drop_outliers
    for r in ar.reports:
        assert r.loss_best <= r.loss_rtn
    out = ar.save_quantized(str(tmp_path / "out"), format="auto_round")
    import json

    qc = json.load(open(f"{out}/quantization_config.json"))
    assert qc["enable_alg_ext"] is True and qc["bits"] == 2
