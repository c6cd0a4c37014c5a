"""Packed int exports as the reference (auto-round 0.16.1) writes them: auto_round, auto_gptq and auto_awq.

Per quantized linear (K in, N out, G group, b bits), GPTQ layout: `qweight` int32 [K*b/32, N] packed along K,
`qzeros` int32 [ceil(K/G), N*b/32] holding zero - 1 (GPTQ v1, clamped at 0) or the zero as is, `scales` float16
[ceil(K/G), N] (signed for full-range sym), `bias` float16, and `g_idx` int32 [K] for auto_gptq. AWQ GEMM layout
(4-bit): `qweight` [K, N/8] and `qzeros` [ceil(K/G), N/8] packed along N in the AWQ interleave, zeros as is.
Everything else (embeddings, norms, lm_head, float layers) stays in the model dtype.

Format "auto_round" picks its packing like the reference: sym -> "auto_round:auto_gptq"; asym with every quantized
layer 4-bit -> "auto_round:auto_awq"; otherwise "auto_round". Exports are written block by block into an atomic
folder (config.json with quantization_config, quantization_config.json, tokenizer and generation config files).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from typing import Any, Callable, Iterator, Mapping

import jax.numpy as jnp
import numpy as np

from ..io.hf_folder import atomic_folder, copy_tokenizer_files, write_json, write_sharded
from ..io.safetensors_io import CheckpointError
from ..models.config import ModelConfig
from ..models.params_table import GLOBAL_TENSORS, block_prefix, block_tensors, linear_shape
from ..models.quantized import QuantizedModel
from ..quant.pack import pack_awq, pack_cols, pack_rows, unpack_awq, unpack_cols, unpack_rows
from ..quant.qdq import QuantizedWeight, group_len, num_groups
from ..quant.scheme import LayerScheme
from ..version import __version__
from .moe_config import router_extra_config, router_names
from .report import write_report


@dataclasses.dataclass(frozen=True)
class Packing:
    """How a packing format lays out one quantized linear."""

    layout: str  # "gptq" (qweight packed along K) | "awq" (GEMM layout, packed along N, 4-bit only)
    zero_offset: int  # stored zero = zero + offset (GPTQ v1 stores zero - 1)
    g_idx: bool  # writes g_idx = k // G


PACKINGS: dict[str, Packing] = {
    "auto_round:auto_gptq": Packing("gptq", -1, False),
    "auto_round": Packing("gptq", 0, False),
    "auto_round:gptqmodel": Packing("gptq", 0, True),
    "auto_round:auto_awq": Packing("awq", 0, False),
    "auto_gptq": Packing("gptq", -1, True),
    "auto_awq": Packing("awq", 0, False),
}
FORMATS = ("auto_round", "auto_gptq", "auto_awq")
# filter_quantization_config: settings equal to these reference defaults are not written (lr defaults to 1/iters).
REFERENCE_DEFAULTS = {"amp": True, "enable_minmax_tuning": True, "enable_quanted_input": True,
                      "gradient_accumulate_steps": 1, "iters": 200}
FLOAT_LAYER = {"bits": 16, "data_type": "float"}


# -- one linear ----------------------------------------------------------------------------------------------------
def packed_shapes(packing: Packing, bits: int, group_size: int, n: int, k: int) -> dict[str, tuple[int, ...]]:
    """The tensors (by suffix) and shapes a packing writes for a linear W[N, K]."""
    ng, words_n = num_groups(k, group_size), n * bits // 32
    if packing.layout == "awq":
        return {"qweight": (k, words_n), "qzeros": (ng, words_n), "scales": (ng, n)}
    shapes = {"qweight": (k * bits // 32, n), "qzeros": (ng, words_n), "scales": (ng, n)}
    return {**shapes, "g_idx": (k,)} if packing.g_idx else shapes


def awq_packable(bits: int, group_size: int, k: int) -> bool:
    """WQLinear_GEMM takes 4-bit weights whose K is a multiple of the group."""
    return bits == 4 and k % group_len(k, group_size) == 0


def pack_linear(qw: QuantizedWeight, packing: Packing) -> dict[str, np.ndarray]:
    """QuantizedWeight (codes [N, K], scales and raw zeros [N, ng]) -> the packed tensors, by suffix."""
    codes, zeros = np.asarray(qw.codes).T, np.asarray(qw.zeros).T
    if packing.layout == "awq":
        if not awq_packable(qw.bits, qw.group_size, codes.shape[0]):
            raise ValueError(f"AWQ packing needs 4-bit weights with in_features a multiple of the group size; got "
                             f"{qw.bits}-bit, in_features {codes.shape[0]}, group_size {qw.group_size}")
        out = {"qweight": pack_awq(codes), "qzeros": pack_awq(zeros)}
    else:
        stored = np.clip(zeros.astype(np.int64) + packing.zero_offset, 0, 2**qw.bits - 1)
        out = {"qweight": pack_rows(codes, qw.bits), "qzeros": pack_cols(stored, qw.bits)}
    out["scales"] = np.ascontiguousarray(np.asarray(qw.scales).T.astype(np.float16))
    if packing.g_idx:
        k = codes.shape[0]
        out["g_idx"] = (np.arange(k) // group_len(k, qw.group_size)).astype(np.int32)
    return out


def unpack_linear(t: Mapping[str, np.ndarray], packing: Packing, scheme: LayerScheme, name: str) -> QuantizedWeight:
    """Packed tensors (by suffix) -> QuantizedWeight: the inverse of pack_linear (a stored zero - 1 comes back + 1)."""
    if packing.layout == "awq":
        codes, zeros = unpack_awq(np.asarray(t["qweight"])), unpack_awq(np.asarray(t["qzeros"])).astype(np.int32)
    else:
        codes = unpack_rows(np.asarray(t["qweight"]), scheme.bits)
        zeros = unpack_cols(np.asarray(t["qzeros"]), scheme.bits).astype(np.int32) - packing.zero_offset
    k = codes.shape[0]
    if "g_idx" in t and not np.array_equal(t["g_idx"], np.arange(k) // group_len(k, scheme.group_size)):
        raise CheckpointError(f"{name}.g_idx is not k // group_size: act-order (desc_act) checkpoints are not "
                              "supported")
    scales = np.asarray(t["scales"]).astype(np.float16)  # QuantLinear keeps them in fp16 whatever the file holds
    return QuantizedWeight(codes=np.ascontiguousarray(codes.T), scales=np.ascontiguousarray(scales.T),
                           zeros=np.ascontiguousarray(zeros.T), bits=scheme.bits, group_size=scheme.group_size,
                           sym=scheme.sym)


# -- the model -----------------------------------------------------------------------------------------------------
def resolve_packing(qm: QuantizedModel, fmt: str) -> str:
    """The packing a format writes; "auto_round" chooses like the reference (AWQ only where every layer fits it)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}: use one of fake, {', '.join(FORMATS)}")
    if fmt != "auto_round":
        return fmt
    if qm.scheme.sym:
        return "auto_round:auto_gptq"
    quantized = [(n, s) for n, s in qm.layer_config.items() if s is not None]
    if all(s.bits == 4 and awq_packable(4, s.group_size, _in_features(qm.config, n)) for n, s in quantized):
        return "auto_round:auto_awq"
    return "auto_round"


