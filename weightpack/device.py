"""Decoding where the model runs: tensors rebuilt on a torch device (a GPU) from the container's bytes.

The container is memory-mapped; each chunk's coded bytes are checked against their crc32 on the host and
copied to the device as they are. There the heads' ANS lanes of many tensors are decoded together by the
lock-step decoder (coding/lockstep.py: a Triton kernel on CUDA, vectorized torch elsewhere), and every
tensor is rebuilt with torch on the device: symbols to head values, the class grouping undone, tails
unpacked from their bit planes, sign | head | tail joined, lossy stages applied (dequantization, low-rank
products) and the result viewed as its dtype. No tensor exists as a whole on the host on this path.

Pieces the device does not decode are decoded on the host a chunk at a time and copied up: chunks stored as
zstd byte planes (the `bytes` chunk codec), zstd-compressed tail parts, trellis levels in the step-major
layout, and streams written before format 1.2 (one ANS stream per chunk). Trellis levels in the lanes layout
take two decodes: parities with the heads, then, after the trellis walk on the device, the rests.

Checks: crc32 of every chunk's coded bytes (host), every stream's structure, and that each ANS lane uses up
its words (device). The crc32 of decoded chunks and the SHA-256 of lossy reconstructions are checked by the
CPU path (`load(device="cpu")`, `unpack`, `verify`), not here: computing them would bring every tensor back.
"""

from __future__ import annotations

import math
import mmap
import os
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import numpy as np

from .coding import lockstep, streams, trellis
from .coding.fields import UINT, packed_size, _subplanes
from .container import ContainerReader
from .dtypes import DTYPES, torch_dtype
from .errors import FormatError, WeightpackError
from .pipeline import stream_plan, unit_bytes
from .stages import lossy

BATCH_SYMBOLS = 1 << 28  # symbols decoded per lock-step batch (bounds the device's working memory: ~6 B each)


def _work(bits: int):
    import torch

    return torch.int32 if bits <= 16 else torch.int64


@dataclass
class _Stream:
    """One stream being rebuilt on the device: what the host prepared, finished after the batch decode."""

    plan: streams.Plan
    dtype: str
    shape: list
    where: str
    base: int = 0  # its first symbol in the batch's output
    lane_chunks: list = field(default_factory=list)  # (a, m, symbol base, BlockGroups of classes)
    host: list = field(default_factory=list)  # (first unit, decoded raw bytes) of chunks decoded on the host
    tails: list = field(default_factory=list)  # (a, m, BlockGroups of trailing zeros, [(tz, count, width, offset)])
    tail_bytes: list = field(default_factory=list)
    tail_size: int = 0
    rests: list = field(default_factory=list)  # trellis lanes layout: each chunk's rest part
    rest_base: int = 0  # its first rest symbol in the second decode's output
    trellis: Optional[tuple] = None  # (parities, quantizers, rest keys) between the two decodes


class _Batch:
    def __init__(self):
        self.lanes = lockstep.LaneSet()
        self.items: list = []  # (tensor record, {part name or None: _Stream})
        self.split: list = []  # trellis streams in the lanes layout: they need a second decode


