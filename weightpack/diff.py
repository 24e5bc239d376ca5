"""What changed between two checkpoints: `weightpack diff A B` and `weightpack.diff(a, b)`.

Each side is a safetensors file, a sharded index, a folder or a container; a folder that holds `.wpk`
files (a packed model folder, a set of shards) is read as those containers, any other as a model folder. Tensors are matched by name. For each pair: identical (by SHA-256: a
container's index holds the hash of every tensor as it decodes, so identical packed tensors are not
decoded), or the error of B against A (max abs error, relative error ||b - a|| / ||a||, SQNR in dB),
computed in float64 in slices, one tensor of each side in memory at a time. Names only in B are added,
only in A removed; an added and a removed tensor with the same dtype, shape and bytes are one rename.
Bits per weight are given for each packed side. Exit codes as cmp: 0 identical, 1 differs, 2 bad input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .checkpoint import open_checkpoint
from .container import MAGIC, ContainerReader
from .dtypes import torch_dtype
from .errors import CheckpointError, FormatError
from .metrics import stored_bytes

SLICE = 1 << 22  # elements compared at a time


class _Source:
    """One side: name -> (dtype, shape), its content hash, its raw bytes, bits per weight if packed."""

    def __init__(self, path):
        self.path = Path(path)
        self.readers: list[ContainerReader] = []
        self.records: dict[str, tuple] = {}  # name -> (dtype, shape, handle)
        if not self.path.exists():
            raise CheckpointError(f"{self.path}: no such file or folder")
        containers = self._containers()
        if containers:
            for c in containers:
                r = ContainerReader(c)
                self.readers.append(r)
                for t in r.index["tensors"]:
                    if t["name"] in self.records:
                        raise CheckpointError(f"{self.path}: tensor {t['name']!r} is in two containers")
                    self.records[t["name"]] = (t["dtype"], list(t["shape"]), (r, t))
            self.packed = True
        else:
            ck = open_checkpoint(self.path)
            for _, f, e in ck.tensors():
                if e.name in self.records:
                    raise CheckpointError(f"{self.path}: tensor {e.name!r} is in two files")
                self.records[e.name] = (e.dtype, list(e.shape), (f, e))
            self.packed = False

    def _containers(self) -> list[Path]:
        p = self.path
        if p.is_file():
            with open(p, "rb") as fh:
                return [p] if fh.read(len(MAGIC)) == MAGIC else []
        return sorted(x for x in p.iterdir() if x.suffix == ".wpk" and x.is_file())

    def sha256(self, name: str) -> str:
        _, _, h = self.records[name]
        if self.packed:
            t = h[1]
            return t["decoded_sha256"] if t["stages"] else t["sha256"]
        from .pipeline import tensor_sha256

        return tensor_sha256(h[0].path, h[1])

    def raw(self, name: str) -> bytes:
        _, _, h = self.records[name]
        if self.packed:
            from .pipeline import decode_tensors

            r, t = h
            for _, pieces in decode_tensors(r, [t], workers=1):
                return b"".join(bytes(p) for p in pieces)
            raise FormatError(f"tensor {name!r}: nothing decoded")
        return bytes(h[0].read(h[1]))

    def bits_per_weight(self, name: str) -> Optional[float]:
        if not self.packed:
            return None
        t = self.records[name][2][1]
        n = math.prod(t["shape"])
        return 8.0 * stored_bytes(t) / n if n else 0.0

    def close(self) -> None:
        for r in self.readers:
            r.close()


@dataclass
class DiffReport:
    a: str
    b: str
    tensors: list[dict] = field(default_factory=list)  # every name in both, with its status and errors
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    renamed: list[dict] = field(default_factory=list)  # {"from", "to"}

    @property
    def identical(self) -> bool:
        return not (self.added or self.removed or self.renamed
                    or any(t["status"] != "identical" for t in self.tensors))

    def count(self, status: str) -> int:
        return sum(t["status"] == status for t in self.tensors)

    def summary(self) -> str:
        if self.identical:
            return f"identical: {len(self.tensors)} tensors, same names, dtypes, shapes and bytes"
        parts = [f"{len(self.tensors)} tensors in both: {self.count('identical')} identical, "
                 f"{self.count('changed')} changed, {self.count('dtype')} with another dtype, "
                 f"{self.count('shape')} with another shape"]
        sq = [t["sqnr_db"] for t in self.tensors if t.get("sqnr_db") is not None]
        mx = [t["max_abs_error"] for t in self.tensors if t.get("max_abs_error") is not None]
        if sq:
            parts.append(f"worst SQNR {min(sq):.2f} dB")
        if mx:
            parts.append(f"largest abs error {max(mx):.4g}")
        parts.append(f"{len(self.added)} added, {len(self.removed)} removed, {len(self.renamed)} renamed")
        return "differ: " + "; ".join(parts)

    def to_json(self) -> dict:
        return {"a": self.a, "b": self.b, "identical": self.identical, "summary": self.summary(),
                "tensors": self.tensors, "added": self.added, "removed": self.removed, "renamed": self.renamed}


def _errors(raw_a: bytes, dtype_a: str, raw_b: bytes, dtype_b: str, n: int) -> dict:
    """max abs error, relative error and SQNR of b against a (None where a dtype has no torch equivalent)."""
    import torch

    ta, tb = torch_dtype(dtype_a), torch_dtype(dtype_b)
    if ta is None or tb is None or ta.is_complex or tb.is_complex:
        return {"max_abs_error": None, "rel_error": None, "sqnr_db": None}
    a = torch.frombuffer(bytearray(raw_a), dtype=torch.uint8).view(ta) if n else torch.zeros(0)
    b = torch.frombuffer(bytearray(raw_b), dtype=torch.uint8).view(tb) if n else torch.zeros(0)
    err = sig = 0.0
    mx = 0.0
    for i in range(0, n, SLICE):
        xa = a[i:i + SLICE].to(torch.float64)
        d = b[i:i + SLICE].to(torch.float64) - xa
        err += float((d * d).sum())
        sig += float((xa * xa).sum())
        if d.numel():
            mx = max(mx, float(d.abs().max()))
    if math.isnan(err) or math.isnan(mx):
        return {"max_abs_error": mx, "rel_error": None, "sqnr_db": None}
    return {"max_abs_error": mx,
            "rel_error": math.sqrt(err / sig) if sig else (0.0 if err == 0 else None),
            "sqnr_db": (10 * math.log10(sig / err) if err and sig else None)}


def diff(a, b) -> DiffReport:
    """Compare two checkpoints or containers tensor by tensor (see the module's docstring)."""
    sa = _Source(a)
    try:
        sb = _Source(b)
        try:
            return _compare(sa, sb)
        finally:
            sb.close()
    finally:
        sa.close()


def _compare(sa: _Source, sb: _Source) -> DiffReport:
    rep = DiffReport(str(sa.path), str(sb.path))
    for name, (da, shape_a, _) in sa.records.items():
        if name not in sb.records:
            continue
        db, shape_b, _ = sb.records[name]
        row: dict[str, Any] = {"name": name, "dtype_a": da, "dtype_b": db, "shape_a": shape_a, "shape_b": shape_b,
                               "bits_per_weight_a": sa.bits_per_weight(name),
                               "bits_per_weight_b": sb.bits_per_weight(name),
                               "max_abs_error": 0.0, "rel_error": 0.0, "sqnr_db": None}
        if shape_a != shape_b:
            row.update(status="shape", max_abs_error=None, rel_error=None)
        elif da == db and sa.sha256(name) == sb.sha256(name):
            row["status"] = "identical"
        else:
            row["status"] = "changed" if da == db else "dtype"
            row.update(_errors(sa.raw(name), da, sb.raw(name), db, math.prod(shape_a)))
        rep.tensors.append(row)
    removed = [n for n in sa.records if n not in sb.records]
    added = [n for n in sb.records if n not in sa.records]
    if removed and added:
        key = lambda s, n: (s.records[n][0], tuple(s.records[n][1]), s.sha256(n))  # noqa: E731
        by_key: dict[tuple, list[str]] = {}
        for n in added:
            by_key.setdefault(key(sb, n), []).append(n)
        for n in list(removed):
            cands = by_key.get(key(sa, n))
            if cands:
                new = cands.pop(0)
                rep.renamed.append({"from": n, "to": new})
                removed.remove(n)
                added.remove(new)
    rep.added, rep.removed = added, removed
    return rep
