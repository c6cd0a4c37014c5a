"""Bit packing against auto_round's own packers (QuantLinear.pack, WQLinear_GEMM.from_linear), byte for byte."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from auto_round.export.export_to_awq.utils import WQLinear_GEMM
from auto_round_extension.torch.qlinear_torch import QuantLinear as QuantLinearRawZero
from auto_round_extension.torch.qlinear_torch_zp import QuantLinear as QuantLinearZeroMinusOne

from autoround_jax.quant import (
    pack_awq,
    pack_cols,
    pack_rows,
    qdq,
    rtn,
    unpack_awq,
    unpack_cols,
    unpack_rows,
)

N = 96  # a multiple of 32, as 3-bit qzeros need


def _quantized(k: int, bits: int, group_size: int, sym: bool, seed: int):
    """Our RTN of a random bf16 weight, and the nn.Linear holding its qdq weight, as the exporter receives it."""
    rs = np.random.RandomState(seed)
    w = jnp.asarray(rs.randn(N, k).astype(np.float32) * 0.02).astype(jnp.bfloat16)
    qw = rtn(w, bits, group_size, sym)
    one = jnp.ones((), w.dtype)  # rtn's arguments, so that W~ is the weight the codes were derived from
    w_qdq, _, _ = qdq(w, jnp.zeros(()), one, one, bits=bits, group_size=group_size, sym=sym)
    linear = torch.nn.Linear(k, N, bias=False, dtype=torch.bfloat16)
    linear.weight.data.copy_(torch.from_numpy(np.array(w_qdq.astype(jnp.float32))))
    return qw, linear


def _np(x) -> np.ndarray:
    return np.array(x)  # a writable copy: torch.from_numpy warns on read-only JAX buffers


@pytest.mark.filterwarnings("ignore:To copy construct:UserWarning")  # inside the reference 3-bit packer
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("k,group_size", [(256, 32), (576, 128), (128, -1)])
@pytest.mark.parametrize(
    "packer,sym",
    [("auto_round:auto_gptq", True), ("auto_round:auto_gptq", False), ("auto_round", False)],
    ids=["gptq-sym", "gptq-asym", "raw-asym"],
)
def test_gptq_layout_matches_reference_pack(packer, sym, k, group_size, bits):
    qw, linear = _quantized(k, bits, group_size, sym, seed=bits + k)
    cls = QuantLinearZeroMinusOne if packer == "auto_round:auto_gptq" else QuantLinearRawZero
    ref = cls(bits, group_size, k, N, bias=False)
    ref.device = "cpu"  # set by export_to_autoround.pack_layer; qlinear_torch's pack reads it
    scales = torch.from_numpy(_np(qw.scales))
    # the exporter passes sym zeros as the Python int 2^(b-1), asym zeros as the float zp tensor
    zeros = 2 ** (bits - 1) if sym else torch.from_numpy(_np(qw.zeros).astype(np.float32))
    with torch.no_grad():
        ref.pack(linear, scales, zeros, None, device="cpu")

    stored_zeros = _np(qw.zeros).T
    if cls is QuantLinearZeroMinusOne:  # GPTQ v1 stores zero - 1, clamped so that a zero of 0 cannot underflow
        stored_zeros = np.clip(stored_zeros - 1, 0, 2**bits - 1)
    qweight = pack_rows(_np(qw.codes).T, bits)
    qzeros = pack_cols(stored_zeros, bits)
    assert qweight.dtype == np.int32 and qzeros.dtype == np.int32
    np.testing.assert_array_equal(qweight, ref.qweight.numpy())
    np.testing.assert_array_equal(qzeros, ref.qzeros.numpy())
    np.testing.assert_array_equal(_np(qw.scales).T, ref.scales.numpy())


@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("k,group_size", [(256, 32), (512, 128), (128, -1)])
def test_awq_layout_matches_reference_from_linear(k, group_size, sym):
    qw, linear = _quantized(k, 4, group_size, sym, seed=k + sym)
    scales = torch.from_numpy(_np(qw.scales)).t().contiguous()
    # export_to_awq.pack_layer passes zeros transposed as float32, or the int 8 for sym
    zeros = 8 if sym else torch.from_numpy(_np(qw.zeros).T.astype(np.float32))
    with torch.no_grad():
        ref = WQLinear_GEMM.from_linear(linear, 4, group_size, scales=scales, zeros=zeros, device="cpu")
    np.testing.assert_array_equal(pack_awq(_np(qw.codes).T), ref.qweight.numpy())
    np.testing.assert_array_equal(pack_awq(_np(qw.zeros).T), ref.qzeros.numpy())
    np.testing.assert_array_equal(_np(qw.scales).T, ref.scales.numpy())


def test_known_words():
    """Hand-checked words: sym int4 qzeros 0x77777777; 3-bit code 10 straddles words 0 and 1."""
    assert pack_cols(np.full((1, 8), 7), 4)[0, 0] == 0x77777777
    assert pack_rows(np.arange(8).reshape(8, 1) % 16, 4)[0, 0] == 0x76543210
    q = np.zeros((32, 1), np.uint8)
    q[10] = 0b101
    assert pack_rows(q, 3)[:, 0].tolist() == [1 << 30, 1, 0]
    awq = pack_awq(np.arange(8).reshape(1, 8))
    assert awq[0, 0] == 0x75316420  # nibble i holds column AWQ_ORDER[i] = [0, 2, 4, 6, 1, 3, 5, 7][i]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_round_trip_numpy_and_jax(bits):
    rs = np.random.RandomState(bits)
    q = rs.randint(0, 2**bits, size=(96, 64)).astype(np.uint8)
    rows, cols = pack_rows(q, bits), pack_cols(q.T, bits)
    np.testing.assert_array_equal(unpack_rows(rows, bits), q)
    np.testing.assert_array_equal(unpack_cols(cols, bits), q.T)
    jit_rows = jax.jit(unpack_rows, static_argnums=1)(jnp.asarray(rows), bits)
    jit_cols = jax.jit(unpack_cols, static_argnums=1)(jnp.asarray(cols), bits)
    assert isinstance(jit_rows, jax.Array) and jit_rows.dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(jit_rows), q)
    np.testing.assert_array_equal(np.asarray(jit_cols), q.T)
    if bits == 4:
        awq = pack_awq(q)
        np.testing.assert_array_equal(unpack_awq(awq), q)
        np.testing.assert_array_equal(np.asarray(jax.jit(unpack_awq)(jnp.asarray(awq))), q)


def test_rejects_bad_input():
    with pytest.raises(ValueError):
        pack_rows(np.zeros((16, 4), np.uint8), 3)  # 3-bit runs are 32 codes
    with pytest.raises(ValueError):
        pack_rows(np.full((8, 4), 16), 4)  # code out of range
    with pytest.raises(ValueError):
        pack_awq(np.zeros((4, 12), np.uint8))
