"""Pack and decode pipelines: checkpoint -> plan -> chunk tasks (in worker processes) -> container, and back.

The main process reads each tensor twice in pieces (to hash it and to plan its coding) and never holds
it whole; workers read their chunks themselves with positioned reads, code them and hand back the
(small) coded bytes. Decoding mirrors that: workers read coded chunks and either write the decoded
bytes straight into the output file or return them.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np

from .checkpoint import Checkpoint, TensorEntry, read_exact
from .coding import streams
from .coding.fields import UINT
from .container import ContainerReader, ContainerWriter
from .dtypes import DTYPES
from .errors import FormatError
from .parallel import Pool, Task

TASK_BYTES = 4 << 20  # raw bytes per worker task
HASH_PIECE = 16 << 20

Progress = Callable[[int], None]


def _noop(_: int) -> None:
    pass


def _pread_exact(fd: int, offset: int, length: int) -> bytes:
    out = bytearray(length)
    view = memoryview(out)
    got = 0
    while got < length:
        n = os.preadv(fd, [view[got:]], offset + got)
        if n <= 0:
            raise FormatError("file ended early (truncated?)")
        got += n
    return bytes(out)


def _unit_bytes(plan: streams.Plan) -> int:
    """Bytes per stream element: an element of the tensor for fields, a byte for bytes."""
    return plan.itemsize_bits // 8 if plan.codec == "fields" else 1


# -- pack ----------------------------------------------------------------------------------------

def _reader(path: Path, entry: TensorEntry) -> streams.Reader:
    """Elements first..first+count-1 of a tensor (dtypes with a field layout: 8 to 64 bits)."""
    size = DTYPES[entry.dtype].bits // 8

    def read(first: int, count: int) -> np.ndarray:
        data = read_exact(path, entry.begin + first * size, count * size)
        return np.frombuffer(data, dtype=UINT[size * 8])

    return read


def tensor_sha256(path: Path, entry: TensorEntry) -> str:
    h = hashlib.sha256()
    for a in range(entry.begin, entry.end, HASH_PIECE):
        h.update(read_exact(path, a, min(HASH_PIECE, entry.end - a)))
    return h.hexdigest()


def _encode_task(path: str, begin: int, plan: streams.Plan, first: int, last: int) -> list:
    unit = _unit_bytes(plan)
    out, nbytes = [], 0
    with open(path, "rb", buffering=0) as f:
        for i in range(first, last):
            a, b = plan.chunk_range(i)
            data = _pread_exact(f.fileno(), begin + a * unit, (b - a) * unit)
            nbytes += len(data)
            u = np.frombuffer(data, dtype=UINT[plan.itemsize_bits] if plan.codec == "fields" else np.uint8)
            out.append(streams.encode_chunk(plan, i, u))
    return nbytes, out


@dataclass
class _TensorStart:
    file_index: int
    entry: TensorEntry
    sha256: str
    plan: streams.Plan


def _pack_items(ckpt: Checkpoint, level: int) -> Iterator:
    for fi, f, e in ckpt.tensors():
        plan = streams.make_plan(e.dtype, e.shape, _reader(f.path, e), level)
        yield _TensorStart(fi, e, tensor_sha256(f.path, e), plan)
        per_task = max(1, TASK_BYTES // max(1, plan.chunk * _unit_bytes(plan)))
        for first in range(0, plan.nchunks, per_task):
            last = min(plan.nchunks, first + per_task)
            yield Task(_encode_task, (str(f.path), e.begin, plan.for_chunks(first, last), first, last))


def pack_checkpoint(ckpt: Checkpoint, writer: ContainerWriter, level: int, workers: Optional[int],
                    progress: Progress = _noop) -> list[dict]:
    """Code every tensor of `ckpt` into `writer`; returns the tensor records for the index."""
    records: list[dict] = []
    current: Optional[dict] = None
    with Pool(workers) as pool:
        for item in pool.ordered_map(_pack_items(ckpt, level)):
            if isinstance(item, _TensorStart):
                e, plan = item.entry, item.plan
                side = plan.side()
                current = {
                    "name": e.name, "file": item.file_index, "dtype": e.dtype, "shape": e.shape,
                    "nbytes": e.nbytes, "sha256": item.sha256, "stages": [],
                    "stream": {"params": plan.params(), "side": writer.write_blob(side) if side else None,
                               "chunks": []},
                }
                records.append(current)
                if plan.nchunks == 0:
                    progress(e.nbytes)
                continue
            nbytes, chunks = item
            for rec, payload in chunks:
                rec.update(writer.write_blob(payload))
                current["stream"]["chunks"].append(rec)
            progress(nbytes)
    return records


# -- decode --------------------------------------------------------------------------------------

def tensor_plan(reader: ContainerReader, t: dict) -> streams.Plan:
    """The validated plan of a tensor record (reads and checks its side information)."""
    where = f"tensor {t['name']!r}"
    st = t["stream"]
    side = reader.read_blob(st["side"], where + " side information") if st.get("side") else b""
    numel = math.prod(t["shape"])
    plan = streams.plan_from_record(t["dtype"], numel, st["params"], side, where)
    if len(st["chunks"]) != plan.nchunks:
        raise FormatError(f"{where}: {len(st['chunks'])} chunks recorded, {plan.nchunks} expected")
    return plan


def _decode_task(path: str, plan: streams.Plan, recs: list, first: int, name: str,
                 out_path: Optional[str], out_offset: int):
    unit = _unit_bytes(plan)
    results = []
    with open(path, "rb", buffering=0) as f:
        out_fd = os.open(out_path, os.O_WRONLY) if out_path else None
        try:
            for k, rec in enumerate(recs):
                i = first + k
                where = f"tensor {name!r} chunk {i}"
                payload = _pread_exact(f.fileno(), rec["offset"], rec["length"])
                if zlib.crc32(payload) != rec["crc32"]:
                    raise FormatError(f"{where}: checksum mismatch (damaged data)")
                raw = streams.decode_chunk(plan, i, rec, memoryview(payload), where)
                if out_fd is not None:
                    a, _ = plan.chunk_range(i)
                    os.pwrite(out_fd, raw, out_offset + a * unit)
                    results.append(len(raw))
                else:
                    results.append(raw)
        finally:
            if out_fd is not None:
                os.close(out_fd)
    return results


def decode_items(reader: ContainerReader, tensors: list[dict], out: Optional[dict] = None) -> Iterator:
    """Tasks decoding `tensors`, each preceded by its record; `out` maps names to (path, offset)."""
    for t in tensors:
        plan = tensor_plan(reader, t)
        yield t
        chunks = t["stream"]["chunks"]
        per_task = max(1, TASK_BYTES // max(1, plan.chunk * _unit_bytes(plan)))
        target = out.get(t["name"]) if out else None
        for first in range(0, len(chunks), per_task):
            last = min(len(chunks), first + per_task)
            yield Task(_decode_task, (str(reader.path), plan.for_chunks(first, last), chunks[first:last], first,
                                      t["name"], target[0] if target else None, target[1] if target else 0))


def decode_tensors(reader: ContainerReader, tensors: list[dict], workers: Optional[int],
                   progress: Progress = _noop) -> Iterator[tuple[dict, list[bytes]]]:
    """Yield (record, decoded chunks in order) for each tensor, decoded in worker processes."""
    with Pool(workers) as pool:
        current, pieces = None, []
        for item in pool.ordered_map(decode_items(reader, tensors)):
            if isinstance(item, dict):
                if current is not None:
                    yield current, _checked(current, pieces)
                current, pieces = item, []
            else:
                pieces.extend(item)
                progress(sum(len(p) for p in item))
        if current is not None:
            yield current, _checked(current, pieces)


def _checked(t: dict, pieces: list[bytes]) -> list[bytes]:
    n = sum(len(p) for p in pieces)
    if n != t["nbytes"]:
        raise FormatError(f"tensor {t['name']!r}: decoded {n} bytes, expected {t['nbytes']}")
    return pieces


def decode_into_files(reader: ContainerReader, targets: dict[str, tuple[str, int]], workers: Optional[int],
                      progress: Progress = _noop) -> None:
    """Decode every tensor straight into its place in an output file: targets[name] = (path, offset)."""
    with Pool(workers) as pool:
        for item in pool.ordered_map(decode_items(reader, reader.index["tensors"], targets)):
            if not isinstance(item, dict):
                progress(sum(item))


def progress_enabled(quiet: bool) -> bool:
    return not quiet and sys.stderr.isatty() and not os.environ.get("CI")
