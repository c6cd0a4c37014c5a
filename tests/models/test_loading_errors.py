"""Bad checkpoints give one clear error naming the problem."""

import json
import os
import shutil

import numpy as np
import pytest

from autoround_jax import load_model
from autoround_jax.io.safetensors_io import CheckpointError, load_file, save_file
from autoround_jax.models import UnsupportedModelError
from tests.tiny_models import build_model, save_model


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return save_model(build_model("qwen2_gqa2_untied"), str(tmp_path_factory.mktemp("good")))


def _copy(good, tmp_path):
    dst = str(tmp_path / "m")
    shutil.copytree(good, dst)
    return dst


def test_missing_folder():
    with pytest.raises(FileNotFoundError, match="not found"):
        load_model("/nonexistent/model/folder")


def test_missing_weights_file(good, tmp_path):
    dst = _copy(good, tmp_path)
    os.remove(os.path.join(dst, "model.safetensors"))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(dst)


def test_truncated_safetensors(good, tmp_path):
    dst = _copy(good, tmp_path)
    path = os.path.join(dst, "model.safetensors")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 1000)
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(dst)


def test_garbage_header(good, tmp_path):
    dst = _copy(good, tmp_path)
    with open(os.path.join(dst, "model.safetensors"), "wb") as f:
        f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(dst)


def test_unsupported_architecture(good, tmp_path):
    dst = _copy(good, tmp_path)
    cfg_path = os.path.join(dst, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(UnsupportedModelError, match="supports Qwen2ForCausalLM, Qwen3ForCausalLM, LlamaForCausalLM"):
        load_model(dst)


def test_misshapen_missing_unexpected(good, tmp_path):
    dst = _copy(good, tmp_path)
    path = os.path.join(dst, "model.safetensors")
    t = load_file(path)
    t["model.layers.0.mlp.up_proj.weight"] = t["model.layers.0.mlp.up_proj.weight"][:-1]
    del t["model.layers.1.self_attn.k_proj.bias"]
    t["model.layers.1.extra.weight"] = np.zeros(3, np.float32)
    save_file(t, path, {"format": "pt"})
    with pytest.raises(CheckpointError) as e:
        load_model(dst)
    msg = str(e.value)
    assert "missing 1" in msg and "k_proj.bias" in msg
    assert "unexpected 1" in msg and "extra.weight" in msg
    assert "misshapen" in msg and "up_proj" in msg


def test_sharded_checkpoint_with_missing_shard(good, tmp_path):
    dst = _copy(good, tmp_path)
    t = load_file(os.path.join(dst, "model.safetensors"))
    os.remove(os.path.join(dst, "model.safetensors"))
    names = sorted(t)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for fname, keys in shards.items():
        save_file({k: t[k] for k in keys}, os.path.join(dst, fname), {"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}
    json.dump(index, open(os.path.join(dst, "model.safetensors.index.json"), "w"))
    model = load_model(dst, dtype="fp32")  # sharded loads
    assert model.config.num_layers == 2
    os.remove(os.path.join(dst, "model-00002-of-00002.safetensors"))
    with pytest.raises(CheckpointError, match="shard .* missing"):
        load_model(dst)


def test_bf16_round_trip_through_our_writer(tmp_path):
    import ml_dtypes

    a = (np.arange(12, dtype=np.float32) / 7).astype(ml_dtypes.bfloat16).reshape(3, 4)
    save_file({"a": a, "b": np.arange(5, dtype=np.int32)}, str(tmp_path / "x.safetensors"))
    got = load_file(str(tmp_path / "x.safetensors"))
    assert got["a"].dtype == a.dtype and (got["a"] == a).all() and (got["b"] == np.arange(5)).all()
