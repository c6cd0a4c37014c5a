"""iters=0 opt-RTN in the AutoRound pipeline: imatrix collection, the disable_opt_rtn rule, quality over plain RTN."""

import numpy as np
import pytest

from autoround_jax.data.calibration import DatasetError
from autoround_jax.models.loading import CheckpointReader
from autoround_jax.quant import dequantize, opt_rtn, rtn
from autoround_jax.tuning.autoround import AutoRound, apply_block
from tests.tiny_models import build_model, save_model

NS, T, BS = 6, 24, 4  # 6 samples in batches of 4: the last batch is padded, and padded rows must not count
SMALL = dict(iters=0, nsamples=NS, seqlen=T, batch_size=BS, group_size=32, model_dtype="fp32", progress=False,
             amp=False)  # fp32, as the transformers oracle computes


@pytest.fixture(scope="module", params=["qwen3_tune", "qwen2_tune"])
def folder(request, tmp_path_factory):
    return save_model(build_model(request.param, num_layers=2), str(tmp_path_factory.mktemp(request.param)))


@pytest.fixture(scope="module")
def ids():
    return np.random.default_rng(1).integers(3, 301, size=(NS, T)).astype(np.int32)


@pytest.fixture(scope="module")
def runs(folder, ids):
    opt = AutoRound(folder, dataset=ids, **SMALL)
    opt.quantize()
    plain = AutoRound(folder, dataset=ids, disable_opt_rtn=True, **SMALL)
    plain.quantize()
    return opt, plain


def test_imatrix_equals_a_direct_computation(folder, ids, runs):
    """sum over samples and tokens of x^2 at each quantized linear's input / nsamples, float model, float inputs."""
    torch = pytest.importorskip("torch")
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    sums = {}

    def hook(name):
        def f(module, inputs, output):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
        return f

    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and ".layers." in name:
            m.register_forward_hook(hook(name))
    with torch.no_grad():
        model(torch.from_numpy(ids.astype(np.int64)))
    opt, _ = runs
    assert sorted(opt.imatrix) == sorted(sums) and len(sums) == 14
    for name, ref in sums.items():
        np.testing.assert_allclose(opt.imatrix[name], ref.numpy() / NS, rtol=2e-5, err_msg=name)


def test_layers_are_opt_rtn_of_their_imatrix(folder, runs):
    opt, plain = runs
    reader = CheckpointReader(folder)
    name = "model.layers.1.mlp.down_proj"
    want = opt_rtn(reader.get(f"{name}.weight"), opt.imatrix[name], 4, 32)
    got = opt.quantized[name]
    assert (np.asarray(want.codes) == got.codes).all() and (np.asarray(want.scales) == got.scales).all()
    ref = rtn(reader.get(f"{name}.weight"), 4, 32, True)  # disable_opt_rtn=True is plain RTN, bit for bit
    assert (np.asarray(ref.codes) == plain.quantized[name].codes).all() and not plain.imatrix
    assert "opt-RTN" in opt.summary() and "plain RTN" in plain.summary()


def test_opt_rtn_beats_plain_rtn(folder, ids, runs):
    """Per layer, the imatrix-weighted weight error (what the search minimises) is no worse than plain RTN's; per
    block, the output error on the calibration data is lower."""
    opt, plain = runs
    reader = CheckpointReader(folder)
    tot_opt = tot_plain = 0.0
    for name, im in opt.imatrix.items():
        w = reader.get(f"{name}.weight").astype(np.float64)
        e_opt = float(np.sum(im * (np.asarray(dequantize(opt.quantized[name])) - w) ** 2))
        e_plain = float(np.sum(im * (np.asarray(dequantize(plain.quantized[name])) - w) ** 2))
        assert e_opt <= e_plain * (1 + 1e-3), name
        tot_opt, tot_plain = tot_opt + e_opt, tot_plain + e_plain
    assert tot_opt < 0.95 * tot_plain

    from autoround_jax.models.decoder import Rotary, causal_mask, default_positions
    import jax.numpy as jnp

    cos, sin = Rotary(opt.config)(default_positions(None, BS, T), jnp.float32)
    mask = causal_mask(None, BS, T)
    x = jnp.take(opt.source.tensor("model.embed_tokens.weight"), jnp.asarray(ids), axis=0)
    for i in range(opt.config.num_layers):
        y = apply_block(opt.source.block(i, jnp.float32), x, cos, sin, mask, BS)
        loss = {k: float(jnp.mean((apply_block(r.quantized_block(i, jnp.float32), x, cos, sin, mask, BS) - y) ** 2))
                for k, r in (("opt", opt), ("plain", plain))}
        assert loss["opt"] < loss["plain"], (i, loss)
        x = y


def test_disable_opt_rtn_resolves_as_the_reference(folder):
    kw = dict(SMALL, tokenizer=None)
    assert AutoRound(folder, **kw).opt_rtn  # None: opt-RTN below 8 bits
    assert not AutoRound(folder, **{**kw, "bits": 8}).opt_rtn  # W8A16: the reference turns it off
    assert AutoRound(folder, enable_opt_rtn=True, **{**kw, "bits": 8}).opt_rtn
    assert AutoRound(folder, disable_opt_rtn=False, **{**kw, "bits": 8}).opt_rtn
    assert not AutoRound(folder, **{**kw, "iters": 5}).opt_rtn  # tuning ignores it
    with pytest.raises(ValueError, match="contradicts"):
        AutoRound(folder, disable_opt_rtn=True, enable_opt_rtn=True, **kw)


def test_without_calibration_data(folder):
    """Plain RTN and asym (no opt-RTN exists for asym) need no data; sym opt-RTN says how to do without."""
    kw = dict(SMALL, tokenizer=None)
    plain = AutoRound(folder, disable_opt_rtn=True, **kw)
    plain.quantize()
    asym = AutoRound(folder, **{**kw, "sym": False})
    asym.quantize()
    w = CheckpointReader(folder).get("model.layers.0.self_attn.q_proj.weight")
    assert (np.asarray(rtn(w, 4, 32, False).codes) == asym.quantized["model.layers.0.self_attn.q_proj"].codes).all()
    with pytest.raises(DatasetError, match="needs a tokenizer.*--disable_opt_rtn"):
        AutoRound(folder, dataset="fortunes", **kw).quantize()
