"""The plan of a `fields` stream: per tensor, the field layout, the head alphabet, one table per block
class, each block's class and trailing zeros; measured by two passes over the tensor (make_plan), written
as parameters and one zstd'd side-information blob, and read back and validated (plan_from_record)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import numpy as np

from ....dtypes import DTYPES
from ....errors import FormatError
from ... import entropy, native
from ...chunks import Chunked, StreamParams, chunk_size
from ...levels import DEFAULT_LEVEL, LEVELS
from ...storage import unzstd, zstd
from ..bytes import codec as bytes_codec
from . import cpu, native as compiled
from .layout import Layout, layout_for, trailing_zeros

NAME = "fields"
CHUNK_TARGET = 1 << 19  # elements per chunk (rounded to whole blocks)
MAX_BLOCK = 1 << 16
DEFAULT_BLOCK = 4096
BACKENDS = {"numpy": cpu, "native": compiled}  # the codec's CPU implementations (coding/native.py chooses)

Reader = Callable[[int, int], np.ndarray]  # (first element, count) -> uint array of raw elements


def backend():
    """The fields codec's CPU implementation in use (cpu.py or native.py)."""
    return native.select(BACKENDS)


@dataclass
class Plan(Chunked):
    """Everything needed to code (and decode) the chunks of one `fields` stream."""

    dtype: str
    n: int
    chunk: int  # elements per chunk
    zstd_level: int = 3
    try_bytes: bool = False
    layout: Optional[Layout] = None
    block: int = 0
    alphabet: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    tables: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.uint32))
    cls: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint8))
    tz: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint8))
    block_base: int = 0  # index of the first block that cls and tz hold
    lane: int = 0  # symbols per ANS lane of the heads (format 1.2); 0: one ANS stream per chunk (1.0/1.1)
    seed: int = 0  # the stream's binding (format 1.3; 0 before): seeds its chunks' decoded-data checksums
    estimate: float = 0.0  # bits the plan expects to code the stream in (heads, tables, classes, raw tails)
    codec: str = NAME
    _tables: Optional[entropy.Tables] = None
    _lut: Optional[np.ndarray] = None

    @property
    def itemsize_bits(self) -> int:
        return DTYPES[self.dtype].bits

    @property
    def unit(self) -> int:
        """Bytes per stream element."""
        return self.itemsize_bits // 8


    # -- side information ------------------------------------------------------------------------
    def params(self) -> dict:
        p = {"codec": NAME, "chunk": self.chunk, "layout": self.layout.to_json(), "block": self.block,
             "contexts": int(self.tables.shape[0]), "alphabet": int(len(self.alphabet))}
        if self.lane:
            p["lane"] = self.lane
        return p

    def side(self) -> bytes:
        present = np.zeros(1 << self.layout.head, dtype=np.uint8)
        present[self.alphabet] = 1
        raw = b"".join([
            np.packbits(present, bitorder="little").tobytes(),
            self.tables.astype("<u2").tobytes(),
            self.cls.astype(np.uint8).tobytes(),
            self.tz.astype(np.uint8).tobytes(),
        ])
        return zstd(raw, 19)

    def coding_tables(self) -> entropy.Tables:
        if self._tables is None:
            self._tables = entropy.Tables(self.tables)
        return self._tables

    def models(self):
        return self.coding_tables().models()

    def lut(self) -> np.ndarray:
        if self._lut is None:
            self._lut = np.zeros(1 << self.layout.head, dtype=np.int32)
            self._lut[self.alphabet] = np.arange(len(self.alphabet), dtype=np.int32)
        return self._lut

    def for_chunks(self, first: int, last: int) -> "Plan":
        """A copy carrying only the block side information of chunks first..last-1 (to ship to a worker)."""
        bpc = self.chunk // self.block
        lo, hi = first * bpc - self.block_base, last * bpc - self.block_base
        return replace(self, cls=self.cls[lo:hi], tz=self.tz[lo:hi], block_base=first * bpc,
                       _tables=None, _lut=None)

    def chunk_blocks(self, i: int, m: int) -> tuple[np.ndarray, np.ndarray]:
        """The class and the trailing zeros of each block of chunk i (m elements)."""
        b0 = i * self.chunk // self.block - self.block_base
        nb = math.ceil(m / self.block)
        if b0 < 0 or b0 + nb > len(self.cls):
            raise FormatError("chunk outside the block side information")
        return self.cls[b0:b0 + nb], self.tz[b0:b0 + nb]


