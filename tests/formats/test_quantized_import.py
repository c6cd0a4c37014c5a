"""Importing packed checkpoints: the reference's exports (tuned included) load into our packed leaf with the
reference's codes and logits, re-export byte for byte, dequantize like the reference, and bad input fails in one
line without leaving an output folder behind."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from autoround_jax import load_model, load_quantized
from autoround_jax.cli import run
from autoround_jax.formats.auto_round import PACKINGS
from autoround_jax.io.hf_folder import write_sharded
from autoround_jax.formats.quantized_import import convert, open_quantized, packing_of
from autoround_jax.io.safetensors_io import load_file, save_file
from autoround_jax.quant.packed_weight import PackedWeight
from autoround_jax.quant.qdq import QuantizedWeight

VERSION_KEYS = ("autoround_version", "autoround_jax_version")


def quantization_config(folder: str) -> dict:
    with open(os.path.join(folder, "config.json")) as f:
        qc = json.load(f)["quantization_config"]
    return {k: sorted(v) if k == "modules_to_not_convert" else v for k, v in qc.items() if k not in VERSION_KEYS}


def edit_config(folder: str, edit) -> None:
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    edit(cfg)
    with open(path, "w") as f:
        json.dump(cfg, f)


def copy(folder: str, tmp_path) -> str:
    return shutil.copytree(folder, str(tmp_path / "src"))


# -- the packed leaf (no reference needed) --------------------------------------------------------------------------
@pytest.mark.parametrize("bits, group_size", [(2, 32), (3, -1), (4, 32), (8, 64)])
def test_packed_leaf_dequantizes_and_multiplies(bits, group_size):
    rng = np.random.default_rng(bits)
    n, k = 64, 128
    ng = 1 if group_size == -1 else k // group_size
    qw = QuantizedWeight(codes=rng.integers(0, 2**bits, (n, k)).astype(np.uint8),
                         scales=rng.normal(0, 0.02, (n, ng)).astype(np.float16),
                         zeros=rng.integers(0, 2**bits, (n, ng)).astype(np.int32), bits=bits, group_size=group_size,
                         sym=False)
    g = k if group_size == -1 else group_size
    want = ((qw.codes.astype(np.float32) - np.repeat(qw.zeros, g, 1)) * np.repeat(qw.scales, g, 1).astype(np.float32))
    leaf = PackedWeight.from_quantized(qw)
    assert leaf.shape == (n, k)
    np.testing.assert_array_equal(np.asarray(leaf.dequantize()), want.astype(np.float16))
    x = rng.normal(size=(2, 3, k)).astype(np.float32)
    graphdef, state = nnx.split(leaf)
    y = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(y), x @ want.T, rtol=2e-3, atol=2e-3 * np.abs(x @ want.T).max())


def test_unknown_backend_is_refused():
    qw = QuantizedWeight(np.zeros((32, 32), np.uint8), np.ones((32, 1), np.float16), np.zeros((32, 1), np.int32),
                         4, -1, False)
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        PackedWeight.from_quantized(qw, backend="cuda")


# -- against the reference ------------------------------------------------------------------------------------------
def test_tuned_reference_export_imports_with_its_codes_and_logits(reference_folder, tiny_src):
    from autoround_jax.tuning.autoround import AutoRound
    from tests.formats import reference

    folder = reference_folder("tuned")
    qm = open_quantized(folder)
    rtn = AutoRound(tiny_src("qwen2_tune"), tokenizer=object(), iters=0, bits=4, group_size=32, model_dtype="fp32",
                    disable_opt_rtn=True, progress=False)
    rtn.quantize()
    tuned_away = 0
    for name, qw in qm.quantized.items():
        words = qm.reader.get(f"{name}.qweight").view(np.uint32)  # oracle-notes: q[8r + i, n] = word[r, n] >> 4i
        shifts = (4 * np.arange(8, dtype=np.uint32))[None, :, None]
        codes = ((words[:, None, :] >> shifts) & 15).reshape(-1, words.shape[1])
        np.testing.assert_array_equal(qw.codes, codes.T, err_msg=name)
        tuned_away += int((qw.codes != rtn.quantized[name].codes).any())
    assert tuned_away > 0  # the reference's tuning moved codes off RTN, so this is not an RTN test in disguise
    ours = load_quantized(folder, dtype="fp32")
    reference.assert_matches_transformers(folder, ours, reference.calibration_ids(2, 24))


@pytest.mark.parametrize("case", ["tuned", "q2_w4g32_sym", "q3_w4g128_asym", "q2_w3gm1_asym", "q3_w8g32_sym_mixed",
                                  "q3_w4g32_asym_mixed", "q2_w4g32_asym_fp", "q3_gptq_mixed", "q2_gptq_asym",
                                  "q3_awq_fp", "q2_w2g128_sym"])
def test_import_export_round_trip_is_byte_identical(case, reference_folder, tmp_path):
    ref = reference_folder(case)
    fmt = {"auto-round": "auto_round", "gptq": "auto_gptq", "awq": "auto_awq"}[quantization_config(ref)["quant_method"]]
    out = convert(ref, str(tmp_path / "out"), to=fmt)
    a, b = load_file(os.path.join(out, "model.safetensors")), load_file(os.path.join(ref, "model.safetensors"))
    assert sorted(a) == sorted(b)
    assert all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].tobytes() == b[k].tobytes() for k in a)
    assert quantization_config(out) == quantization_config(ref)


def _reference_weight(folder: str, name: str, packing: str, scheme):
    """W [N, K] (fp16 values) by the reference's own code for this packing."""
    import torch

    from tests.formats import reference

    tensors = load_file(os.path.join(folder, "model.safetensors"))
    t = {s: tensors[f"{name}.{s}"] for s in ("qweight", "qzeros", "scales")}
    if PACKINGS[packing].layout == "awq":
        return reference.awq_weight(t, scheme.bits, scheme.group_size)
    if PACKINGS[packing].zero_offset:
        from auto_round_extension.torch.qlinear_torch_zp import QuantLinear
    else:
        from auto_round_extension.torch.qlinear_torch import QuantLinear
    k = t["qweight"].shape[0] * 32 // scheme.bits
    layer = QuantLinear(scheme.bits, scheme.group_size, k, t["scales"].shape[1], bias=False)
    for s, v in t.items():
        setattr(layer, s, torch.from_numpy(np.array(v)))
    return reference.quant_linear_weight(layer)