def folder_name(qm: QuantizedModel, fmt: str) -> str:
    """The reference's subfolder for one of several formats: the packing name with ':' and '_' as '-'."""
    return resolve_packing(qm, fmt).replace(":", "-").replace("_", "-")


def _in_features(cfg: ModelConfig, full_name: str) -> int:
    """in_features of a block linear given its full name ('model.layers.3.mlp.up_proj')."""
    return linear_shape(cfg, full_name.split(".", 3)[3])[1]


def _check_exportable(qm: QuantizedModel, fmt: str) -> None:
    missing = [n for n, s in qm.layer_config.items() if s is not None and n not in qm.quantized]
    if missing:
        raise ValueError(f"no integer codes for {len(missing)} quantized layers (e.g. {missing[0]}): quantize first")
    check_format_fits(qm, fmt)


def check_format_fits(qm: QuantizedModel, fmt: str) -> None:
    """Whether fmt can hold qm's layer schemes (known before tuning, so a streaming export checks it first)."""
    resolve_packing(qm, fmt)
    if fmt == "auto_awq":
        odd = [n for n, s in qm.layer_config.items() if s is not None and s != qm.scheme]
        if odd:
            raise ValueError(f"auto_awq cannot record per-layer schemes ({odd[0]} differs): use --format auto_round")
        if not all(awq_packable(s.bits, s.group_size, _in_features(qm.config, n))
                   for n, s in qm.layer_config.items() if s is not None):
            raise ValueError("auto_awq needs 4-bit weights whose in_features are multiples of the group size: "
                             "use --format auto_round")


