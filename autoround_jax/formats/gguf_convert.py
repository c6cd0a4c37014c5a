"""Convert a llama-architecture GGUF file into an ordinary Hugging Face folder, without torch.

The embedded default model ships only as a GGUF. Everything downstream (model loading, calibration, export) reads
HF folders, so we dequantize the GGUF once into float32 safetensors plus config and tokenizer files that
`transformers` and this package load like any checkpoint. We mirror what transformers' own GGUF loader does (its
tensor mapping, the q/k row un-permutation and its byte-level BPE tokenizer), but with numpy, `gguf` and `tokenizers`
only, because that loader imports torch.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from autoround_jax.io.hf_folder import atomic_folder, write_float_files, write_json
from ..validation import check_finite

SUPPORTED_ARCHITECTURE = "llama"
TOKEN_TYPE_CONTROL = 3  # llama.cpp's token type for special tokens such as <|im_end|>
TOKEN_TYPE_USER_DEFINED = 4  # added tokens that are matched whole but are not special

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


class GGUFConvertError(ValueError):
    """The GGUF cannot be converted: corrupt or unsupported."""


def convert_gguf_to_hf(gguf_path: str, out_dir: str, *, overwrite: bool = False) -> str:
    """Write `out_dir` as a float32 HF Llama folder built from `gguf_path`; return `out_dir`.

    The folder is assembled in a temporary sibling and renamed into place (hf_folder.atomic_folder), so a crash or a
    concurrent conversion never leaves a half-written `out_dir`.
    """
    out_dir = os.path.abspath(out_dir)
    with atomic_folder(out_dir, overwrite) as tmp:  # refuses a non-empty out_dir before the slow work
        reader = _open_gguf(gguf_path)
        _write_folder(reader, _metadata(reader, gguf_path), gguf_path, tmp)
    return out_dir


def _open_gguf(path: str) -> Any:
    """Open the file with gguf's reader, turning any parse failure into a one-line error."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: GGUF file not found; check the path")
    import gguf

    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader fails in many ways (struct, numpy, index errors) on a damaged file
        reason = f"{e.__class__.__name__}: {e}"
        raise GGUFConvertError(f"{path}: not a readable GGUF file ({reason}); re-download it") from None


