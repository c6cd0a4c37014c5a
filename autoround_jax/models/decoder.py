"""One Flax NNX decoder for Qwen2 (q/k/v bias), Qwen3 (q/k RMSNorm), Llama and their MoE variants (Qwen3-MoE,
Qwen2-MoE: models/moe.py), parametrized by ModelConfig.

Attribute names mirror the HF module names (self_attn.q_proj, mlp.down_proj, input_layernorm, ...), so the path of a
tensor in this model is its HF name without the "model." prefix: the params table stays declarative and the
exporters can walk the same names.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .config import ModelConfig
from .layers import FloatWeight, Linear, RMSNorm, apply_rope, rope_cos_sin, rope_inv_freq, swiglu
from .moe import SparseMoE
from .precision import f32_einsum, linear, physical_transpose

_NEG = -1e30


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerCache:
    """Keys/values of one block: [B, S_max, KVH, D]."""

    k: jax.Array
    v: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Per-layer caches plus which slots hold real tokens (left padding) and the next free slot."""

    layers: list[LayerCache]
    key_mask: jax.Array  # [B, S_max] bool
    index: jax.Array  # int32 scalar: slots [0, index) are filled

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, max_len: int, dtype) -> "KVCache":
        shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
        layers = [LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.num_layers)]
        return cls(layers, jnp.zeros((batch, max_len), bool), jnp.zeros((), jnp.int32))


def _linear(in_features: int, out_features: int, bias: bool, dtype) -> Linear:
    """A float Linear of zeros: built under nnx.eval_shape it is only shapes, filled later by models/builder.py."""
    return Linear(FloatWeight(jnp.zeros((out_features, in_features), dtype)),
                  jnp.zeros((out_features,), dtype) if bias else None)


class Attention(nnx.Module):
    """Grouped-query attention with optional q/k norm and an optional KV cache."""

    def __init__(self, cfg: ModelConfig, dtype):
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        d = cfg.hidden_size
        self.q_proj = _linear(d, cfg.q_size, cfg.qkv_bias, dtype)
        self.k_proj = _linear(d, cfg.kv_size, cfg.qkv_bias, dtype)
        self.v_proj = _linear(d, cfg.kv_size, cfg.qkv_bias, dtype)
        self.o_proj = _linear(cfg.q_size, d, cfg.o_bias, dtype)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(jnp.ones((cfg.head_dim,), dtype), cfg.rms_norm_eps)
            self.k_norm = RMSNorm(jnp.ones((cfg.head_dim,), dtype), cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def __call__(self, x, cos, sin, mask, cache: LayerCache | None = None, index=None):
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k_all = jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), (0, index, 0, 0))
            v_all = jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), (0, index, 0, 0))
            cache = LayerCache(k_all, v_all)
            k, v = k_all.astype(x.dtype), v_all.astype(x.dtype)
        out = _attend(q, k, v, mask, self.num_kv_heads, causal=cache is None)
        return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim)), cache


