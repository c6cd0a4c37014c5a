"""The kernel variants the GPU suite sweeps (kernels.gpu.variants) and the TPU schedule, in interpret mode.

Each variant must compute the same product as the float oracle: the sweep times only configurations proven here.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from autoround_jax.kernels.api import KernelConfig, gpu, pallas_matmul, prepare
from autoround_jax.kernels import tpu as tpu_schedules
from tests.kernels.test_int_matmul import assert_close, make_weight, make_x

# (M, K, N, group_size): decode (gemv), M = 5 and 16 (16-row dot), M = 96 (128-row blocks); K of 8 tiles, so that
# split-K variants exist.
SHAPES = [(1, 1024, 256, 128), (2, 1024, 256, 128), (5, 1024, 128, 128), (16, 512, 256, 64), (96, 512, 128, 128)]


@pytest.mark.parametrize("m,k,n,group_size", SHAPES)
def test_every_gpu_variant_matches_the_oracle(m, k, n, group_size):
  tensors, w_ref = make_weight(k, n, group_size, 4, False, seed=m + k)
  w = prepare(*tensors, bits=4, group_size=group_size)
  x, x64 = make_x(m, k, seed=m)
  found = gpu.variants(m, w)
  names = [name for name, _, _ in found]
  assert names[0] == "default" and found[0][1] == gpu.choose(m, w)[0]
  assert len(names) == len(set(names)) >= 3, names
  for name, cfg, _ in found:
    y = pallas_matmul(x, w, cfg, interpret=True)
    assert y.shape == (m, n), name
    assert_close(y, x64, w_ref)


@pytest.mark.parametrize("kind", ["gemm", "gemv"])
@pytest.mark.parametrize("prefetch", [2, 3])
def test_deeper_prefetch_matches_the_default(kind, prefetch):
  """prefetch > 1 keeps several tiles' loads in flight (the last ones are clamped dummies): same result."""
  tensors, w_ref = make_weight(768, 128, 64, 4, True, seed=21)
  w = prepare(*tensors, bits=4, group_size=64)
  m = 1 if kind == "gemv" else 16
  x, x64 = make_x(m, 768, seed=22)
  base = KernelConfig(kind=kind, block_m=m, block_n=64, split_k=2)
  y1 = pallas_matmul(x, w, base, interpret=True)
  y2 = pallas_matmul(x, w, dataclasses.replace(base, prefetch=prefetch), interpret=True)
  assert_close(y2, x64, w_ref)
  np.testing.assert_array_equal(np.asarray(y1), np.asarray(y2))


@pytest.mark.parametrize("m,k", [(1, 5120), (8, 1024), (64, 1024)])
def test_tpu_schedule_decode_and_batch(m, k):
  """The TPU schedule (all of K in one block at these sizes) in interpret mode, K as in a 32B layer at M=1."""
  tensors, w_ref = make_weight(k, 256, 128, 4, True, seed=m)
  w = prepare(*tensors, bits=4, group_size=128, platform="tpu")
  cfg, _ = tpu_schedules.choose(m, w)
  assert cfg.split_k == 1 and cfg.block_m % 8 == 0
  x, x64 = make_x(m, k, seed=m + 1)
  assert_close(pallas_matmul(x, w, cfg, interpret=True), x64, w_ref)


def test_tpu_schedule_revisit_split(monkeypatch):
  """A K chunk cap below the activation block forces split-K accumulated in place ("revisit"), as on long K."""
  monkeypatch.setattr(tpu_schedules, "X_BLOCK_BYTES", 8 * 512 * 2)
  tensors, w_ref = make_weight(2048, 256, 128, 4, False, seed=31)
  w = prepare(*tensors, bits=4, group_size=128, platform="tpu")
  cfg, _ = tpu_schedules.choose(3, w)
  assert cfg.split_k == 4 and cfg.split_mode == "revisit"
  x, x64 = make_x(3, 2048, seed=32)
  assert_close(pallas_matmul(x, w, cfg, interpret=True), x64, w_ref)
