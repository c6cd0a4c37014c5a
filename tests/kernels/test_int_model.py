"""A quantized tiny Qwen3 through the int matmul kernels (Pallas in interpret mode on CPU, and the XLA fallback)
gives the logits and greedy tokens of the same model with its dequantized float weights."""

import numpy as np
import pytest

from autoround_jax import load_model, load_quantized
from autoround_jax.formats.quantized_import import convert
from autoround_jax.generation import generate_ids
from autoround_jax.tuning.autoround import AutoRound
from tests.tiny_models import build_model, save_model


@pytest.fixture(scope="module", params=[True, False], ids=["sym", "asym"])
def exported(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("intmodel")
    src = save_model(build_model("qwen3_tune", num_layers=2), str(root / "src"))
    ar = AutoRound(src, iters=0, disable_opt_rtn=True, bits=4, group_size=32, sym=request.param, model_dtype="fp32",
                   progress=False)
    ar.quantize()
    packed = ar.save_quantized(str(root / "q"), format="auto_round")
    dense = convert(packed, str(root / "dense"), to="float")
    return packed, dense


@pytest.mark.parametrize("backend", ["pallas", "xla"])
def test_kernels_match_dequantized_float_model(exported, backend):
    packed, dense = exported
    ours, ref = load_quantized(packed, dtype="fp32", backend=backend), load_model(dense, dtype="fp32")
    ids = np.random.default_rng(0).integers(3, 301, size=(2, 9)).astype(np.int32)
    got, want = np.asarray(ours(ids)), np.asarray(ref(ids))
    assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()
    prompt = ids[:1]
    assert (generate_ids(ours, prompt, max_new_tokens=8) == generate_ids(ref, prompt, max_new_tokens=8)).all()
