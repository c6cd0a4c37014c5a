"""The one model builder: shape-only construction (`nnx.eval_shape`) from the config, then every leaf filled from
a tensor source, each shape-checked against the params table, optionally placed on a `Mesh` by sharding rules.

The float loader (models/loading.py), the quantized importer (formats/quantized_import.py) and the tuner's block
source all come through here; an orbax restore or a sharded load is a different `get` or a `mesh`, not another
loader. A weight-leaf factory decides what each linear's weight becomes (float, fake-quant, packed int): the
builder knows only the float leaf, so it imports nothing from the layers above.
"""

from __future__ import annotations

from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..io.safetensors_io import CheckpointError
from .config import ModelConfig
from .decoder import CausalLM, DecoderBlock, Rotary
from .moe import stack_leaves
from .params_table import GLOBAL_TENSORS, TensorSpec, block_prefix, block_tensors, model_path, module_at
from .sharding import place

# (HF tensor name) -> array; raises for a missing tensor.
TensorGetter = Callable[[str], np.ndarray]
# (HF module name of a linear, e.g. "model.layers.3.mlp.up_proj", its float weight reader) -> a weight leaf, or
# None to keep the float weight. The reader is called only if the factory needs the float values.
WeightLeaf = Callable[[str, Callable[[], np.ndarray]], nnx.Module | None]


def abstract_block(cfg: ModelConfig, dtype, i: int = 0) -> DecoderBlock:
    """Block i as a DecoderBlock of ShapeDtypeStructs: no memory, the target of filling (or of an orbax restore)."""
    return nnx.eval_shape(lambda: DecoderBlock(cfg, dtype, cfg.is_moe_layer(i)))


def abstract_model(cfg: ModelConfig, dtype) -> CausalLM:
    model = nnx.eval_shape(lambda: CausalLM(cfg, dtype))
    model.rotary = Rotary(cfg)  # a constant computed from the config, not a checkpoint tensor
    return model


def _read(get: TensorGetter, name: str, shape: tuple[int, ...], source: str) -> np.ndarray:
    arr = get(name)
    if tuple(arr.shape) != tuple(shape):
        raise CheckpointError(f"{source}: {name} has shape {tuple(arr.shape)}, config.json implies {tuple(shape)}")
    return arr


def _fill(root: nnx.Module, specs: Iterable[tuple[TensorSpec, str]], cfg: ModelConfig, get: TensorGetter, dtype,
          weight_leaf: WeightLeaf | None, mesh, source: str, scope: str) -> None:
    """Assign every (spec, HF name) leaf of root; `scope` is root's path in the whole model (for sharding rules).
    Experts' linears (spec.stack) are gathered and assigned as one stacked leaf per projection."""
    stacks: dict[str, list[tuple[TensorSpec, str]]] = {}
    for spec, name in specs:
        if not spec.present(cfg):
            continue
        if spec.stack is not None:
            stacks.setdefault(spec.stack, []).append((spec, name))
            continue
        path = model_path(spec)  # relative to root: a block's specs are named within the block
        shape = spec.shape(cfg)
        if spec.role == "linear" and weight_leaf is not None:
            module = name[: -len(".weight")]
            leaf = weight_leaf(module, lambda n=name, s=shape: _read(get, n, s, source))
            if leaf is not None:
                module_at(root, path[: -len(".weight.w")]).weight = leaf
                continue
        value = place(jnp.asarray(_read(get, name, shape, source), dtype), scope + path, mesh)
        module_at(root, path).set_value(value)
    for stack, members in stacks.items():
        _fill_stack(root, stack, sorted(members, key=lambda m: m[0].expert), cfg, get, dtype, weight_leaf, mesh,
                    source, scope)


def _fill_stack(root: nnx.Module, stack: str, members: list[tuple[TensorSpec, str]], cfg: ModelConfig,
                get: TensorGetter, dtype, weight_leaf: WeightLeaf | None, mesh, source: str, scope: str) -> None:
    """One stacked expert projection from its per-expert tensors: a float [E, out, in] array, or the weight_leaf
    factory's per-expert leaves stacked into one (every expert must then get a leaf of one structure)."""
    readers = [lambda n=name, s=spec.shape(cfg): _read(get, n, s, source) for spec, name in members]
    target = module_at(root, stack)
    if weight_leaf is not None:
        leaves = [weight_leaf(name[: -len(".weight")], r) for (_, name), r in zip(members, readers)]
        if any(leaf is not None for leaf in leaves):
            target.weight = stack_leaves(leaves, scope + stack)
            return
    value = jnp.asarray(np.stack([r() for r in readers]), dtype)
    module_at(root, model_path(members[0][0])).set_value(place(value, scope + model_path(members[0][0]), mesh))


def build_block(cfg: ModelConfig, i: int, get: TensorGetter, dtype, weight_leaf: WeightLeaf | None = None,
                mesh=None, source: str = "checkpoint") -> DecoderBlock:
    """Block i: abstract, then filled from get("model.layers.{i}....") one tensor at a time."""
    block = abstract_block(cfg, dtype, i)
    p = block_prefix(i)
    _fill(block, ((s, p + s.name) for s in block_tensors(cfg, i)), cfg, get, dtype, weight_leaf, mesh, source,
          f"layers.{i}.")
    return block


def build_model(cfg: ModelConfig, get: TensorGetter, dtype, weight_leaf: WeightLeaf | None = None, mesh=None,
                source: str = "checkpoint", blocks: Iterable[DecoderBlock] | None = None) -> CausalLM:
    """The whole model; `blocks` (already built, e.g. quantized ones) replace the ones read from get."""
    model = abstract_model(cfg, dtype)
    _fill(model, ((s, s.name) for s in GLOBAL_TENSORS), cfg, get, dtype, weight_leaf, mesh, source, "")
    if blocks is None:
        blocks = (build_block(cfg, i, get, dtype, weight_leaf, mesh, source) for i in range(cfg.num_layers))
    model.layers = nnx.List(list(blocks))
    return model


def is_abstract(module: nnx.Module) -> bool:
    """Whether any leaf of module is still a ShapeDtypeStruct (a fill missed it)."""
    return any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(nnx.state(module)))