@pytest.mark.parametrize("case", ["q2_w4g32_sym", "q2_w3gm1_asym", "q3_w4g128_asym", "q3_awq_fp", "q3_w8g32_sym_mixed"])
def test_float_export_matches_the_reference_dequantization(case, reference_folder, tmp_path):
    ref = reference_folder(case)
    qm = open_quantized(ref)
    out = convert(ref, str(tmp_path / "float"), to="float")
    weights = load_file(os.path.join(out, "model.safetensors"))
    packing = packing_of(json.load(open(os.path.join(ref, "config.json")))["quantization_config"])
    for name, scheme in qm.layer_config.items():
        if scheme is not None:
            want = _reference_weight(ref, name, packing, scheme).astype(np.float32)
            np.testing.assert_array_equal(weights[f"{name}.weight"], want, err_msg=name)
    with open(os.path.join(out, "config.json")) as f:
        assert "quantization_config" not in json.load(f)
    ids = np.arange(24, dtype=np.int32).reshape(2, 12)
    np.testing.assert_allclose(np.asarray(load_model(out)(ids)), np.asarray(load_quantized(ref, dtype="fp32")(ids)),
                               atol=5e-3)


def test_legacy_and_side_file_configs_import_the_same(reference_folder, tmp_path):
    def same(a: str, b: str) -> None:
        qa, qb = open_quantized(a), open_quantized(b)
        assert qa.layer_config == qb.layer_config
        for name in qa.quantized:
            x, y = qa.quantized[name], qb.quantized[name]
            assert (x.codes == y.codes).all() and (x.scales == y.scales).all() and (x.zeros == y.zeros).all()

    def legacy(backend):
        def edit(cfg):
            qc = cfg["quantization_config"]
            qc.pop("packing_format")
            qc.update(quant_method="intel/auto-round", backend=backend)
        return edit

    for case, backend in (("q2_w4g32_sym", "auto_round:gptq"), ("q3_w4g128_asym", "auto_round:awq")):
        ref = reference_folder(case)
        old = shutil.copytree(ref, str(tmp_path / case))
        edit_config(old, legacy(backend))
        same(ref, old)
    ref = reference_folder("q3_gptq_mixed")
    side = shutil.copytree(ref, str(tmp_path / "side"))  # AutoGPTQ: quantize_config.json, no quant_method
    qc = json.load(open(os.path.join(side, "quantization_config.json")))
    qc.pop("quant_method")
    os.remove(os.path.join(side, "quantization_config.json"))
    json.dump(qc, open(os.path.join(side, "quantize_config.json"), "w"))
    edit_config(side, lambda cfg: cfg.pop("quantization_config"))
    same(ref, side)