class DeviceDecoder:
    """Rebuilds a container's tensors on `device`; `progress(nbytes)` is told of each finished tensor."""

    def __init__(self, reader: ContainerReader, device, progress: Callable[[int], None] = lambda n: None,
                 raw: bool = False):
        self.reader = reader
        self.raw = raw  # tensors of dtypes torch lacks (F4, F6) come out as their bytes (uint8), not an error
        self.device = device
        self.progress = progress
        self.mm = mmap.mmap(reader.f.fileno(), 0, access=mmap.ACCESS_READ)
        self.threads = ThreadPoolExecutor(os.cpu_count() or 1)  # crc32 and zstd release the GIL
        self.pending: list = []  # device-side checks not yet read back

    def close(self) -> None:
        self.threads.shutdown()
        try:
            self.mm.close()
        except BufferError:  # views of it are still referenced (e.g. by an exception's frames): unmapped
            pass  # when the last one goes

    def tensors(self, records: list[dict]) -> Iterator[tuple[str, "torch.Tensor"]]:
        batch = _Batch()
        for t in records:
            where = f"tensor {t['name']!r}"
            if t["stages"]:
                lossy.params_of(t, where)
                streams_of = {part["name"]: self._prepare(batch, part["stream"], part["dtype"], part["shape"],
                                                          f"{where} part {part['name']!r}", t["name"], part["name"])
                              for part in t["parts"]}
            else:
                streams_of = {None: self._prepare(batch, t["stream"], t["dtype"], t["shape"], where, t["name"])}
            batch.items.append((t, streams_of))
            if batch.lanes.nsymbols >= BATCH_SYMBOLS:
                yield from self._finish(batch)
                batch = _Batch()
        yield from self._finish(batch)
        lockstep.check_pending(self.pending)

    # -- host side ------------------------------------------------------------------------------------
    def _payloads(self, chunks: list, where: str) -> list:
        """The chunks' coded bytes (views of the mapped file), their crc32 checked in threads."""
        views = [memoryview(self.mm)[rec["offset"]:rec["offset"] + rec["length"]] for rec in chunks]
        ok = list(self.threads.map(lambda v, rec: zlib.crc32(v) == rec["crc32"], views, chunks))
        for i, good in enumerate(ok):
            if not good:
                raise FormatError(f"{where} chunk {i}: checksum mismatch (damaged data)")
        return views

    def _prepare(self, batch: _Batch, stream: dict, dtype: str, shape: list, where: str, tensor: str,
                 part: Optional[str] = None) -> _Stream:
        plan = stream_plan(self.reader, stream, dtype, shape, where, tensor, part)
        s = _Stream(plan, dtype, shape, where)
        laned = plan.codec == "fields" and plan.lane
        split = plan.codec == "trellis" and plan.ans_lane and plan.alphabet > 1
        row = batch.lanes.add_tables(plan.tables) if laned and len(plan.alphabet) > 1 else 0
        if split:
            row = batch.lanes.add_tables(plan.ptables)
            s.base = batch.lanes.nsymbols
            batch.split.append(s)
        for i, (rec, payload) in enumerate(zip(stream["chunks"], self._payloads(stream["chunks"], where))):
            w = f"{where} chunk {i}"
            if split:
                self._prepare_trellis(batch, s, i, rec, payload, row, w)
            elif not laned or rec.get("codec") != "fields":
                s.host.append((plan.chunk_range(i)[0], streams.decode_chunk(plan, i, rec, payload, w)))
            else:
                self._prepare_fields(batch, s, i, rec, payload, row, w)
        return s

    def _prepare_trellis(self, batch: _Batch, s: _Stream, i: int, rec: dict, payload, row: int, where: str) -> None:
        """A chunk of trellis levels in the lanes layout: its parities join the first decode; its rests wait
        for the second (their contexts need the quantizers, which need the parities)."""
        plan = s.plan
        a, b = plan.chunk_range(i)
        if rec.get("codec") != "trellis":
            raise FormatError(f"{where}: unknown chunk codec {rec.get('codec')!r}")
        pdata, rdata = trellis.split_parts(plan, streams.chunk_views(rec, payload, where), where)
        rc = np.bincount(trellis.split_row_classes(plan, a, b - a), minlength=plan.classes)
        batch.lanes.add(pdata, rc.tolist(), row, plan.ans_lane, where)
        s.rests.append(rdata)

    def _prepare_fields(self, batch: _Batch, s: _Stream, i: int, rec: dict, payload, row: int, where: str) -> None:
        plan = s.plan
        lay, L = plan.layout, plan.block
        a, b = plan.chunk_range(i)
        m = b - a
        views = streams.chunk_views(rec, payload, where)
        if set(views) != streams.fields_part_names(lay):
            raise FormatError(f"{where}: malformed chunk parts")
        bcls, btz = streams.chunk_blocks(plan, i, m)
        hcodec, hdata = views["head"]
        if len(plan.alphabet) == 1:
            if hcodec != "const" or len(hdata):
                raise FormatError(f"{where}: malformed head part")
        else:
            if hcodec != "lanes" or len(hdata) % 4:
                raise FormatError(f"{where}: malformed head part")
            g = streams.BlockGroups(bcls, plan.tables.shape[0], L, m)
            base = batch.lanes.add(hdata, g.counts, row, plan.lane, where)
            s.lane_chunks.append((a, m, base, g))
        if lay.tail + lay.sign:
            g = streams.BlockGroups(btz, lay.tail + 1, L, m)
            groups, size = [], 0
            for tz in g.keys():
                width = lay.tail - tz + lay.sign
                groups.append((tz, g.counts[tz], width, s.tail_size + size))
                size += packed_size(g.counts[tz], width)
            tcodec, tdata = views["tail"]
            s.tail_bytes.append(streams.unstore(tcodec, tdata, size, where + " tail"))
            s.tails.append((a, m, g, groups))
            s.tail_size += size

    # -- device side ----------------------------------------------------------------------------------
    def _finish(self, batch: _Batch) -> Iterator[tuple[str, "torch.Tensor"]]:
        if not batch.items:
            return
        syms = lockstep.decode(batch.lanes, self.device, "lanes", self.pending) if batch.lanes.nsymbols else None
        rests = self._trellis_rests(batch, syms) if batch.split else None
        for t, streams_of in batch.items:
            where = f"tensor {t['name']!r}"
            if t["stages"]:
                parts = {name: self._rebuild(s, syms, rests) for name, s in streams_of.items()}
                x = lossy.reconstruct(t, parts)
            else:
                x = self._rebuild(streams_of[None], syms, rests)
            if torch_dtype(t["dtype"]) is not None and list(x.shape) != list(t["shape"]):
                raise FormatError(f"{where}: rebuilt with shape {list(x.shape)}")
            self.progress(t["nbytes"])
            yield t["name"], x

    def _trellis_rests(self, batch: _Batch, syms):
        """For each trellis stream in the lanes layout: parities in element order, the quantizers (the walk),
        the rests' contexts; then all rests decoded at once. Returns the rests' output (in coding order)."""
        import torch

        lanes = lockstep.LaneSet()
        for s in batch.split:
            plan, dev = s.plan, self.device
            n, R = plan.n, plan.classes
            chunk_of = torch.arange(n, device=dev) // plan.chunk
            rc = _row_classes(plan, dev)
            order = torch.argsort(chunk_of * R + rc, stable=True) if R > 1 else None
            p = _ungroup(syms[s.base:s.base + n], order).to(torch.int64)
            q = walk_parities(p, dev)
            key = chunk_of * (4 * R) + (q * 2 + p) * R + rc
            counts = torch.bincount(key, minlength=plan.nchunks * 4 * R).reshape(plan.nchunks, 4 * R).cpu().numpy()
            s.trellis = (p, q, key)
            if plan.rest > 1:
                row = lanes.add_tables(plan.tables)
                s.rest_base = lanes.nsymbols
                for rdata, c in zip(s.rests, counts):
                    lanes.add(rdata, c.tolist(), row, plan.ans_lane, s.where)
        return lockstep.decode(lanes, self.device, "lanes", self.pending) if lanes.nsymbols else None

    def _trellis_values(self, s: _Stream, rests) -> "torch.Tensor":
        """The multiples of the step (int16) of a trellis stream in the lanes layout."""
        import torch

        plan = s.plan
        p, q, key = s.trellis
        s.trellis = None
        if plan.rest > 1:
            order = torch.argsort(key, stable=True)
            rs = _ungroup(rests[s.rest_base:s.rest_base + plan.n], order).to(torch.int64)
        else:
            rs = torch.zeros_like(p)
        k = 2 * (rs + plan.rlo) + p
        return (2 * k - q * torch.sign(k)).to(torch.int16)

    def _rebuild(self, s: _Stream, syms, rests=None) -> "torch.Tensor":
        import torch

        tdt = torch_dtype(s.dtype)
        if tdt is None and not self.raw:
            raise WeightpackError(f"{s.where}: torch has no dtype for {s.dtype}")
        plan = s.plan
        if s.trellis is not None:
            return self._trellis_values(s, rests).reshape(s.shape)
        if plan.codec != "fields" or not plan.lane:
            unit = unit_bytes(plan)
            buf = torch.empty(DTYPES[s.dtype].nbytes(math.prod(s.shape)), dtype=torch.uint8, device=self.device)
            for first, raw in s.host:
                buf[first * unit:first * unit + len(raw)] = _upload(np.frombuffer(raw, np.uint8), self.device)
            return buf if tdt is None else buf.view(tdt).reshape(s.shape)
        v = self._fields_values(s, syms)
        return _as_dtype(v, plan.layout.bits, tdt).reshape(s.shape)

    def _fields_values(self, s: _Stream, syms) -> "torch.Tensor":
        """The elements of a laned fields stream as unsigned values in the working integer dtype."""
        import torch

        plan, dev = s.plan, self.device
        lay, L, n = plan.layout, plan.block, plan.n
        work = _work(lay.bits)
        alphabet = torch.as_tensor(plan.alphabet, dtype=work).to(dev)
        if len(plan.alphabet) == 1:
            head = alphabet[0].expand(n).clone()
        else:
            head = self._heads(s, syms, alphabet)
        if lay.tail + lay.sign:
            tail, tz = self._tails(s, work)
            t = lay.tail - tz
            v = (head << lay.tail) | ((tail & ((1 << t) - 1)) << tz)
            if lay.sign:
                v |= (tail >> t) << (lay.bits - 1)
        else:
            v = head
        for first, raw in s.host:  # chunks stored as bytes
            u = np.frombuffer(raw, UINT[lay.bits])
            v[first:first + len(u)] = _upload(u.astype(np.int64 if lay.bits > 16 else np.int32, copy=False)
                                              if lay.bits < 64 else u.view(np.int64), dev).to(work)
        return v

    def _heads(self, s: _Stream, syms, alphabet) -> "torch.Tensor":
        """Head values in element order: the symbols of each chunk are grouped by class (streams.py)."""
        import torch

        plan = s.plan
        L, n = plan.block, plan.n
        chunks = s.lane_chunks
        if not chunks:
            return torch.zeros(n, dtype=alphabet.dtype, device=self.device)
        shift = chunks[0][2] - chunks[0][0]
        if not s.host and all(g.uniform and base - a == shift for a, _, base, g in chunks):
            return alphabet[syms[shift:shift + n].to(torch.int64)]  # the symbols are the elements, in order
        # the symbol of element e is e + delta[e // L]; blocks of chunks decoded on the host point at some
        # symbol (their heads are overwritten)
        nblocks = -(-n // L)
        delta = -np.arange(nblocks, dtype=np.int64) * L
        for a, m, base, g in chunks:
            b0 = a // L
            start = base
            for c, rows in enumerate(g.rows):
                if len(rows):
                    delta[b0 + rows] = start + np.arange(len(rows), dtype=np.int64) * L - (a + rows * L)
                    start += g.counts[c]
        d = _upload(delta, self.device)
        idx = torch.arange(n, dtype=torch.int64, device=self.device) + d.repeat_interleave(L)[:n]
        return alphabet[syms[idx.clamp_(0, syms.numel() - 1)].to(torch.int64)]

    def _tails(self, s: _Stream, work) -> tuple["torch.Tensor", "torch.Tensor | int"]:
        """Tail values in element order and the trailing-zero count (one int, or one per element)."""
        import torch

        plan, dev = s.plan, self.device
        lay, L, n = plan.layout, plan.block, plan.n
        buf = _upload(np.frombuffer(b"".join(s.tail_bytes), np.uint8), dev)
        tail = torch.zeros(n, dtype=work, device=dev)
        uniform = [(a, m, groups[0]) for a, m, g, groups in s.tails if len(groups) == 1]
        # chunks with one trailing-zero group and equal length are unpacked together, one row each
        by_shape: dict = {}
        for a, m, (tz, cnt, width, off) in uniform:
            by_shape.setdefault((m, width), []).append((a, off))
        for (m, width), items in by_shape.items():
            offs = _upload(np.asarray([off for _, off in items], dtype=np.int64), dev)
            rows = buf[offs[:, None] + torch.arange(packed_size(m, width), device=dev)]
            vals = unpack_bits(rows, m, width, work)
            starts = _upload(np.asarray([a for a, _ in items], dtype=np.int64), dev)
            tail[(starts[:, None] + torch.arange(m, device=dev)).reshape(-1)] = vals.reshape(-1)
        for a, m, g, groups in s.tails:
            if len(groups) == 1:
                continue
            for tz, cnt, width, off in groups:
                vals = unpack_bits(buf[off:off + packed_size(cnt, width)][None], cnt, width, work)[0]
                pos = g.gather(np.arange(a, a + m, dtype=np.int64), tz)
                tail[_upload(pos, dev)] = vals
        tzs = plan.tz if len(plan.tz) else np.zeros(1, np.uint8)
        if int(tzs.min()) == int(tzs.max()):
            return tail, int(tzs[0])
        tz = _upload(tzs.astype(np.int64), dev).to(work).repeat_interleave(L)[:n]
        return tail, tz


def _row_classes(plan, dev) -> "torch.Tensor":
    """The row class of every element of a trellis stream (int64, on the device)."""
    import torch

    if plan.classes == 1:
        return torch.zeros(plan.n, dtype=torch.int64, device=dev)
    rc = _upload(plan.rcls.astype(np.int64), dev)
    return rc.repeat_interleave(plan.row)[:plan.n]


def _ungroup(grouped: "torch.Tensor", order) -> "torch.Tensor":
    """Symbols in coding order (grouped by a stable sort, `order`) back to element order."""
    if order is None:
        return grouped
    out = grouped.new_empty(grouped.shape)
    out[order] = grouped
    return out


_WALK = {}


def walk_parities(p: "torch.Tensor", dev) -> "torch.Tensor":
    """trellis.walk_parities on the device: the quantizer (int64) of each element from the levels'
    parities, 8 steps per table lookup, every lane of 256 elements starting in state 0."""
    import torch

    if dev not in _WALK:
        _WALK[dev] = (torch.as_tensor(trellis.PSKIP.astype(np.int64)).reshape(-1).to(dev),
                      torch.as_tensor(trellis.PQGROUP.astype(np.int64)).reshape(-1, trellis.GROUP).to(dev))
    skip, qgroup = _WALK[dev]
    m = p.numel()
    L = -(-m // trellis.LANE)
    padded = torch.zeros(L * trellis.LANE, dtype=torch.int64, device=dev)
    padded[:m] = p
    weights = (1 << torch.arange(trellis.GROUP, device=dev))
    b = (padded.reshape(L, -1, trellis.GROUP) * weights).sum(dim=-1)  # 8 parities -> a byte, first lowest
    q = torch.empty(L, b.shape[1], trellis.GROUP, dtype=torch.int64, device=dev)
    state = torch.zeros(L, dtype=torch.int64, device=dev)
    for i in range(b.shape[1]):
        idx = state * 256 + b[:, i]
        q[:, i] = qgroup[idx]
        state = skip[idx]
    return q.reshape(-1)[:m]


def _upload(a: np.ndarray, device) -> "torch.Tensor":
    import torch

    with warnings.catch_warnings():  # a read-only view of the mapped file: it is only ever read
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(np.ascontiguousarray(a))
    if str(device).startswith("cuda"):
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device) if str(device) != "cpu" else t.clone()


def unpack_bits(rows: "torch.Tensor", n: int, width: int, work) -> "torch.Tensor":
    """fields.unpack_bits on the device, for each row of a (rows, packed_size(n, width)) uint8 tensor."""
    import torch

    v = torch.zeros(rows.shape[0], n, dtype=work, device=rows.device)
    off, shift = 0, 0
    for w in _subplanes(width):
        if w == 8:
            plane = rows[:, off:off + n]
            off += n
        else:
            per = 8 // w
            size = -(-n * w // 8)
            g = rows[:, off:off + size].to(torch.int32)
            off += size
            shifts = torch.arange(0, 8, w, dtype=torch.int32, device=rows.device)
            plane = ((g[:, :, None] >> shifts) & ((1 << w) - 1)).reshape(rows.shape[0], -1)[:, :n]
        v |= plane.to(work) << shift
        shift += w
    return v


def _as_dtype(v: "torch.Tensor", bits: int, tdt) -> "torch.Tensor":
    """Unsigned `bits`-bit values held in a wider signed integer tensor, reinterpreted as `tdt`."""
    import torch

    if bits == 8:
        return v.to(torch.uint8).view(tdt)
    if bits == 16:
        return torch.where(v >= 1 << 15, v - (1 << 16), v).to(torch.int16).view(tdt)
    if bits == 32:
        return torch.where(v >= 1 << 31, v - (1 << 32), v).to(torch.int32).view(tdt)
    return v.view(tdt)


def load(reader: ContainerReader, device, progress: Callable[[int], None] = lambda n: None,
         names: Optional[list[str]] = None, raw: bool = False) -> Iterator[tuple[str, "torch.Tensor"]]:
    """(name, tensor on `device`) for every tensor of the container (or those named), in index order.
    With `raw`, tensors of dtypes torch lacks come as their bytes (uint8) instead of an error."""
    records = reader.index["tensors"] if names is None else [t for t in reader.index["tensors"] if t["name"] in names]
    dec = DeviceDecoder(reader, device, progress, raw)
    try:
        yield from dec.tensors(records)
    finally:
        dec.close()
