"""Where each leaf goes on a device mesh: partition rules by model path, in the style of tunix's ShardingConfig.

Axis names follow the scale-out plan: `data` shards activations along samples (the tuner's business), `fsdp` shards
weights along output features. A rule whose axis is not in the mesh, or whose dimension does not divide by the
axis size, leaves that dimension replicated, so any mesh loads any model.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# (regex on the model path, one axis name or None per dimension); first match wins; no match: replicated.
PARTITION_RULES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.weight\.w$", ("fsdp", None)),
    (r"\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.bias$", ("fsdp",)),
    # A fake-quant weight's V [out x groups, group] and per-group clip scales and init [out x groups]: by output rows.
    (r"\.weight\.(v|min_scale|max_scale|wmin0|wmax0)$", ("fsdp", None)),
    (r"\.weight\.(v|min_scale|max_scale|wmin0|wmax0)$", ("fsdp",)),
    # the orbax quantized checkpoint's packed linears (formats/orbax_format.py): [K*b/32 or groups, N]
    (r"\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.weight\.(qvalue|scale|zero_point)$",
     (None, "fsdp")),
    (r"^lm_head\.weight\.w$", ("fsdp", None)),
    (r"^embed_tokens$", ("fsdp", None)),
)


def partition_spec(path: str, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """The PartitionSpec of a leaf at `path` with `shape` on `mesh`."""
    for pattern, axes in PARTITION_RULES:
        if re.search(pattern, path) and len(axes) == len(shape):
            return PartitionSpec(*(a if a in mesh.shape and dim % mesh.shape[a] == 0 else None
                                   for a, dim in zip(axes, shape)))
    return PartitionSpec()


def place(value: jax.Array, path: str, mesh: Mesh | None) -> jax.Array:
    """value on the mesh as the rules say (unchanged without a mesh)."""
    if mesh is None:
        return value
    return jax.device_put(value, NamedSharding(mesh, partition_spec(path, tuple(value.shape), mesh)))


def leaf_shardings(tree, mesh: Mesh, prefix: str = ""):
    """NamedShardings for every array of an (abstract) nnx state, keyed like it: what an orbax restore asks for."""
    def one(path, leaf):
        keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        if keys and keys[-1] == "value" and isinstance(path[-1], jax.tree_util.GetAttrKey):
            keys = keys[:-1]  # an nnx Variable's value: the path names the Variable
        name = prefix + ".".join(keys)
        return NamedSharding(mesh, partition_spec(name, tuple(jnp.shape(leaf)), mesh))
    return jax.tree_util.tree_map_with_path(one, tree)
