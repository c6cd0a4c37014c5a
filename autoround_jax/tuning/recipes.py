"""The research API: every part of the block optimisation as a named, swappable piece of one static `Recipe`.

The reference's behaviour is the default of each part, so `Recipe()` tunes exactly as the tuner did before recipes
existed (tests/tuning/test_recipes.py checks byte-identical exports against the pre-recipe tuner):

- objective: `(out, target, mask) -> scalar`, out/target [B, T, D] in any float dtype, mask [1, T, 1] float (0 at
  each sample's last position, which has no next-token target), or [B, T, 1] when the calibration tokens hold pad
  tokens (0 there too: data/calibration.valid_token_mask). Default "mse": fp32 MSE of the masked difference.
- optimizer: `(lr, iters) -> optax.GradientTransformation` (lr is a traced fp32 scalar). Default "signsgd":
  p <- p - lr * (1 - t/iters) * sign(g). `minmax_optimizer` (None: the same factory) trains the clip scales.
- parameterization: V (init 0) plus per-group min/max clip scales with value range `clip_range` (default (0, 1))
  and initial value `clip_init` (default 1); `init` "minmax" (the reference's min/max range) or "search" (SignRoundV2's
  imatrix-weighted scale search, sym int only: the scale is init_scale x max_scale).
- select: "best" (the iteration of smallest loss, iteration 0 being RTN) or "last".

A Recipe is a frozen dataclass of hashable fields and is a static argument of the jitted loop: one compilation
per (recipe, block shape). Pass module-level functions (not a fresh lambda per block) so the recipe stays equal.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax

Objective = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
OptimizerFactory = Callable[[jax.Array, int], optax.GradientTransformation]


# -- objectives ---------------------------------------------------------------------------------------------------
def mse(out: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
    """The reference's block loss: mean over all elements of ((out - target) * mask)^2 in fp32."""
    return jnp.mean(jnp.square((out.astype(jnp.float32) - target.astype(jnp.float32)) * mask))