def _neq(scheme: LayerScheme, base: LayerScheme) -> dict[str, Any]:
    keys = ("bits", "group_size", "sym", "data_type")
    return {k: getattr(scheme, k) for k in keys if getattr(scheme, k) != getattr(base, k)}


def _extra_config(qm: QuantizedModel) -> dict[str, dict[str, Any]]:
    """Per-layer schemes that differ from the global one; float layers as {"bits": 16, "data_type": "float"}."""
    out = {}
    for name, s in qm.layer_config.items():
        d = dict(FLOAT_LAYER) if s is None else _neq(s, qm.scheme)
        if d:
            out[name] = d
    return {**out, **router_extra_config(qm.config)}  # MoE routers, as the reference records them


def _gptq_keys(qm: QuantizedModel) -> dict[str, Any]:
    """auto_gptq records overrides as GPTQModel 'dynamic' regexes and lists the quantized modules if some are not."""
    dynamic = {}
    for name in _extra_config(qm):
        if name not in qm.layer_config:  # an MoE router (formats/moe_config.py): excluded from quantization
            dynamic["-:" + (name if name.startswith(".*") else ".*" + re.escape(name) + ".*")] = {}
            continue
        s, regex = qm.layer_config[name], ".*" + re.escape(name) + ".*"
        if s is None:
            dynamic[f"-:{regex}"] = {}
        else:
            dynamic[f"+:{regex}"] = {"bits": s.bits, "group_size": s.group_size, "sym": s.sym}
    out: dict[str, Any] = {"dynamic": dynamic} if dynamic else {}
    out.update(lm_head=False, provider="auto-round", quant_method="gptq", desc_act=False, true_sequential=False,
               damp_percent=0.01)
    if any(s is None for s in qm.layer_config.values()) or router_names(qm.config):  # MoE routers are float layers
        names = {n.split(".", 3)[3] for n, s in qm.layer_config.items() if s is not None}
        out["modules_in_block_to_quantize"] = [sorted(names)]
    return out


def _awq_keys(qm: QuantizedModel) -> dict[str, Any]:
    skipped = ["lm_head"] + [n for n, s in qm.layer_config.items() if s is None] + router_names(qm.config)
    return {"to_quant_block_names": qm.block_name, "provider": "auto-round", "quant_method": "awq",
            "zero_point": not qm.scheme.sym, "version": "gemm", "modules_to_not_convert": sorted(skipped)}


def quantization_config(qm: QuantizedModel, fmt: str) -> dict[str, Any]:
    """The quantization_config the reference writes for this format, with our version in place of its own."""
    s = qm.scheme
    out = {"bits": s.bits, "data_type": s.data_type, "group_size": s.group_size, "sym": s.sym, **qm.settings,
           "autoround_jax_version": __version__}
    if fmt == "auto_gptq":
        return {**out, **_gptq_keys(qm)}
    if fmt == "auto_awq":
        return {**out, **_awq_keys(qm)}
    out.update(block_name_to_quantize=qm.block_name, quant_method="auto-round", packing_format=resolve_packing(qm, fmt))
    extra = _extra_config(qm)
    return {**out, "extra_config": extra} if extra else out


def export_hf_config(qm: QuantizedModel, fmt: str, qc: dict[str, Any] | None) -> dict[str, Any]:
    """config.json: the model's own, dtype set to the float tensors' dtype; the reference declares float16 for AWQ
    packing and auto_gptq (its save_model sets torch_dtype and dtype) although it writes the floats unchanged."""
    cfg = {k: v for k, v in qm.hf_config.items() if k not in ("quantization_config", "torch_dtype")}
    cfg["dtype"] = jnp.dtype(qm.dtype).name  # bfloat16, float16 or float32
    if qc is not None:
        if (fmt == "auto_gptq" or "awq" in resolve_packing(qm, fmt)) and cfg["dtype"] != "float16":
            cfg["dtype"] = cfg["torch_dtype"] = "float16"
        cfg["quantization_config"] = qc
    return cfg


def _float(qm: QuantizedModel, name: str, dtype=None) -> np.ndarray:
    """A source tensor in the export dtype, except that fp32 source tensors are never downcast: the reference puts
    them back after saving (restore_fp32_tensors_from_source), quantized layers' biases included."""
    a = np.asarray(qm.reader.get(name))
    return a if a.dtype == np.float32 else a.astype(dtype or qm.dtype)


