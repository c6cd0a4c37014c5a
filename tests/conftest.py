"""Shared fixtures. The environment is set before anything imports jax or huggingface_hub."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    """The embedded SmolLM2-135M-Instruct as an HF folder (converted from its GGUF once, then cached)."""
    from autoround_jax.default_model import default_model_dir

    return default_model_dir()


@pytest.fixture(scope="session")
def smollm2_gguf_oracle():
    """transformers' own (torch) GGUF loader on the embedded SmolLM2: the oracle for conversion and our forward."""
    torch = pytest.importorskip("torch")
    import transformers

    from autoround_jax.default_model import find_default_gguf

    path = find_default_gguf()
    model = transformers.LlamaForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    )
    return model.eval()
