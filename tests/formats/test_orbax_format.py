"""The orbax quantized checkpoint (formats/orbax_format.py): auto_round -> orbax -> auto_round gives back every
tensor byte for byte (sym and asym, 2/3/4/8 bits, layer 5's MLP kept in float), conversions from it equal those from
the auto_round source, its logits equal the auto_round checkpoint's, and the documented jax+orbax-only restore puts
it on a mesh of 4 simulated devices."""

import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from autoround_jax import load_quantized
from autoround_jax.cli import run
from autoround_jax.formats.orbax_format import restore_state
from autoround_jax.formats.quantized_import import convert, is_quantized
from autoround_jax.io.safetensors_io import CheckpointError, SafetensorsFile
from autoround_jax.tuning.autoround import AutoRound
from tests.tiny_models import build_model, save_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FLOAT_MLP = "model.layers.5.mlp"  # kept in float, as the Qwen2.5-32B card's command does


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A 6-block model with biases and an untied head."""
    return save_model(build_model("qwen2_tune", num_layers=6), str(tmp_path_factory.mktemp("tiny6")))


def _auto_round(folder, out, bits, sym, dtype="fp32"):
    ar = AutoRound(folder, bits=bits, group_size=32, sym=sym, iters=0, disable_opt_rtn=True, fp_layers=FLOAT_MLP,
                   model_dtype=dtype, progress=False)
    ar.quantize()
    return ar.save_quantized(out, format="auto_round")


@pytest.fixture(scope="module")
def exports(folder, tmp_path_factory):
    """(bits, sym, dtype) -> (auto_round folder, its orbax conversion), made once per module."""
    cache = {}

    def get(bits, sym, dtype="fp32"):
        if (bits, sym, dtype) not in cache:
            base = tmp_path_factory.mktemp(f"w{bits}{'sym' if sym else 'asym'}{dtype}")
            src = _auto_round(folder, str(base / "ar"), bits, sym, dtype)
            cache[bits, sym, dtype] = src, convert(src, str(base / "orbax"), to="orbax")
        return cache[bits, sym, dtype]

    return get


def _tensors(folder):
    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            sf = SafetensorsFile(os.path.join(folder, f))
            out.update({k: sf.get(k) for k in sf.keys()})
    return out


def _assert_same_tensors(a, b):
    ta, tb = _tensors(a), _tensors(b)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape, k
        assert ta[k].tobytes() == tb[k].tobytes(), k


def _config(folder):
    with open(os.path.join(folder, "config.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("bits, sym, dtype", [(2, True, "fp32"), (3, True, "fp32"), (4, True, "bf16"),
                                              (8, True, "fp32"), (2, False, "fp32"), (3, False, "bf16"),
                                              (4, False, "fp32"), (8, False, "fp32")])
def test_auto_round_orbax_auto_round_is_lossless(exports, tmp_path, bits, sym, dtype):
    src, orb = exports(bits, sym, dtype)
    assert is_quantized(orb) and {"config.json", "state"} <= set(os.listdir(orb))
    assert not any(f.endswith(".safetensors") for f in os.listdir(orb))
    tree = restore_state(orb)
    up0, up5 = tree["layers"]["0"]["mlp"]["up_proj"]["weight"], tree["layers"]["5"]["mlp"]["up_proj"]["weight"]
    assert sorted(up0) == ["qvalue", "scale", "zero_point"] and sorted(up5) == ["w"]
    assert up0["qvalue"].dtype == np.int32 and up0["qvalue"].shape == (128 * bits // 32, 320)
    assert up0["scale"].shape == up0["zero_point"].shape == (4, 320)
    back = convert(orb, str(tmp_path / "back"), to="auto_round")
    _assert_same_tensors(src, back)
    # config.json as a direct auto_round -> auto_round conversion writes it (quantization_config with extra_config for
    # layer 5's MLP included; its dtype follows the stored floats, which differs from src for fp32 tensors in a bf16
    # export: the importer's behaviour, not this format's)
    assert _config(back) == _config(convert(src, str(tmp_path / "direct"), to="auto_round"))
    assert _config(back)["quantization_config"] == _config(src)["quantization_config"]


@pytest.mark.parametrize("bits, sym", [(4, False)])
def test_logits_and_conversions_equal_the_auto_round_source(exports, tmp_path, bits, sym):
    src, orb = exports(bits, sym)
    ids = np.random.default_rng(0).integers(3, 301, size=(2, 12)).astype(np.int32)
    want = np.asarray(load_quantized(src)(ids))
    np.testing.assert_array_equal(np.asarray(load_quantized(orb)(ids)), want)
    targets = ["float", "auto_gptq"] + (["auto_awq"] if bits == 4 else [])
    for to in targets:
        a = convert(src, str(tmp_path / f"from-ar-{to}"), to=to)
        b = convert(orb, str(tmp_path / f"from-orbax-{to}"), to=to)
        _assert_same_tensors(a, b)
        assert _config(a) == _config(b), to


def test_save_quantized_orbax_and_cli_convert(folder, tmp_path, capsys):
    ar = AutoRound(folder, bits=4, group_size=32, iters=0, disable_opt_rtn=True, model_dtype="fp32", progress=False)
    ar.quantize()
    orb = ar.save_quantized(str(tmp_path / "run-orbax"), format="orbax")
    assert "report.md" in os.listdir(orb)
    ref = ar.save_quantized(str(tmp_path / "run-ar"), format="auto_round")
    assert run(["convert", orb, str(tmp_path / "cli-ar"), "--to", "auto_round"]) == 0
    _assert_same_tensors(ref, str(tmp_path / "cli-ar"))
    assert _config(ref) == _config(str(tmp_path / "cli-ar"))
    assert run(["convert", ref, str(tmp_path / "cli-orbax"), "--to", "orbax"]) == 0
    assert "(orbax)" in capsys.readouterr().out


def test_an_orbax_checkpoint_not_ours_fails_in_one_line(exports, tmp_path):
    import shutil

    import orbax.checkpoint as ocp

    orb = shutil.copytree(exports(4, False)[1], str(tmp_path / "orbax"))
    state = os.path.join(orb, "state")
    tree = restore_state(orb)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(state, tree, force=True, custom_metadata={"format": "something else"})
    ckpt.wait_until_finished()
    with pytest.raises(CheckpointError, match="no autoround_jax.orbax metadata"):
        load_quantized(orb)


def test_documented_restore_shards_onto_a_mesh(exports):
    """docs/formats.md's example, as written, on 4 simulated CPU devices; then restore_state with the project's
    partition rules; both equal the plain restore."""
    src, orb = exports(4, False)
    doc = open(os.path.join(ROOT, "docs", "formats.md")).read()
    example = re.search(r"<!-- restore-example -->\n```python\n(.*?)```", doc, re.S).group(1)
    example = example.replace('"out/model-orbax/state"', repr(os.path.join(orb, "state")))
    assert len(example.strip().splitlines()) <= 13
    code = example + textwrap.dedent("""
        from jax.sharding import Mesh
        from autoround_jax.formats.orbax_format import restore_state
        assert len(jax.devices()) == 4
        plain = restore_state(PATH)
        ours = restore_state(PATH, Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "fsdp")))
        q = ours["layers"]["0"]["mlp"]["up_proj"]["weight"]["qvalue"]
        assert {s.data.shape for s in q.addressable_shards} == {(16, 160)}, [s.data.shape for s in q.addressable_shards]
        assert {s.data.shape for s in up["qvalue"].addressable_shards} == {(16, 80)}
        assert info["layers"]["model.layers.5.mlp.up_proj"] is None and info["scheme"]["bits"] == 4
        for a, b, c in zip(jax.tree.leaves(plain), jax.tree.leaves(ours), jax.tree.leaves(state)):
            assert np.asarray(a).tobytes() == np.asarray(b).tobytes() == np.asarray(c).tobytes()
        b = 4
        import jax.numpy as jnp
        codes = ((up["qvalue"][:, None, :] >> (b * jnp.arange(32 // b))[None, :, None]) & (2**b - 1)).reshape(128, 320)
        from autoround_jax.formats.quantized_import import open_quantized
        want = open_quantized(SRC).quantized["model.layers.0.mlp.up_proj"].codes.T  # the auto_round source's codes
        assert np.array_equal(np.asarray(codes), want)
        print("ok")
    """).replace("PATH", repr(orb)).replace("SRC", repr(src))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": ROOT}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().startswith("ok"), out.stderr[-3000:]
