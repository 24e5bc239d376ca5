"""The typed results of the API: what pack, inspect and verify return, as frozen dataclasses.

Each has `to_json()`, the plain dict that `weightpack ... --json` prints (fields that do not apply to a
result, such as a pack's "shards" when it wrote one file, are left out of it, not written as null).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Optional

OMITTED_WHEN_NONE = {"omit_none": True}


def _optional():
    """A keyword-only field, None by default, that to_json leaves out when it is None (fields() and so
    to_json keep the order of definition)."""
    return field(default=None, kw_only=True, metadata=OMITTED_WHEN_NONE)


def as_json(value: Any) -> Any:
    """A result (or anything inside one) as plain JSON-able values."""
    if is_dataclass(value):
        return {f.name: as_json(getattr(value, f.name)) for f in fields(value)
                if not (f.metadata.get("omit_none") and getattr(value, f.name) is None)}
    if isinstance(value, (list, tuple)):
        return [as_json(v) for v in value]
    if isinstance(value, dict):
        return {k: as_json(v) for k, v in value.items()}
    return value


class _Result:
    def to_json(self) -> dict:
        return as_json(self)


# -- pack ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LossySummary(_Result):
    """The lossy tensors of a pack: how many, their weights, bits per weight, the worst SQNR and its tensor."""
    tensors: int
    weights: int
    bits_per_weight: float
    worst_sqnr_db: Optional[float]  # None: every lossy tensor exact
    worst_tensor: Optional[str]


@dataclass(frozen=True)
class LowRankChoice(_Result):
    """What a low-rank stage chose for one tensor (rank 0: quantized directly)."""
    name: str
    rank: int


@dataclass(frozen=True)
class BudgetTarget(_Result):
    """What rate control was asked for: bits per weight over the lossy tensors, or the file's bytes."""
    bits_per_weight: Optional[float] = _optional()
    bytes: Optional[int] = _optional()


@dataclass(frozen=True)
class TensorAllocation(_Result):
    name: str
    bits_per_weight: float
    sqnr_db: Optional[float]


@dataclass(frozen=True)
class Allocation(_Result):
    """What rate control chose (ratecontrol.py): the step, its unit, the target, what was reached, and
    each lossy tensor's bits and SQNR."""
    step: float
    allocate: str
    target: BudgetTarget
    bits_per_weight: float  # reached, over the lossy tensors
    bytes: int  # the file (or set) written
    tensors: list[TensorAllocation]


@dataclass(frozen=True)
class PackResult(_Result):
    """What pack wrote: its path (a sharded set's index), bytes in and out, their ratio, the time taken,
    the number of tensors; when they apply, what rate control chose, the shard files, the low-rank
    choices and a summary of the lossy tensors."""
    path: str
    bytes_in: int
    bytes_out: int
    ratio: float
    seconds: float
    tensors: int
    allocation: Optional[Allocation] = _optional()
    shards: Optional[list[str]] = _optional()
    lowrank: Optional[list[LowRankChoice]] = _optional()
    lossy: Optional[LossySummary] = _optional()


# -- inspect -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorRow(_Result):
    """One tensor of a container: its stages ("lossless", or the lossy chain), bytes before and after,
    bits per weight, the codecs that won, and (lossy) the quality measured at pack time."""
    name: str
    dtype: str
    shape: list[int]
    stages: list[str]
    bytes_before: int
    bytes_after: int
    bits_per_weight: float
    codec: str
    quality: Optional[dict]  # {"sqnr_db", "rel_error"} of a lossy tensor
    shard: Optional[str] = _optional()  # the shard file that holds it (a sharded set)


@dataclass(frozen=True)
class Totals(_Result):
    tensors: int
    weights: int
    bytes_before: int
    bytes_after: int
    source_bytes: int  # the safetensors files as they were: length, header and data
    container_bytes: int
    ratio: float
    bits_per_weight: float


@dataclass(frozen=True)
class ShardRow(_Result):
    name: str
    bytes: int
    tensors: int


@dataclass(frozen=True)
class InspectReport(_Result):
    """What a container (or a sharded set) holds, per tensor, and the totals."""
    path: str
    format_version: Optional[list[int]]
    source_kind: Optional[str]
    recipe: Optional[str]
    files: list[str]
    carried: list[str]
    shards: Optional[list[ShardRow]] = _optional()  # a sharded set's shard files
    tensors: list[TensorRow]
    totals: Totals


# -- verify --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VerifyReport:
    """verify's findings: `ok` when there is no problem; how many tensors were decoded and checked; the
    problems, one line each; the quality of each lossy tensor (name -> {sqnr_db, rel_error, measured})."""
    ok: bool
    checked: int = 0
    problems: list[str] = field(default_factory=list)
    quality: dict[str, dict] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"ok": self.ok, "tensors_checked": self.checked, "problems": self.problems, "quality": self.quality}
