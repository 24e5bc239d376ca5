"""Trellis-coded quantization: the state machine, the encoder's rate-distortion search, and the context
coder of the levels.

The machine (the decoder walks it): 8 states; states 0-3 use quantizer Q0 (even multiples of the step
delta: level k -> 2k), states 4-7 use Q1 (odd multiples and zero: k -> 2k - sign(k)); the parity of each
level picks the next state (NEXT[state, k & 1]). A tensor, flattened, is cut into lanes of LANE elements;
each lane starts in state 0. The reconstruction of level k in state s is (2k - Q(s) * sign(k)) * delta.

The encoder (`search`) chooses the levels by a Viterbi search over the lanes (all lanes advance together,
one element per step) minimizing squared error + lambda * rate, with the rate taken from tables per
quantizer and row class that a first pass estimates. Weights that are exactly zero (pruned) stay zero.

The coder (`LevelPlan`, `encode_chunk`, `decode_chunk`): the levels are entropy-coded with constriction,
each symbol under the table of its context: the quantizer of its trellis state, whether the previous level
of its lane was zero, negative or positive (optional), and the class of its row (1, 2, 4, 8 or 16 classes
ranked by the row's mean level magnitude), all chosen per tensor by measured cost. The stored elements are
the multiples of delta; the coder turns them back into levels (and the decoder into multiples again). The decoder knows every context before it decodes the symbol: within a
chunk the symbols are ordered step by step (element j of every lane, then element j + 1), and within a
step grouped by context, so each group is one constriction call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Optional

import numpy as np
import zstandard

from ..errors import FormatError
from . import entropy, native
from .binding import chunk_seed

STATES = 8
# next state = NEXT[state, parity]: a feedback shift register (state bits b2 b1 b0 -> (p ^ b2 ^ b1 ^ b0) b2 b1)
NEXT = np.array([[((p ^ (bin(s).count("1") & 1)) << 2) | (s >> 1) for p in (0, 1)] for s in range(STATES)],
                dtype=np.int64)
QUANT = np.arange(STATES, dtype=np.int64) >> 2  # quantizer of each state
LANE = 256  # elements per lane: each lane starts in state 0 (shorter lanes lose more at their starts)
CHUNK_TARGET = 1 << 22  # elements per chunk (a whole number of lanes): big, so each step decodes many symbols
ROW_CLASSES = (1, 2, 4, 8, 16)
LANES_PER_ANS = 16  # format 1.2: an ANS lane holds 16 * entropy.LANE symbols (its ~12 bytes of overhead: < 0.001 bpw)
# The lanes layout codes parities without the quantizer as context (it is known only after the parities):
# nearly free at moderate rates (+0.02% of entropy on MiniLM at 22.8 dB), up to ~30% dearer at 2-3 levels. It is taken
# where it costs at most this much more than the step-major layout.
SPLIT_TOLERANCE = 0.001
LEVEL_MAX = 16383  # |level|: the multiples 2k - sign(k) are stored as int16


def lanes(x: np.ndarray) -> np.ndarray:
    """A flat array as (lanes, LANE), the last lane padded with zeros."""
    n = len(x)
    out = np.zeros((-(-n // LANE), LANE), dtype=x.dtype)
    out.reshape(-1)[:n] = x
    return out


def _machine_tables(group: int):
    """The machine run over `group` steps at once. Each element carries a 2-bit symbol: bit q is the parity
    its level would have on quantizer q (for a level, both bits are its parity). SKIP[s, b] is the state
    after the group of symbols b (2 bits per step, first step lowest), QGROUP[s, b, i] the quantizer of step i."""
    nb = 1 << (2 * group)
    b = np.arange(nb)
    skip = np.zeros((STATES, nb), dtype=np.int8)
    qgroup = np.zeros((STATES, nb, group), dtype=np.int8)
    for s0 in range(STATES):
        s = np.full(nb, s0)
        for i in range(group):
            q = QUANT[s]
            qgroup[s0, :, i] = q
            s = NEXT[s, ((b >> (2 * i)) >> q) & 1]
        skip[s0] = s
    return skip, qgroup


GROUP = 8
SKIP, QGROUP = _machine_tables(GROUP)
# the same for levels' parities only (a level's parity is its bit on either quantizer): 8 parities = a byte
_PBYTES = np.array([sum((((b >> i) & 1) * 3) << (2 * i) for i in range(GROUP)) for b in range(256)])
PSKIP, PQGROUP = SKIP[:, _PBYTES], QGROUP[:, _PBYTES]


def walk_parities(p: np.ndarray) -> np.ndarray:
    """The quantizer (uint8) of each element of a flat array of level parities (0/1), lanes from element 0."""
    m = len(p)
    L = -(-m // LANE)
    padded = np.zeros(L * LANE, dtype=np.uint8)
    padded[:m] = p
    b = np.packbits(padded.reshape(L, LANE // GROUP, GROUP), axis=-1, bitorder="little")[..., 0]
    q = np.empty((L, LANE // GROUP, GROUP), dtype=np.uint8)
    state = np.zeros(L, dtype=np.int64)
    for i in range(LANE // GROUP):
        bi = b[:, i]
        q[:, i] = PQGROUP[state, bi]
        state = PSKIP[state, bi]
    return q.reshape(-1)[:m]


def _run(sym2: np.ndarray) -> np.ndarray:
    """The quantizer of each element of (lanes, LANE) 2-bit symbols, each lane starting in state 0."""
    L = sym2.shape[0]
    g = sym2.reshape(L, LANE // GROUP, GROUP).astype(np.int64)
    b = g[..., 0].copy()
    for i in range(1, GROUP):
        b |= g[..., i] << (2 * i)
    q = np.empty((L, LANE // GROUP, GROUP), dtype=np.int8)
    state = np.zeros(L, dtype=np.int64)
    for i in range(LANE // GROUP):
        q[:, i] = QGROUP[state, b[:, i]]
        state = SKIP[state, b[:, i]]
    return q.reshape(L, LANE).astype(np.int64)


def lanes_at(x: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Lanes `ids` of a flat array as (len(ids), LANE), past its end zero (without copying the rest)."""
    idx = ids[:, None] * LANE + np.arange(LANE)
    return np.where(idx < len(x), x[np.minimum(idx, len(x) - 1)], 0)


