"""The embedded SmolLM2 through our JAX model against transformers' own GGUF loader (torch oracle)."""

import numpy as np
import pytest

from autoround_jax import load_model, load_tokenizer
from autoround_jax.evaluation import perplexity_of_windows, token_windows

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def ours(smollm2_dir):
    return load_model(smollm2_dir, dtype="fp32")


def test_logits_match_transformers_gguf_loader(ours, smollm2_gguf_oracle):
    ids = np.random.default_rng(0).integers(0, 49152, size=(2, 24)).astype(np.int32)
    with torch.no_grad():
        ref = smollm2_gguf_oracle(torch.from_numpy(ids).long()).logits.numpy()
    got = np.asarray(ours(ids))
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_perplexity_agrees_with_oracle_within_half_percent(ours, smollm2_dir, smollm2_gguf_oracle):
    from autoround_jax.data.texts import eval_text

    tok = load_tokenizer(smollm2_dir)
    windows = token_windows(tok(eval_text()[:40000], add_special_tokens=False)["input_ids"], 256, 1024)
    assert windows.shape == (4, 256)
    got = perplexity_of_windows(ours, windows, batch_size=2)
    with torch.no_grad():
        ids = torch.from_numpy(windows).long()
        logp = torch.log_softmax(smollm2_gguf_oracle(ids).logits[:, :-1].float(), -1)
        nll = -logp.gather(-1, ids[:, 1:, None]).mean()
    ref = float(torch.exp(nll))
    assert 1.0 < got < 1000.0
    assert abs(got - ref) / ref < 0.005, (got, ref)


def test_chat_generation_runs_through_template(ours, smollm2_dir):
    from autoround_jax import generate

    tok = load_tokenizer(smollm2_dir)
    answer = generate(ours, tok, [{"role": "user", "content": "Say hello."}], max_new_tokens=8)
    assert isinstance(answer, str) and answer.strip()
