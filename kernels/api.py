"""Weight-only int (2/4/8-bit) matmul kernels: Pallas (GPU, TPU) with an XLA fallback.

`autoround_jax.kernels` is a namespace package without an `__init__.py`, on purpose: a checkout's top-level kernels/
folder must not shadow the PyPI package `kernels` (which transformers imports) when the checkout root is on
sys.path, as it is for `python -m pytest`. Its public names are here: `from autoround_jax.kernels.api import ...`.
"""
from . import gpu, tpu
from .int_matmul import int_matmul, pallas_schedule
from .layout import PackedWeight, dequantize, prepare, unpack_codes
from .pallas_kernel import KernelConfig, pallas_matmul
from .xla import xla_matmul

__all__ = [
    "gpu",
    "tpu",
    "KernelConfig",
    "PackedWeight",
    "dequantize",
    "int_matmul",
    "pallas_matmul",
    "pallas_schedule",
    "prepare",
    "unpack_codes",
    "xla_matmul",
]
