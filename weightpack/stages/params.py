"""Parameters of the lossy stages, parsed from recipe data (no torch needed to read a recipe)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import FormatError, RecipeError

LOSSY_DTYPES = ("F64", "F32", "F16", "BF16")
GRANULARITIES = ("tensor", "channel", "group")


MODES = ("rtn", "ecsq", "tcq")
LAMBDA = 0.3  # tcq: default rate weight, in units of delta^2 per bit


@dataclass(frozen=True)
class QuantParams:
    """mode "rtn": `bits`-bit levels on a grid per group (see quantize.py). mode "ecsq": one uniform step
    for the whole tensor, the coarsest whose SQNR is at least `sqnr` dB (or the given `step`); the levels
    are left to the entropy coder (entropy-constrained scalar quantization). mode "tcq": trellis-coded
    quantization (stages/tcq.py) with one step for the tensor, chosen the same way, and levels picked
    by a search that weighs rate by `lam`."""

    bits: int = 8
    symmetric: bool = True
    granularity: str = "channel"
    group: int = 128
    search: bool = True  # error-minimizing clipping search
    mode: str = "rtn"
    sqnr: float = 0.0
    step: float = 0.0  # ecsq/tcq: a fixed step (rate control sets one for all tensors) instead of `sqnr`
    relative: bool = False  # the step is in units of the tensor's RMS
    lam: float = LAMBDA

    @staticmethod
    def from_dict(d: dict, where: str) -> "QuantParams":
        known = {"name", "bits", "symmetric", "granularity", "group", "search", "mode", "sqnr", "step", "relative",
                 "lam"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise RecipeError(f"recipe {where}: unknown key {unknown[0]!r}")
        p = QuantParams(**{k: v for k, v in d.items() if k != "name"})
        if p.mode not in MODES:
            raise RecipeError(f"recipe {where}: 'mode' must be one of {', '.join(MODES)}")
        if type(p.bits) is not int or not 2 <= p.bits <= 8:
            raise RecipeError(f"recipe {where}: 'bits' must be an integer from 2 to 8")
        if not all(isinstance(v, bool) for v in (p.symmetric, p.search, p.relative)):
            raise RecipeError(f"recipe {where}: 'symmetric', 'search' and 'relative' must be true or false")
        if p.granularity not in GRANULARITIES:
            raise RecipeError(f"recipe {where}: 'granularity' must be one of {', '.join(GRANULARITIES)}")
        if type(p.group) is not int or not 1 <= p.group <= 1 << 20:
            raise RecipeError(f"recipe {where}: 'group' must be a positive integer")
        if type(p.step) not in (int, float) or not (math.isfinite(p.step) and 0 <= p.step <= 1e30):
            raise RecipeError(f"recipe {where}: 'step' must be a finite number, at least 0")
        if type(p.sqnr) not in (int, float) or not (p.mode == "rtn" or p.step > 0 or 0 < p.sqnr <= 90):
            raise RecipeError(f"recipe {where}: 'sqnr' must be a number of dB from above 0 to 90 for mode {p.mode}")
        if type(p.lam) not in (int, float) or not 0 <= p.lam <= 100:
            raise RecipeError(f"recipe {where}: 'lam' must be a number from 0 to 100")
        return p

    def to_json(self) -> dict:
        if self.mode == "ecsq":
            return {"name": "quantize", "mode": "ecsq", "sqnr": self.sqnr, "step": self.step, "relative": self.relative}
        if self.mode == "tcq":
            return {"name": "quantize", "mode": "tcq", "sqnr": self.sqnr, "step": self.step, "relative": self.relative,
                    "lam": self.lam}
        return {"name": "quantize", "bits": self.bits, "symmetric": self.symmetric,
                "granularity": self.granularity, "group": self.group, "search": self.search}

    def parts(self, shape: list[int]) -> dict[str, tuple[str, list[int]]]:
        """The parts quantize.encode makes for a tensor of `shape`: name -> (safetensors dtype, shape)."""
        if self.mode == "ecsq":
            return {"q": ("U16", list(shape)), "step": ("F32", [1]), "offset": ("I32", [1])}
        if self.mode == "tcq":
            return {"q": ("I16", list(shape)), "step": ("F32", [1])}
        rows = shape[0] if len(shape) >= 2 else 1
        cols = math.prod(shape) // rows if rows else 0
        n = {"tensor": 1, "channel": rows,
             "group": rows * -(-cols // min(self.group, cols)) if cols else 0}[self.granularity]
        out = {"q": ("I8" if self.symmetric else "U8", list(shape)), "scale": ("F32", [n])}
        if not self.symmetric:
            out["zero"] = ("U8", [n])
        return out

    def coder(self, part: str) -> str:
        """How a part's stream is coded: 'trellis' (contexts from the trellis walk) or 'fields'."""
        return "trellis" if self.mode == "tcq" and part == "q" else "fields"

    def label(self) -> str:
        if self.mode in ("ecsq", "tcq"):
            if not self.step:
                return f"{self.mode}{self.sqnr:g}dB"
            return f"{self.mode}-step{self.step:.3g}{'rms' if self.relative else ''}"
        g = {"tensor": "t", "channel": "ch", "group": f"g{self.group}"}[self.granularity]
        return f"q{self.bits}{'s' if self.symmetric else 'a'}-{g}"


