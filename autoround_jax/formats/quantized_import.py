"""Read packed int checkpoints (auto_round in any packing, legacy names included, auto_gptq, auto_awq) for JAX
inference, re-export, or dequantization to a float HF folder.

The per-layer scheme follows the reference loader (auto_round/inference/convert_model.py::get_layer_config): the
global bits/group_size/sym, block_name_to_quantize, extra_config (exact names, then regexes), GPTQ `dynamic` and
`modules_in_block_to_quantize`, AWQ `modules_to_not_convert`. Every tensor is then checked against the shapes that
scheme implies, so a checkpoint that disagrees with its config fails with one line naming the tensor.
"""

from __future__ import annotations

import os
import re
from typing import Any, Iterator, Mapping

import jax.numpy as jnp
import numpy as np

from ..models.config import ModelConfig
from ..models.decoder import CausalLM, DecoderBlock
from ..models.layers import FloatWeight, Linear
from ..models.loading import CheckpointReader, check_against, parse_dtype, resolve_model_path
from ..models.params_table import BLOCK_PREFIX, BLOCK_TENSORS, block_prefix, expected_tensors, module_at
from ..quant.packed_weight import PackedWeight, dequantize_codes
from ..quant.qdq import QuantizedWeight
from ..quant.scheme import SUPPORTED_BITS, LayerScheme
from .auto_round import (FORMATS, PACKINGS, Packing, QuantizedModel, export_hf_config, iter_tensors, packed_shapes,
                         unpack_linear, write_quantized)
from ..io.hf_folder import atomic_folder, copy_tokenizer_files, write_json, write_sharded
from ..validation import read_json
from ..io.safetensors_io import CheckpointError

# Names older auto-round versions wrote (normalised as in convert_model.py).
LEGACY_PACKINGS = {"auto_round:gptq": "auto_round:auto_gptq", "auto_round:awq": "auto_round:auto_awq",
                   "auto": "auto_round:auto_gptq"}
# quantization_config keys carried over on re-export: how the checkpoint was tuned.
SETTINGS_KEYS = ("amp", "batch_size", "enable_minmax_tuning", "enable_norm_bias_tuning", "enable_quanted_input",
                 "gradient_accumulate_steps", "iters", "lr", "low_gpu_mem_usage", "minmax_lr", "nsamples",
                 "scale_dtype", "seqlen", "autoround_version")
CONFIG_FILES = ("quantization_config.json", "quantize_config.json", "quant_config.json")


def read_quantization_config(path: str, hf_config: Mapping[str, Any]) -> dict[str, Any]:
    """config.json's quantization_config, else a side file (AutoGPTQ's quantize_config.json, AutoAWQ's ...)."""
    if "quantization_config" in hf_config:
        qc = hf_config["quantization_config"]
        if not isinstance(qc, dict):
            raise CheckpointError(f"{os.path.join(path, 'config.json')}: quantization_config is a "
                                  f"{type(qc).__name__}, expected an object; restore or re-export the checkpoint")
        return dict(qc)
    for name in CONFIG_FILES:
        file = os.path.join(path, name)
        if os.path.isfile(file):
            qc = read_json(file)
            if "quant_method" not in qc:  # AutoGPTQ / AutoAWQ side files predate the key
                qc["quant_method"] = "awq" if "w_bit" in qc or "version" in qc else "gptq"
            return qc
    raise CheckpointError(f"{path}: no quantization_config in config.json: not a quantized checkpoint (load it with "
                          "load_model; quantize it with `autoround-jax --model PATH`)")


def is_quantized(name_or_path: str) -> bool:
    """Whether a folder holds a packed int checkpoint (a quantization_config in config.json, or a side file)."""
    path = resolve_model_path(name_or_path)
    if isinstance(read_json(os.path.join(path, "config.json")).get("quantization_config"), dict):
        return True
    return any(os.path.isfile(os.path.join(path, name)) for name in CONFIG_FILES)


