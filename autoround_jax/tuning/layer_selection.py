"""Which linears get quantized and how: the reference's rules (fp_layers, layer_config, to_quant_block_names,
dimensions divisible by 32, lm_head kept in float)."""

from __future__ import annotations

import difflib
import json
import re
import warnings
from typing import Any, Mapping

from ..models.config import ModelConfig
from ..models.params_table import BLOCK_PREFIX, block_linear_names, linear_shape
from ..quant.scheme import FLOAT_DATA_TYPES, SCHEMES, STANDARD_GROUPS, SUPPORTED_BITS, LayerScheme


def parse_names(spec: str | list[str] | None) -> list[str]:
    """'a,b' or ['a','b'] -> ['a','b']."""
    if not spec:
        return []
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    return [s.strip() for s in items if s.strip()]


def _matches(item: str, layer: str) -> bool:
    """Exact name, prefix, or substring; an item ending in a digit ('layers.1') does not match 'layers.10'."""
    if layer == item or layer.startswith(item + "."):
        return True
    if item[-1:].isdigit():
        return (item + ".") in (layer + ".")
    return item in layer


LAYER_FIELDS = ("bits", "group_size", "sym", "data_type", "act_bits")
_EXAMPLE = '{"mlp.down_proj": {"bits": 8}}'


class LayerConfigError(ValueError):
    """--layer_config of the wrong shape, with unknown fields, bad values or keys that match no layer."""


