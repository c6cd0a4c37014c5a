"""SignRoundV2 (`enable_alg_ext`) for int weight-only schemes, as the reference 0.16.1 runs it.

From auto_round/algorithms/quantization/sign_roundv2/quantizer.py (SignRoundV2Quantizer.prepare_run, _get_loss,
SignRoundOptimizedWrapperLinear) and data_type/utils.py (search_optimized_init_scale, reshape_imatrix_for_weight):

- only when the model's scheme is sym int (asym: the plain SignRound path, unchanged);
- each block's float forward collects the imatrix of every quantized linear: sum over all tokens of x^2 (not divided
  by a count: the search is invariant to that), padded with 1e-5 to whole groups;
- each layer's scale starts at the imatrix-weighted search_scales result (magnitude floored at the wrapper's
  q_scale_thresh), and the tuned scale is init_scale x max_scale, max_scale in [0, 2] (min_scale unused);
- for weights under 4 bits the loss drops the top 0.1% absolute errors (recipes.mse_drop_outliers).

Everything else (V, SignSGD, lr, best-loss selection) is the default recipe.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ..quant.opt_rtn import IMATRIX_PAD, search_scales
from ..quant.qdq import _scale_thresh, group_reshape
from ..quant.scheme import LayerScheme
from .recipes import Recipe, mse_drop_outliers

CLIP_RANGE = (0.0, 2.0)  # SignRoundOptimizedWrapperLinear.minmax_scale_bound


def applies(scheme: LayerScheme) -> bool:
    """SignRoundV2's optimized path: sym int schemes below 16 bits (the reference's prepare_run condition)."""
    return scheme.sym and scheme.data_type == "int" and scheme.bits < 16


def uses_outlier_loss(scheme: LayerScheme) -> bool:
    """`act_bits <= 4 or bits < 4` with 16-bit activations: weights under 4 bits."""
    return applies(scheme) and scheme.bits < 4


def alg_ext_recipe(base: Recipe, scheme: LayerScheme, keep_objective: bool = False) -> Recipe:
    """base with SignRoundV2's parts for the model's default scheme (base unchanged when it does not apply).

    keep_objective: the caller chose an objective explicitly, so the outlier-dropping loss does not replace it.
    """
    if not applies(scheme):
        return base
    changes = dict(clip_range=CLIP_RANGE, init="search")
    if uses_outlier_loss(scheme) and not keep_objective:
        changes["objective"] = mse_drop_outliers
    return dataclasses.replace(base, **changes)


def expand_imatrix(imatrix: np.ndarray | jax.Array, in_features: int, group_size: int) -> jax.Array:
    """reshape_imatrix_for_weight's layout for one row: [ng, G], the last group padded with 1e-5."""
    imat = jnp.asarray(imatrix, jnp.float32).reshape(1, in_features)
    grouped, _ = group_reshape(imat, group_size)
    if grouped.size != imat.size:  # padded: group_reshape pads with zeros, the reference with 1e-5
        pad = grouped.size - imat.size
        grouped = jnp.pad(imat, ((0, 0), (0, pad)), constant_values=IMATRIX_PAD).reshape(grouped.shape)
    return grouped


def init_scale(w: jax.Array, imatrix, scheme: LayerScheme, scale_dtype) -> jax.Array:
    """search_optimized_init_scale for a sym int weight W[N, K] (in its own dtype): the per-group scale [N*ng],
    signed like the reference's full-range scale, magnitude floored at q_scale_thresh."""
    n, k = w.shape
    wg, _ = group_reshape(w, scheme.group_size)  # zero padding, as reshape_pad_tensor_by_group_size
    g = wg.shape[-1]
    data = wg.reshape(n, -1, g)
    qw = None if imatrix is None else expand_imatrix(imatrix, k, scheme.group_size).reshape(1, -1, g)
    scale = search_scales(data, scheme.bits, qw if qw is not None else jnp.ones((1, 1, g), jnp.float32))
    t = jnp.asarray(_scale_thresh(scale_dtype), scale.dtype)
    scale = jnp.where(scale < 0, jnp.minimum(scale, -t), jnp.maximum(scale, t))
    return scale.reshape(-1)