def load_any(name_or_path: str, dtype="auto", backend: str = "auto") -> CausalLM:
    """What every command loads: a packed int checkpoint (ours or the reference's) stays packed via load_quantized;
    a float or fake-quant folder goes through load_model."""
    from ..models.loading import load_model

    if is_quantized(name_or_path):
        return load_quantized(name_or_path, dtype=dtype, backend=backend)
    return load_model(name_or_path, dtype=dtype)


def packing_of(qc: Mapping[str, Any]) -> str:
    """The PACKINGS entry a quantization_config describes."""
    method = str(qc.get("quant_method", "")).lower()
    if "auto-round" in method:  # "auto-round", and "intel/auto-round" (<= 0.4, which named it "backend")
        name = qc.get("packing_format") or qc.get("backend") or "auto_round:auto_gptq"
        name = LEGACY_PACKINGS.get(name, name)
    elif method == "gptq":
        name = "auto_round:gptqmodel" if qc.get("checkpoint_format") == "gptq_v2" else "auto_gptq"
    elif method == "awq":
        if str(qc.get("version", "gemm")).lower() != "gemm":
            raise CheckpointError(f"AWQ version {qc.get('version')!r} is not supported: only the GEMM layout is")
        name = "auto_awq"
    else:
        raise CheckpointError(f"unsupported quant_method {qc.get('quant_method')!r}: use an auto-round, gptq or awq "
                              "checkpoint")
    if name not in PACKINGS:
        raise CheckpointError(f"unknown packing_format {name!r}: supported are {', '.join(PACKINGS)}")
    return name


def _global_scheme(qc: Mapping[str, Any]) -> LayerScheme:
    bits = int(qc.get("bits", qc.get("w_bit", 4)))
    group = int(qc.get("group_size", qc.get("q_group_size", 128)))
    sym = bool(qc["sym"]) if "sym" in qc else not bool(qc.get("zero_point", False))
    scheme = _scheme(LayerScheme(bits, group, sym), {"data_type": qc.get("data_type", "int")})
    if scheme is None:
        raise CheckpointError(f"quantization_config has bits {bits}: nothing is quantized")
    return scheme


def _scheme(base: LayerScheme, d: Mapping[str, Any]) -> LayerScheme | None:
    """A per-layer override applied to the global scheme; None for a float layer."""
    bits, data_type = int(d.get("bits", base.bits)), str(d.get("data_type", base.data_type))
    if bits >= 16 or data_type in ("fp", "float", "float16", "bfloat16"):
        return None
    if not data_type.startswith("int") or bits not in SUPPORTED_BITS:
        raise CheckpointError(f"unsupported scheme: data_type {data_type!r}, {bits} bits (int 2/3/4/8-bit only)")
    return LayerScheme(bits, int(d.get("group_size", base.group_size)), bool(d.get("sym", base.sym)))


def _search(pattern: str, name: str) -> bool:
    try:
        return re.search(pattern, name) is not None
    except re.error:  # the reference skips invalid patterns too
        return False


def _block_names(qc: Mapping[str, Any]) -> list[str]:
    """block_name_to_quantize as a list: 'a,b', ['a', 'b'], or nested lists of block names (their common prefix)."""
    names = qc.get("block_name_to_quantize") or qc.get("to_quant_block_names") or BLOCK_PREFIX
    if isinstance(names, str):
        return [n.strip() for n in names.split(",") if n.strip()]
    return [os.path.commonprefix(n).rstrip(".") if isinstance(n, (list, tuple)) else n for n in names]


def _flat(items) -> list[str]:
    return [x for n in items or [] for x in (n if isinstance(n, (list, tuple)) else [n])]


