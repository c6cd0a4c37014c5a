"""autoround-jax: AutoRound (SignRound) weight-only quantization for Qwen/Llama LLMs in pure JAX.

Public API: load_model, load_quantized, load_tokenizer, generate, perplexity (and, from the tuner, AutoRound).
Importing this package never imports torch.
"""

from .models import CausalLM, ModelConfig, load_model
from .tokenizer import load_tokenizer
from .generation import generate
from .evaluation import perplexity
from .formats.quantized_import import load_quantized

__version__ = "0.1.0"
__all__ = ["CausalLM", "ModelConfig", "load_model", "load_quantized", "load_tokenizer", "generate", "perplexity",
           "__version__"]
