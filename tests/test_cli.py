"""The command line end to end on a tiny Qwen3 that borrows SmolLM2's tokenizer; errors are one line, no traceback."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from autoround_jax import load_quantized
from tests.tiny_models import build_model, save_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture(scope="module")
def tiny_with_tokenizer(tmp_path_factory, smollm2_dir):
    folder = save_model(build_model("qwen3_tune", num_layers=2, vocab_size=49152), str(tmp_path_factory.mktemp("cli")))
    for f in TOKENIZER_FILES:
        shutil.copy(os.path.join(smollm2_dir, f), folder)
    return folder


def _cli(*args, cwd=None):
    code = "import sys; from autoround_jax.cli import run; sys.exit(run(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"})


def test_quantize_export_and_reload(tiny_with_tokenizer, tmp_path):
    out = tmp_path / "out"
    args = ["--model", tiny_with_tokenizer, "--iter", "3", "--nsamples", "4", "--seqlen", "32", "--batch_size", "2",
            "--dataset", "fortunes", "--output_dir", str(out), "--device", "0", "--disable_eval",
            "--model_dtype", "fp32", "--fp_layers", "model.layers.1.mlp.down_proj"]
    r = _cli(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    folder = out / f"{os.path.basename(tiny_with_tokenizer)}-w4g128"
    for f in ("model.safetensors", "config.json", "quantization_config.json", "report.md", "loss.png",
              "tokenizer.json"):
        assert (folder / f).is_file(), f
    assert "loss iter 0" in r.stderr or "blocks" in r.stderr
    qcfg = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qcfg["packing_format"] == "auto_round:auto_gptq" and qcfg["bits"] == 4  # the default format is auto_round
    assert qcfg["extra_config"]["model.layers.1.mlp.down_proj"]["bits"] == 16  # --fp_layers
    model = load_quantized(str(folder), dtype="fp32")
    assert np.isfinite(np.asarray(model(np.array([[5, 6, 7]], np.int32)))).all()
    again = _cli(*args)  # never overwrite silently
    assert again.returncode == 2 and "not empty" in again.stderr and "Traceback" not in again.stderr
    assert _cli(*args, "--overwrite").returncode == 0


@pytest.mark.parametrize("args, message", [
    (["--bits", "5"], "bits 5 is not supported"),
    (["--model", "/no/such/model"], "not found"),
    (["--dataset", "/no/such/file.jsonl", "--iters", "2"], "not found"),
    (["perplexity", "--text", "/no/such/text.txt"], "not found"),
])
def test_bad_input_is_one_line(tiny_with_tokenizer, args, message, tmp_path):
    if "--model" not in args and args[0] != "perplexity":
        args = ["--model", tiny_with_tokenizer, "--output_dir", str(tmp_path), *args]
    elif args[0] == "perplexity":
        args = [*args, "--model", tiny_with_tokenizer]
    r = _cli(*args)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_opt_rtn_flags_presets_and_console_script():
    """The reference's RTN group: --disable_opt_rtn / --enable_opt_rtn (alias --opt_rtn), rtn and opt-rtn recipes."""
    import tomllib

    from autoround_jax.cli import build_quantize_parser
    from autoround_jax.tuning.autoround import PRESETS

    p = build_quantize_parser()
    assert p.parse_args([]).disable_opt_rtn is None
    assert p.parse_args(["--disable_opt_rtn"]).disable_opt_rtn is True
    assert p.parse_args(["--enable_opt_rtn"]).disable_opt_rtn is False
    assert p.parse_args(["--opt_rtn"]).disable_opt_rtn is False
    with pytest.raises(SystemExit):
        p.parse_args(["--disable_opt_rtn", "--enable_opt_rtn"])
    assert PRESETS["rtn"]["disable_opt_rtn"] is True and PRESETS["opt-rtn"]["disable_opt_rtn"] is False
    assert PRESETS["opt-rtn"]["iters"] == PRESETS["rtn"]["iters"] == 0
    assert build_quantize_parser("opt-rtn").prog == "autoround-jax-opt-rtn"
    with open(os.path.join(os.path.dirname(__file__), "..", "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert scripts["autoround-jax-opt-rtn"] == "autoround_jax.cli:main_opt_rtn"


def test_disable_opt_rtn_keeps_plain_rtn_without_data(tmp_path, capsys):
    """A folder without a tokenizer: plain RTN (flag or rtn recipe) runs; default iters 0 (opt-RTN) explains."""
    from autoround_jax.cli import run
    from autoround_jax.io.safetensors_io import load_file

    src = save_model(build_model("qwen3_tune", num_layers=1), str(tmp_path / "tiny"))
    common = ["--model", src, "--bits", "4", "--group_size", "32", "--model_dtype", "fp32", "--format", "fake"]
    assert run([*common, "--iters", "0", "--disable_opt_rtn", "--output_dir", str(tmp_path / "a")]) == 0
    assert "plain RTN" in capsys.readouterr().out
    assert run([*common, "--preset", "rtn", "--output_dir", str(tmp_path / "b")]) == 0
    a, b = (load_file(str(tmp_path / d / "tiny-w4g32" / "model.safetensors")) for d in ("a", "b"))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    assert run([*common, "--iters", "0", "--dataset", "fortunes", "--output_dir", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "--disable_opt_rtn" in err and len(err.strip().splitlines()) == 1, err