def layer_schemes(cfg: ModelConfig, qc: Mapping[str, Any]) -> dict[str, LayerScheme | None]:
    """Every block linear's scheme (None: float), with the reference loader's precedence: modules_to_not_convert and
    modules_in_block_to_quantize, then exact extra_config names, then GPTQ dynamic, then extra_config regexes."""
    base, blocks = _global_scheme(qc), _block_names(qc)
    names = [block_prefix(i) + s.name[: -len(".weight")] for i in range(cfg.num_layers) for s in BLOCK_TENSORS
             if s.role == "linear"]
    extra = dict(qc.get("extra_config") or {})
    dynamic = {k[2:]: ({"bits": 16} if k.startswith("-:") else v) for k, v in (qc.get("dynamic") or {}).items()
               if k[:2] in ("+:", "-:")}
    patterns = [dynamic, {k: v for k, v in extra.items() if k not in names}]
    skip, keep = _flat(qc.get("modules_to_not_convert")), _flat(qc.get("modules_in_block_to_quantize"))
    out: dict[str, LayerScheme | None] = {}
    for name in names:
        if not any(name == b or name.startswith(b + ".") for b in blocks) or any(_search(p, name) for p in skip) \
                or keep and not any(_search(p, name) for p in keep):
            out[name] = None
        elif name in extra:
            out[name] = _scheme(base, extra[name])
        else:
            match = next((d for table in patterns for p, d in table.items() if d and _search(p, name)), None)
            out[name] = base if match is None else _scheme(base, match)
    return out


class PackedLayers(Mapping):
    """Quantized layers decoded from the checkpoint on access, so a converter holds one layer at a time."""

    def __init__(self, reader: CheckpointReader, packing: Packing, schemes: dict[str, LayerScheme | None]):
        self.reader, self.packing = reader, packing
        self.schemes = {n: s for n, s in schemes.items() if s is not None}

    def __getitem__(self, name: str) -> QuantizedWeight:
        suffixes = ("qweight", "qzeros", "scales", "g_idx")
        t = {s: self.reader.get(f"{name}.{s}") for s in suffixes if f"{name}.{s}" in self.reader}
        return unpack_linear(t, self.packing, self.schemes[name], name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.schemes)

    def __len__(self) -> int:
        return len(self.schemes)


def _expected(cfg: ModelConfig, schemes: dict[str, LayerScheme | None], packing: Packing) -> dict[str, tuple]:
    """Tensor name -> shape the config implies (packed tensors for quantized linears)."""
    want = {}
    for name, shape in expected_tensors(cfg).items():
        module = name.rsplit(".", 1)[0]
        s = schemes.get(module)
        if s is not None and name.endswith(".weight"):
            packed = packed_shapes(packing, s.bits, s.group_size, *shape)
            want.update({f"{module}.{k}": v for k, v in packed.items()})
        else:
            want[name] = shape
    return want


def check_quantized_tensors(reader: CheckpointReader, cfg: ModelConfig, schemes, packing: Packing) -> None:
    """Missing, unexpected or misshapen tensors -> one CheckpointError listing the first few."""
    odd = [n for n, s in schemes.items() if s is not None and packing.layout == "awq" and s.bits != 4]
    if odd:
        raise CheckpointError(f"{reader.path}: the AWQ layout holds 4-bit weights only, the config gives {odd[0]} "
                              f"{schemes[odd[0]].bits} bits")
    want, full = _expected(cfg, schemes, packing), expected_tensors(cfg)
    gptq = packing.layout == "gptq"  # g_idx may come with any GPTQ-layout packing
    optional = {f"{m}.g_idx": full[f"{m}.weight"][1:] for m, s in schemes.items() if s is not None and gptq}
    if cfg.tie_word_embeddings:
        optional["lm_head.weight"] = want["model.embed_tokens.weight"]
    check_against(reader, want, optional)


def open_quantized(name_or_path: str) -> QuantizedModel:
    """A quantized checkpoint, checked against its config; codes are decoded lazily, layer by layer."""
    path = resolve_model_path(name_or_path)
    cfg = ModelConfig.from_pretrained(path)
    hf_config = read_json(os.path.join(path, "config.json"))
    qc = read_quantization_config(path, hf_config)
    try:
        packing = PACKINGS[packing_of(qc)]
        schemes = layer_schemes(cfg, qc)
    except CheckpointError:
        raise
    except (TypeError, ValueError, AttributeError) as e:  # e.g. bits "four", extra_config a list
        raise CheckpointError(f"{path}: malformed quantization_config ({e.__class__.__name__}: {e}); restore or "
                              "re-export the checkpoint") from None
    reader = CheckpointReader(path)
    check_quantized_tensors(reader, cfg, schemes, packing)
    dtype = reader.get("model.embed_tokens.weight").dtype  # floats as stored (config.json may say float16 for AWQ)
    settings = {k: qc[k] for k in SETTINGS_KEYS if k in qc}
    block = ",".join(_block_names(qc))
    return QuantizedModel(cfg, hf_config, reader, np.dtype(dtype), _global_scheme(qc), schemes,
                          PackedLayers(reader, packing, schemes), settings, path, block)