def global_tensors(qm: QuantizedModel) -> Iterator[tuple[str, np.ndarray]]:
    """The tensors outside the blocks (embedding, final norm, untied lm_head), in the model dtype."""
    for spec in GLOBAL_TENSORS:
        if spec.present(qm.config):
            yield spec.name, _float(qm, spec.name)


def block_export_tensors(qm: QuantizedModel, i: int, linear: Callable[[QuantizedWeight], dict[str, np.ndarray]],
                         bias_dtype) -> Iterator[tuple[str, np.ndarray]]:
    """Block i's tensors: float ones in the model dtype, a quantized linear's weight replaced by linear(codes)
    (tensors by suffix), its bias in bias_dtype. MoE: per-expert names; routers (role "router") stay float."""
    cfg = qm.config
    p = block_prefix(i)
    for spec in block_tensors(cfg, i):
        if not spec.present(cfg):
            continue
        full = p + spec.name
        module = full.rsplit(".", 1)[0]
        if spec.role in ("float", "router") or qm.layer_config.get(module) is None:
            yield full, _float(qm, full)
        elif spec.role == "linear":
            for suffix, arr in linear(qm.quantized[module]).items():
                yield f"{module}.{suffix}", arr
        else:
            yield full, _float(qm, full, bias_dtype)


def iter_tensors(qm: QuantizedModel, linear: Callable[[QuantizedWeight], dict[str, np.ndarray]],
                 bias_dtype) -> Iterator[tuple[str, np.ndarray]]:
    """Every tensor of an export, block by block (one block's layers in memory at a time)."""
    yield from global_tensors(qm)
    for i in range(qm.config.num_layers):
        yield from block_export_tensors(qm, i, linear, bias_dtype)


def linear_packer(qm: QuantizedModel, fmt: str) -> Callable[[QuantizedWeight], dict[str, np.ndarray]]:
    """What a quantized linear becomes in format fmt (its packed tensors, by suffix)."""
    packing = PACKINGS[resolve_packing(qm, fmt)]
    return lambda qw: pack_linear(qw, packing)


def write_metadata(qm: QuantizedModel, folder: str, fmt: str, report=None) -> None:
    """Everything of an export except its tensors: config.json, quantization_config.json, tokenizer files, and
    whatever report(folder) adds."""
    qc = quantization_config(qm, fmt)
    write_json(export_hf_config(qm, fmt, qc), os.path.join(folder, "config.json"))
    write_json(qc, os.path.join(folder, "quantization_config.json"))
    copy_tokenizer_files(qm.files_dir, folder)
    if report is not None:
        report(folder)


def write_quantized(qm: QuantizedModel, output_dir: str, fmt: str = "auto_round", overwrite: bool = False,
                    report=None) -> str:
    """Write qm in one of FORMATS into output_dir (atomically); report(folder) may add files."""
    _check_exportable(qm, fmt)
    with atomic_folder(output_dir, overwrite) as tmp:
        write_sharded(iter_tensors(qm, linear_packer(qm, fmt), np.float16), tmp)
        write_metadata(qm, tmp, fmt, report)
    return os.path.abspath(output_dir)


# -- from a tuning run ---------------------------------------------------------------------------------------------
def tuning_settings(qm_or_settings) -> dict[str, Any]:
    """The tuning settings the reference records, minus those equal to its defaults (filter_quantization_config).

    Its RTN route (iters=0) records neither iters nor a quantized input; amp is off where tuning ran in fp32.
    Takes a run's QuantizedModel (or its raw settings dict).
    """
    raw = getattr(qm_or_settings, "settings", qm_or_settings)
    iters = raw.get("iters", 0)
    if not iters:
        raw = {"amp": raw["amp"], "enable_quanted_input": False}
        defaults = REFERENCE_DEFAULTS
    else:
        defaults = {**REFERENCE_DEFAULTS, "lr": 1.0 / iters, "minmax_lr": 1.0 / iters}
    return {k: v for k, v in raw.items() if k not in defaults or defaults[k] != v}


def save_run(qm: QuantizedModel, output_dir: str, overwrite: bool = False, fmt: str = "auto_round") -> str:
    """Write a tuning run's QuantizedModel in one of FORMATS (report.md and loss.png included)."""
    exported = dataclasses.replace(qm, settings=tuning_settings(qm))
    return write_quantized(exported, output_dir, fmt, overwrite, report=lambda folder: write_report(qm, folder))


EXPORTERS = {f: functools.partial(save_run, fmt=f) for f in FORMATS}