def _attend(q, k, v, mask, kv_heads, causal: bool = False):
    """softmax(q k^T / sqrt(d)) v with GQA by grouping query heads; softmax in fp32 like HF eager.

    causal: the mask lets no query see a later key (causal_mask, with or without padding, builds only such masks;
    a cached forward's mask does not qualify), so the amp path may skip the blocks above the diagonal."""
    if q.dtype != jnp.float32:
        return _attend_mixed(q, k, v, mask, kv_heads, causal)
    b, t, h, d = q.shape
    qg = q.reshape(b, t, kv_heads, h // kv_heads, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k) / np.sqrt(d).astype(np.float32)
    scores = jnp.where(mask[:, None, None, :, :], scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, d)


def _attend_mixed(q, k, v, mask, kv_heads, causal: bool = False):
    """The same under amp (bf16 operands, f32 scores and accumulation), laid out heads-major ([B*KVH, G*T, D]) so
    that both contractions and their gradients are plain batched matmuls: with the HF layout, XLA:CPU transposed the
    [B, KVH, G, T, S] score tensors back and forth in every forward and backward pass.

    With a causal mask over T = S (even) the queries run in two halves: the first half attends only the first half
    of the keys (the keys after it are masked for all of its queries), so a quarter of the scores, their softmax and
    their four gradient products are never computed. The masked scores' probabilities are exactly 0 either way, so
    the result is the same (12.6 -> 10.1 ms forward and backward on a SmolLM2 block's 4 x 256 tokens, 2-core EPYC).
    """
    b, t, h, d = q.shape
    s, g = k.shape[1], h // kv_heads
    qz = physical_transpose(q.reshape(b, t, kv_heads, g, d), (0, 2, 3, 1, 4)).reshape(b * kv_heads, g, t, d)
    kz = physical_transpose(k, (0, 2, 1, 3)).reshape(b * kv_heads, s, d)
    vz = physical_transpose(v, (0, 2, 1, 3)).reshape(b * kv_heads, s, d)
    halves = 2 if causal and t == s and t % 2 == 0 and t >= 32 else 1
    tb, outs = t // halves, []
    for i in range(halves):
        rows, keys = slice(i * tb, (i + 1) * tb), (i + 1) * tb if halves > 1 else s
        qi = qz[:, :, rows].reshape(b * kv_heads, g * tb, d)
        oi = _softmax_attention(qi, kz[:, :keys], vz[:, :keys], mask[:, rows, :keys], (b, kv_heads, g, tb, keys))
        outs.append(oi.reshape(b, kv_heads, g, tb, d))
    out = outs[0] if halves == 1 else jnp.concatenate(outs, axis=3)
    return physical_transpose(out, (0, 3, 1, 2, 4)).reshape(b, t, h, d)


def _attention_probs(qz, kz, mask, shape):
    """softmax(mask(q k^T / sqrt(d))) in f32, [Z, G*T, S] (Z = B*KVH)."""
    scores = f32_einsum("zqd,zsd->zqs", qz, kz).reshape(shape)
    scores = jnp.where(mask[:, None, None, :, :], scores / np.sqrt(qz.shape[-1]).astype(np.float32), _NEG)
    return jax.nn.softmax(scores, axis=-1).reshape(qz.shape[0], -1, shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _softmax_attention(qz, kz, vz, mask, shape):
    """probs @ v with bf16 operands and f32 accumulation, differentiated by hand.

    The backward is the usual softmax-attention one, dS = P * (dP - rowsum(dP * P)) / sqrt(d), with P the bf16
    probabilities the forward fed to its second matmul: masked positions have P = 0, so no mask select, no f32
    copy of P and no separate softmax-Jacobian passes are needed (autodiff of the composition spent about a tenth
    of a tuning step on the [B, KVH, G, T, S] element-wise passes on a 2-core CPU)."""
    return _softmax_attention_fwd(qz, kz, vz, mask, shape)[0]


def _softmax_attention_fwd(qz, kz, vz, mask, shape):
    probs = _attention_probs(qz, kz, mask, shape).astype(qz.dtype)
    return f32_einsum("zqs,zsd->zqd", probs, vz).astype(qz.dtype), (qz, kz, vz, mask, probs)


def _softmax_attention_bwd(shape, res, dout):
    qz, kz, vz, mask, probs = res
    dout = dout.astype(qz.dtype)
    dprobs = f32_einsum("zqd,zsd->zqs", dout, vz)
    p = probs.astype(jnp.float32)
    ds = p * (dprobs - jnp.sum(dprobs * p, axis=-1, keepdims=True)) / np.sqrt(qz.shape[-1]).astype(np.float32)
    ds = ds.astype(qz.dtype)
    dq = f32_einsum("zqs,zsd->zqd", ds, kz).astype(qz.dtype)
    dk = f32_einsum("zqs,zqd->zsd", ds, qz).astype(kz.dtype)
    dv = f32_einsum("zqs,zqd->zsd", probs, dout).astype(vz.dtype)
    return dq, dk, dv, None


_softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig, dtype, intermediate_size: int | None = None):
        d, i = cfg.hidden_size, intermediate_size or cfg.intermediate_size
        self.gate_proj = _linear(d, i, cfg.mlp_bias, dtype)
        self.up_proj = _linear(d, i, cfg.mlp_bias, dtype)
        self.down_proj = _linear(i, d, cfg.mlp_bias, dtype)

    def __call__(self, x):
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class DecoderBlock(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(.))."""

    def __init__(self, cfg: ModelConfig, dtype=jnp.float32, sparse: bool = False):
        """Shapes from the config only; models/builder.py builds it abstractly and fills its leaves. sparse: a
        mixture-of-experts MLP (cfg.is_moe_layer(i) for block i)."""
        self.input_layernorm = RMSNorm(jnp.ones((cfg.hidden_size,), dtype), cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(jnp.ones((cfg.hidden_size,), dtype), cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, dtype)
        if sparse:
            shared = (MLP(cfg, dtype, cfg.shared_expert_intermediate_size) if cfg.shared_expert_intermediate_size
                      else None)
            self.mlp = SparseMoE(cfg, dtype, shared)
        else:
            self.mlp = MLP(cfg, dtype)

    def __call__(self, x, cos, sin, mask, cache: LayerCache | None = None, index=None):
        """Returns (output, updated cache or None). mask: [B, T, S] bool, True where a query may attend."""
        a, cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, index)
        h = x + a
        return h + self.mlp(self.post_attention_layernorm(h)), cache


class Rotary(nnx.Module):
    """Holds the inverse frequencies (a constant, not a parameter)."""

    def __init__(self, cfg: ModelConfig):
        inv, self.scaling = rope_inv_freq(cfg.rope, cfg.head_dim, cfg.max_position_embeddings)
        self.inv_freq = nnx.Variable(jnp.asarray(inv))

    def __call__(self, positions, dtype):
        return rope_cos_sin(positions, self.inv_freq[...], self.scaling, dtype)


def causal_mask(attention_mask: jax.Array | None, batch: int, t: int) -> jax.Array:
    """[B, T, T] causal mask that also hides padded keys."""
    m = jnp.tril(jnp.ones((t, t), bool))[None]
    m = jnp.broadcast_to(m, (batch, t, t))
    if attention_mask is not None:
        m = m & attention_mask.astype(bool)[:, None, :]
    return m


def default_positions(attention_mask: jax.Array | None, batch: int, t: int) -> jax.Array:
    """Positions count real tokens only, so left-padded prompts rotate like unpadded ones."""
    if attention_mask is None:
        return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (batch, t))
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def attention_inputs(rotary: Rotary, attention_mask: jax.Array | None, batch: int, t: int, dtype,
                     positions: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(cos, sin, mask) for a full forward of T tokens: the prologue shared by the model, lm-eval and the tuner (which
    embeds its calibration ids itself and builds these for one batch of rows)."""
    if positions is None:
        positions = default_positions(attention_mask, batch, t)
    cos, sin = rotary(positions, dtype)
    return cos, sin, causal_mask(attention_mask, batch, t)


class CausalLM(nnx.Module):
    """Embedding, decoder blocks, final norm and (tied or untied) lm_head."""

    def __init__(self, cfg: ModelConfig, dtype=jnp.float32):
        """Shapes from the config only; models/builder.py builds it abstractly and fills its leaves."""
        self.config = cfg
        self.embed_tokens = nnx.Param(jnp.zeros((cfg.vocab_size, cfg.hidden_size), dtype))
        self.layers = nnx.List([DecoderBlock(cfg, dtype, cfg.is_moe_layer(i)) for i in range(cfg.num_layers)])
        self.norm = RMSNorm(jnp.ones((cfg.hidden_size,), dtype), cfg.rms_norm_eps)
        # None when tied to embed_tokens
        self.lm_head = None if cfg.tie_word_embeddings else _linear(cfg.hidden_size, cfg.vocab_size, False, dtype)
        self.rotary = Rotary(cfg)

    @property
    def dtype(self):
        return self.embed_tokens.dtype

    def embed(self, input_ids: jax.Array) -> jax.Array:
        return jnp.take(self.embed_tokens[...], input_ids, axis=0)

    def logits(self, h: jax.Array) -> jax.Array:
        h = self.norm(h)
        if self.lm_head is None:
            out = linear(h, self.embed_tokens[...])
        else:
            out = self.lm_head(h)
        return out.astype(jnp.float32)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> jax.Array:
        """Token ids [B, T] -> fp32 logits [B, T, V]."""
        return self.logits(self.hidden(input_ids, attention_mask, positions))

    def hidden(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               positions: jax.Array | None = None) -> jax.Array:
        """The last block's output [B, T, D] (before the final norm): the one forward body without a cache."""
        b, t = input_ids.shape
        h = self.embed(input_ids)
        cos, sin, mask = attention_inputs(self.rotary, attention_mask, b, t, h.dtype, positions)
        for block in self.layers:
            h, _ = block(h, cos, sin, mask)
        return h

    def forward_cached(
        self,
        input_ids: jax.Array,
        positions: jax.Array,
        token_mask: jax.Array,
        cache: KVCache,
    ) -> tuple[jax.Array, KVCache]:
        """Run T new tokens into slots [cache.index, cache.index + T); token_mask marks real (non-pad) tokens."""
        b, t = input_ids.shape
        s = cache.key_mask.shape[1]
        key_mask = jax.lax.dynamic_update_slice(cache.key_mask, token_mask.astype(bool), (0, cache.index))
        q_slot = cache.index + jnp.arange(t)
        mask = (jnp.arange(s)[None, :] <= q_slot[:, None])[None] & key_mask[:, None, :]
        h = self.embed(input_ids)
        cos, sin = self.rotary(positions, h.dtype)
        new_layers = []
        for block, lc in zip(self.layers, cache.layers):
            h, lc = block(h, cos, sin, mask, lc, cache.index)
            new_layers.append(lc)
        return self.logits(h), KVCache(new_layers, key_mask, cache.index + t)
