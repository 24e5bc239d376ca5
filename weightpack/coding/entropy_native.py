"""The compiled ANS lanes (weightpack/_native.c through ctypes), shared by the codecs: the lanes of
entropy.lanes_encode encoded with constriction's arithmetic, and decoded by a bucketed slot lookup (any
runs of contexts: trellis levels) or a direct one (runs of contexts in order: fields heads). The same bytes
and symbols as entropy.py's constriction coder (tests/test_coding_native.py). entropy.Tables builds and keeps the
table forms these read (slot_tables, fast_slots, enc_tables)."""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..errors import FormatError
from . import native
from .lanes import lane_count, lane_words, lanes_runs

SLOT_BITS = 15  # entropy.TABLE_BITS: a symbol is found by bits 9..23 of the state
BUCKETS = 1 << 12  # slots are looked up 8 at a time, then the symbol is found by its cumulative frequency


def slot_tables(tables) -> tuple[np.ndarray, np.ndarray]:
    """For stored 15-bit tables (one per context, any alphabets up to 2**12, each summing to 2**15): per
    context the symbol of every 8th slot (uint16, 4096 buckets) and the cumulative frequencies (uint32,
    A + 1 per context, padded with 2**15), as the kernels' ans_step reads them."""
    C = max(len(tables), 1)
    A = max((len(f) for f in tables), default=1)
    bucket = np.zeros((C, BUCKETS), dtype=np.uint16)
    cdf = np.full((C, A + 1), 1 << SLOT_BITS, dtype=np.uint32)
    cdf[:, 0] = 0
    for c, f in enumerate(tables):
        f = np.asarray(f, dtype=np.int64)
        cdf[c, 1:len(f) + 1] = np.cumsum(f)
        bucket[c] = np.repeat(np.arange(len(f), dtype=np.uint16), f)[::(1 << SLOT_BITS) // BUCKETS]
    return bucket, cdf


def fast_slots(tables) -> tuple[np.ndarray, np.ndarray]:
    """For stored 15-bit tables (one per context, all of alphabet A): the symbol of every slot (uint16, 2**15
    per context) and each symbol's frequency | cumulative frequency << 16 (uint32), as wp_lanes_fast reads
    them."""
    f = np.asarray(np.stack(tables), dtype=np.int64)
    C, A = f.shape
    dslot = np.empty((C, 1 << SLOT_BITS), np.uint16)
    for c in range(C):
        dslot[c] = np.repeat(np.arange(A, dtype=np.uint16), f[c])
    fc = (f | ((np.cumsum(f, axis=1) - f) << 16)).astype(np.uint32)
    return dslot, fc


def lanes_fast(words: np.ndarray, wcount: np.ndarray, ccount: np.ndarray, lane: int, fast: tuple,
               where: str, scratch: bool = False) -> np.ndarray:
    """The symbols (uint16, coding order) of a lanes payload whose sequence runs through the contexts in
    order, ccount[c] symbols of context c (entropy.lanes_encode's layout), with the direct slot tables of
    fast_slots. With `scratch`, in the thread's work array (valid until its next such call)."""
    dslot, fc = fast
    ccount = np.ascontiguousarray(ccount, dtype=np.int64)
    n = int(ccount.sum())
    nl = -(-n // lane)
    if len(wcount) != nl or int(wcount.sum()) != len(words) or len(ccount) != dslot.shape[0] \
            or int(ccount.min(initial=0)) < 0:
        raise FormatError(f"{where}: malformed lanes part")
    words = np.ascontiguousarray(words, dtype=np.uint32)
    out = native.scratch("lanes_syms", n, np.uint16)[:n] if scratch else np.empty(n, dtype=np.uint16)
    if dslot.shape[1] != 1 << SLOT_BITS or not dslot.flags.c_contiguous or fc.shape[0] != dslot.shape[0]:
        raise ValueError("slot tables do not fit")
    bad = native.lib().wp_lanes_fast(words.ctypes.data, len(words), np.ascontiguousarray(wcount, dtype=np.int64), nl,
                             ccount, len(ccount), dslot, fc, fc.shape[1], n, out)
    if bad >= 0:
        raise FormatError(f"{where}: entropy-coded data is corrupt (stream not used up)")
    return out


def lanes(words: np.ndarray, wcount: np.ndarray, per: np.ndarray, slots: tuple, where: str) -> np.ndarray:
    """Decode lanes: lane j (of nl) holds per[j, c] symbols of context c, contexts in order, and they go to
    positions t * nl + j of the output (int32, coding order)."""
    bucket, cdf = slots
    nl, C = per.shape
    n = int(per.sum())
    if len(wcount) != nl or int(wcount.sum()) != len(words) or C > bucket.shape[0] or int(per.min(initial=0)) < 0 \
            or not np.array_equal(per.sum(axis=1), -(-(n - np.arange(nl)) // max(nl, 1))):  # lane j: t * nl + j < n
        raise FormatError(f"{where}: malformed lanes part")
    out = np.empty(n, dtype=np.int32)
    bad = native.lib().wp_lanes(np.ascontiguousarray(words, dtype=np.uint32), len(words),
                        np.ascontiguousarray(wcount, dtype=np.int64), nl, np.ascontiguousarray(per, dtype=np.int64),
                        C, bucket, cdf, cdf.shape[1], out)
    if bad >= 0:
        raise FormatError(f"{where}: entropy-coded data is corrupt (stream not used up)")
    return out


_magic: Optional[tuple] = None


def _division_table() -> tuple:
    """For every 15-bit frequency f (index f): magic, pre and post of its division (enc_tables)."""
    global _magic
    if _magic is None:
        f = np.arange(1 << SLOT_BITS, dtype=np.int64)
        f[0] = 1
        S = [55 + (int(d) - 1).bit_length() for d in f]
        magic = np.array([-(-(1 << s) // int(d)) for s, d in zip(S, f)], dtype=np.uint64)
        S = np.array(S, dtype=np.int64)
        _magic = (magic, np.maximum(0, 64 - S).astype(np.uint32), np.maximum(0, S - 64).astype(np.uint32))
    return _magic


def enc_tables(tables) -> np.ndarray:
    """Stored 15-bit tables (C rows of one alphabet) as the encoder reads them: per symbol its frequency f,
    cumulative frequency, and the division by f as a multiply (Granlund & Montgomery): for y < 2**55,
    y // f == (y * magic) >> S with S = 55 + l, 2**l >= f, magic = ceil(2**S / f) < 2**57, computed as
    mulhi(y << pre, magic) >> post (pre = 64 - S or 0, post = S - 64 or 0)."""
    f = np.asarray(tables, dtype=np.int64)
    if f.size and not (1 <= int(f.min()) and int(f.max()) < 1 << SLOT_BITS):
        raise ValueError("frequencies out of range")
    magic, pre, post = _division_table()
    tab = np.zeros(f.shape, native.ENC_SYM)
    tab["f"] = f
    tab["c"] = np.cumsum(f, axis=1) - f
    tab["magic"], tab["pre"], tab["post"] = magic[f], pre[f], post[f]
    return tab


def enc_scratch(lane: int) -> int:
    """Words of work space wp_lanes_encode needs: each lane's words for the portable loop's four, or a step's
    pushed words and push mask for the vector kernel's 32."""
    return max(4 * (lane + 2), 33 * lane + 16)


def lanes_encode(sym: np.ndarray, ctx: np.ndarray, lane: int, tab: np.ndarray) -> bytes:
    """entropy.lanes_encode of symbols whose runs of contexts are given element by element (ctx); tab from
    enc_tables. The payload is a per-thread work array, valid until the next call."""
    n = len(sym)
    if len(ctx) != n:
        raise ValueError("symbols and contexts disagree")
    nl = -(-n // lane)
    out = native.scratch("lanes_out", 4 * nl + 4 * (n + 2 * nl) + 8, np.uint8)
    work = native.scratch("lanes", enc_scratch(lane), np.uint32)
    size = native.lib().wp_lanes_encode(np.ascontiguousarray(sym, np.uint16), np.ascontiguousarray(ctx, np.uint8), n,
                                        lane, tab, tab.shape[0], tab.shape[1], work, out, len(out))
    if size < 0:
        raise ValueError("symbols outside their tables")
    return out[:size]


def lanes_decode(payload, counts: list[int], slots: tuple, lane: int, where: str) -> np.ndarray:
    """entropy.lanes_decode with the bucketed compiled decoder (`slots`: slot_tables of the runs' tables)."""
    n = int(sum(counts))
    words, wc = lane_words(payload, n, lane, where)
    return lanes(words, wc, lanes_runs(counts, lane_count(n, lane)), slots, where)
