"""Weight-only int (2/4/8-bit) matmul kernels: Pallas (GPU, TPU) with an XLA fallback."""
from .int_matmul import int_matmul, pallas_schedule
from .layout import PackedWeight, dequantize, prepare, unpack_codes
from .pallas_kernel import KernelConfig, pallas_matmul
from .xla import xla_matmul

__all__ = [
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
