"""Weight-only int (2/4/8-bit) matmul kernels: Pallas (GPU, TPU) with an XLA fallback."""
from kernels.int_matmul import int_matmul, pallas_schedule
from kernels.layout import PackedWeight, dequantize, prepare, unpack_codes
from kernels.pallas_kernel import KernelConfig, pallas_matmul
from kernels.xla import xla_matmul

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
