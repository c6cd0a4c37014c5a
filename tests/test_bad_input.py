"""Bad input never becomes a bad model (issue 16), through the command line in-process.

Every fault gives exit 2, one line `autoround-jax: error: ...` naming the problem and the fix, no traceback, and no
output folder; a failure in block k leaves an existing export byte-identical; every command loads what the others
write.
"""

import hashlib
import json
import os
import shutil

import numpy as np
import pytest

from autoround_jax.cli import run
from autoround_jax.io.safetensors_io import load_file, save_file
from tests.tiny_models import build_model, save_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
RTN = ["--iters", "0", "--disable_opt_rtn", "--bits", "4", "--group_size", "32", "--model_dtype", "fp32"]


@pytest.fixture(scope="module")
def bare(tmp_path_factory):
    """A tiny 2-block Qwen3 (vocab 301) without a tokenizer: plain RTN needs none."""
    return save_model(build_model("qwen3_tune", num_layers=2), str(tmp_path_factory.mktemp("bare")))


@pytest.fixture(scope="module")
def chat(tmp_path_factory, smollm2_dir):
    """A tiny 2-block Qwen3 with SmolLM2's tokenizer (vocab 49152, as the tokenizer's)."""
    folder = save_model(build_model("qwen3_tune", num_layers=2, vocab_size=49152), str(tmp_path_factory.mktemp("chat")))
    for f in TOKENIZER_FILES:
        shutil.copy(os.path.join(smollm2_dir, f), folder)
    return folder


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory, bare, smollm2_dir):
    """The 301-token model with SmolLM2's 49152-token tokenizer: ids beyond the embedding."""
    folder = str(tmp_path_factory.mktemp("small_vocab") / "m")
    shutil.copytree(bare, folder)
    for f in TOKENIZER_FILES:
        shutil.copy(os.path.join(smollm2_dir, f), folder)
    return folder


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "t.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 8)
    return str(path)


def _copy(src, tmp_path, name="m"):
    dst = str(tmp_path / name)
    shutil.copytree(src, dst)
    return dst


def _plant(folder, name, value, index=(0, 0)):
    path = os.path.join(folder, "model.safetensors")
    t = load_file(path)
    t[name] = t[name].copy()
    t[name][index] = value
    save_file(t, path, {"format": "pt"})


def _tree_digest(folder):
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = (hashlib.sha256(fh.read()).hexdigest(), os.stat(p).st_mtime_ns)
    return out


def fails(capsys, args, *fragments):
    """run(args) must exit 2 with a single `autoround-jax: error:` line holding every fragment; returns it."""
    capsys.readouterr()
    code = run([str(a) for a in args])
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip() and "blocks:" not in line]  # tqdm's bar may run first
    assert code == 2, (out, err)
    assert "Traceback" not in err and "Traceback" not in out
    assert len(lines) == 1 and lines[0].startswith("autoround-jax: error: "), err
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


# -- non-finite values --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tensor, value, fragments", [
    ("model.layers.1.self_attn.q_proj.weight", np.nan, ["model.layers.1.self_attn.q_proj.weight (block 1)", "1 NaN"]),
    ("model.layers.0.mlp.down_proj.weight", np.inf, ["model.layers.0.mlp.down_proj.weight (block 0)", "1 inf"]),
    ("model.embed_tokens.weight", np.nan, ["model.embed_tokens.weight", "1 NaN"]),
    ("model.layers.1.post_attention_layernorm.weight", np.nan, ["post_attention_layernorm.weight (block 1)"]),
    # finite in the checkpoint, but its RTN scale (1e6 / 8) overflows the float16 every export stores scales in
    ("model.layers.1.mlp.up_proj.weight", 1e6, ["model.layers.1.mlp.up_proj (block 1)", "--fp_layers"]),
])
def test_nonfinite_weights_stop_quantization(bare, tmp_path, capsys, tensor, value, fragments):
    src = _copy(bare, tmp_path)
    _plant(src, tensor, value, (0,) if tensor.endswith("norm.weight") else (0, 0))
    out = tmp_path / "out"
    fails(capsys, ["--model", src, *RTN, "--output_dir", out], *fragments)
    assert not out.exists()
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_nonfinite_weights_stop_tuning_perplexity_and_generate(chat, tmp_path, capsys, text_file):
    src = _copy(chat, tmp_path)
    _plant(src, "model.layers.0.mlp.gate_proj.weight", np.nan)
    out = tmp_path / "out"
    fails(capsys, ["--model", src, "--iters", "2", "--nsamples", "2", "--seqlen", "16", "--batch_size", "2",
                   "--dataset", "fortunes", "--model_dtype", "fp32", "--output_dir", out],
          "model.layers.0.mlp.gate_proj.weight (block 0)")
    assert not out.exists()
    fails(capsys, ["perplexity", "--model", src, "--text", text_file], "gate_proj.weight (block 0)", "NaN")
    fails(capsys, ["generate", "--model", src, "--prompt", "hi", "--max_new_tokens", "2"], "gate_proj.weight")