# -- planning ------------------------------------------------------------------------------------

def _block_length(n: int, shape: list[int]) -> int:
    if len(shape) >= 2 and shape[0] > 0 and n // shape[0] > 0:
        row = n // shape[0]
        if row > MAX_BLOCK:
            return DEFAULT_BLOCK
        return row * math.ceil(64 / row) if row < 64 else row
    return max(1, min(n, DEFAULT_BLOCK))


def make_plan(dtype: str, shape: list[int], reader: Reader, level: int = DEFAULT_LEVEL, lane: Optional[int] = None):
    """Measure a tensor (two passes through `reader`) and choose its codec (this one, or `bytes` where its
    dtype has no field layout or its heads too many values), contexts and tables. At level 3 the level-2
    layout is measured too (with level 3's trials) and the smaller estimate is taken, so that a tensor whose
    extra head bit or contexts do not pay for their tables is coded as at level 2. `lane`: symbols per ANS
    lane of the heads (None: entropy.LANE, what a writer uses; 0: one ANS stream per chunk, as formats 1.0 and
    1.1 wrote)."""
    lane = entropy.LANE if lane is None else lane
    plan = _make_plan(dtype, shape, reader, LEVELS[level], lane)
    if level == 3 and plan.codec == NAME:
        alt = _make_plan(dtype, shape, reader, dict(LEVELS[2], zstd=LEVELS[3]["zstd"], try_bytes=LEVELS[3]["try_bytes"]),
                         lane)
        if alt.estimate < plan.estimate:
            return alt
    return plan


