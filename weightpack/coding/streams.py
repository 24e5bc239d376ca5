"""A stream: one flat array of elements (a tensor's raw bytes), coded in independent chunks.

Two codecs, chosen per tensor and then per chunk by measured size:

* ``fields``: each element is split into head / tail (see fields.py). Heads are entropy-coded with
  constriction under a context model: each block (a row of a matrix) belongs to one of C classes,
  ranked by the block's mean head value (its scale), and each class has its own frequency table.
  C = 1 is plain order-0 coding; C is chosen per tensor by the measured cost including tables and
  side information. Tails are bit-packed with the trailing zeros common to the block dropped, then
  stored raw or with zstd, whichever is smaller.
* ``bytes``: the chunk's bytes grouped into byte planes, stored raw or with zstd. Used for dtypes
  without a field layout (wide integers, sub-byte floats) and for any chunk where it is smaller.

Per tensor, the side information (alphabet, tables, block classes, block trailing zeros) is one
zstd-compressed blob. Per chunk, the parts are concatenated and described in the index.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import numpy as np
import zstandard

from ..dtypes import DTYPES
from ..errors import FormatError
from . import entropy, native, trellis
from .binding import chunk_seed
from .fields import (UINT, Layout, join, layout_for, pack_bits, packed_size, split, tail_values, trailing_zeros,
                     unpack_bits, work_dtype)

CHUNK_TARGET = 1 << 19  # elements per chunk (rounded to whole blocks)
BYTES_CHUNK = 1 << 20  # bytes per chunk for the bytes codec
MAX_BLOCK = 1 << 16
MAX_CHUNK = 1 << 22  # a reader refuses larger chunks: what one chunk may make it allocate is bounded
DEFAULT_BLOCK = 4096

# Per level: mantissa bits in the head (at most), the largest head alphabet for 16-bit floats (decode
# speed falls as the alphabet grows: fewer mantissa bits are taken above it), most contexts, zstd level,
# whether bytes coding is tried per chunk.
LEVELS = {
    1: dict(k=0, alphabet16=4096, contexts=1, zstd=3, try_bytes=False),
    2: dict(k=2, alphabet16=64, contexts=4, zstd=3, try_bytes=True),
    3: dict(k=3, alphabet16=4096, contexts=8, zstd=19, try_bytes=True),
}
DEFAULT_LEVEL = 2

Reader = Callable[[int, int], np.ndarray]  # (first element, count) -> uint array of raw elements


@dataclass
class Plan:
    """Everything needed to code (and decode) the chunks of one stream."""

    codec: str  # "fields" or "bytes"
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
    _tables: Optional[entropy.Tables] = None
    _lut: Optional[np.ndarray] = None

    @property
    def itemsize_bits(self) -> int:
        return DTYPES[self.dtype].bits

    @property
    def nchunks(self) -> int:
        return math.ceil(self.n / self.chunk)

    def chunk_range(self, i: int) -> tuple[int, int]:
        a = i * self.chunk
        return a, min(self.n, a + self.chunk)

    # -- side information ------------------------------------------------------------------------
    def params(self) -> dict:
        p = {"codec": self.codec, "chunk": self.chunk}
        if self.codec == "fields":
            p.update(layout=self.layout.to_json(), block=self.block, contexts=int(self.tables.shape[0]),
                     alphabet=int(len(self.alphabet)))
            if self.lane:
                p["lane"] = self.lane
        return p

    def side(self) -> bytes:
        if self.codec != "fields":
            return b""
        present = np.zeros(1 << self.layout.head, dtype=np.uint8)
        present[self.alphabet] = 1
        raw = b"".join([
            np.packbits(present, bitorder="little").tobytes(),
            self.tables.astype("<u2").tobytes(),
            self.cls.astype(np.uint8).tobytes(),
            self.tz.astype(np.uint8).tobytes(),
        ])
        return _zstd(raw, 19)

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
        if self.codec != "fields":
            return self
        bpc = self.chunk // self.block
        lo, hi = first * bpc - self.block_base, last * bpc - self.block_base
        return replace(self, cls=self.cls[lo:hi], tz=self.tz[lo:hi], block_base=first * bpc,
                       _tables=None, _lut=None)


_compressors = threading.local()


def _zstd(data: bytes, level: int) -> bytes:
    """zstd at `level`, with a compressor kept per thread and level (making one costs more than a chunk)."""
    by_level = getattr(_compressors, "by_level", None)
    if by_level is None:
        by_level = _compressors.by_level = {}
    c = by_level.get(level)
    if c is None:
        c = by_level[level] = zstandard.ZstdCompressor(level=level)
    return c.compress(data)


def unzstd(data, expected: int, where: str) -> bytes:
    """Decompress a zstd frame that must hold exactly `expected` bytes (checked before allocating)."""
    try:
        size = zstandard.frame_content_size(data)
    except zstandard.ZstdError:
        raise FormatError(f"{where}: damaged zstd data") from None
    if size != expected:
        raise FormatError(f"{where}: zstd data declares {size} bytes, expected {expected}")
    try:
        out = zstandard.ZstdDecompressor().decompress(data, max_output_size=expected)
    except zstandard.ZstdError:
        raise FormatError(f"{where}: damaged zstd data") from None
    if len(out) != expected:
        raise FormatError(f"{where}: zstd data decodes to {len(out)} bytes, expected {expected}")
    return out


# A trial compression costs as much as the rest of a chunk's coding and rarely wins on weights (the byte
# planes of a chunk; its packed tails), so long data is first measured on a sample of PROBE_PIECES pieces
# spread over it: the order-0 entropy of each byte plane (what zstd's entropy stage can reach, a little
# optimistic) and zstd -1 of the sample (which sees repeats, where LZ matching wins). The trial is made
# where either says it can win; a level above FAST_ZSTD only where FAST_ZSTD comes close.
PROBE_PIECES, PROBE_PIECE = 8, 4096
PROBE_MIN = 4 * PROBE_PIECES * PROBE_PIECE
ENTROPY_SLACK = 1.0  # order-0 estimate against what must be beaten (zstd stays above its order-0 entropy)
REPEATS = 0.9  # zstd -1 of the sample below this share of its order-0 entropy: repeats, try LZ
BYTES_SLACK = 0.02  # a slow level is tried when zstd -3 of the whole comes within this of what it must beat
SKEWED = 0.998  # tails whose order-0 entropy is below this share of their size are compressed at the level's own
FAST_ZSTD = 3
BYTES_SLOW_ZSTD = 12  # the slow level of a trial against a known size (zstd -19 costs 5x more for ~0.3%)


def _sample(data, pieces: int = PROBE_PIECES, piece: int = PROBE_PIECE) -> bytes:
    step = len(data) // pieces
    return b"".join(bytes(data[k * step:k * step + piece]) for k in range(pieces))


def _order0_bytes(planes: np.ndarray) -> float:
    """Order-0 entropy, in bytes, of each row of a (planes, n) uint8 array, summed."""
    P, n = planes.shape
    c = np.bincount((planes + np.arange(0, 256 * P, 256, dtype=np.int64)[:, None]).ravel(), minlength=256 * P)
    c = c[c > 0].astype(np.float64)
    return float(-(c * np.log2(c / n)).sum()) / 8


def _estimates(data, planes: int) -> tuple[float, Callable[[], float]]:
    """Estimates of zstd's size for long data, from a sample: its order-0 entropy per plane (bytes), and a
    function giving zstd -1 of the sample, scaled (it sees repeats)."""
    piece = PROBE_PIECE - PROBE_PIECE % planes
    sample = np.frombuffer(_sample(data, PROBE_PIECES, piece), np.uint8).reshape(-1, planes).T
    scale = len(data) / sample.size
    return _order0_bytes(sample) * scale, lambda: len(_zstd(np.ascontiguousarray(sample).tobytes(), 1)) * scale


def may_win(data, planes: int, beat: float) -> bool:
    """Whether zstd may code `data` (`planes` interleaved byte planes, grouped into planes before coding when
    planes > 1) in fewer than `beat` bytes: always for short data, else by a sample's estimates."""
    if len(data) < PROBE_MIN:
        return True
    entropy, lz = _estimates(data, planes)
    if entropy < beat * ENTROPY_SLACK:
        return True
    lz = lz()
    return lz < entropy * REPEATS and lz < beat * ENTROPY_SLACK / REPEATS


