"""Parameters of the lossy stages, parsed from recipe data (no torch needed to read a recipe)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import FormatError, RecipeError

LOSSY_DTYPES = ("F64", "F32", "F16", "BF16")
GRANULARITIES = ("tensor", "channel", "group")


@dataclass(frozen=True)
class QuantParams:
    bits: int = 8
    symmetric: bool = True
    granularity: str = "channel"
    group: int = 128
    search: bool = True  # error-minimizing clipping search

    @staticmethod
    def from_dict(d: dict, where: str) -> "QuantParams":
        known = {"name", "bits", "symmetric", "granularity", "group", "search"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise RecipeError(f"recipe {where}: unknown key {unknown[0]!r}")
        p = QuantParams(**{k: v for k, v in d.items() if k != "name"})
        if type(p.bits) is not int or not 2 <= p.bits <= 8:
            raise RecipeError(f"recipe {where}: 'bits' must be an integer from 2 to 8")
        if not isinstance(p.symmetric, bool) or not isinstance(p.search, bool):
            raise RecipeError(f"recipe {where}: 'symmetric' and 'search' must be true or false")
        if p.granularity not in GRANULARITIES:
            raise RecipeError(f"recipe {where}: 'granularity' must be one of {', '.join(GRANULARITIES)}")
        if type(p.group) is not int or not 1 <= p.group <= 1 << 20:
            raise RecipeError(f"recipe {where}: 'group' must be a positive integer")
        return p

    def to_json(self) -> dict:
        return {"name": "quantize", "bits": self.bits, "symmetric": self.symmetric,
                "granularity": self.granularity, "group": self.group, "search": self.search}

    def parts(self, shape: list[int]) -> dict[str, tuple[str, list[int]]]:
        """The parts quantize.encode makes for a tensor of `shape`: name -> (safetensors dtype, shape)."""
        rows = shape[0] if len(shape) >= 2 else 1
        cols = math.prod(shape) // rows if rows else 0
        n = {"tensor": 1, "channel": rows,
             "group": rows * -(-cols // min(self.group, cols)) if cols else 0}[self.granularity]
        out = {"q": ("I8" if self.symmetric else "U8", list(shape)), "scale": ("F32", [n])}
        if not self.symmetric:
            out["zero"] = ("U8", [n])
        return out

    def label(self) -> str:
        g = {"tensor": "t", "channel": "ch", "group": f"g{self.group}"}[self.granularity]
        return f"q{self.bits}{'s' if self.symmetric else 'a'}-{g}"


def params_of(t: dict, where: str) -> QuantParams:
    """The stage parameters of a container's tensor record, validated."""
    stages = t["stages"]
    if len(stages) != 1 or not isinstance(stages[0], dict) or stages[0].get("name") != "quantize":
        raise FormatError(f"{where}: unknown stages")
    try:
        p = QuantParams.from_dict(stages[0], where)
    except (RecipeError, TypeError) as e:
        raise FormatError(f"{where}: malformed stage parameters ({e})") from None
    if t["dtype"] not in LOSSY_DTYPES:
        raise FormatError(f"{where}: stages on a {t['dtype']} tensor")
    return p
