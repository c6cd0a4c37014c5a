"""Greedy decoding with our KV cache against transformers' generate (torch) on tiny random models."""

import numpy as np
import pytest

from autoround_jax import load_model
from autoround_jax.generation import generate_ids, sample_logits
from tests.tiny_models import FAMILIES, build_model, save_model

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_greedy_matches_transformers_generate(name, tmp_path):
    torch_model = build_model(name, seed=3)
    ours = load_model(save_model(torch_model, str(tmp_path)), dtype="fp32")
    ids = np.random.default_rng(2).integers(3, 301, size=(1, 9)).astype(np.int32)
    with torch.no_grad():
        ref = torch_model.generate(torch.from_numpy(ids).long(), max_new_tokens=20, do_sample=False,
                                   eos_token_id=None, pad_token_id=0).numpy()[0, 9:]
    got = generate_ids(ours, ids, max_new_tokens=20)[0]
    assert got.tolist() == ref.tolist()


def test_left_padded_batch_generates_like_single_prompts(tmp_path):
    torch_model = build_model("qwen3_gqa4_tied", seed=4)
    ours = load_model(save_model(torch_model, str(tmp_path)), dtype="fp32")
    rng = np.random.default_rng(5)
    a, b = rng.integers(3, 301, size=11), rng.integers(3, 301, size=6)
    ids = np.zeros((2, 11), np.int32)
    mask = np.zeros((2, 11), bool)
    ids[0], mask[0] = a, True
    ids[1, 5:], mask[1, 5:] = b, True
    batch = generate_ids(ours, ids, mask, max_new_tokens=12)
    for row, prompt in zip(batch, (a, b)):
        with torch.no_grad():
            ref = torch_model.generate(torch.from_numpy(prompt[None]).long(), max_new_tokens=12, do_sample=False,
                                       eos_token_id=None, pad_token_id=0).numpy()[0, len(prompt):]
        assert row.tolist() == ref.tolist()


def test_generation_stops_at_eos_and_pads(tmp_path):
    torch_model = build_model("llama_gqa4_untied", seed=6)
    ours = load_model(save_model(torch_model, str(tmp_path)), dtype="fp32")
    ids = np.random.default_rng(7).integers(3, 301, size=(1, 5)).astype(np.int32)
    free = generate_ids(ours, ids, max_new_tokens=10)[0]
    stop = int(free[3])  # declare the 4th generated token an eos
    first = free.tolist().index(stop)
    got = generate_ids(ours, ids, max_new_tokens=10, eos_token_ids=[stop], pad_token_id=-7)[0]
    assert got[: first + 1].tolist() == free[: first + 1].tolist()
    assert (got[first + 1 :] == -7).all()


def test_sampling_respects_top_k_and_seed():
    import jax

    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
    keys = jax.random.split(jax.random.PRNGKey(0), 200)
    draws = np.array([int(sample_logits(logits, k, 1.0, 2, 1.0)[0]) for k in keys])
    assert set(draws) <= {0, 1} and len(set(draws)) == 2
    draws_p = np.array([int(sample_logits(logits, k, 1.0, 0, 0.6)[0]) for k in keys])
    assert set(draws_p) <= {0, 1}
    assert int(sample_logits(logits, keys[0], 0.0, 0, 1.0)[0]) == 0
