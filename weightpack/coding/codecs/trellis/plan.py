"""The plan of a `trellis` stream (the levels of a tcq tensor): the level alphabet, the contexts (the
quantizer of each element's trellis state, optionally its path's previous level, its row's class) chosen by
measured cost with their tables, in one of two layouts: step-major (formats 1.1+), or parity | rest in ANS
lanes (format 1.2+, decodable on a GPU; taken where it costs at most SPLIT_TOLERANCE more). Measured by
make_plan, written as parameters and a zstd'd side-information blob, read back by plan_from_record."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

import numpy as np
import zstandard

from ....errors import FormatError
from ....stages.tcq import BLOCK_ELEMENTS, LEVEL_MAX, PATH, QUANT, levels_of, row_classes
from ... import entropy
from ...chunks import Chunked, StreamParams
from ...storage import unzstd

NAME = "trellis"
CHUNK_TARGET = 1 << 22  # elements per chunk (a whole number of paths): big, so each step decodes many symbols
ROW_CLASSES = (1, 2, 4, 8, 16)
LANES_PER_ANS = 16  # format 1.2: an ANS lane holds 16 * entropy.LANE symbols (its ~12 bytes of overhead: < 0.001 bpw)
# The lanes layout codes parities without the quantizer as context (it is known only after the parities):
# nearly free at moderate rates (+0.02% of entropy on MiniLM at 22.8 dB), up to ~30% dearer at 2-3 levels. It is taken
# where it costs at most this much more than the step-major layout.
SPLIT_TOLERANCE = 0.001


@dataclass
class LevelPlan(Chunked):
    """Everything needed to code (and decode) the level stream of one tensor."""

    n: int
    row: int  # elements per row (row classes)
    chunk: int
    lo: int = 0  # symbol = level - lo
    alphabet: int = 1
    prev: int = 0  # 1: contexts on the previous level's sign class
    classes: int = 1  # row classes
    tables: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.uint32))
    rcls: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint8))
    # format 1.2 ("ans_lane" > 0): each level k is coded as its parity k & 1 (contexts: row class) and its
    # rest (k >> 1) - rlo (contexts: quantizer, parity, row class), each in ANS lanes of ans_lane symbols
    ans_lane: int = 0
    rlo: int = 0
    rest: int = 0  # rest alphabet
    ptables: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.uint32))
    codec: str = NAME
    itemsize_bits: int = 16
    unit: int = 2  # bytes per stream element
    dtype: str = "I16"
    seed: int = 0  # the stream's binding (format 1.3; binding.py)
    _coded: Optional[entropy.Tables] = None
    _pcoded: Optional[entropy.Tables] = None

    @property
    def contexts(self) -> int:
        """Tables of the levels (format 1.1), or of the rests (1.2)."""
        if self.ans_lane:
            return 4 * self.classes if self.alphabet > 1 and self.rest > 1 else 0
        return 2 * (3 if self.prev else 1) * self.classes if self.alphabet > 1 else 0

    @property
    def pcontexts(self) -> int:
        return self.classes if self.ans_lane and self.alphabet > 1 else 0


    def params(self) -> dict:
        # "lane": the trellis path length (the key predates the ANS lanes of format 1.2)
        p = {"codec": NAME, "chunk": self.chunk, "lane": PATH, "row": self.row, "lo": self.lo,
             "alphabet": self.alphabet, "prev": self.prev, "classes": self.classes}
        if self.ans_lane:
            p.update(ans_lane=self.ans_lane, rlo=self.rlo, rest=self.rest)
        return p

    def side(self, level: int = 19) -> bytes:
        raw = (self.ptables.astype("<u2").tobytes() + self.tables.astype("<u2").tobytes()
               + self.rcls.astype(np.uint8).tobytes())
        return zstandard.ZstdCompressor(level=level).compress(raw)

    def coding_tables(self) -> entropy.Tables:
        """The tables of the levels (step-major layout) or of the rests (lanes layout)."""
        if self._coded is None:
            self._coded = entropy.Tables(self.tables)
        return self._coded

    def parity_tables(self) -> entropy.Tables:
        if self._pcoded is None:
            self._pcoded = entropy.Tables(self.ptables)
        return self._pcoded

    def models(self):
        return self.coding_tables().models()

    def pmodels(self):
        return self.parity_tables().models()

    def for_chunks(self, first: int, last: int) -> "LevelPlan":
        return replace(self, _coded=None, _pcoded=None)

    def contexts_of(self, prevcls: np.ndarray, q: np.ndarray, rc: np.ndarray) -> np.ndarray:
        c = q * (3 if self.prev else 1) + (prevcls if self.prev else 0)
        return c * self.classes + rc


def _sign_class(levels: np.ndarray) -> np.ndarray:
    """0 negative, 1 zero, 2 positive."""
    return np.sign(levels) + 1


def element_contexts(lv: np.ndarray, first: int, row: int):
    """(previous-level class, row index) of each element of (paths, PATH) levels whose first element is
    element `first` of the tensor."""
    prev = np.ones(lv.shape, dtype=np.int64)  # a path starts as if after a zero
    prev[:, 1:] = _sign_class(lv[:, :-1])
    rows = (first + np.arange(lv.size).reshape(lv.shape)) // row
    return prev, rows


def _blocks(r: np.ndarray):
    """(first element, levels (paths, PATH), quantizers, valid mask) of flat multiples, in blocks."""
    n = len(r)
    for a in range(0, n, BLOCK_ELEMENTS):
        m = min(BLOCK_ELEMENTS, n - a)
        lv, q = levels_of(r[a:a + m])
        yield a, lv, q, (np.arange(lv.size) < m).reshape(lv.shape)


def make_plan(r: np.ndarray, shape: list[int], lane: Optional[int] = None) -> LevelPlan:
    """Measure a tensor's multiples (flat int16) and choose the contexts of its levels by total cost,
    tables and side information included. Two passes over blocks: memory is bounded by the block. `lane`:
    the ANS lane size of the lanes layout is LANES_PER_ANS times this (None: entropy.LANE, what a writer
    uses; 0: the step-major layout only, as format 1.1 wrote)."""
    lane = entropy.LANE if lane is None else lane
    n = len(r)
    row = n // shape[0] if len(shape) >= 2 and shape[0] and n else max(1, n)
    plan = LevelPlan(n=n, row=row, chunk=CHUNK_TARGET, rcls=np.zeros(-(-n // row), np.uint8))
    if n == 0:
        return plan
    nrows = len(plan.rcls)
    lo, hi = None, None
    stat = np.zeros(nrows)  # each row's sum of |level|
    for a, lv, _, valid in _blocks(r):
        k = lv[valid]
        lo = int(k.min()) if lo is None else min(lo, int(k.min()))
        hi = int(k.max()) if hi is None else max(hi, int(k.max()))
        rows = (a + np.arange(len(k))) // row
        r0 = int(rows[0])
        stat[r0:int(rows[-1]) + 1] += np.bincount(rows - r0, weights=np.abs(k).astype(np.float64))
    plan.lo, plan.alphabet = lo, hi - lo + 1
    if plan.alphabet == 1:
        return plan
    if plan.alphabet > entropy.MAX_ALPHABET or lo < -LEVEL_MAX - 1 or hi > LEVEL_MAX:
        raise ValueError(f"levels from {lo} to {hi}: too many or too large to code")
    A = plan.alphabet
    # one histogram on the finest row classes; coarser ones merge neighbours (quantile classes nest)
    Rmax = max(R for R in ROW_CLASSES if R == 1 or nrows >= 8 * R)
    fine_cls = row_classes(stat, Rmax)
    fine = np.zeros(6 * Rmax * A, dtype=np.int64)
    for a, lv, q, valid in _blocks(r):
        prev, rows = element_contexts(lv, a, row)
        rc = fine_cls[np.minimum(rows, nrows - 1)].astype(np.int64)
        fine += np.bincount((((q * 3 + prev) * Rmax + rc) * A + (lv - lo))[valid], minlength=6 * Rmax * A)
    fine = fine.reshape(2, 3, Rmax, A)
    best = None
    for R in (R for R in ROW_CLASSES if R <= Rmax):
        byR = fine.reshape(2, 3, R, Rmax // R, A).sum(axis=3)
        rcls = (fine_cls // (Rmax // R)).astype(np.uint8)
        for use_prev in (0, 1):
            tables, bits = _tables_of((byR if use_prev else byR.sum(axis=1, keepdims=True)), A)
            cand = replace(plan, prev=use_prev, classes=R, tables=tables.astype(np.uint32), rcls=rcls)
            bits += 8 * len(cand.side(level=3))  # a quick estimate of the side information's size
            if best is None or bits < best[0]:
                best = (bits, cand)
    if lane:  # the lanes layout (decodable on a GPU) unless it costs noticeably more
        bits, split = _split_plan(plan, r, fine_cls, Rmax, LANES_PER_ANS * lane)
        if bits <= best[0] * (1 + SPLIT_TOLERANCE):
            return split
    return best[1]


def _tables_of(counts: np.ndarray, A: int) -> tuple[np.ndarray, float]:
    """One stored table per histogram of A symbols (an empty one: uniform), and the bits they code it in."""
    counts = counts.reshape(-1, A)
    tables = np.stack([entropy.quantize_counts(h if h.sum() else np.ones(A, np.int64)) for h in counts])
    return tables, sum(entropy.bits_with_table(h, t) for h, t in zip(counts, tables))


def _split_plan(plan: LevelPlan, r: np.ndarray, fine_cls: np.ndarray, Rmax: int, ans_lane: int) -> LevelPlan:
    """Format 1.2: tables for parities (per row class) and rests (per quantizer, parity and row class), the
    number of row classes chosen by total cost."""
    row, nrows = plan.row, len(plan.rcls)
    rlo, rhi = plan.lo >> 1, (plan.lo + plan.alphabet - 1) >> 1
    B = rhi - rlo + 1
    par = np.zeros(Rmax * 2, dtype=np.int64)
    rest = np.zeros(4 * Rmax * B, dtype=np.int64)
    for a, lv, q, valid in _blocks(r):
        rows = (a + np.arange(lv.size).reshape(lv.shape)) // row
        rc = fine_cls[np.minimum(rows, nrows - 1)].astype(np.int64)[valid]
        k, qq = lv[valid], q[valid]
        p = k & 1
        par += np.bincount(rc * 2 + p, minlength=Rmax * 2)
        rest += np.bincount((((qq * 2 + p) * Rmax + rc) * B + (k >> 1) - rlo), minlength=4 * Rmax * B)
    par, rest = par.reshape(Rmax, 2), rest.reshape(4, Rmax, B)
    best = None
    for R in (R for R in ROW_CLASSES if R <= Rmax):
        pt, bits = _tables_of(par.reshape(R, Rmax // R, 2).sum(axis=1), 2)
        cand = replace(plan, classes=R, ans_lane=ans_lane, rlo=rlo, rest=B, ptables=pt.astype(np.uint32),
                       rcls=(fine_cls // (Rmax // R)).astype(np.uint8),
                       tables=np.zeros((0, B), np.uint32))
        if B > 1:
            rt, rbits = _tables_of(rest.reshape(4, R, Rmax // R, B).sum(axis=2), B)
            cand.tables, bits = rt.astype(np.uint32), bits + rbits
        bits += 8 * len(cand.side(level=3))
        lanes = entropy.lane_count(plan.n, cand.ans_lane) + (plan.n // plan.chunk)  # ~ per part of each chunk
        bits += 2 * 8 * 12 * lanes  # word count and the final state of each lane
        if best is None or bits < best[0]:
            best = (bits, cand)
    return best


def split_row_classes(plan: LevelPlan, a: int, m: int) -> np.ndarray:
    """The row class (uint8) of each element of a chunk starting at element a."""
    if plan.classes == 1:
        return np.zeros(m, dtype=np.uint8)
    r0, r1 = a // plan.row, (a + m - 1) // plan.row + 1
    cls = np.repeat(plan.rcls[r0:r1], plan.row)
    return cls[a - r0 * plan.row: a - r0 * plan.row + m]


def rest_contexts(plan: LevelPlan, rc: np.ndarray, p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Contexts (uint8) of the rests: quantizer, parity and row class of each element."""
    return (q * np.uint8(2) + p) * np.uint8(plan.classes) + rc


