"""The one model builder: shape-only construction, leaves filled and shape-checked from any tensor source, a
weight-leaf factory, and placement on a device mesh by the partition rules."""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from flax import nnx

from autoround_jax.io.safetensors_io import CheckpointError
from autoround_jax.models.builder import abstract_model, build_block, build_model, is_abstract
from autoround_jax.models.config import ModelConfig
from autoround_jax.models.layers import FloatWeight
from autoround_jax.models.params_table import expected_tensors

CFG = ModelConfig.from_hf_config(dict(
    model_type="qwen3", hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, num_hidden_layers=2, vocab_size=128, rms_norm_eps=1e-6, rope_theta=10000.0,
    max_position_embeddings=64, tie_word_embeddings=False))


def _tensors(cfg=CFG):
    rng = np.random.default_rng(0)
    return {n: rng.standard_normal(s).astype(np.float32) * 0.05 for n, s in expected_tensors(cfg).items()}


def test_abstract_model_holds_no_arrays():
    model = abstract_model(CFG, np.float32)
    leaves = jax.tree.leaves(nnx.state(model.layers))
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    assert model.layers[1].mlp.down_proj.weight.w.shape == (64, 96)


def test_every_leaf_is_filled_from_the_source_by_its_table_name():
    t = _tensors()
    model = build_model(CFG, t.__getitem__, np.float32)
    assert not is_abstract(model)
    np.testing.assert_array_equal(model.layers[1].self_attn.k_norm.weight[...], t["model.layers.1.self_attn.k_norm.weight"])
    np.testing.assert_array_equal(model.lm_head.weight.w[...], t["lm_head.weight"])
    np.testing.assert_array_equal(model.embed_tokens[...], t["model.embed_tokens.weight"])
    assert np.isfinite(np.asarray(model(np.array([[1, 2, 3]])))).all()


def test_a_misshapen_tensor_is_named():
    t = _tensors()
    t["model.layers.1.mlp.up_proj.weight"] = t["model.layers.1.mlp.up_proj.weight"][:, :-1]
    with pytest.raises(CheckpointError, match=r"model.layers.1.mlp.up_proj.weight has shape \(96, 63\), config.json "
                                              r"implies \(96, 64\)"):
        build_block(CFG, 1, t.__getitem__, np.float32, source="src")


def test_the_weight_leaf_factory_decides_each_linear_and_reads_floats_only_when_asked():
    t = _tensors()
    read = []

    def get(name):
        read.append(name)
        return t[name]

    def leaf(module, read_float):
        if module.endswith("mlp.down_proj"):
            return FloatWeight(np.zeros((64, 96), np.float32))  # a stand-in for a packed leaf: no float read
        if module.endswith("q_proj"):
            return FloatWeight(read_float() * 2)
        return None

    block = build_block(CFG, 0, get, np.float32, weight_leaf=leaf)
    assert "model.layers.0.mlp.down_proj.weight" not in read
    np.testing.assert_array_equal(block.self_attn.q_proj.weight.w[...], t["model.layers.0.self_attn.q_proj.weight"] * 2)
    assert not block.mlp.down_proj.weight.w[...].any()


def test_a_mesh_shards_linears_along_output_features():
    """4 simulated CPU devices (a subprocess: the device count is fixed when JAX starts), mesh data=2 x fsdp=2."""
    code = textwrap.dedent("""
        import numpy as np, jax
        from jax.sharding import Mesh
        from tests.models.test_builder import CFG, _tensors
        from autoround_jax.models.builder import build_model
        mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "fsdp"))
        t = _tensors()
        sharded = build_model(CFG, t.__getitem__, np.float32, mesh=mesh)
        plain = build_model(CFG, t.__getitem__, np.float32)
        w = sharded.layers[0].mlp.up_proj.weight.w[...]
        assert [s.data.shape for s in w.addressable_shards] == [(48, 64)] * 4, [s.data.shape for s in w.addressable_shards]
        o = sharded.layers[1].self_attn.o_proj.weight.w[...]
        assert {s.data.shape for s in o.addressable_shards} == {(32, 64)}
        n = sharded.layers[0].input_layernorm.weight[...]
        assert {s.data.shape for s in n.addressable_shards} == {(64,)}  # replicated
        from flax import nnx
        from jax.sharding import PartitionSpec
        from autoround_jax.models.builder import abstract_block
        from autoround_jax.models.sharding import leaf_shardings
        specs = leaf_shardings(nnx.state(abstract_block(CFG, np.float32)), mesh, "layers.0.")
        flat = {".".join(str(getattr(k, "key", "")) for k in p).strip("."): v.spec
                for p, v in jax.tree_util.tree_flatten_with_path(specs)[0]}
        assert flat["mlp.up_proj.weight.w"] == PartitionSpec("fsdp", None), flat
        assert flat["input_layernorm.weight"] == PartitionSpec()
        ids = np.array([[1, 5, 9, 2]])
        np.testing.assert_allclose(np.asarray(sharded(ids)), np.asarray(plain(ids)), rtol=1e-5, atol=1e-5)
        print("ok")
    """)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    root = os.path.join(os.path.dirname(__file__), "..", "..")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