def _make_plan(dtype: str, shape: list[int], reader: Reader, cfg: dict, lane: int):
    dt = DTYPES[dtype]
    n = math.prod(shape)
    lay = layout_for(dt, cfg["k"])
    if lay is None or n == 0:
        return bytes_codec.make_plan(dtype, n, cfg["zstd"])
    L = _block_length(n, shape)
    chunk = max(1, CHUNK_TARGET // L) * L
    nblocks = math.ceil(n / L)
    hist = np.zeros(1 << lay.head, dtype=np.int64)
    bsum = np.zeros(nblocks, dtype=np.int64)
    blow = np.zeros(nblocks, dtype=np.uint64)
    cpu_backend = backend()
    for a in range(0, n, chunk):
        cpu_backend.plan_scan(reader(a, min(chunk, n - a)), lay, L, hist, bsum[a // L:], blow[a // L:])
    bsum = bsum.astype(np.float64)  # sums of integers below 2**53: the same values
    tz = trailing_zeros(blow, lay.tail).astype(np.uint8) if lay.tail else np.zeros(nblocks, np.uint8)
    floor = layout_for(dt, 0).head
    while lay.bits == 16 and lay.head > floor and np.count_nonzero(hist) > cfg["alphabet16"]:
        hist = hist.reshape(-1, 2).sum(axis=1)  # one mantissa bit less in the head, one more in the tail
        lay = Layout(lay.bits, lay.sign, lay.head - 1, lay.tail + 1)
    alphabet = np.flatnonzero(hist).astype(np.int64)
    if len(alphabet) > entropy.MAX_ALPHABET:  # too many distinct whole values (16-bit integers)
        return bytes_codec.make_plan(dtype, n, cfg["zstd"])
    plan = Plan(dtype, n, chunk, cfg["zstd"], cfg["try_bytes"], lay, L, alphabet,
                np.zeros((0, len(alphabet)), np.uint32), np.zeros(nblocks, np.uint8), tz, lane=lane)
    sizes = np.full(nblocks, L, dtype=np.float64)
    sizes[-1] = n - L * (nblocks - 1)
    plan.estimate = float((sizes * (lay.tail + lay.sign - tz.astype(np.float64))).sum())  # tails, raw
    if len(alphabet) < 2:
        return plan
    cmax = 1
    while cmax * 2 <= min(cfg["contexts"], nblocks):
        cmax *= 2
    if cmax > 1:
        stat = bsum / sizes
        thresholds = np.quantile(stat, np.arange(1, cmax) / cmax)
        cls = np.searchsorted(thresholds, stat, side="right").astype(np.uint8)
    else:
        cls = np.zeros(nblocks, np.uint8)
    lut = np.zeros(1 << lay.head, dtype=np.int64)
    lut[alphabet] = np.arange(len(alphabet))
    A = len(alphabet)
    fine = np.zeros((cmax, A), dtype=np.int64)
    for a in range(0, n, chunk):
        cpu_backend.class_hist(reader(a, min(chunk, n - a)), lay, L, cls[a // L:], lut, fine)
    best = None
    c = cmax
    while c >= 1:
        shift = int(math.log2(cmax // c))
        counts = fine.reshape(c, cmax // c, A).sum(axis=1)
        tables = np.stack([entropy.quantize_counts(h if h.sum() else np.ones(A, np.int64)) for h in counts])
        bits = sum(entropy.bits_with_table(h, t) for h, t in zip(counts, tables))
        bits += 8 * len(zstd(tables.astype("<u2").tobytes(), 19)) + nblocks * math.log2(c)
        if best is None or bits < best[0]:
            best = (bits, tables.astype(np.uint32), (cls >> shift).astype(np.uint8))
        c //= 2
    plan.tables, plan.cls = best[1], best[2]
    plan.estimate += best[0]
    return plan


# -- reading a record ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Params(StreamParams):
    layout: Optional[Layout] = None
    block: int = 0
    contexts: int = 0
    alphabet: int = 0
    lane: int = 0


def check_params(dtype: str, numel: int, params: dict, where: str) -> Params:
    """Validate a stream's parameters against its tensor's dtype and size (types, ranges, consistency)."""
    dt = DTYPES.get(dtype)
    if dt is None:
        raise FormatError(f"{where}: unknown dtype {dtype!r}")
    chunk = chunk_size(params, where)
    keys = ("layout", "block", "contexts", "alphabet")
    lane = params.get("lane", 0)
    if set(params) - {"lane"} != {"codec", "chunk", *keys} or not isinstance(params["layout"], list) or not all(
        type(x) is int for x in [*params["layout"], *(params[k] for k in keys[1:]), lane]
    ) or len(params["layout"]) != 4:
        raise FormatError(f"{where}: malformed stream parameters")
    if "lane" in params and not (entropy.MIN_LANE <= lane <= entropy.MAX_LANE and lane & (lane - 1) == 0):
        raise FormatError(f"{where}: lane size out of range")
    lay = Layout.from_json(params["layout"])
    block, C, A = (params[k] for k in keys[1:])
    if not lay.valid() or lay.bits != dt.bits:
        raise FormatError(f"{where}: field layout does not fit dtype {dtype}")
    if not (1 <= block <= chunk and chunk % block == 0 and 1 <= A <= min(1 << lay.head, entropy.MAX_ALPHABET)
            and 0 <= C <= 8 and (C == 0) == (A == 1) and numel >= 1):
        raise FormatError(f"{where}: stream parameters out of range")
    return Params(NAME, chunk, lay, block, C, A, lane)


def plan_from_record(dtype: str, numel: int, params: dict, side: bytes, where: str) -> Plan:
    """Rebuild a Plan from a container record, validating everything before allocating."""
    p = check_params(dtype, numel, params, where)
    lay, block, C, A, chunk = p.layout, p.block, p.contexts, p.alphabet, p.chunk
    nblocks = math.ceil(numel / block)
    bitmap = max(1, (1 << lay.head) // 8)
    expected = bitmap + 2 * C * A + 2 * nblocks
    raw = unzstd(side, expected, where + " side information")
    alphabet = np.flatnonzero(np.unpackbits(np.frombuffer(raw, np.uint8, bitmap), bitorder="little")[: 1 << lay.head])
    off = bitmap
    tables = np.frombuffer(raw, "<u2", C * A, off).reshape(C, A).astype(np.uint32); off += 2 * C * A
    cls = np.frombuffer(raw, np.uint8, nblocks, off); off += nblocks
    tz = np.frombuffer(raw, np.uint8, nblocks, off)
    if len(alphabet) != A:
        raise FormatError(f"{where}: malformed alphabet")
    for t in tables:
        entropy.check_table(t, where)
    if nblocks and (int(cls.max()) >= max(C, 1) or int(tz.max()) > lay.tail):
        raise FormatError(f"{where}: malformed block side information")
    return Plan(dtype, numel, chunk, layout=lay, block=block, alphabet=alphabet, tables=tables,
                cls=cls, tz=tz, lane=p.lane)
