"""Our auto_round / auto_gptq / auto_awq exports against the reference's: the same tensors byte for byte, the same
quantization_config, and transformers + auto-round load them with logits equal to our packed JAX forward."""

import json
import os
import shutil

import pytest

from autoround_jax import load_quantized
from autoround_jax.io.safetensors_io import load_file
from autoround_jax.tuning.autoround import AutoRound
from tests.formats import reference

pytest.importorskip("auto_round")
VERSION_KEYS = ("autoround_version", "autoround_jax_version")


def our_export(src: str, out: str, fmt: str, **kw) -> str:
    ar = AutoRound(src, tokenizer=object(), iters=0, disable_opt_rtn=True, model_dtype="fp32", progress=False, amp=False,
                   **kw)  # the reference is pinned to amp=False too (tests/formats/reference.py)
    ar.quantize()
    return ar.save_quantized(out, format=fmt)


def read_config(folder: str) -> tuple[dict, dict]:
    """(config.json without quantization_config, quantization_config without version keys, lists as sets)."""
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    qc = cfg.pop("quantization_config")
    with open(os.path.join(folder, "quantization_config.json")) as f:
        assert json.load(f) == qc
    return cfg, {k: sorted(v) if isinstance(v, list) and k == "modules_to_not_convert" else v
                 for k, v in qc.items() if k not in VERSION_KEYS}


def assert_same_tensors(ours: str, ref: str) -> None:
    a, b = load_file(os.path.join(ours, "model.safetensors")), load_file(os.path.join(ref, "model.safetensors"))
    assert sorted(a) == sorted(b)
    bad = [k for k in a if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or a[k].tobytes() != b[k].tobytes()]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:3]}"


@pytest.mark.parametrize("case", list(reference.CASES))
def test_rtn_export_equals_reference(case, tiny_src, reference_folder, tmp_path):
    family, scheme, fmt = reference.CASES[case]
    ref = reference_folder(case)
    ours = our_export(tiny_src(family), str(tmp_path / "out"), fmt, **scheme)
    assert_same_tensors(ours, ref)
    (our_cfg, our_qc), (ref_cfg, ref_qc) = read_config(ours), read_config(ref)
    assert our_qc == ref_qc
    assert our_cfg == ref_cfg
    assert set(os.listdir(ref)) <= set(os.listdir(ours))


@pytest.mark.parametrize("case", ["q2_w4g32_sym", "q2_w3gm1_asym", "q3_w8g32_sym_mixed", "q3_gptq_mixed"])
def test_export_loads_in_transformers_like_ours(case, tiny_src, tmp_path):
    family, scheme, fmt = reference.CASES[case]
    folder = our_export(tiny_src(family), str(tmp_path / "out"), fmt, **scheme)
    ours = load_quantized(folder, dtype="fp32")
    reference.assert_matches_transformers(folder, ours, reference.calibration_ids(2, 24))


def test_tuned_export_records_the_reference_settings(tiny_src, reference_folder, tmp_path):
    ar = AutoRound(tiny_src("qwen2_tune"), tokenizer=object(), dataset=reference.calibration_ids(), bits=4,
                   group_size=32, sym=True, model_dtype="fp32", progress=False, amp=False, **reference.TUNED)
    ar.quantize()
    ours = ar.save_quantized(str(tmp_path / "out"), format="auto_round")
    assert read_config(ours)[1] == read_config(reference_folder("tuned"))[1]
    assert os.path.isfile(os.path.join(ours, "report.md"))


def test_several_formats_write_the_reference_subfolders(tiny_src, tmp_path):
    ar = AutoRound(tiny_src("qwen3_tune"), tokenizer=object(), iters=0, bits=4, group_size=32, sym=False,
                   disable_opt_rtn=True, model_dtype="fp32", progress=False)
    ar.quantize()
    out = ar.save_quantized(str(tmp_path / "out"), format="auto_round,auto_gptq,auto_awq,fake")
    assert sorted(os.listdir(out)) == ["auto-awq", "auto-gptq", "auto-round-auto-awq", "fake"]
    for sub in ("auto-awq", "auto-gptq", "auto-round-auto-awq"):
        load_quantized(os.path.join(out, sub), dtype="fp32")  # each one imports (shapes checked)
    a = load_file(os.path.join(out, "auto-awq", "model.safetensors"))
    b = load_file(os.path.join(out, "auto-round-auto-awq", "model.safetensors"))
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)  # same AWQ packing, different config


def test_asym_4bit_falls_back_to_gptq_layout_where_awq_cannot_pack(tiny_src, tmp_path):
    """Qwen2's down_proj (K=320) at G=128 fits no AWQ layout: the reference crashes, we write "auto_round"."""
    out = our_export(tiny_src("qwen2_tune"), str(tmp_path / "out"), "auto_round", bits=4, group_size=128, sym=False)
    assert read_config(out)[1]["packing_format"] == "auto_round"
    with pytest.raises(ValueError, match="auto_awq needs 4-bit"):
        our_export(tiny_src("qwen2_tune"), str(tmp_path / "awq"), "auto_awq", bits=4, group_size=128, sym=False)
    assert not os.path.exists(tmp_path / "awq")


def test_bad_formats_are_one_line_errors(tiny_src, tmp_path):
    ar = AutoRound(tiny_src("qwen3_tune"), tokenizer=object(), iters=0, bits=3, group_size=32, model_dtype="fp32",
                   disable_opt_rtn=True, progress=False)
    ar.quantize()
    with pytest.raises(ValueError, match="unknown format 'gguf'"):
        ar.save_quantized(str(tmp_path / "a"), format="auto_round,gguf")
    with pytest.raises(ValueError, match="auto_awq needs 4-bit"):
        ar.save_quantized(str(tmp_path / "b"), format="auto_awq")
    assert os.listdir(tmp_path) == []


def test_cli_quantize_writes_packed_formats(tiny_src, smollm2_dir, tmp_path, capsys):
    from autoround_jax.cli import run

    src = shutil.copytree(tiny_src("qwen3_tune"), str(tmp_path / "tiny"))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(smollm2_dir, f), src)
    args = ["--model", src, "--iters", "0", "--disable_opt_rtn", "--bits", "4", "--group_size", "32",
            "--model_dtype", "fp32",
            "--format", "auto_round,auto_gptq", "--output_dir", str(tmp_path / "out")]
    assert run(args) == 0
    out = tmp_path / "out" / "tiny-w4g32"
    assert sorted(os.listdir(out)) == ["auto-gptq", "auto-round-auto-gptq"]
    assert (out / "auto-round-auto-gptq" / "tokenizer.json").is_file()
    assert run([*args[:-4], "--format", "auto_round,gguf", "--output_dir", str(tmp_path / "bad")]) == 2
    assert "unknown --format gguf" in capsys.readouterr().err
