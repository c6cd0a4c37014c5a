"""Read packed int checkpoints (auto_round in any packing, legacy names included, auto_gptq, auto_awq) for JAX
inference, re-export, or dequantization to a float HF folder.

The per-layer scheme follows the reference loader (auto_round/inference/convert_model.py::get_layer_config): the
global bits/group_size/sym, block_name_to_quantize, extra_config (exact names, then regexes), GPTQ `dynamic` and
`modules_in_block_to_quantize`, AWQ `modules_to_not_convert`. Every tensor is then checked against the shapes that
scheme implies, so a checkpoint that disagrees with its config fails with one line naming the tensor.
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Mapping

import jax.numpy as jnp
import numpy as np

from ..io.checkpoint import CheckpointReader, resolve_model_path
from ..io.files import read_json
from ..io.hf_folder import write_float_folder
from ..models.builder import build_model
from ..models.config import ModelConfig
from ..models.decoder import CausalLM
from ..models.quantized import QuantizedModel
from ..models.loading import check_against, parse_dtype
from ..models.params_table import BLOCK_PREFIX, block_prefix, block_tensors, expected_tensors
from ..quant.packed_weight import PackedWeight
from ..quant.qdq import QuantizedWeight, dequantize
from ..quant.rules import checkpoint_rules, global_scheme, quantized_blocks, resolve
from ..quant.scheme import LayerScheme, UnsupportedSchemeError
from .auto_round import (FORMATS, PACKINGS, Packing, export_hf_config, iter_tensors, packed_shapes,
                         unpack_linear, write_quantized)
from ..io.safetensors_io import CheckpointError
from .orbax_format import is_orbax, open_orbax, save_orbax

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
    try:
        return global_scheme(qc)
    except UnsupportedSchemeError as e:
        raise CheckpointError(str(e)) from None


def _block_names(qc: Mapping[str, Any]) -> list[str]:
    """block_name_to_quantize as a list: 'a,b', ['a', 'b'], or nested lists of block names (their common prefix)."""
    return quantized_blocks(qc, BLOCK_PREFIX)


def layer_schemes(cfg: ModelConfig, qc: Mapping[str, Any]) -> dict[str, LayerScheme | None]:
    """Every block linear's scheme (None: float), with the reference loader's precedence: modules_to_not_convert and
    modules_in_block_to_quantize, then exact extra_config names, then GPTQ dynamic, then extra_config regexes
    (quant/rules.py's checkpoint_rules)."""
    base, blocks = _global_scheme(qc), _block_names(qc)
    names = [block_prefix(i) + s.name[: -len(".weight")] for i in range(cfg.num_layers) for s in block_tensors(cfg, i)
             if s.role == "linear"]  # MoE: per-expert names; routers are float whatever extra_config says
    try:
        return resolve(names, base, checkpoint_rules(qc, names, blocks))
    except UnsupportedSchemeError as e:
        raise CheckpointError(str(e)) from None


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
    if is_orbax(path):  # the JAX-native checkpoint (formats/orbax_format.py)
        return open_orbax(path)
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


def packed_leaves(qm: QuantizedModel, backend: str):
    """The weight-leaf factory of a packed import: a quantized linear becomes a PackedWeight (its float weight is never
    read), every other linear stays float."""
    def leaf(module: str, read_float):
        if qm.layer_config.get(module) is None:
            return None
        return PackedWeight.from_quantized(qm.quantized[module], backend)
    return leaf


def load_quantized(name_or_path: str, dtype="auto", backend: str = "auto") -> CausalLM:
    """Load an auto_round / auto_gptq / auto_awq checkpoint as a CausalLM whose quantized linears stay packed.

    dtype: activations and float weights ('auto' follows config.json); backend: the int matmul ('auto', 'pallas',
    'xla'; see quant/packed_weight.py).
    """
    qm = open_quantized(name_or_path)
    dtype = parse_dtype(dtype, qm.hf_config.get("dtype") or qm.hf_config.get("torch_dtype"))
    return build_model(qm.config, qm.reader.get, dtype, packed_leaves(qm, backend), source=qm.files_dir)


def save_float(qm: QuantizedModel, output_dir: str, overwrite: bool = False) -> str:
    """A float HF folder (dtype of the stored float tensors) holding the dequantized weights, in float16 first as the
    reference's QuantLinear computes them: fp16((q - zero) * scale)."""
    weight = lambda qw: {"weight": np.asarray(dequantize(qw, jnp.float16)).astype(qm.dtype)}  # noqa: E731
    return write_float_folder(iter_tensors(qm, weight, qm.dtype), export_hf_config(qm, "auto_round", None), output_dir,
                              files_dir=qm.files_dir, overwrite=overwrite)


CONVERT_TARGETS = (*FORMATS, "orbax", "float")


def convert(src: str, dst: str, to: str = "auto_round", overwrite: bool = False) -> str:
    """Re-export a quantized checkpoint in another packed format, or dequantize it to a float folder ('float')."""
    if to not in CONVERT_TARGETS:
        raise ValueError(f"unknown target {to!r}: use one of {', '.join(CONVERT_TARGETS)}")
    qm = open_quantized(src)
    if to == "float":
        return save_float(qm, dst, overwrite)
    if to == "orbax":
        return save_orbax(qm, dst, overwrite)
    return write_quantized(qm, dst, to, overwrite)