def walk(levels: np.ndarray) -> np.ndarray:
    """The quantizer (0 or 1) of each element of a (lanes, LANE) array of levels."""
    p = levels & 1
    return _run(p | (p << 1))


def reconstruct(levels: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Multiples of delta: 2k on Q0, 2k - sign(k) on Q1."""
    k = levels.astype(np.int64)
    return 2 * k - q * np.sign(k)


def multiples(levels: np.ndarray) -> np.ndarray:
    """The multiples of delta (int16) that flat levels reconstruct to (in blocks of lanes)."""
    n = len(levels)
    out = np.empty(n, dtype=np.int16)
    block = BLOCK_ELEMENTS
    for a in range(0, n, block):
        lv = lanes(levels[a:a + block].astype(np.int64))
        out[a:a + block] = reconstruct(lv, walk(lv)).reshape(-1)[: min(block, n - a)]
    return out


def levels_of(r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The levels (lanes, LANE) behind flat multiples, and their quantizers; ValueError when the multiples
    are not a trellis path."""
    rv = lanes(r.astype(np.int64))
    sgn = np.sign(rv)
    k0, k1 = rv >> 1, (rv + sgn) >> 1  # the level on Q0 and on Q1
    q = _run((k0 & 1) | ((k1 & 1) << 1))
    odd = (rv & 1) == 1
    if np.any((q == 0) & odd) or np.any((q == 1) & ~odd & (rv != 0)):
        raise ValueError("multiples off the trellis")
    return np.where(q == 0, k0, k1), q


# -- the encoder's search ------------------------------------------------------------------------

def _candidates(t: np.ndarray) -> list[np.ndarray]:
    """The levels around t (in units of delta) on each quantizer, one even and one odd:
    [Q0 even, Q0 odd, Q1 even, Q1 odd] (float32 arrays shaped like t)."""
    a = np.floor(t * np.float32(0.5))  # Q0: levels a, a + 1 (reconstructions 2a <= t < 2a + 2)
    e0 = np.ceil(a * np.float32(0.5)) * 2
    o0 = 2 * a + 1 - e0
    sgn = np.where(t >= 0, np.float32(1), np.float32(-1))
    m = np.floor((np.abs(t) + 1) * np.float32(0.5))  # Q1 (on |t|): levels m, m + 1
    e1 = np.ceil(m * np.float32(0.5)) * 2
    o1 = (2 * m + 1 - e1) * sgn
    e1 *= sgn
    return [e0, o0, e1, o1]


# predecessors of each state: NEXT[PRED_STATE[s, i], PRED_PARITY[s, i]] == s for i in (0, 1)
PRED_STATE = np.array([[s for s in range(STATES) for p in (0, 1) if NEXT[s, p] == s2] for s2 in range(STATES)])
PRED_PARITY = np.array([[p for s in range(STATES) for p in (0, 1) if NEXT[s, p] == s2] for s2 in range(STATES)])


BLOCK_ELEMENTS = 1 << 20  # a whole number of lanes: work arrays are this long, whatever the tensor
BLOCK_LANES = BLOCK_ELEMENTS // LANE  # lanes searched at a time (memory: ~100 bytes per element of a block)


def viterbi(x: np.ndarray, lam: float, rate: np.ndarray, lo: int, rc: Optional[np.ndarray] = None) -> np.ndarray:
    """Levels of x (lanes, LANE), in units of delta, minimizing (x - reconstruction)^2 + lam * bits.

    rate[q, r, k - lo] is the cost in bits of level k on quantizer q in row class r (rc: the class of each
    element, (lanes, LANE); None for one class); levels outside the table cost its last column.
    """
    out = np.empty(x.shape, dtype=np.int32)
    flat_rate = (lam * rate).astype(np.float32).reshape(-1)
    for a in range(0, x.shape[0], BLOCK_LANES):
        b = min(x.shape[0], a + BLOCK_LANES)
        out[a:b] = _viterbi_block(x[a:b], flat_rate, rate.shape[1], rate.shape[2], lo,
                                  rc[a:b] if rc is not None else None)
    return out


def _viterbi_block(x, flat_rate, R: int, A: int, lo: int, rc) -> np.ndarray:
    L, m = x.shape
    xt = np.ascontiguousarray(x.T, dtype=np.float32)  # (step, lane): each step's data contiguous
    cands = _candidates(xt)
    rbase = (rc.T.astype(np.int32) * A) if rc is not None else 0
    J = np.empty((m, L, 4), dtype=np.float32)  # branch costs, [.., quantizer * 2 + parity]
    for i, k in enumerate(cands):
        q = i >> 1
        d = xt - (2 * k - np.sign(k)) if q else xt - 2 * k
        idx = k.astype(np.int32)
        idx -= lo
        np.clip(idx, 0, A - 1, out=idx)
        idx += q * R * A + rbase
        J[..., i] = d * d + flat_rate[idx]
    # a weight that is exactly zero (pruned, or zero in the checkpoint) stays zero: on both quantizers the
    # even candidate of 0 is level 0, so the odd branches are closed there
    zero = xt == 0
    J[..., 1][zero] = np.inf
    J[..., 3][zero] = np.inf
    del d, idx
    sa, sb = PRED_STATE[:, 0], PRED_STATE[:, 1]
    ia = QUANT[sa] * 2 + PRED_PARITY[:, 0]  # the branch (quantizer, parity) from each predecessor
    ib = QUANT[sb] * 2 + PRED_PARITY[:, 1]
    cost = np.full((L, STATES), np.inf, dtype=np.float32)
    cost[:, 0] = 0.0
    ca, cb, ja, jb = (np.empty_like(cost) for _ in range(4))
    choice = np.empty((m, L, STATES), dtype=bool)  # whether the second predecessor won
    for j in range(m):
        np.take(cost, sa, axis=1, out=ca)
        np.take(cost, sb, axis=1, out=cb)
        np.take(J[j], ia, axis=1, out=ja)
        np.take(J[j], ib, axis=1, out=jb)
        ca += ja
        cb += jb
        np.less(cb, ca, out=choice[j])
        np.minimum(ca, cb, out=cost)
    out = np.empty((L, m), dtype=np.int64)
    state = np.argmin(cost, axis=1)
    ix = np.arange(L)
    pa, pb = PRED_PARITY[:, 0], PRED_PARITY[:, 1]
    for j in range(m - 1, -1, -1):
        won_b = choice[j, ix, state]
        prev = np.where(won_b, sb[state], sa[state])
        par = np.where(won_b, pb[state], pa[state])
        branch = QUANT[prev] * 2 + par
        out[:, j] = np.choose(branch, [c[j] for c in cands])
        state = prev
    return out


def _rate_table(levels: np.ndarray, q: np.ndarray, rc: Optional[np.ndarray], R: int, lo: int, A: int) -> np.ndarray:
    """Bits of each level per quantizer and row class, from counts (add-half smoothing)."""
    key = (q * R + (rc if rc is not None else 0)) * A + np.clip(levels - lo, 0, A - 1)
    counts = np.bincount(key.reshape(-1), minlength=2 * R * A).reshape(2, R, A) + 0.5
    return -np.log2(counts / counts.sum(axis=2, keepdims=True))


def row_classes(stat: np.ndarray, R: int) -> np.ndarray:
    """Class 0..R-1 of each row by a per-row statistic (quantiles)."""
    if R == 1 or len(stat) == 0:
        return np.zeros(len(stat), dtype=np.uint8)
    th = np.quantile(stat, np.arange(1, R) / R)
    return np.searchsorted(th, stat, side="right").astype(np.uint8)


SEARCH_CLASSES = 4
RATE_SAMPLE_LANES = (1 << 17) // LANE  # lanes the rate-measuring passes run on


def search(w: np.ndarray, cols: int, delta: float, lam: float, passes: int = 2, stride: int = 1) -> np.ndarray:
    """Levels of a flat float array for step delta: a first pass (on a sample of lanes) with the rates of
    plain rounding, then passes with the rates the previous pass measured, per quantizer and row class.
    With stride > 1, only every stride-th lane is searched and the levels come back as (lanes, LANE): a
    sample, for step searches."""
    n = len(w)
    ids = np.arange(0, -(-n // LANE), stride)
    rows = n // cols if cols else 0
    R = SEARCH_CLASSES if rows * cols == n and rows >= 4 * SEARCH_CLASSES else 1
    rcls = None
    if R > 1:
        w2 = w.reshape(rows, cols)
        step = max(1, (1 << 20) // cols)
        rmean = np.concatenate([np.abs(w2[a:a + step]).mean(axis=1) for a in range(0, rows, step)])
        rcls = row_classes(rmean, R)
    # the lanes (in units of delta, float32: the search's precision) and their row classes, in blocks
    x = np.empty((len(ids), LANE), dtype=np.float32)
    rc = np.empty((len(ids), LANE), dtype=np.uint8) if R > 1 else None
    for a in range(0, len(ids), BLOCK_LANES):
        x[a:a + BLOCK_LANES] = lanes_at(w, ids[a:a + BLOCK_LANES]) / delta
        if rc is not None:
            idx = ids[a:a + BLOCK_LANES, None] * LANE + np.arange(LANE)
            rc[a:a + BLOCK_LANES] = rcls[np.minimum(idx // cols, rows - 1)]
    levels = search_lanes(x, rc, R, lam, passes)
    return levels if stride > 1 else levels.reshape(-1)[:n]


def search_lanes(x: np.ndarray, rc: Optional[np.ndarray], R: int, lam: float, passes: int = 2,
                 rate_lanes: int = RATE_SAMPLE_LANES) -> np.ndarray:
    """Levels (lanes, LANE) of lanes in units of delta, rc the class (0..R-1) of each element (None: one
    class): the rate tables are per quantizer and class. The passes before the last only measure rates,
    on a sample of about `rate_lanes` lanes."""
    sub = max(1, len(x) // rate_lanes)
    k0 = np.round(x[::sub] * 0.5).astype(np.int64)
    lo = int(k0.min()) - 2
    A = max(int(max(float(x.max()), -float(x.min())) * 0.5) + 3 - lo, int(k0.max()) + 3 - lo)
    rate = _rate_table(k0, np.zeros_like(k0), rc[::sub] if rc is not None else None, R, lo, A)
    rate[1] = rate[0]  # the first pass prices both quantizers' levels alike (not Q1's as uniform over A)
    for p in range(passes):
        s = sub if p < passes - 1 else 1
        xs, rs = x[::s], (rc[::s] if rc is not None else None)
        levels = viterbi(xs, lam, rate, lo, rs)
        if p < passes - 1:
            rate = _rate_table(levels, walk(levels), rs, R, lo, A)
    return levels


# -- the context coder ---------------------------------------------------------------------------

@dataclass
class LevelPlan:
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
    codec: str = "trellis"
    itemsize_bits: int = 16
    dtype: str = "I16"
    seed: int = 0  # the stream's binding (format 1.3; binding.py)
    _coded: Optional[entropy.Tables] = None
    _pcoded: Optional[entropy.Tables] = None

    @property
    def nchunks(self) -> int:
        return math.ceil(self.n / self.chunk)

    @property
    def contexts(self) -> int:
        """Tables of the levels (format 1.1), or of the rests (1.2)."""
        if self.ans_lane:
            return 4 * self.classes if self.alphabet > 1 and self.rest > 1 else 0
        return 2 * (3 if self.prev else 1) * self.classes if self.alphabet > 1 else 0

    @property
    def pcontexts(self) -> int:
        return self.classes if self.ans_lane and self.alphabet > 1 else 0

    def chunk_range(self, i: int) -> tuple[int, int]:
        a = i * self.chunk
        return a, min(self.n, a + self.chunk)

    def params(self) -> dict:
        p = {"codec": "trellis", "chunk": self.chunk, "lane": LANE, "row": self.row, "lo": self.lo,
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


def _element_contexts(lv: np.ndarray, first: int, row: int):
    """(previous-level class, row index) of each element of (lanes, LANE) levels whose first element is
    element `first` of the tensor."""
    prev = np.ones(lv.shape, dtype=np.int64)  # a lane starts as if after a zero
    prev[:, 1:] = _sign_class(lv[:, :-1])
    rows = (first + np.arange(lv.size).reshape(lv.shape)) // row
    return prev, rows


def _blocks(r: np.ndarray):
    """(first element, levels (lanes, LANE), quantizers, valid mask) of flat multiples, in blocks."""
    n = len(r)
    for a in range(0, n, BLOCK_ELEMENTS):
        m = min(BLOCK_ELEMENTS, n - a)
        lv, q = levels_of(r[a:a + m])
        yield a, lv, q, (np.arange(lv.size) < m).reshape(lv.shape)


def make_plan(r: np.ndarray, shape: list[int]) -> LevelPlan:
    """Measure a tensor's multiples (flat int16) and choose the contexts of its levels by total cost,
    tables and side information included. Two passes over blocks: memory is bounded by the block."""
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
        prev, rows = _element_contexts(lv, a, row)
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
    if entropy.LANE:  # the lanes layout (decodable on a GPU) unless it costs noticeably more
        bits, split = _split_plan(plan, r, fine_cls, Rmax)
        if bits <= best[0] * (1 + SPLIT_TOLERANCE):
            return split
    return best[1]


def _tables_of(counts: np.ndarray, A: int) -> tuple[np.ndarray, float]:
    """One stored table per histogram of A symbols (an empty one: uniform), and the bits they code it in."""
    counts = counts.reshape(-1, A)
    tables = np.stack([entropy.quantize_counts(h if h.sum() else np.ones(A, np.int64)) for h in counts])
    return tables, sum(entropy.bits_with_table(h, t) for h, t in zip(counts, tables))


def _split_plan(plan: LevelPlan, r: np.ndarray, fine_cls: np.ndarray, Rmax: int) -> LevelPlan:
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
        cand = replace(plan, classes=R, ans_lane=LANES_PER_ANS * entropy.LANE, rlo=rlo, rest=B, ptables=pt.astype(np.uint32),
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


def _encode_split(plan: LevelPlan, a: int, m: int, lv: np.ndarray, q: np.ndarray) -> list:
    rc = split_row_classes(plan, a, m)
    k, qq = lv.reshape(-1)[:m], q.reshape(-1)[:m].astype(np.uint8)
    p = (k & 1).astype(np.uint8)
    R = plan.classes
    order, counts = _order(rc, R)
    parts = [("parity", "lanes", entropy.lanes_encode(_gather(p, order), list(zip(counts.tolist(), plan.pmodels())),
                                                      plan.ans_lane))]
    if plan.rest > 1:
        order, counts = _order(rest_contexts(plan, rc, p, qq), 4 * R)
        rs = ((k >> 1) - plan.rlo).astype(np.int32)
        parts.append(("rest", "lanes", entropy.lanes_encode(_gather(rs, order), list(zip(counts.tolist(), plan.models())),
                                                            plan.ans_lane)))
    else:
        parts.append(("rest", "const", b""))
    return parts


def _gather(x: np.ndarray, order: Optional[np.ndarray]) -> np.ndarray:
    return (x if order is None else x[order]).astype(np.int32)


def split_parts(plan: LevelPlan, views: dict, where: str):
    """The parity and rest parts of a 1.2 chunk, checked: (parity bytes, rest codec, rest bytes)."""
    if set(views) != {"parity", "rest"}:
        raise FormatError(f"{where}: malformed chunk parts")
    pcodec, pdata = views["parity"]
    rcodec, rdata = views["rest"]
    if pcodec != "lanes" or len(pdata) % 4 or rcodec != ("lanes" if plan.rest > 1 else "const") \
            or len(rdata) % 4 or (rcodec == "const" and len(rdata)):
        raise FormatError(f"{where}: malformed level parts")
    return pdata, rdata


def rest_contexts(plan: LevelPlan, rc: np.ndarray, p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Contexts (uint8) of the rests: quantizer, parity and row class of each element."""
    return (q * np.uint8(2) + p) * np.uint8(plan.classes) + rc


def split_multiples(plan: LevelPlan, p: np.ndarray, rs: np.ndarray, q: np.ndarray) -> np.ndarray:
    """The multiples (int16) of levels given by parity and rest symbols, on quantizers q."""
    k = 2 * (rs.astype(np.int32) + plan.rlo) + p
    return (2 * k - q * np.sign(k)).astype("<i2")


def _decode_split(plan: LevelPlan, a: int, m: int, views: dict, where: str) -> np.ndarray:
    pdata, rdata = split_parts(plan, views, where)
    rc = split_row_classes(plan, a, m)
    R = plan.classes
    if native.available():
        return _decode_split_native(plan, m, pdata, rdata, rc, where)
    order, counts = _order(rc, R)
    p = _scatter(entropy.lanes_decode(pdata, counts.tolist(), plan.parity_tables(), plan.ans_lane, where),
                 order, np.uint8)
    q = walk_parities(p)
    if plan.rest > 1:
        order, counts = _order(rest_contexts(plan, rc, p, q), 4 * R)
        rs = _scatter(entropy.lanes_decode(rdata, counts.tolist(), plan.coding_tables(), plan.ans_lane, where),
                      order, np.int32)
    else:
        rs = np.zeros(m, dtype=np.int32)
    return split_multiples(plan, p, rs, q)


def _decode_split_native(plan: LevelPlan, m: int, pdata, rdata, rc: np.ndarray, where: str) -> np.ndarray:
    """_decode_split with the compiled kernels: the same symbols, without sorts (one pass each)."""
    counts = np.bincount(rc, minlength=plan.classes)
    grouped = entropy.lanes_decode(pdata, counts.tolist(), plan.parity_tables(), plan.ans_lane, where)
    p = native.ungroup(grouped, rc, counts, np.uint8)
    q = native.walk(p, LANE)
    if plan.rest > 1:
        ctx, counts = native.split_contexts(p, q, rc, plan.classes)
        grouped = entropy.lanes_decode(rdata, counts.tolist(), plan.coding_tables(), plan.ans_lane, where)
        rs = native.ungroup(grouped, ctx, counts, np.int32)
    else:
        rs = np.zeros(m, dtype=np.int32)
    return native.split_multiples(p, rs, q, plan.rlo)


def _scatter(grouped: np.ndarray, order: Optional[np.ndarray], dtype) -> np.ndarray:
    """Symbols in coding order back to element order (order None: the same)."""
    if order is None:
        return grouped.astype(dtype)
    out = np.empty(len(grouped), dtype=dtype)
    out[order] = grouped
    return out


def _order(ctx: np.ndarray, C: int) -> tuple[Optional[np.ndarray], np.ndarray]:
    """Positions sorted by context (stable; None when there is one context) and the count of each context."""
    ctx = ctx.astype(np.uint8, copy=False)
    counts = np.bincount(ctx, minlength=C)
    if np.count_nonzero(counts) <= 1:
        return None, counts
    return np.argsort(ctx, kind="stable"), counts


def encode_chunk(plan: LevelPlan, i: int, u: np.ndarray) -> tuple[dict, bytes]:
    """Code chunk i of the multiples (int16 elements as uint16)."""
    raw = u.tobytes()
    rec = {"codec": "trellis", "raw_crc": native.crc32(raw, chunk_seed(plan.seed, i))}
    if plan.alphabet == 1:
        rec["parts"] = [["levels", "const", 0]]
        return rec, b""
    a, _ = plan.chunk_range(i)
    m = len(u)
    lv, q = levels_of(u.view(np.int16))
    if plan.ans_lane:
        parts = _encode_split(plan, a, m, lv, q)
        rec["parts"] = [[name, codec, len(data)] for name, codec, data in parts]
        return rec, b"".join(data for _, _, data in parts)
    prev, rows = _element_contexts(lv, a, plan.row)
    rc = plan.rcls[np.minimum(rows, len(plan.rcls) - 1)].astype(np.int64)
    ctx = plan.contexts_of(prev, q, rc)
    sym = (lv - plan.lo).astype(np.int32)
    models = plan.models()
    C = plan.contexts
    groups = []
    for j in range(LANE):
        active = -(-(m - j) // LANE)  # lanes that have an element j
        order, counts = _order(ctx[:active, j], C)
        s = sym[:active, j] if order is None else sym[:active, j][order]
        off = 0
        for c in np.flatnonzero(counts):
            groups.append((s[off:off + counts[c]], models[c]))
            off += counts[c]
    words = entropy.ans_encode(groups).astype("<u4").tobytes()
    rec["parts"] = [["levels", "ans", len(words)]]
    return rec, words


def decode_chunk(plan: LevelPlan, i: int, rec: dict, payload, where: str) -> bytes:
    """Decode chunk i back to the raw bytes of its multiples (int16), checking its checksum."""
    a, b = plan.chunk_range(i)
    m = b - a
    parts = rec.get("parts")
    if plan.ans_lane and plan.alphabet > 1:
        from .streams import chunk_views

        out = _decode_split(plan, a, m, chunk_views(rec, payload, where), where)
        raw = out.tobytes()
        if native.crc32(raw, chunk_seed(plan.seed, i)) != rec.get("raw_crc"):
            raise FormatError(f"{where}: decoded data fails its checksum")
        return raw
    if not isinstance(parts, list) or len(parts) != 1 or not isinstance(parts[0], list) or len(parts[0]) != 3 \
            or parts[0][0] != "levels" or parts[0][2] != len(payload):
        raise FormatError(f"{where}: malformed chunk parts")
    codec = parts[0][1]
    if plan.alphabet == 1:
        if codec != "const" or len(payload):
            raise FormatError(f"{where}: malformed level part")
        k = np.full(lanes(np.zeros(m)).shape, plan.lo, dtype=np.int64)
        out = reconstruct(k, walk(k)).reshape(-1)[:m].astype("<i2")
    else:
        if codec != "ans" or len(payload) % 4:  # (an ANS stream of symbol 0 only is empty)
            raise FormatError(f"{where}: malformed level part")
        out = _decode_multiples(plan, a, m, np.frombuffer(payload, dtype="<u4"), where)
    raw = out.tobytes()
    if native.crc32(raw, chunk_seed(plan.seed, i)) != rec.get("raw_crc"):
        raise FormatError(f"{where}: decoded data fails its checksum")
    return raw


def _multiple_table(plan: LevelPlan) -> np.ndarray:
    """multiple[state, symbol]: the multiple of delta that a symbol decodes to in a state."""
    k = np.arange(plan.alphabet) + plan.lo
    return (2 * k[None, :] - QUANT[:, None] * np.sign(k)[None, :]).astype("<i2")


def _decode_multiples(plan: LevelPlan, a: int, m: int, words: np.ndarray, where: str) -> np.ndarray:
    """Step by step over the lanes of a chunk: each lane's context from its state, previous level and row;
    the symbols of each context decoded in one call; the multiples written as they come."""
    if native.available():
        return native.step_major(words, m, LANE, a, plan.row, plan.rcls, plan.classes, plan.prev, plan.lo,
                                 plan.coding_tables().slots(), _multiple_table(plan), where)
    coder = entropy.Decoder(words, where)
    L = -(-m // LANE)
    models = plan.models()
    C, R = plan.contexts, plan.classes
    # per (state, symbol): the multiple it decodes to, and the next state; per symbol: its sign class
    k = np.arange(plan.alphabet) + plan.lo
    A = plan.alphabet
    multiple = _multiple_table(plan).reshape(-1)  # [state * A + symbol]
    following = NEXT[:, k & 1].reshape(-1)
    sign_class = np.sign(k) + 1
    state_ctx = QUANT * (3 if plan.prev else 1) * R
    # the row class of every element, step-major
    rows = (a + np.arange(L)[None, :] * LANE + np.arange(LANE)[:, None]) // plan.row
    rc = plan.rcls[np.minimum(rows, len(plan.rcls) - 1)].astype(np.int64) if R > 1 else np.zeros((LANE, L), np.int64)
    out = np.zeros((LANE, L), dtype="<i2")  # step-major while decoding
    state = np.zeros(L, dtype=np.int64)
    prev = np.ones(L, dtype=np.int64)
    sym = np.empty(L, dtype=np.int64)
    for j in range(LANE):
        active = -(-(m - j) // LANE)
        if active <= 0:  # a chunk shorter than a lane: no lane has element j
            break
        st = state[:active]
        ctx = state_ctx[st] + rc[j, :active]
        if plan.prev:
            ctx += prev[:active] * R
        order, counts = _order(ctx, C)
        nz = np.flatnonzero(counts)
        got = [coder.decode(models[c], int(counts[c])) for c in nz]
        s = sym[:active]
        if order is None:
            s[:] = got[0]
        else:
            s[order] = got[0] if len(got) == 1 else np.concatenate(got)
        flat = st * A + s
        out[j, :active] = multiple.take(flat)
        state[:active] = following.take(flat)
        if plan.prev:
            prev[:active] = sign_class[s]
    coder.finish()
    return out.T.reshape(-1)[:m]


SPLIT_KEYS = {"ans_lane", "rlo", "rest"}


def check_params(numel: int, params: dict, where: str) -> dict:
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
    if not (p["lane"] == LANE and 1 <= p["chunk"] <= 1 << 22 and p["chunk"] % LANE == 0 and 1 <= p["row"]
            and numel >= 1 and 1 <= p["alphabet"] <= entropy.MAX_ALPHABET and p["prev"] in (0, 1)
            and p["classes"] in ROW_CLASSES and -LEVEL_MAX - 1 <= p["lo"]
            and p["lo"] + p["alphabet"] - 1 <= LEVEL_MAX):
        raise FormatError(f"{where}: stream parameters out of range")
    return p


def plan_from_record(numel: int, params: dict, side: bytes, where: str) -> LevelPlan:
    from .streams import unzstd

    p = check_params(numel, params, where)
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
