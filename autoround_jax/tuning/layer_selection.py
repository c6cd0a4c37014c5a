"""Which linears get quantized and how, for the tuner: the model's block linears (names and shapes from
models/params_table) run through the one rule engine (quant/rules.py: fp_layers, layer_config,
to_quant_block_names), then the reference's shape rules: dimensions not divisible by 32 stay in float, and the group
size must divide every quantized layer's input size. lm_head is never quantized."""

from __future__ import annotations

import warnings

from ..models.config import ModelConfig
from ..models.params_table import BLOCK_PREFIX, block_linear_names, linear_shape
from ..quant.rules import LAYER_FIELDS, LayerConfigError, flag_rules, parse_layer_config, parse_names, resolve, unmatched
from ..quant.scheme import STANDARD_GROUPS, SUPPORTED_BITS, LayerScheme

__all__ = ["LAYER_FIELDS", "LayerConfigError", "check_scheme", "parse_layer_config", "parse_names", "resolve_layers"]


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
    blocks = [f"{BLOCK_PREFIX}.{i}" for i in range(cfg.num_layers)]
    shapes = {f"{blk}.{lin}": linear_shape(cfg, lin) for i, blk in enumerate(blocks)
              for lin in block_linear_names(cfg, i)}  # MoE: experts by name (mlp.experts.E.up_proj), routers never
    names = list(shapes)
    rules = flag_rules(names, blocks, block_prefix=BLOCK_PREFIX, fp_layers=fp_layers, layer_config=layer_config,
                       to_quant_block_names=to_quant_block_names)
    out = resolve(names, default, rules)
    for name, scheme in out.items():
        n_out, n_in = shapes[name]
        if scheme is not None and (n_in % 32 or n_out % 32):
            warnings.warn(f"{name} ({n_out}x{n_in}) has a dimension not divisible by 32: kept in float")
            out[name] = scheme = None
        if scheme is not None:
            check_scheme(scheme, n_in, name)
    unused = unmatched(parse_names(fp_layers), names, "substring")
    if unused:
        raise ValueError(f"--fp_layers entries match no layer: {', '.join(unused)} (names look like model.layers.5.mlp.up_proj)")
    if all(s is None for s in out.values()):
        raise ValueError("no layer is left to quantize: --fp_layers, --layer_config and --to_quant_block_names keep "
                         "every linear in float (or no linear has dimensions divisible by 32); quantize at least one")
    return out
