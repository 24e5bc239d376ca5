"""Decoding where the model runs: tensors rebuilt on a torch device (a GPU) from the container's bytes.

This module batches; what is particular to a codec is in its folder (coding/codecs/*/device.py, mapped by
coding/codecs/on_device.py). The container is memory-mapped; each chunk's coded bytes are checked against
their crc32 on the host and handed to its codec's rebuilder, which queues its ANS lanes into the batch. The
lanes of many tensors are decoded together by the lock-step decoder (coding/lockstep.py: a Triton kernel on
CUDA, vectorized torch elsewhere), a second decode takes what needs the first one's symbols (trellis rests),
and every stream is rebuilt by its codec with torch on the device; lossy stages are applied (dequantization,
low-rank products). No tensor exists as a whole on the host on this path.

Pieces the device does not decode are decoded on the host a chunk at a time (the codecs' CPU decoders) and
copied up: chunks stored as zstd byte planes (the `bytes` chunk codec), trellis levels in the step-major
layout, and streams written before format 1.2 (one ANS stream per chunk).

Checks: crc32 of every chunk's coded bytes (host), every stream's structure, and that each ANS lane uses up
its words (device). The crc32 of decoded chunks and the SHA-256 of lossy reconstructions are checked by the
CPU path (`load(device="cpu")`, `unpack`, `verify`), not here: computing them would bring every tensor back.
"""

from __future__ import annotations

import math
import mmap
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import numpy as np

from .coding import lockstep
from .coding.codecs import registry
from .coding.codecs.on_device import rebuilder
from .container import ContainerReader
from .dtypes import DTYPES, torch_dtype
from .errors import FormatError, WeightpackError
from .pipeline import stream_plan
from .stages import lossy

BATCH_SYMBOLS = 1 << 28  # symbols decoded per lock-step batch (bounds the device's working memory: ~6 B each)


@dataclass
class _Stream:
    """One stream being rebuilt: its codec's rebuilder on the device (None: every chunk decoded on the host)
    and the chunks the host decoded."""

    plan: registry.Plan
    dtype: str
    shape: list
    where: str
    on_device: Optional[object] = None
    host: list = field(default_factory=list)  # (first element, decoded raw bytes) of chunks decoded on the host


class _Batch:
    def __init__(self):
        self.lanes = lockstep.LaneSet()
        self.items: list = []  # (tensor record, {part name or None: _Stream})


class DeviceDecoder:
    """Rebuilds a container's tensors on `device`; `progress(nbytes)` is told of each finished tensor."""

    def __init__(self, reader: ContainerReader, device, progress: Callable[[int], None] = lambda n: None,
                 raw: bool = False):
        self.reader = reader
        self.raw = raw  # tensors of dtypes torch lacks (F4, F6) come out as their bytes (uint8), not an error
        self.device = device
        self.progress = progress
        self.mm = mmap.mmap(reader.fileno(), 0, access=mmap.ACCESS_READ)
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
        """A stream's chunks queued into the batch by its codec's rebuilder, or decoded on the host."""
        plan = stream_plan(self.reader, stream, dtype, shape, where, tensor, part)
        s = _Stream(plan, dtype, shape, where, rebuilder(plan, batch.lanes, self.device, where))
        for i, (rec, payload) in enumerate(zip(stream["chunks"], self._payloads(stream["chunks"], where))):
            w = f"{where} chunk {i}"
            if s.on_device is None or not s.on_device.add_chunk(batch.lanes, i, rec, payload, w):
                s.host.append((plan.chunk_range(i)[0], registry.decode_chunk(plan, i, rec, payload, w)))
        return s

    # -- device side ----------------------------------------------------------------------------------
    def _finish(self, batch: _Batch) -> Iterator[tuple[str, "torch.Tensor"]]:
        if not batch.items:
            return
        syms = lockstep.decode(batch.lanes, self.device, "lanes", self.pending) if batch.lanes.nsymbols else None
        rests = self._second_round(batch, syms)
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

    def _second_round(self, batch: _Batch, syms):
        """The symbols of a second lock-step decode of what the rebuilders queue once the first one's symbols
        are known (trellis rests: their contexts need the walk over the parities), or None."""
        lanes = lockstep.LaneSet()
        for _, streams_of in batch.items:
            for s in streams_of.values():
                if s.on_device is not None:
                    s.on_device.second_round(syms, lanes)
        return lockstep.decode(lanes, self.device, "lanes", self.pending) if lanes.nsymbols else None

    def _rebuild(self, s: _Stream, syms, rests=None) -> "torch.Tensor":
        import torch

        tdt = torch_dtype(s.dtype)
        if tdt is None and not self.raw:
            raise WeightpackError(f"{s.where}: torch has no dtype for {s.dtype}")
        if s.on_device is not None:
            return s.on_device.values(syms, rests, s.host, tdt).reshape(s.shape)
        unit = s.plan.unit
        buf = torch.empty(DTYPES[s.dtype].nbytes(math.prod(s.shape)), dtype=torch.uint8, device=self.device)
        for first, raw in s.host:
            buf[first * unit:first * unit + len(raw)] = lockstep.upload(np.frombuffer(raw, np.uint8), self.device)
        return buf if tdt is None else buf.view(tdt).reshape(s.shape)


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