def compress_best(data: bytes, level: int, beat: Optional[int] = None) -> tuple[str, bytes]:
    """('zstd', frame) when zstd makes `data` smaller, else ('raw', data). With `beat`, a level above
    FAST_ZSTD is tried only where FAST_ZSTD comes within BYTES_SLACK of `beat` bytes."""
    z = _zstd(data, min(level, FAST_ZSTD) if beat is not None else level)
    if beat is not None and level > FAST_ZSTD and len(z) < beat * (1 + BYTES_SLACK):
        slow = _zstd(data, min(level, BYTES_SLOW_ZSTD))
        z = slow if len(slow) < len(z) else z
    return ("zstd", z) if len(z) < len(data) else ("raw", data)


def compress_tail(data: bytes, level: int) -> tuple[str, bytes]:
    """compress_best of a chunk's packed tails where a sample says zstd may make them smaller; a level above
    FAST_ZSTD only where the tails are not near-uniform (their order-0 entropy below SKEWED of their size)
    or FAST_ZSTD saves anything."""
    if len(data) < PROBE_MIN:
        return compress_best(data, level)
    entropy, lz = _estimates(data, 1)
    if entropy < len(data) * SKEWED:
        return compress_best(data, level)
    if entropy < len(data) or lz() < entropy * REPEATS:
        return compress_best(data, level, len(data) / (1 + BYTES_SLACK))
    return "raw", data