def order_by_context(ctx: np.ndarray, C: int) -> tuple[Optional[np.ndarray], np.ndarray]:
    """Positions sorted by context (stable; None when there is one context) and the count of each context."""
    ctx = ctx.astype(np.uint8, copy=False)
    counts = np.bincount(ctx, minlength=C)
    if np.count_nonzero(counts) <= 1:
        return None, counts
    return np.argsort(ctx, kind="stable"), counts


def multiple_table(plan: LevelPlan) -> np.ndarray:
    """multiple[state, symbol]: the multiple of delta that a symbol decodes to in a state."""
    k = np.arange(plan.alphabet) + plan.lo
    return (2 * k[None, :] - QUANT[:, None] * np.sign(k)[None, :]).astype("<i2")


SPLIT_KEYS = {"ans_lane", "rlo", "rest"}


def check_params(dtype: str, numel: int, params: dict, where: str) -> StreamParams:
    """Validate a stream's parameters against its tensor's dtype and size (types, ranges, consistency)."""
    if dtype != "I16":
        raise FormatError(f"{where}: trellis-coded levels must be I16")
    keys = {"codec", "chunk", "lane", "row", "lo", "alphabet", "prev", "classes"}
    if "ans_lane" in params:
        keys |= SPLIT_KEYS
    if set(params) != keys or not all(type(params[k]) is int for k in keys - {"codec"}):
        raise FormatError(f"{where}: malformed stream parameters")
    p = params
    if "ans_lane" in p:
        z, lo, A = p["ans_lane"], p["lo"], p["alphabet"]
        if not (entropy.MIN_LANE <= z <= entropy.MAX_LANE and z & (z - 1) == 0 and p["prev"] == 0
                and type(lo) is int and type(A) is int and p["rlo"] == lo >> 1
                and p["rest"] == ((lo + A - 1) >> 1) - (lo >> 1) + 1):
            raise FormatError(f"{where}: stream parameters out of range")
    if not (p["lane"] == PATH and 1 <= p["chunk"] <= 1 << 22 and p["chunk"] % PATH == 0 and 1 <= p["row"]
            and numel >= 1 and 1 <= p["alphabet"] <= entropy.MAX_ALPHABET and p["prev"] in (0, 1)
            and p["classes"] in ROW_CLASSES and -LEVEL_MAX - 1 <= p["lo"]
            and p["lo"] + p["alphabet"] - 1 <= LEVEL_MAX):
        raise FormatError(f"{where}: stream parameters out of range")
    return StreamParams(NAME, p["chunk"])


