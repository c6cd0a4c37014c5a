"""Which linears get quantized and how: the reference's rules (fp_layers, layer_config, to_quant_block_names,
dimensions divisible by 32, lm_head kept in float)."""

from __future__ import annotations

import json
import re
import warnings
from typing import Any, Mapping

from ..models.config import ModelConfig
from ..models.params_table import BLOCK_PREFIX, block_linear_names, linear_shape
from .fake_quant import LayerScheme

SUPPORTED_BITS = (2, 3, 4, 8)
STANDARD_GROUPS = (-1, 0, 32, 64, 128, 256)  # padding allowed when K is not a multiple (reference behaviour)
SCHEMES = {
    "W4A16": LayerScheme(4, 128, True), "W8A16": LayerScheme(8, 128, True), "W3A16": LayerScheme(3, 128, True),
    "W2A16": LayerScheme(2, 128, True), "W2A16G64": LayerScheme(2, 64, True), "W2A16G32": LayerScheme(2, 32, True),
}


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


def parse_layer_config(spec: str | Mapping[str, Any] | None) -> dict[str, Any]:
    if not spec:
        return {}
    if isinstance(spec, Mapping):
        return dict(spec)
    try:
        return json.loads(spec)
    except json.JSONDecodeError:
        raise ValueError(
            f"--layer_config is not valid JSON: {spec!r}; write e.g. '{{\"mlp.down_proj\": {{\"bits\": 8}}}}'"
        ) from None


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
    out: dict[str, LayerScheme | None] = {}
    for i in range(cfg.num_layers):
        block = f"{BLOCK_PREFIX}.{i}"
        selected = any(_matches(b, block) or block.startswith(b + ".") or b == BLOCK_PREFIX for b in blocks)
        for lin in block_linear_names(cfg):
            name = f"{block}.{lin}"
            scheme: LayerScheme | None = default if selected else None
            for key, val in overrides.items():
                if _matches(key, name) or re.fullmatch(key, name):
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
    return out


def _override(base: LayerScheme, val: Any) -> LayerScheme | None:
    if isinstance(val, str):
        if val.upper() not in SCHEMES:
            raise ValueError(f"unknown scheme {val!r} in layer_config: use one of {', '.join(SCHEMES)} or a dict")
        return SCHEMES[val.upper()]
    d = dict(val)
    if d.get("bits", base.bits) >= 16 or d.get("data_type") in ("fp", "float"):
        return None
    return LayerScheme(
        bits=int(d.get("bits", base.bits)),
        group_size=int(d.get("group_size", base.group_size)),
        sym=bool(d.get("sym", base.sym)),
    )