def parse_layer_config(spec: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """--layer_config (JSON text or a dict) -> {key: scheme name or field dict}, schema-checked."""
    if not spec:
        return {}
    if isinstance(spec, Mapping):
        config = dict(spec)
    else:
        try:
            config = json.loads(spec)
        except json.JSONDecodeError as e:
            raise LayerConfigError(
                f"--layer_config is not valid JSON ({e.msg} at column {e.colno}): {spec!r}; write e.g. '{_EXAMPLE}'"
            ) from None
        if not isinstance(config, dict):
            raise LayerConfigError(f"--layer_config must be a JSON object {{layer name or regex: {{bits, group_size, "
                                   f"sym}}}}, got a {_json_type(config)}; write e.g. '{_EXAMPLE}'")
    for key, val in config.items():
        _check_entry(key, val)
    return config


def _json_type(v: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(v), "number" if isinstance(v, (int, float)) else type(v).__name__)


def _check_entry(key: Any, val: Any) -> None:
    where = f"--layer_config[{key!r}]"
    if not isinstance(key, str) or not key.strip():
        raise LayerConfigError(f"--layer_config key {key!r} must be a layer name or regex")
    try:
        re.compile(key)
    except re.error as e:
        raise LayerConfigError(f"--layer_config key {key!r} is not a valid regular expression ({e}): escape special "
                               "characters or use the plain layer name") from None
    if isinstance(val, str):
        if val.upper() not in SCHEMES:
            raise LayerConfigError(f"{where}: unknown scheme {val!r}: use one of {', '.join(SCHEMES)} or an object "
                                   "like {\"bits\": 8}")
        return
    if not isinstance(val, Mapping):
        raise LayerConfigError(f"{where} is a {_json_type(val)}: each value must be an object like {{\"bits\": 8, "
                               f"\"group_size\": 128, \"sym\": true}} or a scheme name; write e.g. '{_EXAMPLE}'")
    for field, v in val.items():
        if field not in LAYER_FIELDS:
            close = difflib.get_close_matches(str(field), LAYER_FIELDS, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise LayerConfigError(f"{where}: unknown field {field!r}: {hint}known fields are {', '.join(LAYER_FIELDS)}")
        if field in ("bits", "group_size", "act_bits") and (isinstance(v, bool) or not isinstance(v, int)):
            raise LayerConfigError(f"{where}[{field!r}] is {v!r} ({_json_type(v)}): use an integer, e.g. "
                                   f"{8 if field != 'group_size' else 128}")
        if field == "sym" and not isinstance(v, bool):
            raise LayerConfigError(f"{where}['sym'] is {v!r} ({_json_type(v)}): use true or false")
        if field == "data_type" and (not isinstance(v, str) or v not in ("int", *FLOAT_DATA_TYPES)):
            raise LayerConfigError(f"{where}['data_type'] is {v!r}: autoround-jax quantizes to int; use \"int\", or "
                                   "\"float\" to keep the layer in float")
        if field == "act_bits" and v < 16:
            raise LayerConfigError(f"{where}['act_bits'] is {v}: activations are never quantized here (weight-only); "
                                   "drop act_bits or set it to 16")
    if "bits" in val and val["bits"] < 16 and val["bits"] not in SUPPORTED_BITS:
        raise LayerConfigError(f"{where}: bits {val['bits']} is not supported: use one of 2, 3, 4, 8 (or 16 to keep "
                               "the layer in float)")


def _key_matches(key: str, name: str) -> bool:
    return _matches(key, name) or re.fullmatch(key, name) is not None


def check_scheme(scheme: LayerScheme, in_features: int | None = None, name: str = "") -> None:
    if scheme.bits not in SUPPORTED_BITS:
        raise ValueError(f"bits {scheme.bits} is not supported: use one of 2, 3, 4, 8 (or 16 to keep a layer in float)")
    g = scheme.group_size
    if in_features is not None and g not in STANDARD_GROUPS and (g < 0 or in_features % g):
        raise ValueError(
            f"group_size {g} does not divide in_features {in_features}{' of ' + name if name else ''}: "
            "use -1, 32, 64, 128 or a divisor of every quantized layer's input size"
        )


def resolve_layers(
    cfg: ModelConfig,
    default: LayerScheme,
    *,
    fp_layers=None,
    layer_config=None,
    to_quant_block_names=None,
) -> dict[str, LayerScheme | None]:
    """Every block linear's full HF module name -> its scheme, or None to keep it in float."""
    check_scheme(default)
    fp = parse_names(fp_layers)
    overrides = parse_layer_config(layer_config)
    blocks = parse_names(to_quant_block_names) or [BLOCK_PREFIX]
    block_names = [f"{BLOCK_PREFIX}.{i}" for i in range(cfg.num_layers)]
    selects = lambda b, block: _matches(b, block) or block.startswith(b + ".") or b == BLOCK_PREFIX  # noqa: E731
    unmatched = [b for b in blocks if not any(selects(b, blk) for blk in block_names)]
    if unmatched:
        raise ValueError(f"--to_quant_block_names entries match no block: {', '.join(unmatched)} (this model's blocks "
                         f"are {BLOCK_PREFIX}.0 ... {BLOCK_PREFIX}.{cfg.num_layers - 1}; pass {BLOCK_PREFIX} for all)")
    all_names = [f"{blk}.{lin}" for blk in block_names for lin in block_linear_names(cfg)]
    unused = [k for k in overrides if not any(_key_matches(k, n) for n in all_names) and not _float_head(k, overrides[k])]
    if unused:
        raise LayerConfigError(f"--layer_config keys match no layer: {', '.join(map(repr, unused))} (names look like "
                               f"{BLOCK_PREFIX}.5.mlp.up_proj or a regex such as .*down_proj; lm_head always stays "
                               "in float)")
    out: dict[str, LayerScheme | None] = {}
    for i, block in enumerate(block_names):
        selected = any(selects(b, block) for b in blocks)
        for lin in block_linear_names(cfg):
            name = f"{block}.{lin}"
            scheme: LayerScheme | None = default if selected else None
            for key, val in overrides.items():
                if _key_matches(key, name):
                    scheme = _override(default if scheme is None else scheme, val)
            if scheme is not None and any(_matches(f, name) for f in fp):
                scheme = None
            n_out, n_in = linear_shape(cfg, lin)
            if scheme is not None and (n_in % 32 or n_out % 32):
                warnings.warn(f"{name} ({n_out}x{n_in}) has a dimension not divisible by 32: kept in float")
                scheme = None
            if scheme is not None:
                check_scheme(scheme, n_in, name)
            out[name] = scheme
    unused = [f for f in fp if not any(_matches(f, n) for n in out)]
    if unused:
        raise ValueError(f"--fp_layers entries match no layer: {', '.join(unused)} (names look like model.layers.5.mlp.up_proj)")
    if all(s is None for s in out.values()):
        raise ValueError("no layer is left to quantize: --fp_layers, --layer_config and --to_quant_block_names keep "
                         "every linear in float (or no linear has dimensions divisible by 32); quantize at least one")
    return out


def _float_head(key: str, val: Any) -> bool:
    """A key for lm_head that keeps it in float: true already (lm_head is never quantized), so accepted."""
    if not re.fullmatch(r"(.*\.)?lm_head", key):
        return False
    return isinstance(val, Mapping) and (val.get("bits", 16) >= 16 or val.get("data_type") in FLOAT_DATA_TYPES)


def _override(base: LayerScheme, val: Any) -> LayerScheme | None:
    if isinstance(val, str):
        if val.upper() not in SCHEMES:
            raise ValueError(f"unknown scheme {val!r} in layer_config: use one of {', '.join(SCHEMES)} or a dict")
        return SCHEMES[val.upper()]
    d = dict(val)
    if d.get("bits", base.bits) >= 16 or d.get("data_type") in FLOAT_DATA_TYPES:
        return None
    return LayerScheme(
        bits=int(d.get("bits", base.bits)),
        group_size=int(d.get("group_size", base.group_size)),
        sym=bool(d.get("sym", base.sym)),
    )