def plan_from_record(dtype: str, numel: int, params: dict, side: bytes, where: str) -> LevelPlan:
    """Rebuild a LevelPlan from a container record, validating everything before allocating."""
    check_params(dtype, numel, params, where)
    p = params
    plan = LevelPlan(n=numel, row=p["row"], chunk=p["chunk"], lo=p["lo"], alphabet=p["alphabet"], prev=p["prev"],
                     classes=p["classes"], ans_lane=p.get("ans_lane", 0), rlo=p.get("rlo", 0), rest=p.get("rest", 0))
    nrows = -(-numel // plan.row)
    C, P = plan.contexts, plan.pcontexts
    A = plan.rest if plan.ans_lane else plan.alphabet
    raw = unzstd(side, 2 * P * 2 + 2 * C * A + nrows, where + " side information")
    plan.ptables = np.frombuffer(raw, "<u2", P * 2).reshape(P, 2).astype(np.uint32)
    plan.tables = np.frombuffer(raw, "<u2", C * A, 4 * P).reshape(C, A).astype(np.uint32)
    plan.rcls = np.frombuffer(raw, np.uint8, nrows, 4 * P + 2 * C * A)
    for t in [*plan.ptables, *plan.tables]:
        entropy.check_table(t, where)
    if nrows and int(plan.rcls.max()) >= plan.classes:
        raise FormatError(f"{where}: malformed row classes")
    return plan
