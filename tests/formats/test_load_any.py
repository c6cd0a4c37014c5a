"""`perplexity` and `generate` load the reference's packed folders (and ours) as they are, through load_any."""

import shutil

import numpy as np

from autoround_jax import tokenizer as tokenizer_module
from autoround_jax.cli import run
from autoround_jax.formats.quantized_import import is_quantized, load_any, load_quantized
from autoround_jax.quant.packed_weight import PackedWeight


class WordTokenizer:
    """'w5 w6' <-> [5, 6] over the tiny models' 301 ids (the reference's tiny exports carry no tokenizer)."""

    chat_template = None
    pad_token_id, eos_token_id, eos_token = 0, 2, None

    def __call__(self, text, add_special_tokens=True, **kw):
        return {"input_ids": [int(w[1:]) for w in text.split()]}

    def get_vocab(self):
        return {f"w{i}": i for i in range(301)}

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(f"w{i}" for i in ids)


def test_reference_folders_load_packed_in_every_command(reference_folder, tmp_path, capsys, monkeypatch):
    src = str(tmp_path / "ref")
    shutil.copytree(reference_folder("q2_w4g32_sym"), src)
    assert is_quantized(src)
    model = load_any(src, dtype="fp32")
    assert isinstance(model.layers[0].mlp.up_proj.weight, PackedWeight)
    ids = np.array([[5, 6, 7, 8]], np.int32)
    np.testing.assert_array_equal(np.asarray(model(ids)), np.asarray(load_quantized(src, dtype="fp32")(ids)))
    monkeypatch.setattr(tokenizer_module, "load_tokenizer", lambda path: WordTokenizer())
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i}" for i in range(3, 200)))
    capsys.readouterr()
    assert run(["perplexity", "--model", src, "--text", str(text), "--seqlen", "64"]) == 0
    out = capsys.readouterr().out
    assert "(189 tokens scored in 3 window(s) of 64," in out and "nan" not in out, out
    assert run(["generate", "--model", src, "--prompt", "w5 w6 w7", "--max_new_tokens", "3"]) == 0
    assert capsys.readouterr().out.strip().startswith("w")
