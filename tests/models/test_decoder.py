"""Our NNX decoder against transformers' torch forward on tiny random Qwen2/Qwen3/Llama models (fp32)."""

import numpy as np
import pytest

from autoround_jax import load_model
from tests.tiny_models import FAMILIES, build_model, save_model

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def pair(request, tmp_path_factory):
    model = build_model(request.param)
    folder = save_model(model, str(tmp_path_factory.mktemp(request.param)))
    return model, load_model(folder, dtype="fp32")


def test_logits_match_transformers(pair):
    torch_model, ours = pair
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 301, size=(3, 17)).astype(np.int32)  # batch of different prompts
    with torch.no_grad():
        ref = torch_model(torch.from_numpy(ids).long()).logits.numpy()
    got = np.asarray(ours(ids))
    assert got.shape == ref.shape
    scale = np.abs(ref).max()
    assert np.abs(got - ref).max() <= 1e-4 * max(scale, 1.0), np.abs(got - ref).max()


def test_left_padded_batch_matches_unpadded(pair):
    """A left-padded prompt gives the same logits on its real tokens as the same prompt alone (HF semantics)."""
    torch_model, ours = pair
    rng = np.random.default_rng(1)
    ids = rng.integers(3, 301, size=(2, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :5] = 0
    ids[1, :5] = 0
    got = np.asarray(ours(ids, attention_mask=mask))
    with torch.no_grad():
        ref = torch_model(torch.from_numpy(ids[1:, 5:]).long()).logits.numpy()
    assert np.abs(got[1, 5:] - ref[0]).max() <= 1e-4 * max(np.abs(ref).max(), 1.0)


def test_bf16_forward_and_cached_decoding_match_the_bf16_torch_model(pair, tmp_path):
    """A bf16 model (bf16 matmul operands with f32 accumulation, heads-major attention) against transformers' bf16
    forward of the same weights, and its cached step logits against its own full forward."""
    torch_model, _ = pair
    ours = load_model(save_model(torch_model, str(tmp_path)), dtype="bf16")
    ids = np.random.default_rng(3).integers(3, 301, size=(2, 13)).astype(np.int32)
    with torch.no_grad():
        ref = torch_model.to(torch.bfloat16)(torch.from_numpy(ids).long()).logits.float().numpy()
    torch_model.to(torch.float32)
    got = np.asarray(ours(ids))
    scale = np.abs(ref).max()
    assert np.abs(got - ref).max() <= 3e-2 * max(scale, 1.0), np.abs(got - ref).max()

    from autoround_jax.models.decoder import KVCache

    cache = KVCache.init(ours.config, 2, 16, ours.dtype)
    pos = np.broadcast_to(np.arange(13, dtype=np.int32), (2, 13))
    first, cache = ours.forward_cached(ids[:, :12], pos[:, :12], np.ones((2, 12), bool), cache)
    last, _ = ours.forward_cached(ids[:, 12:], pos[:, 12:], np.ones((2, 1), bool), cache)
    np.testing.assert_allclose(np.asarray(last)[:, 0], got[:, 12], atol=3e-2 * max(scale, 1.0))