def _field(reader: Any, key: str, default: Any = None) -> Any:
    """One metadata value as a plain Python object (lists for arrays)."""
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _metadata(reader: Any, path: str) -> dict[str, Any]:
    """Collect the llama hyperparameters and tokenizer facts the folder files need."""
    arch = _field(reader, "general.architecture")
    if arch != SUPPORTED_ARCHITECTURE:
        raise GGUFConvertError(f"{path}: GGUF architecture {arch!r} is not supported, only {SUPPORTED_ARCHITECTURE!r}")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if _field(reader, "tokenizer.ggml.model") != "gpt2" or not tokens:
        raise GGUFConvertError(f"{path}: only GGUF files with a byte-level BPE ('gpt2') tokenizer are supported")
    hidden = _field(reader, f"{arch}.embedding_length")
    heads = _field(reader, f"{arch}.attention.head_count")
    return {
        "vocab_size": _field(reader, f"{arch}.vocab_size", len(tokens)),
        "hidden_size": hidden,
        "intermediate_size": _field(reader, f"{arch}.feed_forward_length"),
        "num_hidden_layers": _field(reader, f"{arch}.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": _field(reader, f"{arch}.attention.head_count_kv", heads),
        "head_dim": _field(reader, f"{arch}.attention.key_length", hidden // heads),
        "rms_norm_eps": _float32(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        "rope_theta": _float32(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": _field(reader, f"{arch}.context_length"),
        "tie_word_embeddings": all(t.name != "output.weight" for t in reader.tensors),
        "tokens": tokens,
        "token_types": _field(reader, "tokenizer.ggml.token_type", []),
        "merges": _field(reader, "tokenizer.ggml.merges", []),
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
        "unk_token_id": _field(reader, "tokenizer.ggml.unknown_token_id"),
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(_field(reader, "tokenizer.ggml.add_eos_token", False)),
        "chat_template": _field(reader, "tokenizer.chat_template"),
    }


def _float32(value: float) -> float:
    """GGUF stores float32; write its shortest decimal (1e-05, not 9.999999747378752e-06) as configs spell it."""
    return float(str(np.float32(value)))


def _write_folder(reader: Any, meta: dict[str, Any], path: str, folder: str) -> None:
    """Everything a HF folder needs: weights and model config (hf_folder's float writer), generation config and
    tokenizer files built from the GGUF metadata."""
    tensors = _state_dict(reader, meta, path)
    for name, arr in tensors.items():  # a NaN/inf in the GGUF stops here, before the folder exists
        check_finite(arr, name, path, fix="the GGUF file is damaged: re-download it")
    write_float_files(folder, tensors.items(), _config(meta), sort_keys=False)
    _write_json(folder, "generation_config.json", _generation_config(meta))
    _tokenizer(meta).save(os.path.join(folder, "tokenizer.json"))
    _write_json(folder, "tokenizer_config.json", _tokenizer_config(meta))
    _write_json(folder, "special_tokens_map.json", _special_tokens(meta))


def _write_json(folder: str, name: str, obj: dict[str, Any]) -> None:
    write_json(obj, os.path.join(folder, name), sort_keys=False, ensure_ascii=False)


def _state_dict(reader: Any, meta: dict[str, Any], path: str) -> dict[str, np.ndarray]:
    """Dequantize every tensor to float32 under its HF name, undoing llama.cpp's q/k row permutation."""
    from gguf.quants import dequantize

    tensors = {}
    for t in reader.tensors:
        name = _hf_name(t.name, path)
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        if name.endswith("q_proj.weight"):
            w = _unpermute_rows(w, meta["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            w = _unpermute_rows(w, meta["num_key_value_heads"])
        tensors[name] = w
    return tensors


def _hf_name(gguf_name: str, path: str) -> str:
    """Map `blk.N.attn_q.weight` style names to `model.layers.N.self_attn.q_proj.weight`."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    raise GGUFConvertError(f"{path}: unexpected tensor {gguf_name!r}; the file is not a plain llama model")


def _unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute` (rotary halves interleaved per head), as transformers' GGUF loader does."""
    dim = w.shape[0] // n_head // 2
    return np.ascontiguousarray(w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape))


def _config(meta: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "max_position_embeddings",
        "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
    )  # fmt: skip
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **{k: meta[k] for k in keys},
        "rope_parameters": {"rope_theta": meta["rope_theta"], "rope_type": "default"},
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }


def _generation_config(meta: dict[str, Any]) -> dict[str, Any]:
    return {k: meta[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}


def _special_tokens(meta: dict[str, Any]) -> dict[str, str]:
    """bos/eos/unk/pad as strings, for the ids the GGUF names."""
    names = ("bos_token", "eos_token", "unk_token", "pad_token")
    return {name: meta["tokens"][meta[name + "_id"]] for name in names if meta[name + "_id"] is not None}


def _tokenizer_config(meta: dict[str, Any]) -> dict[str, Any]:
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": meta["add_bos_token"],
        "add_eos_token": meta["add_eos_token"],
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": meta["max_position_embeddings"],
        **_special_tokens(meta),
    }
    if meta["chat_template"]:
        config["chat_template"] = meta["chat_template"]
    return config


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet byte-level BPE vocabularies are spelled in."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _tokenizer(meta: dict[str, Any]) -> Any:
    """Byte-level BPE built from the GGUF vocabulary and merges, like transformers' GGUF tokenizer converter."""
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {_spell(t, spelling, alphabet): i for i, t in enumerate(meta["tokens"])}
    merges = [tuple(m.split(" ")) for m in meta["merges"]]
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix=""))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    typed = list(zip(meta["tokens"], meta["token_types"]))
    control = [t for t, kind in typed if kind == TOKEN_TYPE_CONTROL and set(t) <= alphabet]
    user = [t for t, kind in typed if kind == TOKEN_TYPE_USER_DEFINED and t in vocab]
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
    tok.post_processor = _post_processor(meta)
    return tok


def _spell(token: str, spelling: dict[int, str], alphabet: set[str]) -> str:
    """Respell a token stored as raw text into the byte alphabet (llama.cpp sometimes stores it decoded)."""
    return token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8"))


def _post_processor(meta: dict[str, Any]) -> Any:
    """Add bos/eos around encodings only where the GGUF asks for it (SmolLM2 asks for neither)."""
    from tokenizers import processors

    specials = []
    single = ["$A"]
    if meta["add_bos_token"]:
        specials.append((meta["tokens"][meta["bos_token_id"]], meta["bos_token_id"]))
        single.insert(0, specials[-1][0])
    if meta["add_eos_token"]:
        specials.append((meta["tokens"][meta["eos_token_id"]], meta["eos_token_id"]))
        single.append(specials[-1][0])
    pair = single + [s if s != "$A" else "$B:1" for s in single]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