def _block(qm: QuantizedModel, i: int, dtype, backend: str) -> DecoderBlock:
    """Block i with float tensors loaded and every quantized linear holding a PackedWeight."""
    p = block_prefix(i)
    quantized = [n[len(p):] for n, s in qm.layer_config.items() if s is not None and n.startswith(p)]
    tensors = {}
    for spec in BLOCK_TENSORS:
        if spec.present(qm.config):
            packed = spec.role == "linear" and spec.name[: -len(".weight")] in quantized
            # A packed linear gets an empty placeholder weight that is replaced below.
            tensors[spec.name] = np.zeros((0, 0), np.float32) if packed else qm.reader.get(p + spec.name)
    block = DecoderBlock(qm.config, tensors, dtype)
    for name in quantized:
        module_at(block, name).weight = PackedWeight.from_quantized(qm.quantized[p + name], backend)
    return block


def load_quantized(name_or_path: str, dtype="auto", backend: str = "auto") -> CausalLM:
    """Load an auto_round / auto_gptq / auto_awq checkpoint as a CausalLM whose quantized linears stay packed.

    dtype: activations and float weights ('auto' follows config.json); backend: the int matmul ('auto', 'pallas',
    'xla'; see quant/packed_weight.py).
    """
    qm = open_quantized(name_or_path)
    dtype = parse_dtype(dtype, qm.hf_config.get("dtype") or qm.hf_config.get("torch_dtype"))
    cfg = qm.config
    blocks = [_block(qm, i, dtype, backend) for i in range(cfg.num_layers)]
    tensor = lambda name: jnp.asarray(qm.reader.get(name), dtype)  # noqa: E731
    head = None if cfg.tie_word_embeddings else Linear(FloatWeight(tensor("lm_head.weight")))
    return CausalLM(cfg, tensor("model.embed_tokens.weight"), blocks, tensor("model.norm.weight"), head)


def dequantized_weight(qw: QuantizedWeight) -> np.ndarray:
    """W [N, K] in float16 as the reference's QuantLinear computes it: fp16((q - zero) * scale)."""
    codes_kn = np.asarray(qw.codes).T
    return np.asarray(dequantize_codes(codes_kn, np.asarray(qw.scales).T, np.asarray(qw.zeros).T, qw.group_size)).T


def save_float(qm: QuantizedModel, output_dir: str, overwrite: bool = False) -> str:
    """A float HF folder (dtype of the stored float tensors) holding the dequantized weights."""
    with atomic_folder(output_dir, overwrite) as tmp:
        weight = lambda qw: {"weight": dequantized_weight(qw).astype(qm.dtype)}  # noqa: E731
        write_sharded(iter_tensors(qm, weight, qm.dtype), tmp)
        write_json(export_hf_config(qm, "auto_round", None), os.path.join(tmp, "config.json"))
        copy_tokenizer_files(qm.files_dir, tmp)
    return os.path.abspath(output_dir)


CONVERT_TARGETS = (*FORMATS, "float")


def convert(src: str, dst: str, to: str = "auto_round", overwrite: bool = False) -> str:
    """Re-export a quantized checkpoint in another packed format, or dequantize it to a float folder ('float')."""
    if to not in CONVERT_TARGETS:
        raise ValueError(f"unknown target {to!r}: use one of {', '.join(CONVERT_TARGETS)}")
    qm = open_quantized(src)
    if to == "float":
        return save_float(qm, dst, overwrite)
    return write_quantized(qm, dst, to, overwrite)