@dataclass(frozen=True)
class PruneParams:
    """Zero the smallest weights before quantization: a fraction of the tensor, or all but the n largest
    magnitudes in every run of m consecutive elements of a row (n:m structured sparsity, e.g. 2:4)."""

    sparsity: float = 0.5
    n: int = 0  # n:m pattern when m > 0; otherwise unstructured at `sparsity`
    m: int = 0

    @staticmethod
    def from_dict(d: dict, where: str) -> "PruneParams":
        unknown = sorted(set(d) - {"name", "sparsity", "n", "m"})
        if unknown:
            raise RecipeError(f"recipe {where}: unknown key {unknown[0]!r}")
        p = PruneParams(**{k: v for k, v in d.items() if k != "name"})
        if type(p.sparsity) not in (int, float) or not 0 <= p.sparsity < 1:
            raise RecipeError(f"recipe {where}: 'sparsity' must be a number from 0 to below 1")
        if type(p.n) is not int or type(p.m) is not int or not (p.m == p.n == 0 or 0 < p.n < p.m <= 64):
            raise RecipeError(f"recipe {where}: 'n' and 'm' must satisfy 0 < n < m <= 64 (or both be 0)")
        return p

    def to_json(self) -> dict:
        return {"name": "prune", "sparsity": self.sparsity, "n": self.n, "m": self.m}

    def label(self) -> str:
        return f"{self.n}of{self.m}" if self.m else f"prune{round(100 * self.sparsity)}"


@dataclass(frozen=True)
class LowRankParams:
    """Low rank plus residual: W = A @ B + R with A (rows x rank) and B (rank x cols) from a truncated SVD,
    both 8-bit with a scale per row of A and per column of B, and the residual R quantized by the next
    stage at the same error budget. rank 0 (in a recipe): chosen per tensor by estimated size at equal
    error, and no factorization at all where none saves bits (the tensor is then quantized directly)."""

    rank: int = 0

    @staticmethod
    def from_dict(d: dict, where: str) -> "LowRankParams":
        unknown = sorted(set(d) - {"name", "rank"})
        if unknown:
            raise RecipeError(f"recipe {where}: unknown key {unknown[0]!r}")
        p = LowRankParams(**{k: v for k, v in d.items() if k != "name"})
        if type(p.rank) is not int or not 0 <= p.rank <= 1 << 20:
            raise RecipeError(f"recipe {where}: 'rank' must be an integer from 0 (auto) up")
        return p

    def to_json(self) -> dict:
        return {"name": "lowrank", "rank": self.rank}

    def parts(self, shape: list[int]) -> dict[str, tuple[str, list[int]]]:
        rows = shape[0] if len(shape) >= 2 else 1
        cols = math.prod(shape) // rows if rows else 0
        return {"lr_a": ("I8", [rows, self.rank]), "lr_as": ("F32", [rows]),
                "lr_b": ("I8", [self.rank, cols]), "lr_bs": ("F32", [cols])}

    def label(self) -> str:
        return f"lowrank{self.rank or '-auto'}"


STAGE_PARSERS = {"quantize": QuantParams.from_dict, "prune": PruneParams.from_dict, "lowrank": LowRankParams.from_dict}


def chain_parts(chain: list, shape: list[int]) -> dict[str, tuple[str, list[int]]]:
    """The parts a chain stores for a tensor of `shape`: the low-rank factors (if any), then quantize's."""
    out = {}
    for p in chain:
        if hasattr(p, "parts"):
            out.update(p.parts(shape))
    return out


def parse_chain(stages: list, where: str) -> list:
    """Stage parameters from data: [quantize], [prune, quantize] or [lowrank, quantize]."""
    out = []
    for j, s in enumerate(stages):
        name = s.get("name") if isinstance(s, dict) else s
        if not isinstance(name, str) or name not in STAGE_PARSERS:
            raise RecipeError(f"recipe {where}: unknown stage {name!r} (known: {', '.join(STAGE_PARSERS)})")
        out.append(STAGE_PARSERS[name](s, f"{where} stages[{j}]"))
    kinds = [type(p) for p in out]
    if kinds not in ([], [QuantParams], [PruneParams, QuantParams], [LowRankParams, QuantParams]):
        raise RecipeError(f"recipe {where}: stages must be [quantize], [prune, quantize] or [lowrank, quantize]")
    return out


def params_of(t: dict, where: str) -> list:
    """The stage chain of a container's tensor record, validated: [quantize] or [prune, quantize]."""
    try:
        chain = parse_chain(t["stages"], where)
    except (RecipeError, TypeError) as e:
        raise FormatError(f"{where}: malformed stages ({e})") from None
    if not chain:
        raise FormatError(f"{where}: unknown stages")
    if isinstance(chain[0], LowRankParams):
        shape = t.get("shape")
        ok = isinstance(shape, list) and len(shape) >= 2 and all(type(d) is int and d > 0 for d in shape)
        rows = shape[0] if ok else 0
        if not ok or not 1 <= chain[0].rank <= min(rows, math.prod(shape) // rows):
            raise FormatError(f"{where}: malformed stages (rank out of range)")
    if t["dtype"] not in LOSSY_DTYPES:
        raise FormatError(f"{where}: stages on a {t['dtype']} tensor")
    return chain