def unstore(codec: str, data, expected: int, where: str) -> bytes:
    if codec == "raw":
        if len(data) != expected:
            raise FormatError(f"{where}: raw part holds {len(data)} bytes, expected {expected}")
        return data
    if codec == "zstd":
        return unzstd(data, expected, where)
    raise FormatError(f"{where}: unknown part codec {codec!r}")


# -- bytes codec ---------------------------------------------------------------------------------

def _planes(nbits: int) -> int:
    return nbits // 8 if nbits >= 8 else 1


def bytes_encode(raw: bytes, planes: int, level: int, beat: Optional[int] = None) -> list:
    a = np.frombuffer(raw, dtype=np.uint8)
    if planes > 1:
        a = np.ascontiguousarray(a.reshape(-1, planes).T)
    codec, data = compress_best(a.tobytes(), level, beat)
    return [("data", codec, data)]


def bytes_decode(parts, payload, nbytes: int, planes: int, where: str) -> bytes:
    if len(parts) != 1 or parts[0][0] != "data":
        raise FormatError(f"{where}: malformed parts for the bytes codec")
    raw = unstore(parts[0][1], payload, nbytes, where)
    if planes > 1:
        a = np.frombuffer(raw, dtype=np.uint8).reshape(planes, -1)
        return np.ascontiguousarray(a.T).tobytes()
    return bytes(raw)


# -- planning ------------------------------------------------------------------------------------

def _block_length(n: int, shape: list[int]) -> int:
    if len(shape) >= 2 and shape[0] > 0 and n // shape[0] > 0:
        row = n // shape[0]
        if row > MAX_BLOCK:
            return DEFAULT_BLOCK
        return row * math.ceil(64 / row) if row < 64 else row
    return max(1, min(n, DEFAULT_BLOCK))


