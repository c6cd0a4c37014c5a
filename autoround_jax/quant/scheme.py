"""How one linear is quantized (LayerScheme), the named scheme presets, and the one check of what is supported.

Every layer above (rules, the tuner, the exporters and the importer) validates a bit width or a group size through
`check_scheme`, so the supported set is written down once.
"""

from __future__ import annotations

import dataclasses

SUPPORTED_BITS = (2, 3, 4, 8)
STANDARD_GROUPS = (-1, 0, 32, 64, 128, 256)  # padding allowed when K is not a multiple (reference behaviour)
FLOAT_DATA_TYPES = ("fp", "float", "float16", "bfloat16")


@dataclasses.dataclass(frozen=True)
class LayerScheme:
    """How one linear is quantized."""

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    data_type: str = "int"


# The reference's weight-only preset names (auto_round/schemes.py).
SCHEMES = {
    "W4A16": LayerScheme(4, 128, True), "W8A16": LayerScheme(8, 128, True), "W3A16": LayerScheme(3, 128, True),
    "W2A16": LayerScheme(2, 128, True), "W2A16G64": LayerScheme(2, 64, True), "W2A16G32": LayerScheme(2, 32, True),
}


class UnsupportedSchemeError(ValueError):
    """A bit width, group size or data type this implementation does not quantize to."""


def check_bits(bits: int) -> int:
    """bits as an int, or UnsupportedSchemeError naming the supported widths."""
    if isinstance(bits, bool) or int(bits) != bits or int(bits) not in SUPPORTED_BITS:
        raise UnsupportedSchemeError(f"bits must be 2, 3, 4 or 8, got {bits}")
    return int(bits)


def check_scheme(scheme: LayerScheme) -> LayerScheme:
    """The scheme itself if int 2/3/4/8-bit with group -1, 0 or >= 1; else UnsupportedSchemeError."""
    check_bits(scheme.bits)
    if not str(scheme.data_type).startswith("int"):
        raise UnsupportedSchemeError(f"data_type {scheme.data_type!r} is not supported: int weight-only schemes only")
    if scheme.group_size < -1:
        raise UnsupportedSchemeError(f"group_size must be -1 (one group per row), 0 or positive, got "
                                     f"{scheme.group_size}")
    return scheme