def test_nonfinite_gguf_is_not_converted(tmp_path, capsys, monkeypatch):
    from autoround_jax.formats import gguf_convert

    real = gguf_convert._state_dict

    def damaged(reader, meta, path):
        sd = real(reader, meta, path)
        sd["model.layers.3.self_attn.v_proj.weight"][0, :2] = np.nan
        return sd

    monkeypatch.setattr(gguf_convert, "_state_dict", damaged)
    out = tmp_path / "smollm2"
    fails(capsys, ["convert-gguf", out], "model.layers.3.self_attn.v_proj.weight (block 3)", "2 NaN", ".gguf",
          "re-download")
    assert not out.exists() and os.listdir(tmp_path) == []


def test_nonfinite_loss_and_scales_are_caught_per_block():
    """The per-block check the tuner calls: a NaN loss, an inf scale or codes out of range stop the run."""
    from types import SimpleNamespace

    from autoround_jax.quant.qdq import QuantizedWeight
    from autoround_jax.tuning.autoround import BlockReport
    from autoround_jax.tuning.checks import check_block
    from autoround_jax.validation import NonFiniteError

    good = QuantizedWeight(codes=np.full((4, 32), 8, np.uint8), scales=np.ones((4, 1), np.float16),
                           zeros=np.full((4, 1), 8, np.int32), bits=4, group_size=32, sym=True)
    ar = SimpleNamespace(reports=[BlockReport(3, 0.5, 0.25, 7, 1.0)], quantized={"model.layers.3.mlp.up_proj": good})
    check_block(ar, 3)
    ar.reports[-1].loss_best = float("nan")
    with pytest.raises(NonFiniteError, match=r"block 3 .*best tuning loss is nan"):
        check_block(ar, 3)
    ar.reports[-1].loss_best = 0.25
    ar.quantized["model.layers.3.mlp.up_proj"] = QuantizedWeight(good.codes, np.full((4, 1), np.inf, np.float16),
                                                                 good.zeros, 4, 32, True)
    with pytest.raises(NonFiniteError, match=r"model\.layers\.3\.mlp\.up_proj \(block 3\)"):
        check_block(ar, 3)
    ar.quantized["model.layers.3.mlp.up_proj"] = QuantizedWeight(np.full((4, 32), 16, np.uint8), good.scales,
                                                                 good.zeros, 4, 32, True)
    with pytest.raises(NonFiniteError, match="codes of model.layers.3.mlp.up_proj"):
        check_block(ar, 3)


