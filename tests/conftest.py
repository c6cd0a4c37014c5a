"""Shared fixtures. The environment is set before anything imports jax or huggingface_hub."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# amp's precision depends on the host (bf16 matmuls on CPUs with bf16 units, fp32 on AVX2-only ones): the suite runs
# fp32 on every host unless a test asks for bf16 itself, so results never depend on which CPU CI drew.
os.environ.setdefault("AUTOROUND_JAX_CPU_BF16", "0")

import pytest  # noqa: E402


def pytest_sessionstart(session):
    """Print the CPU flags that decide speed and bf16 behaviour (also under -q), so that a failure on one kind of
    machine is recognisable from the log."""
    import platform

    from autoround_jax.models.precision import CPU_BF16_ENV, cpu_flag_summary, cpu_has_bf16

    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    line = (f"cpu: {platform.machine()}, flags: {cpu_flag_summary()}; bf16 units: "
            f"{'yes' if cpu_has_bf16(respect_env=False) else 'no'}; tests run fp32 ({CPU_BF16_ENV}="
            f"{os.environ.get(CPU_BF16_ENV)}) unless a test asks for bf16")
    if reporter is not None:
        reporter.write_line(line)


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
