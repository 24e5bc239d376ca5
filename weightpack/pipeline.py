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
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import numpy as np

from .checkpoint import Checkpoint, TensorEntry, pread_into, read_exact
from .coding import native
from .coding.binding import binding
from .coding.chunks import payload_crc
from .coding.codecs import registry
from .coding.codecs.fields import codec as fields_codec
from .coding.codecs.fields.layout import UINT
from .coding.codecs.fields.plan import Reader
from .coding.codecs.trellis import codec as trellis_codec
from .container import ContainerReader, ContainerWriter
from .dtypes import DTYPES
from .errors import CheckpointError, FormatError
from .index import VERSION, BlobRef, Chunk, Index, Part, Quality, SourceFile, Stream, TensorRecord
from .parallel import Pool, Task
from .recipe import Recipe
from .stages import lossy

TASK_BYTES = 4 << 20  # raw bytes per worker task
PACK_INFLIGHT = 16  # pack tasks queued or done but not yet written, per worker
HASH_PIECE = 16 << 20

Progress = Callable[[int], None]


def _noop(_: int) -> None:
    pass


# -- pack ----------------------------------------------------------------------------------------

def _pread(fd: int, offset: int, length: int, what: str, error: type = CheckpointError) -> np.ndarray:
    """pread_exact into an uninitialized array: no zero-filling under the GIL (reads run in threads beside
    each other)."""
    return pread_into(fd, offset, np.empty(length, np.uint8), error, what)


def _reader(path: Path, entry: TensorEntry) -> Reader:
    """Elements first..first+count-1 of a tensor (dtypes with a field layout: 8 to 64 bits)."""
    size = DTYPES[entry.dtype].bits // 8

    def read(first: int, count: int) -> np.ndarray:
        with open(path, "rb", buffering=0) as f:
            data = _pread(f.fileno(), entry.begin + first * size, count * size, str(path))
        return data.view(UINT[size * 8])

    return read


def tensor_sha256(path: Path, entry: TensorEntry) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        for a in range(entry.begin, entry.end, HASH_PIECE):
            h.update(_pread(f.fileno(), a, min(HASH_PIECE, entry.end - a), str(path)))
    return h.hexdigest()


def _encode_task(path: str, begin: int, plan: registry.Plan, first: int, last: int) -> tuple[int, list]:
    """Code chunks first..last-1 of a tensor, reading them from the source file."""
    unit = plan.unit
    out, nbytes = [], 0
    with open(path, "rb", buffering=0) as f:
        for i in range(first, last):
            a, b = plan.chunk_range(i)
            data = _pread(f.fileno(), begin + a * unit, (b - a) * unit, path)
            nbytes += len(data)
            rec, payload = registry.encode_chunk(plan, i, _elements(plan, data))
            out.append((rec, payload, payload_crc(payload)))
    return nbytes, out


def _encode_data_task(plan: registry.Plan, first: int, data: bytes) -> tuple[int, list]:
    """Code consecutive chunks from `first` on, given their bytes (parts made in the main process)."""
    unit, out, off = plan.unit, [], 0
    i = first
    while off < len(data):
        a, b = plan.chunk_range(i)
        piece = data[off:off + (b - a) * unit]
        out.append(registry.encode_chunk(plan, i, _elements(plan, piece)))
        off += len(piece)
        i += 1
    return 0, out


def _elements(plan: registry.Plan, data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=UINT[8 * plan.unit])


