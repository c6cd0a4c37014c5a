"""What the reference (auto-round 0.16.1) records for MoE routing layers in a packed export's extra_config.

The router `mlp.gate` is in its predefined ignore list and written as a regex `.*model\\.layers\\.N\\.mlp\\.gate.*`
with {"bits": 16, "data_type": "float"}; Qwen2-MoE's `shared_expert_gate` ([1, hidden], skipped for its shape) is
written by name with {"bits": 16, "data_type": "fp"}. Loaders (transformers + auto-round, vLLM) then keep both float.
"""

from __future__ import annotations

import re
from typing import Any

from ..models.config import ModelConfig
from ..models.params_table import block_prefix, router_shapes

ROUTER_RECORDS = {"mlp.gate": {"bits": 16, "data_type": "float"},
                  "mlp.shared_expert_gate": {"bits": 16, "data_type": "fp"}}


def router_extra_config(cfg: ModelConfig) -> dict[str, dict[str, Any]]:
    """extra_config entries for every sparse block's routers ({} for a dense model)."""
    out: dict[str, dict[str, Any]] = {}
    for i in range(cfg.num_layers):
        if not cfg.is_moe_layer(i):
            continue
        for name in router_shapes(cfg):
            full = block_prefix(i) + name
            key = ".*" + re.escape(full) + ".*" if name == "mlp.gate" else full
            out[key] = dict(ROUTER_RECORDS[name])
    return out


def router_names(cfg: ModelConfig) -> list[str]:
    """Full module names of every sparse block's routers (AWQ's modules_to_not_convert lists them)."""
    return [block_prefix(i) + n for i in range(cfg.num_layers) if cfg.is_moe_layer(i) for n in router_shapes(cfg)]

