"""autoround-jax: AutoRound (SignRound) weight-only quantization for Qwen/Llama LLMs in pure JAX.

Public API: load_model, load_quantized, load_tokenizer, generate, perplexity (and, from the tuner, AutoRound).
Importing this package never imports torch.
"""

import importlib.abc as _abc
import importlib.machinery as _machinery
import os as _os
import sys as _sys


class _SourceTreeKernels(_abc.MetaPathFinder):
    """`pip install` maps the top-level kernels/ folder to autoround_jax.kernels (pyproject's package-dir). A source
    tree used without installing it (PYTHONPATH=checkout, as on a bare GPU machine) gets the same name here."""

    _dir = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), "kernels")

    def find_spec(self, fullname, path=None, target=None):
        if fullname != __name__ + ".kernels" or not _os.path.isfile(_os.path.join(self._dir, "api.py")):
            return None
        spec = _machinery.ModuleSpec(fullname, None, is_package=True)  # a namespace package, as installed
        spec.submodule_search_locations = [self._dir]
        return spec


if not any(isinstance(f, _SourceTreeKernels) for f in _sys.meta_path):
    _sys.meta_path.append(_SourceTreeKernels())  # after the installed finders: an install always wins

from .models import CausalLM, ModelConfig, load_model  # noqa: E402
from .tokenizer import load_tokenizer  # noqa: E402
from .generation import generate  # noqa: E402
from .evaluation import perplexity  # noqa: E402
from .formats.quantized_import import load_quantized  # noqa: E402

from .version import __version__  # noqa: E402
__all__ = ["CausalLM", "ModelConfig", "load_model", "load_quantized", "load_tokenizer", "generate", "perplexity",
           "__version__"]
