"""Qwen3-MoE and Qwen2-MoE against transformers' torch forward and generate (tiny random models: odd expert counts,
top-k 1 and 2, a shared expert, a dense layer via mlp_only_layers), and the stacked-expert leaves."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from autoround_jax import load_model
from autoround_jax.generation import generate_ids
from autoround_jax.models.config import ModelConfig
from autoround_jax.models.moe import (MixedExpertSchemes, SparseMoE, StackedLinear, experts_forward, pairs_forward,
                                      route, stack_leaves)
from autoround_jax.models.params_table import block_linear_names, expected_tensors
from tests.tiny_models import MOE_FAMILIES, build_model, save_model

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module", params=sorted(MOE_FAMILIES))
def pair(request, tmp_path_factory):
    model = build_model(request.param)
    folder = save_model(model, str(tmp_path_factory.mktemp(request.param)))
    return model, load_model(folder, dtype="fp32"), folder


def _slow_for_qwen2(ours, request):
    """The second family repeats a path the first covers: only under -m slow (or no -m), to keep the default fast."""
    markexpr = request.config.getoption("-m") or ""
    if ours.config.family == "qwen2_moe" and "not slow" in markexpr:
        pytest.skip("covered by qwen3_moe; runs without -m 'not slow'")


def test_logits_match_transformers(pair):
    torch_model, ours, _ = pair
    ids = np.random.default_rng(0).integers(3, 301, size=(3, 17)).astype(np.int32)
    with torch.no_grad():
        ref = torch_model(torch.from_numpy(ids).long()).logits.numpy()
    got = np.asarray(ours(ids))
    assert np.abs(got - ref).max() <= 1e-4 * max(np.abs(ref).max(), 1.0), np.abs(got - ref).max()


def test_greedy_generation_matches_transformers_generate(pair, request):
    torch_model, ours, _ = pair
    _slow_for_qwen2(ours, request)
    ids = np.random.default_rng(2).integers(3, 301, size=(1, 9)).astype(np.int32)
    with torch.no_grad():
        ref = torch_model.generate(torch.from_numpy(ids).long(), max_new_tokens=12, do_sample=False,
                                   eos_token_id=None, pad_token_id=0).numpy()[0, 9:]
    assert generate_ids(ours, ids, max_new_tokens=12)[0].tolist() == ref.tolist()


def test_checkpoint_names_are_per_expert_and_dense_layers_stay_dense(pair):
    """The table expects what save_pretrained writes (per-expert 2-D names); mlp_only_layers keeps a dense MLP."""
    torch_model, ours, folder = pair
    cfg = ours.config
    want = expected_tensors(cfg)
    from safetensors import safe_open

    with safe_open(f"{folder}/model.safetensors", "np") as f:
        on_disk = set(f.keys())
    assert set(want) == on_disk - ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    assert "model.layers.0.mlp.experts.4.down_proj.weight" in want and "model.layers.0.mlp.gate.weight" in want
    names = block_linear_names(cfg, 0)
    assert "mlp.gate" not in names and "mlp.shared_expert_gate" not in names  # routers are never quantizable
    assert len([n for n in names if ".experts." in n]) == 3 * cfg.num_experts
    for i in range(cfg.num_layers):
        assert isinstance(ours.layers[i].mlp, SparseMoE) == (i not in cfg.mlp_only_layers)


def test_qwen2_moe_config_needs_its_shared_expert_size():
    d = {"architectures": ["Qwen2MoeForCausalLM"], "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
         "num_hidden_layers": 1, "num_attention_heads": 2, "num_experts": 3, "num_experts_per_tok": 2,
         "moe_intermediate_size": 4}
    with pytest.raises(ValueError, match="shared_expert_intermediate_size"):
        ModelConfig.from_hf_config(d)
    with pytest.raises(ValueError, match="exceeds num_experts"):
        ModelConfig.from_hf_config({**d, "num_experts_per_tok": 4, "shared_expert_intermediate_size": 4})


def _loop_reference(x, idx, w, gate, up, down):
    """The same sum as transformers' loop over experts, in numpy."""
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(idx.shape[1]):
            e = idx[t, k]
            h = x[t] @ gate[e].T
            h = h / (1 + np.exp(-h)) * (x[t] @ up[e].T)
            out[t] += w[t, k] * (h @ down[e].T)
    return out


