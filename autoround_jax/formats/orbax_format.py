"""The JAX-native quantized checkpoint: the packed-int model's state as an orbax checkpoint, for JAX users who
restore it into their own code (sharded, with no torch names) and for lossless conversion to and from the packed
HF formats.

Folder: `state/` (orbax StandardCheckpointer; the tree below; its custom metadata holds the JSON described in
docs/formats.md: model config, global and per-layer schemes, packing, settings), `config.json` (the model's, with
quantization_config packing_format "orbax"), and the tokenizer files.

Tree: nested dicts by the NNX model path (`embed_tokens`, `layers/<i>/self_attn/q_proj/...`, `norm`, `lm_head`).
A quantized linear's weight is a group named as Qwix names a quantized array: `qvalue` int32 [K*b/32, N] (codes
packed along K, GPTQ order, the same words as auto_round's qweight), `scale` float16 [ceil(K/G), N] and
`zero_point` uint8 [ceil(K/G), N] (the raw zero: W[n, k] = (q[k, n] - zero_point[g, n]) * scale[g, n],
g = k // G). Float tensors keep the dtype they had in the source, a float linear's weight is `weight/w` [N, K].
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterator, Mapping

import numpy as np

from ..io.checkpoint import resolve_model_path
from ..io.hf_folder import atomic_folder, copy_tokenizer_files, write_json
from ..io.safetensors_io import CheckpointError
from ..models.config import ModelConfig
from ..models.params_table import BLOCK_TENSORS, GLOBAL_TENSORS, block_prefix, model_path
from ..models.quantized import QuantizedModel
from ..quant.pack import pack_rows, unpack_rows
from ..quant.qdq import QuantizedWeight
from ..quant.scheme import LayerScheme
from ..version import __version__
from .auto_round import export_hf_config, quantization_config, tuning_settings
from .report import write_report

FORMAT = "autoround_jax.orbax"
VERSION = 1
STATE_DIR = "state"
QLEAVES = ("qvalue", "scale", "zero_point")


def is_orbax(path: str) -> bool:
    """Whether a folder holds this format (an orbax state/ with our metadata beside a config.json)."""
    return os.path.isfile(os.path.join(path, STATE_DIR, "_CHECKPOINT_METADATA"))


def _tensor_paths(qm_config: ModelConfig) -> Iterator[tuple[str, str, str]]:
    """(HF tensor name, NNX model path, role) for every tensor the config implies."""
    for spec in GLOBAL_TENSORS:
        if spec.present(qm_config):
            yield spec.name, model_path(spec), spec.role
    for i in range(qm_config.num_layers):
        for spec in BLOCK_TENSORS:
            if spec.present(qm_config):
                yield block_prefix(i) + spec.name, f"layers.{i}." + model_path(spec), spec.role


def _set(tree: dict, dotted: str, value) -> None:
    *head, last = dotted.split(".")
    for h in head:
        tree = tree.setdefault(h, {})
    tree[last] = value


def _get(tree: Mapping, dotted: str):
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def qarray(qw: QuantizedWeight) -> dict[str, np.ndarray]:
    """QuantizedWeight (codes [N, K], scales and zeros [N, ng]) -> {qvalue, scale, zero_point} as stored."""
    return {"qvalue": pack_rows(np.asarray(qw.codes).T, qw.bits),
            "scale": np.ascontiguousarray(np.asarray(qw.scales).T),
            "zero_point": np.ascontiguousarray(np.asarray(qw.zeros).T.astype(np.uint8))}


def from_qarray(leaves: Mapping[str, np.ndarray], scheme: LayerScheme) -> QuantizedWeight:
    codes = unpack_rows(np.asarray(leaves["qvalue"]), scheme.bits)
    return QuantizedWeight(codes=np.ascontiguousarray(np.asarray(codes).T.astype(np.uint8)),
                           scales=np.ascontiguousarray(np.asarray(leaves["scale"]).T),
                           zeros=np.ascontiguousarray(np.asarray(leaves["zero_point"]).T.astype(np.int32)),
                           bits=scheme.bits, group_size=scheme.group_size, sym=scheme.sym)


def _scheme_json(s: LayerScheme | None):
    return None if s is None else dataclasses.asdict(s)


def state_tree(qm: QuantizedModel) -> dict[str, Any]:
    """The checkpoint's tree: float tensors as the source holds them, quantized linears as qvalue/scale/zero_point."""
    tree: dict[str, Any] = {}
    for name, path, role in _tensor_paths(qm.config):
        module = name.rsplit(".", 1)[0]
        if role == "linear" and qm.layer_config.get(module) is not None:
            for k, v in qarray(qm.quantized[module]).items():
                _set(tree, path[: -len(".w")] + "." + k, v)
        else:
            _set(tree, path, np.asarray(qm.reader.get(name)))
    return tree


