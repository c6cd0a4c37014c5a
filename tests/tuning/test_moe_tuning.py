"""Tuning a tiny Qwen3-MoE (5 experts, top-2, a dense middle block): every block beats RTN, one compile per block
shape, every expert's linears tuned; an expert no calibration token reaches keeps its RTN codes (no NaN) unless
moe_route_all_experts sends tokens to it."""

import numpy as np
import pytest

from autoround_jax.tuning import signround
from autoround_jax.tuning.autoround import AutoRound
from tests.tiny_models import build_model, save_model

torch = pytest.importorskip("torch")
SMALL = dict(iters=20, nsamples=4, seqlen=32, batch_size=2, model_dtype="fp32", progress=False, amp=False,
             bits=4, group_size=32, sym=True)
IDLE = 4  # expert of block 0 that top-2 routing never picks


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Blocks 0 and 2 sparse, block 1 dense (mlp_only_layers); block 0's router logits are (a, -a, b, -b, 0), so
    top-2 always picks one of experts 0/1 and one of 2/3 (each >= 0) and never expert 4."""
    model = build_model("qwen3_moe_e5k2", num_layers=3)
    with torch.no_grad():
        w = model.model.layers[0].mlp.gate.weight
        w[1], w[3], w[IDLE] = -w[0], -w[2], 0.0
    return save_model(model, str(tmp_path_factory.mktemp("moe")))


@pytest.fixture(scope="module")
def ids():
    return np.random.default_rng(0).integers(3, 301, size=(4, 32)).astype(np.int32)


def _codes(ar, name):
    return np.asarray(ar.quantized[name].codes), np.asarray(ar.quantized[name].scales)


def test_every_moe_block_beats_rtn_and_idle_experts_keep_rtn(folder, ids):
    before = signround.TRACE_COUNT["tune"]
    ar = AutoRound(folder, dataset=ids, **SMALL)
    ar.quantize()
    assert signround.TRACE_COUNT["tune"] - before <= 2  # one compile for both sparse blocks, one for the dense
    for r in ar.reports:
        assert r.loss_best < r.loss_rtn, r
    assert len([n for n in ar.quantized if ".experts." in n]) == 2 * 5 * 3
    assert all(np.isfinite(np.asarray(q.scales, np.float32)).all() for q in ar.quantized.values())
    rtn = AutoRound(folder, iters=0, disable_opt_rtn=True, **{k: v for k, v in SMALL.items() if k != "iters"})
    rtn.quantize()
    for lin in ("gate_proj", "up_proj", "down_proj"):
        idle, busy = f"model.layers.0.mlp.experts.{IDLE}.{lin}", f"model.layers.0.mlp.experts.0.{lin}"
        for a, b in zip(_codes(ar, idle), _codes(rtn, idle)):
            np.testing.assert_array_equal(a, b)  # no token, no gradient: V = 0, scales 1
        assert any((a != b).any() for a, b in zip(_codes(ar, busy), _codes(rtn, busy)))  # routed experts move


def test_route_all_experts_tunes_the_idle_expert_too(folder, ids):
    ar = AutoRound(folder, dataset=ids, moe_route_all_experts=True, **SMALL)
    ar.quantize()
    for r in ar.reports:
        assert r.loss_best < r.loss_rtn, r
    rtn = AutoRound(folder, iters=0, disable_opt_rtn=True, **{k: v for k, v in SMALL.items() if k != "iters"})
    rtn.quantize()
    idle = f"model.layers.0.mlp.experts.{IDLE}.up_proj"
    assert any((a != b).any() for a, b in zip(_codes(ar, idle), _codes(rtn, idle)))
    assert not ar.model().layers[0].mlp.route_all  # the quantized model routes as the float one does


def test_opt_rtn_imatrix_of_each_expert_sums_only_its_routed_tokens(folder, ids):
    """The experts' imatrix against transformers' own routing: hook the fused experts module of block 0, sum x^2
    (gate/up inputs) and h^2 (down inputs) over the tokens routed to each expert, divide by nsamples."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    experts = model.model.layers[0].mlp.experts
    seen = {}

    def hook(module, args):
        x, idx = args[0], args[1]
        for e in range(module.num_experts):
            rows = (idx == e).any(-1)
            xe = x[rows]
            gate, up = torch.nn.functional.linear(xe, module.gate_up_proj[e]).chunk(2, dim=-1)
            h = torch.nn.functional.silu(gate) * up
            seen[e] = ((xe ** 2).sum(0).numpy(), (h ** 2).sum(0).numpy())

    handle = experts.register_forward_pre_hook(hook)
    with torch.no_grad():
        model(torch.from_numpy(ids.astype(np.int64)))
    handle.remove()
    ar = AutoRound(folder, dataset=ids, iters=0, enable_opt_rtn=True,  # experts search only when asked (reference)
                   **{k: v for k, v in SMALL.items() if k != "iters"})
    ar.quantize()
    assert "model.layers.0.mlp.experts.0.up_proj" in ar.quantized
    n = ids.shape[0]
    for e in range(5):
        p = f"model.layers.0.mlp.experts.{e}."
        np.testing.assert_allclose(ar.imatrix[p + "up_proj"], seen[e][0] / n, rtol=2e-4, atol=1e-9)
        np.testing.assert_allclose(ar.imatrix[p + "down_proj"], seen[e][1] / n, rtol=2e-4, atol=1e-9)
    assert not ar.imatrix[f"model.layers.0.mlp.experts.{IDLE}.gate_proj"].any()  # no token, a zero imatrix


def test_cli_moe_route_all_experts_reaches_autoround_and_mixed_expert_schemes_are_one_line(folder, tmp_path,
                                                                                           monkeypatch, capsys):
    from autoround_jax import cli
    from autoround_jax.tuning import autoround

    seen = {}

    class Spy(autoround.AutoRound):
        def __init__(self, *a, **kw):
            seen.update(kw)
            super().__init__(*a, **kw)

    monkeypatch.setattr(autoround, "AutoRound", Spy)
    base = ["--model", folder, "--iters", "0", "--disable_opt_rtn", "--model_dtype", "fp32", "--disable_amp",
            "--group_size", "32"]
    assert cli.run(base + ["--moe_route_all_experts", "--output_dir", str(tmp_path / "out")]) == 0
    assert seen["moe_route_all_experts"] is True
    assert cli.run(base + ["--fp_layers", "model.layers.0.mlp.experts.1.down_proj",
                           "--output_dir", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("autoround-jax: error:") and "one scheme" in err[-1], err