@pytest.mark.parametrize("impl", ["tiled", "ragged"])
def test_grouped_matmul_equals_a_loop_over_experts_and_unrouted_experts_get_no_gradient(impl, monkeypatch):
    monkeypatch.setenv("AUTOROUND_JAX_MOE_MATMUL", impl)
    rng = np.random.default_rng(0)
    e, d, i, t, k = 7, 16, 12, 10, 2
    gate, up = rng.normal(size=(e, i, d)).astype(np.float32), rng.normal(size=(e, i, d)).astype(np.float32)
    down = rng.normal(size=(e, d, i)).astype(np.float32)
    x = rng.normal(size=(t, d)).astype(np.float32)
    idx = rng.integers(0, e - 1, size=(t, k)).astype(np.int32)  # expert e-1 receives no token
    idx[:6, 0] = 2  # one crowded expert: its rows span several tiles
    w = rng.uniform(size=(t, k)).astype(np.float32)
    got = experts_forward(jnp.asarray(x), jnp.asarray(idx), jnp.asarray(w), gate, up, down)
    np.testing.assert_allclose(np.asarray(got), _loop_reference(x, idx, w, gate, up, down), rtol=1e-4, atol=1e-4)
    flat = idx.reshape(-1)
    pairs = pairs_forward(jnp.asarray(x), jnp.asarray(w), gate[flat], up[flat], down[flat])  # the decode path
    np.testing.assert_allclose(np.asarray(pairs), _loop_reference(x, idx, w, gate, up, down), rtol=1e-4, atol=1e-4)
    g = jax.grad(lambda gt: experts_forward(jnp.asarray(x), jnp.asarray(idx), jnp.asarray(w), gt, up, down).sum())(
        jnp.asarray(gate))
    assert np.isfinite(np.asarray(g)).all() and not np.asarray(g)[e - 1].any() and np.asarray(g)[0].any()


def test_route_all_experts_covers_every_expert():
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(6, 5)).astype(np.float32))
    idx, w = route(logits, 2, True, route_all=True)
    assert set(np.asarray(idx).ravel().tolist()) == set(range(5))
    np.testing.assert_allclose(np.asarray(w).sum(-1), 1.0, rtol=1e-6)
    idx_top, _ = route(logits, 2, True)
    assert (np.asarray(idx_top) == np.argsort(-np.asarray(logits), axis=-1)[:, :2]).all()


def test_stacked_fake_quant_leaf_quantizes_each_expert_like_its_own_linear():
    from autoround_jax.quant.scheme import LayerScheme
    from autoround_jax.tuning.fake_quant import FakeQuantWeight

    rng = np.random.default_rng(0)
    ws = [jnp.asarray(rng.normal(size=(64, 96)).astype(np.float32)) for _ in range(3)]
    scheme = LayerScheme(4, 32, False)
    leaves = [FakeQuantWeight(w, scheme) for w in ws]
    stacked = StackedLinear(stack_leaves(leaves))
    got = np.asarray(stacked.stacked_weight())
    for e, leaf in enumerate(leaves):
        np.testing.assert_array_equal(got[e], np.asarray(leaf.dequantize()))
    with pytest.raises(MixedExpertSchemes, match="same"):
        stack_leaves([FakeQuantWeight(ws[0], scheme), FakeQuantWeight(ws[1], LayerScheme(4, 32, True))])
    with pytest.raises(MixedExpertSchemes, match="quantize all"):
        stack_leaves([FakeQuantWeight(ws[0], scheme), None])


def test_fused_expert_checkpoint_loads_like_the_per_expert_one(pair, tmp_path, request):
    """transformers 5's in-memory layout (mlp.experts.gate_up_proj [E, 2I, D], down_proj [E, D, I]) saved as is."""
    import shutil

    from safetensors.numpy import save_file

    torch_model, ours, folder = pair
    _slow_for_qwen2(ours, request)
    state = {k: v.detach().numpy().copy() for k, v in torch_model.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state  # the layout this test is about
    if ours.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(tmp_path / "model.safetensors"))
    shutil.copy(f"{folder}/config.json", tmp_path / "config.json")
    fused = load_model(str(tmp_path), dtype="fp32")
    ids = np.random.default_rng(4).integers(3, 301, size=(2, 11)).astype(np.int32)
    np.testing.assert_array_equal(np.asarray(fused(ids)), np.asarray(ours(ids)))


def test_bf16_forward_and_cached_decoding(pair, tmp_path, request):
    """bf16 weights and activations (f32 accumulation) against transformers' bf16 forward, and cached decoding
    against our own full forward."""
    torch_model, ours32, folder = pair
    if ours32.config.family == "qwen2_moe":  # measured: 2 of 26 tokens route differently in bf16 (near-tied top-1)
        pytest.skip("top-1 routing flips on near-ties under bf16 rounding (logits then differ ~9% at that token)")
    from autoround_jax.models.decoder import KVCache

    ours = load_model(folder, dtype="bf16")
    ids = np.random.default_rng(3).integers(3, 301, size=(2, 13)).astype(np.int32)
    with torch.no_grad():
        ref = torch_model.to(torch.bfloat16)(torch.from_numpy(ids).long()).logits.float().numpy()
    torch_model.to(torch.float32)
    got = np.asarray(ours(ids))
    scale = max(np.abs(ref).max(), 1.0)
    assert np.abs(got - ref).max() <= 3e-2 * scale, np.abs(got - ref).max()
    cache = KVCache.init(ours.config, 2, 16, ours.dtype)
    pos = np.broadcast_to(np.arange(13, dtype=np.int32), (2, 13))
    _, cache = ours.forward_cached(ids[:, :12], pos[:, :12], np.ones((2, 12), bool), cache)
    last, _ = ours.forward_cached(ids[:, 12:], pos[:, 12:], np.ones((2, 1), bool), cache)
    np.testing.assert_allclose(np.asarray(last)[:, 0], got[:, 12], atol=3e-2 * scale)