def metadata(qm: QuantizedModel) -> dict[str, Any]:
    """The JSON stored with the tree: enough to rebuild the QuantizedModel (and the model) without other files."""
    return {"format": FORMAT, "version": VERSION, "autoround_jax_version": __version__,
            "packing": "qvalue: int32 words packing b-bit codes along K (GPTQ order), [K*b/32, N]",
            "dtype": np.dtype(qm.dtype).name, "hf_config": qm.hf_config, "scheme": _scheme_json(qm.scheme),
            "layers": {n: _scheme_json(s) for n, s in sorted(qm.layer_config.items())},
            "settings": qm.settings, "block_name": qm.block_name,
            "quantization_config": quantization_config(qm, "auto_round")}


def save_orbax(qm: QuantizedModel, output_dir: str, overwrite: bool = False) -> str:
    """Write qm as an orbax checkpoint folder (atomically); a tuning run's report goes with it."""
    import orbax.checkpoint as ocp

    run = bool(qm.reports)
    if run:
        qm = dataclasses.replace(qm, settings=tuning_settings(qm))
    missing = [n for n, s in qm.layer_config.items() if s is not None and n not in qm.quantized]
    if missing:
        raise ValueError(f"no integer codes for {len(missing)} quantized layers (e.g. {missing[0]}): quantize first")
    meta = metadata(qm)
    with atomic_folder(output_dir, overwrite) as tmp:
        ckpt = ocp.StandardCheckpointer()
        ckpt.save(os.path.join(os.path.abspath(tmp), STATE_DIR), state_tree(qm), custom_metadata=meta)
        ckpt.wait_until_finished()
        qc = {**meta["quantization_config"], "packing_format": "orbax"}
        write_json(export_hf_config(qm, "auto_round", qc), os.path.join(tmp, "config.json"))
        copy_tokenizer_files(qm.files_dir, tmp)
        if run:
            write_report(qm, tmp)
    return os.path.abspath(output_dir)


def read_metadata(path: str) -> dict[str, Any]:
    import orbax.checkpoint as ocp

    meta = ocp.StandardCheckpointer().metadata(os.path.join(os.path.abspath(path), STATE_DIR)).custom_metadata
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: the orbax checkpoint has no {FORMAT} metadata: not written by autoround-jax "
                              "save_quantized(format='orbax'); restore it with orbax directly")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path}: {FORMAT} version {meta.get('version')} is not supported (this version reads "
                              f"{VERSION}): upgrade autoround-jax")
    return meta


def restore_state(path: str, mesh=None) -> dict[str, Any]:
    """The checkpoint's tree: numpy arrays, or, given a mesh, jax arrays sharded by models/sharding.py's rules."""
    import jax
    import orbax.checkpoint as ocp

    state = os.path.join(os.path.abspath(path), STATE_DIR)
    ckpt = ocp.StandardCheckpointer()
    if mesh is None:
        return ckpt.restore(state)
    from ..models.sharding import leaf_shardings

    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), ckpt.metadata(state).item_metadata.tree)
    shardings = leaf_shardings(abstract, mesh)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return ckpt.restore(state, target)


class _TreeReader:
    """CheckpointReader's .get over the restored tree (float tensors by HF name)."""

    def __init__(self, path: str, tree: Mapping, paths: Mapping[str, str]):
        self.path, self._tree, self._paths = path, tree, paths

    def keys(self) -> list[str]:
        return list(self._paths)

    def __contains__(self, name: str) -> bool:
        return name in self._paths

    def get(self, name: str) -> np.ndarray:
        if name not in self._paths:
            raise CheckpointError(f"{self.path}: tensor {name} is missing from the orbax checkpoint")
        try:
            return np.asarray(_get(self._tree, self._paths[name]))
        except KeyError:
            raise CheckpointError(f"{self.path}: {self._paths[name]} is missing from the orbax tree") from None


def open_orbax(name_or_path: str) -> QuantizedModel:
    """An orbax quantized checkpoint as a QuantizedModel (what converters and load_quantized take)."""
    path = resolve_model_path(name_or_path)
    meta = read_metadata(path)
    cfg = ModelConfig.from_pretrained(path)
    tree = restore_state(path)
    schemes = {n: None if s is None else LayerScheme(**s) for n, s in meta["layers"].items()}
    floats, quantized = {}, {}
    for name, p, role in _tensor_paths(cfg):
        module = name.rsplit(".", 1)[0]
        if role == "linear" and schemes.get(module) is not None:
            try:
                leaves = {k: _get(tree, p[: -len(".w")] + "." + k) for k in QLEAVES}
            except KeyError:
                raise CheckpointError(f"{path}: {p[: -len('.w')]} lacks one of {', '.join(QLEAVES)}") from None
            quantized[module] = from_qarray(leaves, schemes[module])
        else:
            floats[name] = p
    return QuantizedModel(cfg, dict(meta["hf_config"]), _TreeReader(path, tree, floats), np.dtype(meta["dtype"]),
                          LayerScheme(**meta["scheme"]), schemes, quantized, dict(meta["settings"]), path,
                          meta["block_name"])