def _bytes_plan(dtype: str, n: int, cfg: dict) -> Plan:
    dt = DTYPES[dtype]
    planes = _planes(dt.bits)
    return Plan("bytes", dtype, dt.nbytes(n), max(planes, (BYTES_CHUNK // planes) * planes), cfg["zstd"])


def make_plan(dtype: str, shape: list[int], reader: Reader, level: int = DEFAULT_LEVEL) -> Plan:
    """Measure a tensor (two passes through `reader`) and choose its codec, contexts and tables. At level 3
    the level-2 layout is measured too (with level 3's trials) and the smaller estimate is taken, so that a
    tensor whose extra head bit or contexts do not pay for their tables is coded as at level 2."""
    plan = _make_plan(dtype, shape, reader, LEVELS[level])
    if level == 3 and plan.codec == "fields":
        alt = _make_plan(dtype, shape, reader, dict(LEVELS[2], zstd=LEVELS[3]["zstd"], try_bytes=LEVELS[3]["try_bytes"]))
        if alt.estimate < plan.estimate:
            return alt
    return plan


def _make_plan(dtype: str, shape: list[int], reader: Reader, cfg: dict) -> Plan:
    dt = DTYPES[dtype]
    n = math.prod(shape)
    lay = layout_for(dt, cfg["k"])
    if lay is None or n == 0:
        return _bytes_plan(dtype, n, cfg)
    L = _block_length(n, shape)
    chunk = max(1, CHUNK_TARGET // L) * L
    nblocks = math.ceil(n / L)
    hist = np.zeros(1 << lay.head, dtype=np.int64)
    bsum = np.zeros(nblocks, dtype=np.float64)
    tz = np.zeros(nblocks, dtype=np.uint8)
    fast = native.available()
    if fast:
        bsum_i = np.zeros(nblocks, dtype=np.int64)
        blow = np.zeros(nblocks, dtype=np.uint64)
    for a in range(0, n, chunk):
        u = reader(a, min(chunk, n - a))
        b0 = a // L
        if fast:
            native.plan_scan(u, lay.bits, lay.head, lay.tail, L, hist, bsum_i[b0:], blow[b0:])
            continue
        head, v = split(u, lay)
        hist += np.bincount(head, minlength=1 << lay.head)
        starts = np.arange(0, len(u), L)
        bsum[b0:b0 + len(starts)] = np.add.reduceat(head.astype(np.float64), starts)
        if lay.tail:
            low = np.bitwise_or.reduceat(v & np.uint64((1 << lay.tail) - 1), starts)
            tz[b0:b0 + len(starts)] = trailing_zeros(low, lay.tail)
    if fast:
        bsum = bsum_i.astype(np.float64)  # sums of integers below 2**53: the same values
        if lay.tail:
            tz = trailing_zeros(blow, lay.tail).astype(np.uint8)
    floor = layout_for(dt, 0).head
    while lay.bits == 16 and lay.head > floor and np.count_nonzero(hist) > cfg["alphabet16"]:
        hist = hist.reshape(-1, 2).sum(axis=1)  # one mantissa bit less in the head, one more in the tail
        lay = Layout(lay.bits, lay.sign, lay.head - 1, lay.tail + 1)
    alphabet = np.flatnonzero(hist).astype(np.int64)
    if len(alphabet) > entropy.MAX_ALPHABET:  # too many distinct whole values (16-bit integers)
        return _bytes_plan(dtype, n, cfg)
    plan = Plan("fields", dtype, n, chunk, cfg["zstd"], cfg["try_bytes"], lay, L, alphabet,
                np.zeros((0, len(alphabet)), np.uint32), np.zeros(nblocks, np.uint8), tz, lane=entropy.LANE)
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
    fine = np.zeros(cmax * A, dtype=np.int64)
    for a in range(0, n, chunk):
        u = reader(a, min(chunk, n - a))
        if fast:
            native.class_hist(u, lay.bits, lay.head, lay.tail, L, cls[a // L:], lut, fine.reshape(cmax, A))
            continue
        head, _ = split(u, lay)
        ecls = np.repeat(cls[a // L: a // L + math.ceil(len(u) / L)].astype(np.int64), L)[: len(u)]
        fine += np.bincount(ecls * A + lut[head], minlength=cmax * A)
    fine = fine.reshape(cmax, A)
    best = None
    c = cmax
    while c >= 1:
        shift = int(math.log2(cmax // c))
        counts = fine.reshape(c, cmax // c, A).sum(axis=1)
        tables = np.stack([entropy.quantize_counts(h if h.sum() else np.ones(A, np.int64)) for h in counts])
        bits = sum(entropy.bits_with_table(h, t) for h, t in zip(counts, tables))
        bits += 8 * len(_zstd(tables.astype("<u2").tobytes(), 19)) + nblocks * math.log2(c)
        if best is None or bits < best[0]:
            best = (bits, tables.astype(np.uint32), (cls >> shift).astype(np.uint8))
        c //= 2
    plan.tables, plan.cls = best[1], best[2]
    plan.estimate += best[0]
    return plan


@dataclass(frozen=True)
class Params:
    codec: str
    chunk: int
    layout: Optional[Layout] = None
    block: int = 0
    contexts: int = 0
    alphabet: int = 0
    lane: int = 0


def check_params(dtype: str, numel: int, params, where: str) -> Params:
    """Validate a stream's parameters against its tensor's dtype and size (types, ranges, consistency)."""
    if not isinstance(params, dict) or params.get("codec") not in ("fields", "bytes", "trellis"):
        raise FormatError(f"{where}: unknown stream codec")
    if params["codec"] == "trellis":
        if dtype != "I16":
            raise FormatError(f"{where}: trellis-coded levels must be I16")
        p = trellis.check_params(numel, params, where)
        return Params("trellis", p["chunk"])
    dt = DTYPES.get(dtype)
    if dt is None:
        raise FormatError(f"{where}: unknown dtype {dtype!r}")
    chunk = params.get("chunk")
    if type(chunk) is not int or not 1 <= chunk <= MAX_CHUNK:
        raise FormatError(f"{where}: chunk size out of range")
    if params["codec"] == "bytes":
        if set(params) != {"codec", "chunk"}:
            raise FormatError(f"{where}: malformed stream parameters")
        return Params("bytes", chunk)
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
    return Params("fields", chunk, lay, block, C, A, lane)


def plan_from_record(dtype: str, numel: int, params: dict, side: bytes, where: str) -> Plan:
    """Rebuild a Plan from a container record, validating everything before allocating."""
    p = check_params(dtype, numel, params, where)
    if p.codec == "trellis":
        return trellis.plan_from_record(numel, params, side, where)
    if p.codec == "bytes":
        if len(side):
            raise FormatError(f"{where}: unexpected side information")
        return Plan("bytes", dtype, DTYPES[dtype].nbytes(numel), p.chunk)
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
    return Plan("fields", dtype, numel, chunk, layout=lay, block=block, alphabet=alphabet, tables=tables,
                cls=cls, tz=tz, lane=p.lane)


# -- chunks --------------------------------------------------------------------------------------

def _block_counts(bkeys: np.ndarray, nkeys: int, L: int, m: int) -> np.ndarray:
    """Elements per key of blocks of L (the last one m - (nb - 1) L long)."""
    lengths = np.full(len(bkeys), L, dtype=np.int64)
    if len(bkeys):
        lengths[-1] = m - (len(bkeys) - 1) * L
    return np.bincount(bkeys, weights=lengths, minlength=nkeys)[:nkeys].astype(np.int64)


class BlockGroups:
    """Elements of a chunk grouped by a per-block key (class or trailing zeros), in block order.

    Works on rows of the (blocks x L) view, so gathering and scattering copy whole rows.
    """

    def __init__(self, bkeys: np.ndarray, nkeys: int, L: int, m: int):
        self.L, self.m, self.nb = L, m, len(bkeys)
        self.last = m - (self.nb - 1) * L  # length of the last (maybe partial) block
        self.uniform = self.nb == 0 or int(bkeys.min()) == int(bkeys.max())
        self.rows = [np.flatnonzero(bkeys == k) for k in range(nkeys)]
        self.counts = _block_counts(bkeys, nkeys, L, m).tolist()

    def keys(self):
        return [k for k, c in enumerate(self.counts) if c]

    def _split_last(self, k):
        rows = self.rows[k]
        if len(rows) and rows[-1] == self.nb - 1 and self.last != self.L:
            return rows[:-1], True
        return rows, False

    def gather(self, x: np.ndarray, k: int) -> np.ndarray:
        if self.uniform:
            return x if self.counts[k] else x[:0]
        rows, partial = self._split_last(k)
        full = x[: (self.nb - 1) * self.L + (self.L if self.last == self.L else 0)]
        g = full.reshape(-1, self.L)[rows].reshape(-1)
        return np.concatenate([g, x[(self.nb - 1) * self.L:]]) if partial else g

    def scatter(self, out: np.ndarray, k: int, values: np.ndarray) -> None:
        if self.uniform:
            out[:] = values
            return
        rows, partial = self._split_last(k)
        nfull = len(rows) * self.L
        whole = out[: (self.nb - 1) * self.L + (self.L if self.last == self.L else 0)].reshape(-1, self.L)
        whole[rows] = values[:nfull].reshape(-1, self.L)
        if partial:
            out[(self.nb - 1) * self.L:] = values[nfull:]


def encode_chunk(plan: Plan, i: int, u: np.ndarray) -> tuple[dict, bytes]:
    """Code chunk `i` (elements as raw uint array, or bytes for the bytes codec); returns record and payload."""
    if plan.codec == "trellis":
        return trellis.encode_chunk(plan, i, u)
    raw = u.view(np.uint8)  # the chunk's bytes, not copied
    rec = {"codec": plan.codec, "raw_crc": native.crc32(raw, chunk_seed(plan.seed, i))}
    planes = _planes(plan.itemsize_bits)
    if plan.codec == "bytes":
        parts = bytes_encode(raw, planes, plan.zstd_level)
    else:
        parts = _fields_encode(plan, i, u)
        size = sum(len(p[2]) for p in parts)
        if plan.try_bytes and may_win(raw, planes, size):
            alt = bytes_encode(raw, planes, plan.zstd_level, beat=size)
            if len(alt[0][2]) < size:
                rec["codec"], parts = "bytes", alt
    rec["parts"] = [[name, codec, len(data)] for name, codec, data in parts]
    payload = b"".join(data for _, _, data in parts)
    return rec, payload


def payload_crc(payload) -> int:
    """The crc32 of a coded chunk as the container records it (computed where the chunk is coded)."""
    return native.crc32(payload)


def chunk_blocks(plan: Plan, i: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    b0 = i * plan.chunk // plan.block - plan.block_base
    nb = math.ceil(m / plan.block)
    if b0 < 0 or b0 + nb > len(plan.cls):
        raise FormatError("chunk outside the block side information")
    return plan.cls[b0:b0 + nb], plan.tz[b0:b0 + nb]


def _fields_encode_native(plan: Plan, bcls: np.ndarray, btz: np.ndarray, u: np.ndarray) -> list:
    """_fields_encode of a laned chunk with the compiled kernels (the same bytes)."""
    lay = plan.layout
    coded = len(plan.alphabet) > 1
    sym, ctx, tail = native.fields_split(u, lay.bits, lay.sign, lay.head, lay.tail, plan.block, bcls, btz,
                                         max(1, plan.tables.shape[0]), plan.lut() if coded else None)
    parts = [("head", "lanes", native.lanes_encode(sym, ctx, plan.lane, plan.coding_tables().encoder()))
             if coded else ("head", "const", b"")]
    if lay.tail + lay.sign:
        codec, data = compress_tail(tail, plan.zstd_level)
        parts.append(("tail", codec, data))
    return parts


def _fields_encode(plan: Plan, i: int, u: np.ndarray) -> list:
    lay, L = plan.layout, plan.block
    m = len(u)
    bcls, btz = chunk_blocks(plan, i, m)
    if plan.lane and native.available():
        return _fields_encode_native(plan, bcls, btz, u)
    head, v = split(u, lay)
    parts = []
    if len(plan.alphabet) > 1:
        sym = plan.lut()[head]
        C = plan.tables.shape[0]
        g = BlockGroups(bcls, C, L, m)
        groups = [(g.gather(sym, c), plan.models()[c]) for c in range(C)]
        if plan.lane:
            runs = [(len(x), model) for x, model in groups]
            parts.append(("head", "lanes", entropy.lanes_encode(np.concatenate([x for x, _ in groups]), runs,
                                                                plan.lane)))
        else:
            parts.append(("head", "ans", entropy.ans_encode(groups).astype("<u4").tobytes()))
    else:
        parts.append(("head", "const", b""))
    if lay.tail + lay.sign:
        g = BlockGroups(btz, lay.tail + 1, L, m)
        pieces = []
        for tz in g.keys():
            t, w = tail_values(g.gather(v, tz), lay, tz)
            pieces.append(pack_bits(t, w))
        codec, data = compress_tail(b"".join(pieces), plan.zstd_level)
        parts.append(("tail", codec, data))
    return parts


def decode_chunk(plan: Plan, i: int, rec: dict, payload, where: str, into: Optional[np.ndarray] = None):
    """Decode one chunk's payload back to its raw bytes (bytes-like), checking its checksum; into `into` (a
    uint8 array of the chunk's size) when given, which is then returned."""
    if plan.codec == "trellis":
        if rec.get("codec") != "trellis":
            raise FormatError(f"{where}: unknown chunk codec {rec.get('codec')!r}")
        raw = trellis.decode_chunk(plan, i, rec, payload, where)
    else:
        raw = _decode_chunk(plan, i, rec, payload, where, into)
        if native.crc32(raw, chunk_seed(plan.seed, i)) != rec.get("raw_crc"):
            raise FormatError(f"{where}: decoded data fails its checksum")
    if into is not None and raw is not into:
        if len(raw) != len(into):
            raise FormatError(f"{where}: decoded {len(raw)} bytes, expected {len(into)}")
        into[:] = np.frombuffer(raw, np.uint8)
        return into
    return raw


def _decode_chunk(plan: Plan, i: int, rec: dict, payload, where: str, into: Optional[np.ndarray]):
    a, b = plan.chunk_range(i)
    m = b - a
    parts = rec.get("parts")
    views = chunk_views(rec, payload, where)
    codec = rec.get("codec")
    if codec == "bytes":
        planes = _planes(DTYPES[plan.dtype].bits) if plan.codec == "fields" else _planes(plan.itemsize_bits)
        nbytes = m * (plan.itemsize_bits // 8) if plan.codec == "fields" else m
        return bytes_decode(parts, payload, nbytes, planes, where)
    if codec == "fields" and plan.codec == "fields":
        out = None
        if into is not None and len(into) == m * plan.itemsize_bits // 8:
            out = into.view(UINT[plan.itemsize_bits])
        return _fields_decode(plan, i, m, views, where, out).view(np.uint8)
    raise FormatError(f"{where}: unknown chunk codec {codec!r}")


def chunk_views(rec: dict, payload, where: str) -> dict:
    """The named parts of a chunk: name -> (part codec, bytes), checked against the payload's length."""
    parts = rec.get("parts")
    if not isinstance(parts, list) or not all(
        isinstance(p, list) and len(p) == 3 and isinstance(p[0], str) and isinstance(p[1], str)
        and type(p[2]) is int and p[2] >= 0 for p in parts
    ) or sum(p[2] for p in parts) != len(payload):
        raise FormatError(f"{where}: malformed chunk parts")
    views, off = {}, 0
    for name, codec, ln in parts:
        views[name] = (codec, payload[off:off + ln])
        off += ln
    return views


def fields_part_names(lay: Layout) -> set:
    return {"head", "tail"} if lay.tail + lay.sign else {"head"}


def _tail_widths(lay: Layout, tz_counts) -> dict:
    """The packed width of the tails of each trailing-zero count present in a chunk."""
    return {tz: lay.tail - tz + lay.sign for tz, c in enumerate(tz_counts) if c}


def _tail_size(lay: Layout, tz_counts) -> int:
    """Bytes of a chunk's tail part: every trailing-zero group's tails packed at its width."""
    return sum(packed_size(int(tz_counts[tz]), w) for tz, w in _tail_widths(lay, tz_counts).items())


def _fields_decode_native(plan: Plan, m: int, bcls: np.ndarray, btz: np.ndarray, hdata, views: dict,
                          where: str, out: Optional[np.ndarray] = None) -> np.ndarray:
    """_fields_decode of a laned chunk with the compiled kernels: heads decoded (direct slot tables), then
    put in place and joined with their tails in one pass."""
    lay, L = plan.layout, plan.block
    ccount = _block_counts(bcls, plan.tables.shape[0], L, m)
    words, wc = entropy.lane_words(hdata, m, plan.lane, where)
    syms = native.lanes_fast(words, wc, ccount, plan.lane, plan.coding_tables().fast(), where)
    tail = b""
    if lay.tail + lay.sign:
        if int(btz.max(initial=0)) > lay.tail:
            raise FormatError(f"{where}: malformed trailing zeros")
        tcodec, tdata = views["tail"]
        tail = unstore(tcodec, tdata, _tail_size(lay, _block_counts(btz, lay.tail + 1, L, m)), where + " tail")
    return native.fields_join(syms, plan.alphabet, bcls, btz, L, m, ccount, tail, lay.bits, lay.sign, lay.tail,
                              where, out)


def _fields_decode(plan: Plan, i: int, m: int, views: dict, where: str,
                   out: Optional[np.ndarray] = None) -> np.ndarray:
    """A fields chunk's m elements (uint of the dtype's width); written into `out` where the compiled kernels
    decode it."""
    lay, L = plan.layout, plan.block
    wd = work_dtype(lay)
    bcls, btz = chunk_blocks(plan, i, m)
    if set(views) != fields_part_names(lay):
        raise FormatError(f"{where}: malformed chunk parts")
    hcodec, hdata = views["head"]
    A = len(plan.alphabet)
    alphabet = plan.alphabet.astype(wd)
    if A == 1:
        if hcodec != "const" or len(hdata):
            raise FormatError(f"{where}: malformed head part")
        head = np.full(m, alphabet[0], dtype=wd)
    else:
        # (an ANS stream may be empty: symbol 0 only, encoded from state 0)
        if hcodec != ("lanes" if plan.lane else "ans") or len(hdata) % 4:
            raise FormatError(f"{where}: malformed head part")
        C = plan.tables.shape[0]
        if plan.lane and native.available():
            return _fields_decode_native(plan, m, bcls, btz, hdata, views, where, out)
        g = BlockGroups(bcls, C, L, m)
        if plan.lane:
            syms = entropy.lanes_decode(hdata, g.counts, plan.coding_tables(), plan.lane, where)
            got = np.split(syms, np.cumsum(g.counts)[:-1])
        else:
            runs = [(g.counts[c], plan.models()[c]) for c in range(C)]
            got = entropy.ans_decode(np.frombuffer(hdata, dtype="<u4"), runs, where)
        head = np.empty(m, dtype=wd)
        for c in g.keys():
            sym = got[c]
            if sym.min() < 0 or sym.max() >= A:
                raise FormatError(f"{where}: entropy-coded data is corrupt")
            g.scatter(head, c, alphabet[sym])
    if not lay.tail + lay.sign:
        return head.astype(UINT[lay.bits])
    g = BlockGroups(btz, lay.tail + 1, L, m)
    widths = _tail_widths(lay, g.counts)
    tcodec, tdata = views["tail"]
    tail = memoryview(unstore(tcodec, tdata, _tail_size(lay, g.counts), where + " tail"))
    out = np.empty(m, dtype=wd) if not g.uniform else None
    off = 0
    for tz, w in widths.items():
        cnt = g.counts[tz]
        size = packed_size(cnt, w)
        t = unpack_bits(tail[off:off + size], cnt, w, wd)
        off += size
        if g.uniform:
            out = join(head, t, lay, tz)
        else:
            g.scatter(out, tz, join(g.gather(head, tz), t, lay, tz))
    return out.astype(UINT[lay.bits], copy=False)