# -- bad input ------------------------------------------------------------------------------------------------------
def _truncate(src):
    path = os.path.join(src, "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)


def _corrupt_header(src):
    with open(os.path.join(src, "model.safetensors"), "r+b") as f:
        f.seek(8)
        f.write(b"\xff" * 16)


def _missing_shard(src):
    tensors = load_file(os.path.join(src, "model.safetensors"))
    os.remove(os.path.join(src, "model.safetensors"))
    write_sharded(iter(tensors.items()), src, max_shard_bytes=200_000)
    with open(os.path.join(src, "model.safetensors.index.json")) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    os.remove(os.path.join(src, shards[1]))


def _unquantized(src):
    edit_config(src, lambda cfg: cfg.pop("quantization_config"))
    os.remove(os.path.join(src, "quantization_config.json"))


def _config(**changes):
    return lambda src: edit_config(src, lambda cfg: cfg["quantization_config"].update(changes))


def _qwen3_config(src):
    edit_config(src, lambda cfg: cfg.update(model_type="qwen3", architectures=["Qwen3ForCausalLM"]))


BAD = {
    "truncated": (_truncate, "truncated file"),
    "corrupt header": (_corrupt_header, "corrupt"),
    "missing shard": (_missing_shard, "shard listed in model.safetensors.index.json is missing"),
    "unknown packing": (_config(packing_format="auto_round:fp8_static"),
                        "unknown packing_format 'auto_round:fp8_static'"),
    "group size": (_config(group_size=64), r"shapes disagree with the config\): model.layers.0.mlp.down_proj.qzeros "
                                           r"\(10, 16\) != \(5, 16\)"),
    "bits": (_config(bits=6), "unsupported scheme"),
    "architecture": (_qwen3_config, "missing 4 tensors"),
    "float": (_unquantized, "not a quantized checkpoint"),
}


@pytest.mark.parametrize("bad", list(BAD))
def test_bad_checkpoints_fail_in_one_line(bad, reference_folder, tmp_path):
    src = copy(reference_folder("q2_w4g32_sym"), tmp_path)
    damage, message = BAD[bad]
    damage(src)
    dst = tmp_path / "out"
    with pytest.raises(ValueError, match=message) as e:
        convert(src, str(dst), to="float")
    assert "\n" not in str(e.value) and not dst.exists()
    assert sorted(os.listdir(tmp_path)) == ["src"]  # no temporary folder left behind


def test_failure_while_writing_leaves_no_output(reference_folder, tmp_path, capsys):
    src = copy(reference_folder("q3_gptq_mixed"), tmp_path)
    path = os.path.join(src, "model.safetensors")
    tensors = load_file(path)
    tensors["model.layers.1.mlp.up_proj.g_idx"] = tensors["model.layers.1.mlp.up_proj.g_idx"][::-1].copy()
    save_file(tensors, path, metadata={"format": "pt"})  # an act-order g_idx, found only when block 1 is written
    capsys.readouterr()  # drop what building the reference fixture printed
    assert run(["convert", src, str(tmp_path / "out"), "--to", "auto_round"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("autoround-jax: error: ") and "act-order" in err and "\n" not in err
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_cli_convert(reference_folder, tmp_path, capsys):
    ref, out = reference_folder("q3_awq_fp"), str(tmp_path / "out")
    assert run(["convert", ref, out, "--to", "auto_round"]) == 0
    assert quantization_config(out)["packing_format"] == "auto_round:auto_awq"
    assert run(["convert", ref, out, "--to", "auto_gptq"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert run(["convert", ref, out, "--to", "auto_gptq", "--overwrite"]) == 0
    assert quantization_config(out)["quant_method"] == "gptq"
    load_quantized(out, dtype="fp32")
    with pytest.raises(SystemExit):
        run(["convert", ref, out, "--to", "gguf"])
