"""The safetensors dtypes: bit widths, float field layouts and torch equivalents."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class DType:
    name: str
    bits: int  # bits per element
    # Float field layout (sign bit, exponent bits, mantissa bits); None for integers and bool.
    exponent: Optional[int] = None
    mantissa: Optional[int] = None
    signed_float: bool = True

    @property
    def is_float(self) -> bool:
        return self.exponent is not None

    def nbytes(self, numel: int) -> int:
        """Bytes of a tensor of `numel` elements (sub-byte types are packed, rounded up)."""
        return (numel * self.bits + 7) // 8


_ALL = [
    DType("F64", 64, 11, 52),
    DType("F32", 32, 8, 23),
    DType("F16", 16, 5, 10),
    DType("BF16", 16, 8, 7),
    DType("F8_E4M3", 8, 4, 3),
    DType("F8_E5M2", 8, 5, 2),
    DType("F8_E4M3FNUZ", 8, 4, 3),
    DType("F8_E5M2FNUZ", 8, 5, 2),
    DType("F8_E8M0", 8, 8, 0, signed_float=False),
    DType("F6_E2M3", 6),
    DType("F6_E3M2", 6),
    DType("F4", 4),
    DType("I64", 64),
    DType("I32", 32),
    DType("I16", 16),
    DType("I8", 8),
    DType("U64", 64),
    DType("U32", 32),
    DType("U16", 16),
    DType("U8", 8),
    DType("BOOL", 8),
    DType("C64", 64),  # complex64: two F32, coded as byte planes
]
DTYPES: dict[str, DType] = {d.name: d for d in _ALL}

_TORCH_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu",
    "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz", "C64": "complex64",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
}


def torch_dtype(name: str) -> Optional["torch.dtype"]:
    """The torch dtype for a safetensors dtype name, or None where torch has none."""
    import torch

    attr = _TORCH_NAMES.get(name)
    return getattr(torch, attr, None) if attr else None


def torch_view(raw, dtype: str, shape: list[int]) -> "torch.Tensor":
    """A tensor of safetensors dtype `dtype` over the bytes `raw` (a writable buffer: no copy)."""
    import torch

    return torch.frombuffer(raw, dtype=torch.uint8).view(torch_dtype(dtype)).reshape(shape)