def _chunk_batches(plan: registry.Plan) -> Iterator[tuple[int, int]]:
    per_task = max(1, TASK_BYTES // max(1, plan.chunk * plan.unit))
    for first in range(0, plan.nchunks, per_task):
        yield first, min(plan.nchunks, first + per_task)


@dataclass
class _TensorStart:
    """A tensor without stages begins: its record (without its stream) and its plan; its chunks follow."""

    record: TensorRecord
    plan: registry.Plan
    side: bytes  # the plan's side information (made in the worker that planned it)


@dataclass
class _PartSpec:
    """A part of a tensor coded in a worker: its name, dtype and shape (its stream is beside it)."""

    name: str
    dtype: str
    shape: list[int]


@dataclass
class _OpenStream:
    """The tensor being written (no stages): its record so far, its stream's parameters and side
    information, and its chunks as they are written."""

    record: TensorRecord
    params: dict
    side: Optional[BlobRef]
    chunks: list[Chunk]

    def close(self) -> TensorRecord:
        return replace(self.record, stream=Stream(self.params, self.side, tuple(self.chunks)))


@dataclass
class _Coded:
    """A tensor coded whole in a worker: its record (without streams) and, per stream (the tensor's, or each
    part's), the stream's parameters, side information and coded chunks."""

    record: TensorRecord
    streams: list[tuple[Optional[_PartSpec], dict, bytes, list]]  # (part or None, params, side, chunks)


PLAN_AHEAD = 2  # tensors planned and hashed ahead, per worker, while earlier tensors' chunks are coded


def _plan_task(path: str, e: TensorEntry, level: int) -> tuple[registry.Plan, bytes, Optional[str]]:
    """Measure a tensor and choose its coding (in a worker: its two passes over the tensor run beside the
    coding of earlier tensors); returns the plan, its side information and, for a tensor of at most
    HASH_PIECE bytes (read once, planned and hashed from memory), its SHA-256 (else None: _hash_task)."""
    if e.nbytes > HASH_PIECE:
        reader = _reader(Path(path), e)
        sha256 = None
    else:
        with open(path, "rb", buffering=0) as f:
            data = _pread(f.fileno(), e.begin, e.nbytes, path)
        sha256 = hashlib.sha256(data).hexdigest()
        u = _elements_of(e.dtype, data)

        def reader(first: int, count: int) -> np.ndarray:
            return u[first:first + count]
    plan = _bound(fields_codec.make_plan(e.dtype, e.shape, reader, level), e.name, None)
    return plan, plan.side(), sha256


def _bound(plan, tensor: str, part: Optional[str]):
    """The plan with its stream bound to the record it is written for (binding.py)."""
    plan.seed = binding(tensor, part)
    return plan


def _hash_task(path: str, e: TensorEntry) -> str:
    return tensor_sha256(Path(path), e)


def _pack_items(ckpt: Checkpoint, recipe: Recipe, pool: Pool) -> Iterator:
    """The pack's tasks in container order. Each tensor's plan and hash are computed by workers, submitted
    PLAN_AHEAD tensors per worker ahead of its chunks, so that no step that grows with the model runs in
    the main process."""
    ahead: deque = deque()
    tensors = iter(ckpt.tensors())

    def submit_next() -> None:
        for fi, f, e in tensors:
            stages = recipe.stages_for(e.name, len(e.shape)) if lossy.can_apply(e.dtype, e.numel) else []
            if stages:
                ahead.append((Task(_lossy_task, (str(f.path), fi, e, stages, recipe.level)), None))
            else:
                hashed = pool.submit(_hash_task, str(f.path), e) if e.nbytes > HASH_PIECE else None
                ahead.append(((fi, str(f.path), e), (pool.submit(_plan_task, str(f.path), e, recipe.level), hashed)))
            return

    for _ in range(PLAN_AHEAD * pool.workers):
        submit_next()
    while ahead:
        item, futures = ahead.popleft()
        submit_next()
        if futures is None:
            yield item
            continue
        fi, path, e = item
        plan, side, sha256 = futures[0].result()
        yield _TensorStart(_record(fi, e, sha256 or futures[1].result()), plan, side)
        for first, last in _chunk_batches(plan):
            yield Task(_encode_task, (path, e.begin, plan.for_chunks(first, last), first, last))


def _record(fi: int, e: TensorEntry, sha256: str, **lossy_fields) -> TensorRecord:
    """A tensor's record, its streams not yet written."""
    return TensorRecord(e.name, fi, e.dtype, tuple(e.shape), e.nbytes, sha256, **lossy_fields)


def _lossy_task(path: str, fi: int, e: TensorEntry, stages: list, level: int) -> _Coded:
    """Apply a tensor's lossy stages and code their parts (in a worker: the stages are the slow part). A
    tensor holding NaN or infinity is coded losslessly instead."""
    raw = read_exact(Path(path), e.begin, e.nbytes)
    result = lossy.encode(e.dtype, e.shape, raw, stages)
    if result is None:
        u = _elements_of(e.dtype, bytes(raw))
        plan = _bound(fields_codec.make_plan(e.dtype, e.shape, lambda a, c: u[a:a + c], level), e.name, None)
        return _Coded(_record(fi, e, hashlib.sha256(raw).hexdigest()),
                      [(None, plan.params(), plan.side(), _encode_data_task(plan, 0, bytes(raw))[1])])
    # `lowrank`: what a low-rank stage decided (for information: inspect, pack's summary)
    record = _record(fi, e, hashlib.sha256(raw).hexdigest(), stages=result.stages,
                     decoded_sha256=result.decoded_sha256, quality=Quality(**result.quality), lowrank=result.lowrank)
    del raw
    quant = result.params[-1]
    coded = []
    for name, (dtype, shape, data) in result.parts.items():
        u = _elements_of(dtype, data)
        plan = None
        if quant.coder(name) == "trellis":
            try:
                plan = trellis_codec.make_plan(u.view(np.int16), shape)
            except ValueError:  # more distinct levels than a table holds: plain 16-bit integer coding
                pass
        if plan is None:
            plan = fields_codec.make_plan(dtype, shape, lambda a, c, u=u: u[a:a + c], level)
        _bound(plan, e.name, name)
        coded.append((_PartSpec(name, dtype, shape), plan.params(), plan.side(), _encode_data_task(plan, 0, data)[1]))
    return _Coded(record, coded)


def _elements_of(dtype: str, data: bytes) -> np.ndarray:
    bits = DTYPES[dtype].bits
    return np.frombuffer(data, dtype=UINT[bits]) if bits in UINT else np.frombuffer(data, np.uint8)


def pack_checkpoint(ckpt: Checkpoint, writer: ContainerWriter, recipe: Recipe, workers: Optional[int],
                    progress: Progress = _noop, pool: Optional[Callable] = None) -> list[TensorRecord]:
    """Code every tensor of `ckpt` into `writer`; returns the tensor records for the index. `pool` makes
    the worker pool (default: parallel.Pool; distributed.py's for a Ray cluster)."""
    records: list[TensorRecord] = []
    open_tensor: Optional[_OpenStream] = None

    def write_chunks(chunks, out: list[Chunk]) -> list[Chunk]:
        for code, payload, *crc in chunks:
            out.append(Chunk.placed(code, writer.write_blob(payload, *crc)))
        return out

    def write_stream(params: dict, side: bytes, chunks) -> Stream:
        side_ref = writer.write_blob(side) if side else None
        return Stream(params, side_ref, tuple(write_chunks(chunks, [])))

    def close_tensor() -> None:
        nonlocal open_tensor
        if open_tensor is not None:
            records.append(open_tensor.close())
            open_tensor = None

    # threads where the coding runs in the compiled kernels, zstd and hashlib (all release the GIL);
    # processes for lossy stages and for constriction (they hold it)
    with (pool or Pool)(workers, threads=native.backend() == "native" and not recipe.lossy) as pool:
        # a slow tensor (lossy stages on a big matrix) holds back the output: let the other workers run ahead
        for item in pool.ordered_map(_pack_items(ckpt, recipe, pool), inflight=PACK_INFLIGHT * pool.workers):
            if isinstance(item, _TensorStart):
                close_tensor()
                side_ref = writer.write_blob(item.side) if item.side else None
                open_tensor = _OpenStream(item.record, item.plan.params(), side_ref, [])
                if item.plan.nchunks == 0:
                    progress(item.record.nbytes)
            elif isinstance(item, _Coded):
                close_tensor()
                streams = [(part, write_stream(params, side, chunks)) for part, params, side, chunks in item.streams]
                if item.record.stages:
                    records.append(replace(item.record, parts=tuple(
                        Part(p.name, p.dtype, tuple(p.shape), s) for p, s in streams)))
                else:
                    records.append(replace(item.record, stream=streams[0][1]))
                progress(item.record.nbytes)
            else:
                nbytes, chunks = item
                write_chunks(chunks, open_tensor.chunks)
                progress(nbytes)
        close_tensor()
    return records


def pack_container(ckpt: Checkpoint, target: Path, recipe: Recipe, workers: Optional[int], force: bool,
                   progress: bool, index_extra: Optional[dict] = None, pool: Optional[Callable] = None
                   ) -> tuple[list[TensorRecord], int]:
    """Pack `ckpt` into one container at `target` (written atomically): its tensors, its carried files and
    the index; `index_extra` adds optional keys to the index (weightpack.torch: "tied"). Returns the tensor
    records and the container's size."""
    with ContainerWriter(target, force) as w, progress_bar(ckpt.total_bytes, "pack", progress) as bar:
        tensors = pack_checkpoint(ckpt, w, recipe, workers, bar.update, pool=pool)
        carried = [w.write_carried(name, path) for name, path in ckpt.carried]
        index = Index(VERSION, ckpt.kind, recipe.to_json(), tuple(SourceFile(f.rel, f.header_text) for f in ckpt.files),
                      tuple(carried), tuple(tensors), dict(index_extra or {}))
        return tensors, w.commit(index)


# -- decode --------------------------------------------------------------------------------------

def stream_plan(reader: ContainerReader, t: TensorRecord, part: Optional[Part] = None) -> registry.Plan:
    """The plan of the stream of `t` (or of its `part`): its side information read and checked (the chunk
    count was checked with the whole index when the container was opened), bound to its record from format
    1.3 on."""
    owner = part or t
    where = t.where if part is None else f"{t.where} part {part.name!r}"
    stream = owner.stream
    side = reader.read_blob(stream.side, where + " side information") if stream.side is not None else b""
    plan = registry.plan_from_record(owner.dtype, math.prod(owner.shape), stream.params, side, where)
    return _bound(plan, t.name, part and part.name) if reader.version >= (1, 3) else plan


def _decode_task(path: str, plan: registry.Plan, recs: list[Chunk], first: int, what: str,
                 out_path: Optional[str], out_offset: int, into: Optional[np.ndarray] = None) -> list:
    """Decode chunks first.. of a stream: write them into `out_path` at their place, or into the stream's
    buffer `into` (threads share it), or return them."""
    unit = plan.unit
    results = []
    with open(path, "rb", buffering=0) as f:
        out_fd = os.open(out_path, os.O_WRONLY) if out_path else None
        try:
            for k, rec in enumerate(recs):
                i = first + k
                where = f"{what} chunk {i}"
                if into is not None or out_fd is not None:  # decoded into a buffer: read into a work array
                    work = native.scratch("payload", rec.length, np.uint8)[:rec.length]
                    payload = pread_into(f.fileno(), rec.offset, work, FormatError, where)
                else:  # (pieces returned may be views of the payload)
                    payload = _pread(f.fileno(), rec.offset, rec.length, where, FormatError)
                if native.crc32(payload) != rec.crc32:
                    raise FormatError(f"{where}: checksum mismatch (damaged data)")
                a, b = plan.chunk_range(i)
                if into is not None:
                    dest = into[a * unit:b * unit]
                elif out_fd is not None:  # decoded into the thread's work array, then written out
                    dest = native.scratch("unpack", (b - a) * unit, np.uint8)[:(b - a) * unit]
                else:
                    dest = None
                raw = registry.decode_chunk(plan, i, rec, memoryview(payload), where, dest)
                if out_fd is not None:
                    os.pwrite(out_fd, raw, out_offset + a * unit)
                    results.append(len(raw))
                elif dest is not None:
                    results.append(len(raw))
                else:
                    results.append(raw)
        finally:
            if out_fd is not None:
                os.close(out_fd)
    return results


@dataclass
class _Mark:
    """In the ordered task stream: a tensor (or one of its parts) begins."""

    record: TensorRecord
    part: Optional[str] = None
    in_memory: bool = True
    whole: bool = False  # a lossy tensor decoded and rebuilt by one task: its result is the tensor's bytes
    buffer: Optional[np.ndarray] = None  # the tensor's bytes, which its tasks (threads) decode into


WHOLE_LOSSY_CHUNKS = 2  # a lossy tensor with at most this many chunks (all parts) is rebuilt in a worker


def _decode_lossy_task(path: str, t: TensorRecord, parts: list[tuple[Part, registry.Plan]], where: str) -> list[bytes]:
    """Decode every part of a lossy tensor and rebuild it (in a worker: the reconstruction and its hash
    check are then off the main process too)."""
    got = {}
    for part, plan in parts:
        w = f"{where} part {part.name!r}"
        pieces = _decode_task(path, plan, part.stream.chunks, 0, w, None, 0)
        got[part.name] = bytearray().join(_checked(part, pieces, w))
    return [lossy.decode(t, got)]


def _chunk_task_args(reader: ContainerReader, plan: registry.Plan, chunks: tuple[Chunk, ...], where: str,
                     target: Optional[tuple[str, int]], into: Optional[np.ndarray] = None) -> Iterator[tuple]:
    for first, last in _chunk_batches(plan):
        yield (str(reader.path), plan.for_chunks(first, last), chunks[first:last], first,
               where, target[0] if target else None, target[1] if target else 0, into)


def _decode_batch(batch: list[tuple]) -> list:
    """Several small decode tasks in one round trip to a worker."""
    return [r for args in batch for r in _decode_task(*args)]


def _decode_tensor_task(reader: ContainerReader, t: TensorRecord, target: Optional[tuple[str, int]],
                        into: Optional[np.ndarray]) -> list:
    """A small tensor without stages decoded whole by a worker thread, its plan read there too: off the main
    thread, which would otherwise wait for the workers' Python at every release of the GIL."""
    plan = stream_plan(reader, t)
    return [r for args in _chunk_task_args(reader, plan, t.stream.chunks, t.where, target, into)
            for r in _decode_task(*args)]


def _decode_tensors_task(reader: ContainerReader, batch: list[tuple]) -> list:
    """Several small tensors (_decode_tensor_task) in one round trip to a worker thread."""
    return [r for t, target, into in batch for r in _decode_tensor_task(reader, t, target, into)]


def decode_items(reader: ContainerReader, tensors: Iterable[TensorRecord], out: Optional[dict] = None,
                 shared: bool = False) -> Iterator:
    """Tasks decoding `tensors`, each preceded by a mark; `out` maps names to (path, offset) for tensors
    whose chunks workers write straight into a file (tensors without stages). Small tensors written
    straight to files share tasks, so a model of many small tensors costs few round trips. With `shared`
    (worker threads of this process), tensors without stages decoded in memory are decoded straight into
    their buffer, and small tensors' plans are read by the tasks that decode them."""
    batch: list[tuple] = []
    batch_bytes = 0

    def flush():
        nonlocal batch, batch_bytes
        if batch:
            yield Task(_decode_tensors_task, (reader, batch)) if shared else Task(_decode_batch, (batch,))
        batch, batch_bytes = [], 0

    for t in tensors:
        where = t.where
        if t.stages:
            yield from flush()
            t.chain()
            plans = [(part, stream_plan(reader, t, part)) for part in t.parts]
            if sum(plan.nchunks for _, plan in plans) <= WHOLE_LOSSY_CHUNKS:
                yield _Mark(t, whole=True)
                yield Task(_decode_lossy_task, (str(reader.path), t, plans, where))
                continue
            yield _Mark(t)
            for part, plan in plans:
                w = f"{where} part {part.name!r}"
                yield _Mark(t, part.name)
                yield from (Task(_decode_task, a) for a in _chunk_task_args(reader, plan, part.stream.chunks, w, None))
            continue
        target = out.get(t.name) if out else None
        if target is not None and t.nbytes < TASK_BYTES:
            if batch_bytes + t.nbytes > TASK_BYTES:
                yield from flush()
            yield _Mark(t, in_memory=False)
            if shared:
                batch.append((t, target, None))
            else:
                batch += _chunk_task_args(reader, stream_plan(reader, t), t.stream.chunks, where, target)
            batch_bytes += t.nbytes
            continue
        yield from flush()
        if target is None and shared and 0 < t.nbytes <= TASK_BYTES:
            buf = np.empty(t.nbytes, np.uint8)
            yield _Mark(t, buffer=buf)
            yield Task(_decode_tensor_task, (reader, t, None, buf))
            continue
        plan = stream_plan(reader, t)
        args = list(_chunk_task_args(reader, plan, t.stream.chunks, where, target))
        if target is None and shared and t.nbytes:
            buf = np.empty(t.nbytes, np.uint8)
            yield _Mark(t, buffer=buf)
            args = _chunk_task_args(reader, plan, t.stream.chunks, where, None, buf)
        else:
            yield _Mark(t, in_memory=target is None)
        yield from (Task(_decode_task, a) for a in args)
    yield from flush()


def _decoded(items: Iterator, progress: Progress) -> Iterator[tuple[TensorRecord, list[bytes]]]:
    """(record, decoded bytes in pieces) for each tensor decoded in memory, in order."""
    mark, parts, pieces = None, {}, []

    def finish():
        t = mark.record
        if mark.whole:
            progress(t.nbytes)
            return t, _checked(t, pieces, t.where)
        if t.stages:
            parts[mark.part] = bytearray().join(pieces)
            for part in t.parts:
                _checked(part, [parts[part.name]], f"{t.where} part {part.name!r}")
            progress(t.nbytes)
            return t, [lossy.decode(t, parts)]
        if mark.buffer is not None:
            if sum(pieces) != len(mark.buffer):
                raise FormatError(f"{t.where}: decoded {sum(pieces)} bytes, expected {len(mark.buffer)}")
            return t, [mark.buffer]
        return t, _checked(t, pieces, t.where)

    for item in items:
        if isinstance(item, _Mark):
            if mark is not None and item.part is not None and item.record is mark.record:
                if mark.part is not None:
                    parts[mark.part] = bytearray().join(pieces)
                mark, pieces = item, []
                continue
            if mark is not None and mark.in_memory:
                yield finish()
            mark, parts, pieces = item, {}, []
        elif mark.buffer is not None:  # lengths of the chunks decoded into it
            pieces.extend(item)
            progress(sum(item))
        elif mark.in_memory:
            pieces.extend(item)
            if not mark.record.stages and not mark.whole:
                progress(sum(len(p) for p in item))
        else:
            progress(sum(item))
    if mark is not None and mark.in_memory:
        yield finish()


def decode_tensors(reader: ContainerReader, tensors: Iterable[TensorRecord], workers: Optional[int],
                   progress: Progress = _noop, pool: Optional[Callable] = None
                   ) -> Iterator[tuple[TensorRecord, list[bytes]]]:
    """Yield (record, decoded bytes in pieces) for each tensor, decoded by worker threads where the compiled
    kernels are built (they release the GIL), else by worker processes."""
    threads = native.backend() == "native"
    with (pool or Pool)(workers, threads=threads) as p:  # a pool from elsewhere (Ray) shares no memory
        yield from _decoded(p.ordered_map(decode_items(reader, tensors, shared=threads and pool is None)), progress)


def _checked(t: TensorRecord | Part, pieces: list[bytes], where: str) -> list[bytes]:
    expected = t.nbytes
    n = sum(len(p) for p in pieces)
    if n != expected:
        raise FormatError(f"{where}: decoded {n} bytes, expected {expected}")
    return pieces


def decode_into_files(reader: ContainerReader, targets: dict[str, tuple[str, int]], workers: Optional[int],
                      progress: Progress = _noop, pool: Optional[Callable] = None) -> None:
    """Decode every tensor into its place in an output file: targets[name] = (path, offset). Workers write
    the chunks of plain tensors themselves; tensors with stages are rebuilt here and then written."""
    threads = native.backend() == "native"
    with (pool or Pool)(workers, threads=threads) as p:  # (shared: as in decode_tensors)
        plain = {t.name: targets[t.name] for t in reader.index.tensors if not t.stages}
        items = decode_items(reader, reader.index.tensors, plain, shared=threads and pool is None)
        for t, pieces in _decoded(p.ordered_map(items), progress):
            path, offset = targets[t.name]
            fd = os.open(path, os.O_WRONLY)
            try:
                for piece in pieces:
                    os.pwrite(fd, piece, offset)
                    offset += len(piece)
            finally:
                os.close(fd)


def progress_enabled(quiet: bool) -> bool:
    return not quiet and sys.stderr.isatty() and not os.environ.get("CI")


def progress_bar(total: int, desc: str, show: bool):
    """A progress bar in bytes (tqdm; hidden unless `show`): its `update` is the pipelines' progress."""
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not show,
                dynamic_ncols=True, leave=False)
