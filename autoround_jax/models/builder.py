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
from .params_table import BLOCK_TENSORS, GLOBAL_TENSORS, TensorSpec, block_prefix, model_path, module_at
from .sharding import place

# (HF tensor name) -> array; raises for a missing tensor.
TensorGetter = Callable[[str], np.ndarray]
# (HF module name of a linear, e.g. "model.layers.3.mlp.up_proj", its float weight reader) -> a weight leaf, or
# None to keep the float weight. The reader is called only if the factory needs the float values.
WeightLeaf = Callable[[str, Callable[[], np.ndarray]], nnx.Module | None]


def abstract_block(cfg: ModelConfig, dtype) -> DecoderBlock:
    """A DecoderBlock of ShapeDtypeStructs: no memory, the target of filling (or of an orbax restore)."""
    return nnx.eval_shape(lambda: DecoderBlock(cfg, dtype))


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
    """Assign every (spec, HF name) leaf of root; `scope` is root's path in the whole model (for sharding rules)."""
    for spec, name in specs:
        if not spec.present(cfg):
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


def build_block(cfg: ModelConfig, i: int, get: TensorGetter, dtype, weight_leaf: WeightLeaf | None = None,
                mesh=None, source: str = "checkpoint") -> DecoderBlock:
    """Block i: abstract, then filled from get("model.layers.{i}....") one tensor at a time."""
    block = abstract_block(cfg, dtype)
    p = block_prefix(i)
    _fill(block, ((s, p + s.name) for s in BLOCK_TENSORS), cfg, get, dtype, weight_leaf, mesh, source,
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
