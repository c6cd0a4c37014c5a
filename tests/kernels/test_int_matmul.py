"""int_matmul against a float oracle built from an independent numpy packer.

On CPU the Pallas kernel runs in interpret mode; on a GPU / TPU the same tests
run it compiled.
"""
from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from autoround_jax.kernels import api as kernels
from autoround_jax.kernels.api import KernelConfig, int_matmul, pallas_matmul, prepare
from autoround_jax.kernels import tpu as tpu_schedules

# (M, K, N, group_size, bits, sym): every M of {1, 7, 16, 64, 256}, Qwen-like
# K / N (256..896) and K an odd multiple of the group (3G).
CASES = [
    (1, 896, 256, 128, 4, True),
    (1, 96, 128, 32, 8, False),
    (1, 256, 128, 64, 2, False),
    (7, 384, 128, 128, 4, False),
    (7, 512, 384, -1, 8, True),
    (16, 192, 256, 64, 4, True),
    (16, 896, 128, 64, 8, False),
    (64, 256, 896, -1, 4, False),
    (64, 384, 128, 128, 8, True),
    (256, 96, 128, 32, 4, False),
    (256, 256, 128, 32, 8, True),
]


def gptq_pack(codes: np.ndarray, bits: int) -> np.ndarray:
  """Oracle packer: int32 [K*bits/32, N], q[k = per*r + i] in bits [bits*i, bits*(i+1))."""
  per = 32 // bits
  k, n = codes.shape
  words = np.zeros((k // per, n), np.uint64)
  for r in range(k // per):
    for i in range(per):
      words[r] += codes[per * r + i].astype(np.uint64) << np.uint64(bits * i)
  return words.astype(np.uint32).view(np.int32)


def make_weight(k: int, n: int, group_size: int, bits: int, sym: bool, seed: int):
  """Random codes / scales / zeros -> (checkpoint tensors, float64 W oracle)."""
  rng = np.random.default_rng(seed)
  g = k if group_size == -1 else group_size
  n_groups = -(-k // g)
  codes = rng.integers(0, 2**bits, (k, n))
  scales = (rng.standard_normal((n_groups, n)) * 0.02).astype(np.float16)
  if sym:
    zeros = np.full((n_groups, n), 2 ** (bits - 1), np.int32)
  else:
    zeros = rng.integers(0, 2**bits, (n_groups, n)).astype(np.int32)
  rows = np.arange(k) // g
  w = (codes - zeros[rows]) * scales[rows].astype(np.float64)
  return (gptq_pack(codes, bits), scales, zeros), w


def assert_close(y: jax.Array, x: np.ndarray, w: np.ndarray) -> None:
  """|y - x@W| within bf16 rounding of W and of y: 2**-8 * (|x| @ |W|)."""
  y = np.asarray(y, np.float64)
  ref = x @ w
  bound = 2.0**-8 * (np.abs(x) @ np.abs(w)) + 1e-6
  assert y.shape == ref.shape
  assert np.all(np.isfinite(y))
  worst = np.max(np.abs(y - ref) / bound)
  assert worst <= 1.0, f"error {worst:.2f}x the bf16 bound"


def make_x(m: int, k: int, seed: int, dtype=jnp.bfloat16) -> tuple[jax.Array, np.ndarray]:
  x = jnp.asarray(np.random.default_rng(seed).standard_normal((m, k)), dtype)
  return x, np.asarray(x, np.float64)


@pytest.mark.parametrize("m,k,n,group_size,bits,sym", CASES)
@pytest.mark.parametrize("backend", ["pallas", "xla"])
def test_matches_dequantized_matmul(m, k, n, group_size, bits, sym, backend):
  tensors, w_ref = make_weight(k, n, group_size, bits, sym, seed=m + k + n)
  w = prepare(*tensors, bits=bits, group_size=group_size)
  x, x64 = make_x(m, k, seed=m)
  y = int_matmul(x, w, backend=backend)
  assert y.dtype == x.dtype
  assert_close(y, x64, w_ref)


@pytest.mark.parametrize("m,k,n,group_size,bits,sym", [c for c in CASES if c[0] == 1])
@pytest.mark.parametrize("reduce_max_m", [0, 1])
def test_both_xla_forms_at_decode(m, k, n, group_size, bits, sym, reduce_max_m):
  """The XLA fallback's multiply-reduce form (GPU default at M=1) and its dequant + dot form (elsewhere)."""
  from autoround_jax.kernels.xla import xla_matmul

  tensors, w_ref = make_weight(k, n, group_size, bits, sym, seed=m + k + n)
  w = prepare(*tensors, bits=bits, group_size=group_size)
  x, x64 = make_x(m, k, seed=m)
  assert_close(xla_matmul(x, w, reduce_max_m=reduce_max_m), x64, w_ref)


@pytest.mark.parametrize("group_size,bits,sym", [(128, 4, True), (32, 8, False), (-1, 4, False)])
def test_dequantize_is_exact(group_size, bits, sym):
  tensors, w_ref = make_weight(384, 128, group_size, bits, sym, seed=1)
  w = prepare(*tensors, bits=bits, group_size=group_size)
  np.testing.assert_array_equal(np.asarray(kernels.dequantize(w)), w_ref.astype(np.float32))


@pytest.mark.parametrize("kind", ["gemm", "gemv"])
@pytest.mark.parametrize("split_mode", ["partials", "revisit"])
def test_schedule_variants(kind, split_mode):
  tensors, w_ref = make_weight(512, 256, 64, 4, False, seed=2)
  w = prepare(*tensors, bits=4, group_size=64)
  m = 2 if kind == "gemv" else 16
  cfg = KernelConfig(kind=kind, block_m=m, block_n=128, split_k=2, split_mode=split_mode)
  x, x64 = make_x(m, 512, seed=3)
  assert_close(pallas_matmul(x, w, cfg, interpret=True), x64, w_ref)


def test_tpu_schedule_in_interpret_mode():
  tensors, w_ref = make_weight(1024, 256, 128, 4, False, seed=4)
  w = prepare(*tensors, bits=4, group_size=128, platform="tpu")
  assert w.tile_k == 128 and w.scales.dtype == jnp.float32
  x, x64 = make_x(5, 1024, seed=5)
  cfg, _ = tpu_schedules.choose(5, w)
  assert_close(pallas_matmul(x, w, cfg, interpret=True), x64, w_ref)


def test_float16_activations_and_batch_dims():
  tensors, w_ref = make_weight(256, 128, 64, 4, True, seed=6)
  w = prepare(*tensors, bits=4, group_size=64)
  x = jnp.asarray(np.random.default_rng(7).standard_normal((2, 3, 256)), jnp.float16)
  for backend in ("pallas", "xla"):
    y = int_matmul(x, w, backend=backend)
    assert y.shape == (2, 3, 128) and y.dtype == jnp.float16
    assert_close(y.reshape(6, 128), np.asarray(x, np.float64).reshape(6, 256), w_ref)


def test_packed_weight_is_a_pytree_with_static_metadata():
  tensors, w_ref = make_weight(256, 128, 64, 4, True, seed=8)
  w = prepare(*tensors, bits=4, group_size=64)
  leaves, treedef = jax.tree_util.tree_flatten(w)
  assert len(leaves) == 3
  assert jax.tree_util.tree_unflatten(treedef, leaves).group_size == 64
  x, x64 = make_x(3, 256, seed=9)
  y = jax.jit(lambda x, w: int_matmul(x, w, backend="xla"))(x, w)
  assert_close(y, x64, w_ref)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="auto picks Pallas off CPU")
def test_auto_on_cpu_uses_xla(monkeypatch):
  def no_pallas(*args, **kwargs):
    raise AssertionError("auto must not use Pallas on CPU")

  dispatch = importlib.import_module("autoround_jax.kernels.int_matmul")  # module, not the function
  monkeypatch.setattr(dispatch, "pallas_matmul", no_pallas)
  tensors, w_ref = make_weight(256, 128, 64, 4, True, seed=10)
  w = prepare(*tensors, bits=4, group_size=64)
  x, x64 = make_x(4, 256, seed=11)
  assert_close(int_matmul(x, w), x64, w_ref)


def test_prepare_rejects_bad_inputs():
  tensors, _ = make_weight(256, 128, 64, 4, True, seed=12)
  qweight, scales, zeros = tensors
  with pytest.raises(ValueError, match="do not match"):
    prepare(qweight, scales[:2], zeros, bits=4, group_size=64)
  with pytest.raises(ValueError, match="power of two"):
    prepare(qweight, scales, zeros, bits=4, group_size=64, plane=24)
  with pytest.raises(ValueError, match="bits"):
    prepare(qweight, scales, zeros, bits=3, group_size=64)