def mse_drop_outliers(out: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
    """SignRoundV2's loss for < 4-bit weights (sign_roundv2/quantizer.py `_get_loss`): the MSE without the
    max(1, numel // 1000) largest absolute errors of the micro-batch, chosen before the position mask is applied."""
    diff = jnp.abs(out.astype(jnp.float32) - target.astype(jnp.float32))
    flat = diff.reshape(-1)
    k = max(1, int(flat.size / 1000))
    _, top = jax.lax.top_k(flat, k)
    keep = jnp.ones_like(flat).at[top].set(0.0).reshape(diff.shape)
    return jnp.mean(jnp.square(diff * mask * keep))


def l1(out: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean absolute error of the masked difference (a research alternative, less driven by outliers than MSE)."""
    return jnp.mean(jnp.abs((out.astype(jnp.float32) - target.astype(jnp.float32)) * mask))


def token_normalized_mse(out: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
    """MSE of each token divided by that token's target energy: every position counts equally, whatever the scale
    of its hidden state (attention sinks carry huge norms and otherwise dominate the plain MSE)."""
    d = (out.astype(jnp.float32) - target.astype(jnp.float32)) * mask
    energy = jnp.mean(jnp.square(target.astype(jnp.float32)), axis=-1, keepdims=True)
    return jnp.mean(jnp.square(d) / (energy + 1e-6)) * jnp.mean(energy)


OBJECTIVES: dict[str, Objective] = {
    "mse": mse,
    "mse_drop_outliers": mse_drop_outliers,
    "l1": l1,
    "token_normalized_mse": token_normalized_mse,
}


# -- optimizers ---------------------------------------------------------------------------------------------------
def signsgd(lr, iters: int) -> optax.GradientTransformation:
    """p <- p - lr * (1 - t/iters) * sign(g): the reference's SignSGD with LinearLR(1 -> 0)."""
    return optax.chain(optax.scale_by_sign(), optax.scale_by_schedule(lambda t: -lr * (1.0 - t / iters)))


def signsgd_cosine(lr, iters: int) -> optax.GradientTransformation:
    """SignSGD with a cosine decay from lr to 0 instead of the linear one."""
    return optax.chain(optax.scale_by_sign(),
                       optax.scale_by_schedule(lambda t: -lr * 0.5 * (1.0 + jnp.cos(jnp.pi * t / iters))))


def signsgd_momentum(lr, iters: int) -> optax.GradientTransformation:
    """Sign of an exponential moving average of the gradient (beta 0.9; Lion-like), linear decay."""
    return optax.chain(optax.ema(0.9, debias=False), optax.scale_by_sign(),
                       optax.scale_by_schedule(lambda t: -lr * (1.0 - t / iters)))


def adam(lr, iters: int) -> optax.GradientTransformation:
    """Adam with linear decay; its normalised step is of the order of lr like SignSGD's (the reference's AdamRound
    uses Adam on the same parameters)."""
    return optax.adam(lambda t: lr * (1.0 - t / iters))


OPTIMIZERS: dict[str, OptimizerFactory] = {
    "signsgd": signsgd,
    "signsgd_cosine": signsgd_cosine,
    "signsgd_momentum": signsgd_momentum,
    "adam": adam,
}

INITS = ("minmax", "search")
SELECTS = ("best", "last")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One block-optimisation recipe; static and hashable (see the module docstring for each field)."""

    objective: Objective = mse
    optimizer: OptimizerFactory = signsgd
    minmax_optimizer: OptimizerFactory | None = None
    clip_range: tuple[float, float] = (0.0, 1.0)
    clip_init: float = 1.0
    init: str = "minmax"
    select: str = "best"

    def __post_init__(self):
        lo, hi = self.clip_range
        if not lo <= self.clip_init <= hi:
            raise ValueError(f"clip_init {self.clip_init} lies outside clip_range {self.clip_range}: pick one inside")
        if self.init not in INITS:
            raise ValueError(f"unknown init {self.init!r}: use one of {', '.join(INITS)}")
        if self.select not in SELECTS:
            raise ValueError(f"unknown select {self.select!r}: use one of {', '.join(SELECTS)}")
        object.__setattr__(self, "clip_range", (float(lo), float(hi)))

    def minmax_tx(self, lr, iters: int) -> optax.GradientTransformation:
        return (self.minmax_optimizer or self.optimizer)(lr, iters)


DEFAULT = Recipe()


def describe(recipe: Recipe) -> str:
    """The fields that differ from the reference's recipe, e.g. "objective=l1, optimizer=adam" ("" for the default)."""
    parts = []
    for f in dataclasses.fields(Recipe):
        value, default = getattr(recipe, f.name), getattr(DEFAULT, f.name)
        if value != default:
            parts.append(f"{f.name}={getattr(value, '__name__', value)}")
    return ", ".join(parts)


def _resolve(value, table: dict, what: str):
    if value is None:
        return None
    if callable(value):
        return value
    if isinstance(value, str) and value in table:
        return table[value]
    raise ValueError(f"unknown {what} {value!r}: use one of {', '.join(table)} or pass a Python callable")


def resolve_objective(value: str | Objective | None) -> Objective | None:
    """A registered objective name or a callable `(out, target, mask) -> scalar`."""
    return _resolve(value, OBJECTIVES, "objective")


def resolve_optimizer(value: str | OptimizerFactory | None) -> OptimizerFactory | None:
    """A registered optimizer name or a callable `(lr, iters) -> optax.GradientTransformation`."""
    return _resolve(value, OPTIMIZERS, "optimizer")


def make_recipe(recipe: Recipe | None = None, objective=None, optimizer=None, **fields) -> Recipe:
    """`recipe` (default: the reference's) with the given parts replaced; names resolve through the registries."""
    base = recipe or DEFAULT
    changes = {k: v for k, v in fields.items() if v is not None}
    if objective is not None:
        changes["objective"] = resolve_objective(objective)
    if optimizer is not None:
        changes["optimizer"] = resolve_optimizer(optimizer)
    if "minmax_optimizer" in changes:
        changes["minmax_optimizer"] = resolve_optimizer(changes["minmax_optimizer"])
    return dataclasses.replace(base, **changes) if changes else base