def test_failure_in_block_k_leaves_the_existing_export_byte_identical(bare, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(["--model", bare, *RTN, "--output_dir", str(out)]) == 0
    before = _tree_digest(out)
    assert any(k.endswith("model.safetensors") for k in before)
    name = os.path.basename(bare)
    src = _copy(bare, tmp_path, name)  # same folder name, so the same export folder is targeted
    _plant(src, "model.layers.1.mlp.down_proj.weight", np.nan)
    fails(capsys, ["--model", src, *RTN, "--output_dir", out, "--overwrite"], "down_proj.weight (block 1)")
    assert _tree_digest(out) == before
    assert os.listdir(out) == [f"{name}-w4g32"]


# -- vocabulary ---------------------------------------------------------------------------------------------------
def test_tokenizer_beyond_the_vocabulary_is_refused_wherever_text_is_read(small_vocab, tmp_path, capsys, text_file):
    out = tmp_path / "out"
    for args in (["--model", small_vocab, "--iters", "2", "--nsamples", "2", "--seqlen", "16", "--dataset",
                  "fortunes", "--output_dir", out],
                 ["--model", small_vocab, "--iters", "0", "--bits", "4", "--group_size", "32", "--nsamples", "2",
                  "--seqlen", "16", "--dataset", "fortunes", "--output_dir", out],  # opt-RTN reads calibration text
                 ["perplexity", "--model", small_vocab, "--text", text_file],
                 ["generate", "--model", small_vocab, "--prompt", "hi", "--max_new_tokens", "2"]):
        fails(capsys, args, "token ids up to 49151", "vocab_size 301", "own tokenizer")
    assert not out.exists()
    # plain RTN reads no text: the tokenizer is never used and the folder quantizes as it is
    assert run(["--model", small_vocab, *RTN, "--output_dir", str(out)]) == 0


def test_ids_beyond_the_vocabulary_in_the_library(small_vocab, bare):
    from autoround_jax import generate, load_model, load_tokenizer, perplexity
    from autoround_jax.tuning.autoround import AutoRound
    from autoround_jax.validation import VocabularyError, check_tokenizer_fits

    model, tok = load_model(small_vocab, dtype="fp32"), load_tokenizer(small_vocab)
    with pytest.raises(VocabularyError, match="vocab_size is 301"):
        perplexity(model, tok, "Zebras quietly photograph xylophones.")
    with pytest.raises(VocabularyError, match="vocab_size is 301"):
        generate(model, tok, "Zebras quietly photograph xylophones.", max_new_tokens=2)
    check_tokenizer_fits(tok, 49152 + 64)  # a padded embedding larger than the tokenizer is normal
    ids = np.full((2, 16), 301, np.int32)  # token ids given directly
    with pytest.raises(VocabularyError, match="calibration token ids"):
        AutoRound(bare, dataset=ids, iters=1, nsamples=2, seqlen=16, batch_size=2, progress=False).quantize()


# -- hub datasets -------------------------------------------------------------------------------------------------
def test_hub_dataset_offline_is_one_line_naming_the_hub(chat, tmp_path, capsys):
    out = tmp_path / "out"
    fails(capsys, ["--model", chat, "--iters", "2", "--nsamples", "2", "--seqlen", "16", "--dataset",
                   "someorg/no-such-dataset", "--output_dir", out],
          "someorg/no-such-dataset", "Hugging Face hub", "HF_HUB_OFFLINE")
    assert not out.exists()


# -- early checks -------------------------------------------------------------------------------------------------
def test_output_dir_naming_a_file(bare, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("keep me")
    fails(capsys, ["--model", bare, *RTN, "--output_dir", f], str(f), "is a file")
    fails(capsys, ["convert-gguf", f], "is a file")
    assert f.read_text() == "keep me"


@pytest.mark.parametrize("layer_config, fragments", [
    ('[{"bits": 8}]', ["must be a JSON object", "got a list"]),
    ("8", ["must be a JSON object", "got a number"]),
    ('{"mlp.up_proj": 8}', ["--layer_config['mlp.up_proj'] is a number", "must be an object"]),
    ('{"mlp.up_proj": {"bits": "eight"}}', ["['bits'] is 'eight' (string)", "use an integer"]),
    ('{"mlp.up_proj": {"bits": 8.5}}', ["['bits'] is 8.5", "use an integer"]),
    ('{"mlp.up_proj": {"sym": "yes"}}', ["['sym'] is 'yes'", "true or false"]),
    ('{"mlp.up_proj": {"bit": 8}}', ["unknown field 'bit'", "did you mean 'bits'"]),
    ('{"mlp.up_proj": {"group_sise": 32}}', ["unknown field 'group_sise'", "did you mean 'group_size'"]),
    ('{"mlp.up_proj": {"bits": 5}}', ["bits 5 is not supported"]),
    ('{"mlp.up_proj": {"data_type": "nv_fp"}}', ["data_type'] is 'nv_fp'"]),
    ('{"mlp.(up": {"bits": 8}}', ["key 'mlp.(up' is not a valid regular expression"]),
    ('{"mlp.upp_proj": {"bits": 8}}', ["keys match no layer: 'mlp.upp_proj'"]),
    ('{"lm_head": {"bits": 4}}', ["keys match no layer: 'lm_head'", "lm_head always stays in float"]),
    ('{"mlp.up_proj": {"bits": 8}', ["is not valid JSON"]),
])
def test_layer_config_faults(bare, tmp_path, capsys, layer_config, fragments):
    out = tmp_path / "out"
    fails(capsys, ["--model", bare, *RTN, "--layer_config", layer_config, "--output_dir", out], *fragments)
    assert not out.exists()


def test_layer_config_regex_and_float_head_are_accepted(bare):
    from autoround_jax.models.config import ModelConfig
    from autoround_jax.quant.scheme import LayerScheme
    from autoround_jax.tuning.layer_selection import resolve_layers

    cfg = ModelConfig.from_pretrained(bare)
    lc = resolve_layers(cfg, LayerScheme(4, 32, True), layer_config={
        r".*\.1\.mlp\.down_proj": {"bits": 8}, "lm_head": {"bits": 16}, "self_attn.o_proj": "W8A16"})
    assert lc["model.layers.1.mlp.down_proj"].bits == 8 and lc["model.layers.0.mlp.down_proj"].bits == 4
    assert lc["model.layers.0.self_attn.o_proj"].bits == 8


@pytest.mark.parametrize("extra, fragments", [
    (["--to_quant_block_names", "model.language_model.layers"], ["--to_quant_block_names", "match no block"]),
    (["--fp_layers", "model.layers"], ["no layer is left to quantize"]),
])
def test_nothing_to_quantize_is_refused(bare, tmp_path, capsys, extra, fragments):
    out = tmp_path / "out"
    fails(capsys, ["--model", bare, *RTN, *extra, "--output_dir", out], *fragments)
    assert not out.exists()


@pytest.mark.parametrize("args, flag", [
    (["generate", "--prompt", "hi", "--max_new_tokens", "0"], "--max_new_tokens 0"),
    (["generate", "--prompt", "hi", "--top_p", "0"], "--top_p 0.0"),
    (["generate", "--prompt", "hi", "--temperature", "-1"], "--temperature -1.0"),
    (["generate", "--prompt", "hi", "--top_k", "-3"], "--top_k -3"),
    (["perplexity", "--seqlen", "1"], "--seqlen 1"),
    (["perplexity", "--max_tokens", "0"], "--max_tokens 0"),
    (["demo", "--nsamples", "0"], "--nsamples 0"),
    (["eval", "--tasks", "x", "--eval_bs", "0"], "--eval_bs 0"),
    (["--nsamples", "0"], "--nsamples 0"),
    (["--iters", "-1"], "--iters -1"),
    (["--seqlen", "1"], "--seqlen 1"),
    (["--batch_size", "0"], "--batch_size 0"),
    (["--gradient_accumulate_steps", "0"], "--gradient_accumulate_steps 0"),
    (["--lr", "nan"], "--lr nan"),
    (["--limit", "0", "--eval"], "--limit 0.0"),
])
def test_numeric_arguments(tmp_path, capsys, args, flag):
    out = tmp_path / "out"
    if args[0] not in ("generate", "perplexity", "demo", "eval"):
        args = [*args, "--output_dir", str(out)]
    fails(capsys, args, flag, "out of range", "pass ")
    assert not out.exists()


def test_eval_without_lm_eval_names_the_extra(bare, tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as in a runtime-only install
    fails(capsys, ["eval", "--model", bare, "--tasks", "lambada_openai"], "needs lm-eval", "autoround-jax[eval]")
    out = tmp_path / "out"
    fails(capsys, ["--model", bare, *RTN, "--eval", "--output_dir", out], "needs lm-eval")
    assert not out.exists()


def _damage(kind, folder):
    cfg = os.path.join(folder, "config.json")
    if kind == "config missing key":
        d = json.load(open(cfg))
        del d["vocab_size"]
        json.dump(d, open(cfg, "w"))
        return cfg, ["missing required key 'vocab_size'", "config.json"]
    if kind == "config bad json":
        open(cfg, "w").write('{"vocab_size": 301,')
        return cfg, ["config.json: invalid JSON"]
    if kind == "config not utf-8":
        open(cfg, "wb").write(b'{"model_type": "qwen3\xff"}')
        return cfg, ["config.json: not UTF-8 text", "0xff"]
    if kind == "config binary":
        open(cfg, "wb").write(b"\x00\x01\x02binary")
        return cfg, ["config.json: is a binary file"]
    if kind == "config a list":
        open(cfg, "w").write("[1, 2]")
        return cfg, ["config.json: expected a JSON object"]
    if kind == "config bad value":
        d = json.load(open(cfg))
        d["num_hidden_layers"] = "two"
        json.dump(d, open(cfg, "w"))
        return cfg, ["num_hidden_layers is 'two'", "integer"]
    t = load_file(os.path.join(folder, "model.safetensors"))
    os.remove(os.path.join(folder, "model.safetensors"))
    save_file(t, os.path.join(folder, "model-00001-of-00001.safetensors"), {"format": "pt"})
    index = os.path.join(folder, "model.safetensors.index.json")
    if kind == "index without weight_map":
        json.dump({"metadata": {}}, open(index, "w"))
        return index, ["model.safetensors.index.json", "weight_map"]
    assert kind == "index bad json"
    open(index, "w").write("{")
    return index, ["model.safetensors.index.json: invalid JSON"]


@pytest.mark.parametrize("kind", ["config missing key", "config bad json", "config not utf-8", "config binary",
                                  "config a list", "config bad value", "index without weight_map",
                                  "index bad json"])
def test_malformed_metadata(bare, tmp_path, capsys, kind):
    src = _copy(bare, tmp_path)
    path, fragments = _damage(kind, src)
    out = tmp_path / "out"
    line = fails(capsys, ["--model", src, *RTN, "--output_dir", out], *fragments)
    assert path in line or os.path.basename(path) in line
    assert not out.exists()


def test_malformed_text_tokenizer_and_dataset_files(chat, tmp_path, capsys):
    binary = tmp_path / "t.txt"
    binary.write_bytes(b"\x00\x01 not text")
    fails(capsys, ["perplexity", "--model", chat, "--text", binary], str(binary), "binary file")
    latin1 = tmp_path / "calib.jsonl"
    latin1.write_bytes('{"text": "caf\xe9"}\n'.encode("latin-1"))
    out = tmp_path / "out"
    common = ["--model", chat, "--iters", "2", "--nsamples", "2", "--seqlen", "16", "--output_dir", out]
    fails(capsys, [*common, "--dataset", latin1], str(latin1), "not UTF-8")
    fails(capsys, [*common, "--dataset", "fortunes:num=abc"], "num=abc", "not a positive integer", "fortunes:num=64")
    fails(capsys, [*common, "--dataset", "fortunes:nmu=3"], "unknown dataset option 'nmu'")
    assert not out.exists()
    broken = _copy(chat, tmp_path, "broken_tok")
    open(os.path.join(broken, "tokenizer.json"), "w").write("{ not json")
    fails(capsys, ["generate", "--model", broken, "--prompt", "hi"], "cannot load the tokenizer", broken)


# -- every command loads what the others write ------------------------------------------------------------------
def test_commands_load_each_others_output(chat, tmp_path, capsys, text_file):
    out = tmp_path / "q"
    assert run(["--model", chat, *RTN, "--output_dir", str(out)]) == 0
    export = out / f"{os.path.basename(chat)}-w4g32"
    capsys.readouterr()
    assert run(["perplexity", "--model", str(export), "--text", text_file, "--seqlen", "16"]) == 0
    line = capsys.readouterr().out
    assert line.startswith("perplexity ") and "nan" not in line
    assert run(["generate", "--model", str(export), "--prompt", "hi", "--max_new_tokens", "3"]) == 0
    assert run(["convert", str(export), str(tmp_path / "float"), "--to", "float"]) == 0
    assert run(["perplexity", "--model", str(tmp_path / "float"), "--text", text_file, "--seqlen", "16"]) == 0
    capsys.readouterr()
    fails(capsys, ["--model", export, *RTN, "--output_dir", tmp_path / "again"], "is a quantized checkpoint",
          "--to float")
    fails(capsys, ["convert", chat, tmp_path / "c"], "not a quantized checkpoint")


def test_perplexity_reports_the_tokens_scored(chat, tmp_path, capsys):
    from autoround_jax import load_tokenizer

    short = tmp_path / "short.txt"
    short.write_text("Three small words.")
    n = len(load_tokenizer(chat)(short.read_text(), add_special_tokens=False)["input_ids"])
    capsys.readouterr()
    assert run(["perplexity", "--model", chat, "--text", str(short)]) == 0
    out = capsys.readouterr().out
    assert f"({n - 1} tokens scored in 1 window(s) of {n}," in out, out
    assert "20480" not in out
