"""Lazy access, like safetensors' safe_open: one container opened for per-tensor reads (WpkFile), slices
of one tensor (`get_slice`), and one reader over a set of containers (a folder of `.wpk` shards, or a list
of them: WpkSet).

A slice of a lossless tensor decodes only the chunks that hold its elements: the slice is cut into runs of
consecutive elements (row-major), each chunk that a run touches is decoded (crc32 checked) and its part of
the runs copied to the output, so memory is the output plus one chunk. A lossy tensor whose reconstruction
is elementwise (quantize, alone or after prune: rtn, ecsq, tcq) decodes the level chunks the same way and
its small parts (steps, scales) whole; a low-rank tensor is decoded whole (with its SHA-256 checked) and
then sliced. Slices are decoded on the host (one chunk at a time) and then copied to the file's device.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional, Union

import numpy as np

from .container import ContainerReader
from .dtypes import DTYPES, torch_dtype
from .errors import FormatError, UsageError
from .tensors import read_tensor, resolve_device, use_device_decoder

if TYPE_CHECKING:
    import torch

PathLike = Union[str, os.PathLike]

MAX_RUNS = 1 << 24  # runs listed exactly up to this many; beyond, a slice decodes its bounding range


def source_metadata(files: list) -> Optional[dict]:
    """The `__metadata__` of the first source file (an index's "files") that has one."""
    for f in files:
        md = json.loads(f["header"]).get("__metadata__")
        if md is not None:
            return md
    return None


class WpkFile:
    """Lazy access to a container, like safetensors' `safe_open`: keys(), metadata(), get_tensor(name),
    get_slice(name); a context manager."""

    def __init__(self, path: PathLike, device: "str | torch.device" = "cpu", decoder: str = "auto"):
        self.device = resolve_device(device)
        self._on_device = use_device_decoder(self.device, decoder)
        self._r = ContainerReader(path)
        self._by_name = {t["name"]: t for t in self._r.index["tensors"]}

    @property
    def path(self) -> Path:
        return self._r.path

    def keys(self) -> list[str]:
        return list(self._by_name)

    def metadata(self) -> Optional[dict]:
        """The `__metadata__` of the (first) source file, as safetensors' safe_open gives it."""
        return source_metadata(self._r.index["files"])

    def get_tensor(self, name: str) -> "torch.Tensor":
        t = self._by_name.get(name)
        if t is None:
            raise KeyError(name)
        return read_tensor(self._r, t, self.device, self._on_device)

    def get_slice(self, name: str) -> "TensorSlice":
        """A lazy view of one tensor, like safe_open's get_slice: get_shape(), get_dtype(), and `[...]`
        (integers, slices, `...`), which decodes only the chunks the slice needs."""
        return TensorSlice(self, name)

    def close(self) -> None:
        self._r.close()

    def __enter__(self) -> "WpkFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def parse_index(key, shape: list[int]) -> tuple[list[tuple[int, int, int]], list[int], list[int]]:
    """Normalize `key` (ints, slices with positive steps, one Ellipsis) against `shape`.

    Returns per dimension (start, step, count), the dimensions that an integer removes, and the output shape.
    """
    if not isinstance(key, tuple):
        key = (key,)
    if sum(k is Ellipsis for k in key) > 1:
        raise UsageError("an index can only have a single ellipsis ('...')")
    if Ellipsis in key:
        i = key.index(Ellipsis)
        fill = len(shape) - (len(key) - 1)
        if fill < 0:
            raise UsageError(f"too many indices for a tensor of {len(shape)} dimensions")
        key = key[:i] + (slice(None),) * fill + key[i + 1:]
    if len(key) > len(shape):
        raise UsageError(f"too many indices ({len(key)}) for a tensor of {len(shape)} dimensions")
    key = key + (slice(None),) * (len(shape) - len(key))
    dims, dropped, out_shape = [], [], []
    for d, (k, n) in enumerate(zip(key, shape)):
        if isinstance(k, slice):
            if k.step is not None and (not isinstance(k.step, int) or k.step <= 0):
                raise UsageError(f"dimension {d}: slice step must be a positive integer")
            start, stop, step = k.indices(n)
            count = max(0, math.ceil((stop - start) / step))
            dims.append((start if count else 0, step, count))
            out_shape.append(count)
        elif isinstance(k, (int, np.integer)) and not isinstance(k, bool):
            i = int(k)
            if not -n <= i < n:
                raise IndexError(f"index {i} is out of range for dimension {d} of size {n}")
            dims.append((i % n, 1, 1))
            dropped.append(d)
        else:
            raise UsageError(f"dimension {d}: unsupported index {k!r} (use integers, slices and ...)")
    return dims, dropped, out_shape


def runs_of(dims: list[tuple[int, int, int]], shape: list[int]) -> tuple[np.ndarray, int]:
    """The slice as runs of consecutive elements: sorted start offsets (flat, row-major) and one length."""
    strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
    # trailing dimensions taken whole merge into one run, with the next one inward if its step is 1
    length, d = 1, len(dims) - 1
    while d >= 0 and dims[d] == (0, 1, shape[d]):
        length *= shape[d]
        d -= 1
    base = 0
    if d >= 0 and dims[d][1] == 1:
        length *= dims[d][2]
        base = dims[d][0] * strides[d]
        d -= 1
    starts = np.array([base], dtype=np.int64)
    for e in range(d, -1, -1):
        start, step, count = dims[e]
        offs = (start + step * np.arange(count, dtype=np.int64)) * strides[e]
        starts = (offs[:, None] + starts[None, :]).reshape(-1)
        if starts.size > MAX_RUNS:
            raise MemoryError
    return starts, length


class TensorSlice:
    """One tensor of an open container, sliced lazily: `get_shape()`, `get_dtype()`, and `[...]`."""

    def __init__(self, f: "WpkFile", name: str):
        t = f._by_name.get(name)
        if t is None:
            raise KeyError(name)
        self._f, self._t = f, t

    def get_shape(self) -> list[int]:
        return list(self._t["shape"])

    def get_dtype(self) -> str:
        """The safetensors dtype name (as safetensors' get_slice gives it): "F32", "BF16", ..."""
        return self._t["dtype"]

    def __len__(self) -> int:
        if not self._t["shape"]:
            raise TypeError("len() of a 0-d tensor")
        return self._t["shape"][0]

    def __getitem__(self, key) -> "torch.Tensor":
        t = self._t
        shape = t["shape"]
        dims, dropped, out_shape = parse_index(key, shape)
        final_shape = out_shape
        dt = torch_dtype(t["dtype"])
        if dt is None:
            raise UsageError(f"tensor {t['name']!r}: torch has no dtype for {t['dtype']}")
        bits = DTYPES[t["dtype"]].bits
        if bits % 8 or math.prod(final_shape) == 0 or (t["stages"] and not elementwise(t)):
            return self._whole(dims, dropped)
        try:
            starts, length = runs_of(dims, shape)
        except MemoryError:
            return self._whole(dims, dropped)
        if t["stages"]:
            x = decode_lossy_runs(self._f._r, t, starts, length).reshape(final_shape)
        else:
            x = _torch_view(decode_runs(self._f._r, t, starts, length), dt, final_shape)
        return x.to(self._f.device) if self._f.device.type != "cpu" else x

    def _whole(self, dims, dropped) -> "torch.Tensor":
        x = self._f.get_tensor(self._t["name"])
        idx = tuple(s if d in dropped else slice(s, s + step * c, step) if c else slice(0, 0)
                    for d, (s, step, c) in enumerate(dims))
        return x[idx].clone()


def _torch_view(a: np.ndarray, dt, shape: list[int]) -> "torch.Tensor":
    import torch

    return torch.from_numpy(a).view(dt).reshape(shape)


def chunks_of_stream(reader, t: dict, wanted: list[int]) -> Iterator[tuple[int, int, int, bytes]]:
    """(chunk, first byte, end byte, decoded bytes) for the chunks `wanted` of a lossless tensor's stream.

    The one place that calls into the coder for partial decoding: the plan from the record, each chunk's
    coded bytes read and checked, then decoded (and its crc32 checked) on its own."""
    from .coding.codecs import registry
    from .pipeline import stream_plan

    where = f"tensor {t['name']!r}"
    plan = stream_plan(reader, t["stream"], t["dtype"], t["shape"], where, *t.get("owner", (t["name"], None)))
    unit = plan.unit
    for i in wanted:
        rec = t["stream"]["chunks"][i]
        payload = reader.read_blob(rec, f"{where} chunk {i}")
        a, b = plan.chunk_range(i)
        yield i, a * unit, b * unit, registry.decode_chunk(plan, i, rec, memoryview(payload), f"{where} chunk {i}")


def chunk_bounds(t: dict) -> np.ndarray:
    """Byte offsets where the chunks of a lossless tensor's stream begin (plus the end)."""
    p = t["stream"]["params"]
    n = math.prod(t["shape"])
    unit = DTYPES[t["dtype"]].bits // 8 if p["codec"] != "bytes" else 1
    total = (n if p["codec"] != "bytes" else t["nbytes"]) * unit
    step = p["chunk"] * unit
    return np.append(np.arange(0, total, step, dtype=np.int64), total)


def needed_chunks(t: dict, starts: np.ndarray, length: int) -> list[int]:
    """The chunks that hold any element of the runs (byte offsets: run starts x item size)."""
    isz = DTYPES[t["dtype"]].bits // 8
    bounds = chunk_bounds(t)
    first = np.searchsorted(bounds, starts * isz, side="right") - 1
    last = np.searchsorted(bounds, (starts + length) * isz - 1, side="right") - 1
    if not len(first):
        return []
    span = last - first
    if int(span.max()) == 0:
        return sorted(set(first.tolist()))
    mark = np.zeros(len(bounds), dtype=np.int64)  # interval cover: +1 at first, -1 after last
    np.add.at(mark, first, 1)
    np.add.at(mark, last + 1, -1)
    return np.nonzero(np.cumsum(mark)[:-1] > 0)[0].tolist()


def decode_runs(reader, t: dict, starts: np.ndarray, length: int) -> np.ndarray:
    """The elements of the runs (starts[k] .. starts[k] + length), decoding only the chunks they touch."""
    isz = DTYPES[t["dtype"]].bits // 8
    out = np.empty(len(starts) * length * isz, dtype=np.uint8)
    bstart = starts * isz
    blen = length * isz
    bend = bstart + blen
    for _, a, b, raw in chunks_of_stream(reader, t, needed_chunks(t, starts, length)):
        src = np.frombuffer(raw, dtype=np.uint8)
        lo = int(np.searchsorted(bend, a, side="right"))  # first run ending after a
        hi = int(np.searchsorted(bstart, b, side="left"))  # runs starting before b
        if lo >= hi:
            continue
        s = np.clip(bstart[lo:hi], a, b)
        e = np.clip(bend[lo:hi], a, b)
        dst0 = (np.arange(lo, hi, dtype=np.int64) * blen) + (s - bstart[lo:hi])
        n = e - s
        if hi - lo <= 64:
            for k in range(hi - lo):
                out[dst0[k]:dst0[k] + n[k]] = src[s[k] - a:s[k] - a + n[k]]
        else:  # many short runs: one gather (indices: at most one chunk's worth)
            rep = np.repeat(np.arange(hi - lo), n)
            within = np.arange(int(n.sum()), dtype=np.int64) - np.repeat(np.cumsum(n) - n, n)
            out[dst0[rep] + within] = src[s[rep] - a + within]
    return out


# -- lossy tensors -------------------------------------------------------------------------------------

def elementwise(t: dict) -> bool:
    """A chain whose reconstruction is element by element from the levels (quantize alone, or after prune):
    its slices decode only the level chunks they touch. Low rank needs its factors' product: decoded whole."""
    from .stages.params import LowRankParams, params_of

    return not any(isinstance(c, LowRankParams) for c in params_of(t, f"tensor {t['name']!r}"))


def _part(t: dict, name: str) -> dict:
    for x in t["parts"]:
        if x["name"] == name:
            return {**x, "name": f"{t['name']} part {name}", "stages": [], "owner": (t["name"], name)}
    raise FormatError(f"tensor {t['name']!r}: no part {name!r}")


def _whole_part(reader, t: dict, name: str) -> "torch.Tensor":
    """A small part (a step, scales, zero points) decoded whole."""
    import torch

    part = _part(t, name)
    chunks = list(range(len(part["stream"]["chunks"])))
    raw = b"".join(r for _, _, _, r in chunks_of_stream(reader, part, chunks))
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(torch_dtype(part["dtype"])) if raw else \
        torch.zeros(0, dtype=torch_dtype(part["dtype"]))


def decode_lossy_runs(reader, t: dict, starts: np.ndarray, length: int) -> "torch.Tensor":
    """The runs of a lossy tensor whose chain is elementwise: the level part decoded only where the runs
    lie, the small parts whole, and the same float32 arithmetic as stages/quantize.py's decode, element by
    element (so the values are bit-identical to a whole decode; the reconstruction's SHA-256, which covers
    the whole tensor, is not checked here: each chunk's crc32 is)."""
    import torch

    from .stages.params import params_of

    p = params_of(t, f"tensor {t['name']!r}")[-1]
    qp = _part(t, "q")
    q = torch.from_numpy(decode_runs(reader, qp, starts, length)).view(torch_dtype(qp["dtype"]))
    if p.mode == "tcq":
        x = q.to(torch.float32) * _whole_part(reader, t, "step").to(torch.float32)[0]
    elif p.mode == "ecsq":
        off = _whole_part(reader, t, "offset").to(torch.int64)[0]
        x = (q.to(torch.int64) + off).to(torch.float32) * _whole_part(reader, t, "step").to(torch.float32)[0]
    else:
        shape = t["shape"]
        rows = shape[0] if len(shape) >= 2 else 1
        cols = math.prod(shape) // rows if rows else 0
        idx = (torch.from_numpy(starts)[:, None] + torch.arange(length)[None, :]).reshape(-1)
        if p.granularity == "tensor":
            gid = torch.zeros_like(idx)
        elif p.granularity == "channel":
            gid = idx // cols
        else:
            g = min(p.group, cols)
            gid = (idx // cols) * (-(-cols // g)) + (idx % cols) // g
        scale = _whole_part(reader, t, "scale").to(torch.float32)
        zero = (_whole_part(reader, t, "zero").to(torch.float32) if any(x["name"] == "zero" for x in t["parts"])
                else torch.zeros(len(scale)))
        if len(zero) != len(scale) or (len(gid) and int(gid.max()) >= len(scale)):
            raise FormatError(f"tensor {t['name']!r}: scale or zero point count does not match the groups")
        x = (q.to(torch.float32) - zero[gid]) * scale[gid]
    return x.to(torch_dtype(t["dtype"]))


# -- a set of containers -------------------------------------------------------------------------

PathLike = Union[str, os.PathLike]


def container_paths(src) -> Optional[list[Path]]:
    """The .wpk files of a folder or a list of paths; None when `src` is one container file."""
    if isinstance(src, (list, tuple)):
        return [Path(p) for p in src]
    p = Path(src)
    if p.is_dir():
        found = sorted(x for x in p.iterdir() if x.suffix == ".wpk" and x.is_file())
        if not found:
            raise FormatError(f"{p}: no .wpk files in this folder")
        return found
    return None


class WpkSet:
    """Several containers read as one (shards): keys(), metadata(), get_tensor(), get_slice(); a context
    manager like safe_open. A name held by two containers is an error."""

    def __init__(self, paths: list[Path], device="cpu", decoder: str = "auto"):
        self.files: list[WpkFile] = []
        self._where: dict[str, "WpkFile"] = {}
        try:
            for p in paths:
                f = WpkFile(p, device, decoder)
                self.files.append(f)
                for k in f.keys():
                    if k in self._where:
                        raise FormatError(f"tensor {k!r} is in both {self._where[k].path} and {p}")
                    self._where[k] = f
        except BaseException:
            self.close()
            raise

    def keys(self) -> list[str]:
        return list(self._where)

    def metadata(self) -> Optional[dict]:
        for f in self.files:
            md = f.metadata()
            if md is not None:
                return md
        return None

    def _file(self, name: str) -> "WpkFile":
        f = self._where.get(name)
        if f is None:
            raise KeyError(name)
        return f

    def get_tensor(self, name: str) -> "torch.Tensor":
        return self._file(name).get_tensor(name)

    def get_slice(self, name: str) -> TensorSlice:
        return self._file(name).get_slice(name)

    def close(self) -> None:
        for f in self.files:
            f.close()

    def __enter__(self) -> "WpkSet":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
