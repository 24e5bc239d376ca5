"""Trellis-coded quantization (the `tcq` mode of the quantize stage): the state machine and the encoder's
rate-distortion search.

The machine (every decoder walks it): 8 states; states 0-3 use quantizer Q0 (even multiples of the step
delta: level k -> 2k), states 4-7 use Q1 (odd multiples and zero: k -> 2k - sign(k)); the parity of each
level picks the next state (NEXT[state, k & 1]). A tensor, flattened, is cut into paths of PATH elements;
each path starts in state 0. The reconstruction of level k in state s is (2k - Q(s) * sign(k)) * delta.

The encoder (`search`) chooses the levels by a Viterbi search over the paths (all paths advance together,
one element per step) minimizing squared error + lambda * rate, with the rate taken from tables per
quantizer and row class that a first pass estimates. Weights that are exactly zero (pruned) stay zero.

The stage stores the multiples of delta; the `trellis` codec (coding/codecs/trellis/) codes them as levels,
with contexts on this machine's states.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

STATES = 8
# next state = NEXT[state, parity]: a feedback shift register (state bits b2 b1 b0 -> (p ^ b2 ^ b1 ^ b0) b2 b1)
NEXT = np.array([[((p ^ (bin(s).count("1") & 1)) << 2) | (s >> 1) for p in (0, 1)] for s in range(STATES)],
                dtype=np.int64)
QUANT = np.arange(STATES, dtype=np.int64) >> 2  # quantizer of each state
PATH = 256  # elements per path: each path starts in state 0 (shorter paths lose more at their starts)
LEVEL_MAX = 16383  # |level|: the multiples 2k - sign(k) are stored as int16


def paths(x: np.ndarray) -> np.ndarray:
    """A flat array as (paths, PATH), the last path padded with zeros."""
    n = len(x)
    out = np.zeros((-(-n // PATH), PATH), dtype=x.dtype)
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
    """The quantizer (uint8) of each element of a flat array of level parities (0/1), paths from element 0."""
    m = len(p)
    L = -(-m // PATH)
    padded = np.zeros(L * PATH, dtype=np.uint8)
    padded[:m] = p
    b = np.packbits(padded.reshape(L, PATH // GROUP, GROUP), axis=-1, bitorder="little")[..., 0]
    q = np.empty((L, PATH // GROUP, GROUP), dtype=np.uint8)
    state = np.zeros(L, dtype=np.int64)
    for i in range(PATH // GROUP):
        bi = b[:, i]
        q[:, i] = PQGROUP[state, bi]
        state = PSKIP[state, bi]
    return q.reshape(-1)[:m]


def _run(sym2: np.ndarray) -> np.ndarray:
    """The quantizer of each element of (paths, PATH) 2-bit symbols, each path starting in state 0."""
    L = sym2.shape[0]
    g = sym2.reshape(L, PATH // GROUP, GROUP).astype(np.int64)
    b = g[..., 0].copy()
    for i in range(1, GROUP):
        b |= g[..., i] << (2 * i)
    q = np.empty((L, PATH // GROUP, GROUP), dtype=np.int8)
    state = np.zeros(L, dtype=np.int64)
    for i in range(PATH // GROUP):
        q[:, i] = QGROUP[state, b[:, i]]
        state = SKIP[state, b[:, i]]
    return q.reshape(L, PATH).astype(np.int64)


def paths_at(x: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Paths `ids` of a flat array as (len(ids), PATH), past its end zero (without copying the rest)."""
    idx = ids[:, None] * PATH + np.arange(PATH)
    return np.where(idx < len(x), x[np.minimum(idx, len(x) - 1)], 0)


def walk(levels: np.ndarray) -> np.ndarray:
    """The quantizer (0 or 1) of each element of a (paths, PATH) array of levels."""
    p = levels & 1
    return _run(p | (p << 1))


def reconstruct(levels: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Multiples of delta: 2k on Q0, 2k - sign(k) on Q1."""
    k = levels.astype(np.int64)
    return 2 * k - q * np.sign(k)


def multiples(levels: np.ndarray) -> np.ndarray:
    """The multiples of delta (int16) that flat levels reconstruct to (in blocks of paths)."""
    n = len(levels)
    out = np.empty(n, dtype=np.int16)
    block = BLOCK_ELEMENTS
    for a in range(0, n, block):
        lv = paths(levels[a:a + block].astype(np.int64))
        out[a:a + block] = reconstruct(lv, walk(lv)).reshape(-1)[: min(block, n - a)]
    return out


def levels_of(r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The levels (paths, PATH) behind flat multiples, and their quantizers; ValueError when the multiples
    are not a trellis path."""
    rv = paths(r.astype(np.int64))
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


BLOCK_ELEMENTS = 1 << 20  # a whole number of paths: work arrays are this long, whatever the tensor
BLOCK_PATHS = BLOCK_ELEMENTS // PATH  # paths searched at a time (memory: ~100 bytes per element of a block)


def viterbi(x: np.ndarray, lam: float, rate: np.ndarray, lo: int, rc: Optional[np.ndarray] = None) -> np.ndarray:
    """Levels of x (paths, PATH), in units of delta, minimizing (x - reconstruction)^2 + lam * bits.

    rate[q, r, k - lo] is the cost in bits of level k on quantizer q in row class r (rc: the class of each
    element, (paths, PATH); None for one class); levels outside the table cost its last column.
    """
    out = np.empty(x.shape, dtype=np.int32)
    flat_rate = (lam * rate).astype(np.float32).reshape(-1)
    for a in range(0, x.shape[0], BLOCK_PATHS):
        b = min(x.shape[0], a + BLOCK_PATHS)
        out[a:b] = _viterbi_block(x[a:b], flat_rate, rate.shape[1], rate.shape[2], lo,
                                  rc[a:b] if rc is not None else None)
    return out


def _viterbi_block(x, flat_rate, R: int, A: int, lo: int, rc) -> np.ndarray:
    L, m = x.shape
    xt = np.ascontiguousarray(x.T, dtype=np.float32)  # (step, path): each step's data contiguous
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
RATE_SAMPLE_PATHS = (1 << 17) // PATH  # paths the rate-measuring passes run on


def search(w: np.ndarray, cols: int, delta: float, lam: float, passes: int = 2, stride: int = 1) -> np.ndarray:
    """Levels of a flat float array for step delta: a first pass (on a sample of paths) with the rates of
    plain rounding, then passes with the rates the previous pass measured, per quantizer and row class.
    With stride > 1, only every stride-th path is searched and the levels come back as (paths, PATH): a
    sample, for step searches."""
    n = len(w)
    ids = np.arange(0, -(-n // PATH), stride)
    rows = n // cols if cols else 0
    R = SEARCH_CLASSES if rows * cols == n and rows >= 4 * SEARCH_CLASSES else 1
    rcls = None
    if R > 1:
        w2 = w.reshape(rows, cols)
        step = max(1, (1 << 20) // cols)
        rmean = np.concatenate([np.abs(w2[a:a + step]).mean(axis=1) for a in range(0, rows, step)])
        rcls = row_classes(rmean, R)
    # the paths (in units of delta, float32: the search's precision) and their row classes, in blocks
    x = np.empty((len(ids), PATH), dtype=np.float32)
    rc = np.empty((len(ids), PATH), dtype=np.uint8) if R > 1 else None
    for a in range(0, len(ids), BLOCK_PATHS):
        x[a:a + BLOCK_PATHS] = paths_at(w, ids[a:a + BLOCK_PATHS]) / delta
        if rc is not None:
            idx = ids[a:a + BLOCK_PATHS, None] * PATH + np.arange(PATH)
            rc[a:a + BLOCK_PATHS] = rcls[np.minimum(idx // cols, rows - 1)]
    levels = search_paths(x, rc, R, lam, passes)
    return levels if stride > 1 else levels.reshape(-1)[:n]


def search_paths(x: np.ndarray, rc: Optional[np.ndarray], R: int, lam: float, passes: int = 2,
                 rate_paths: int = RATE_SAMPLE_PATHS) -> np.ndarray:
    """Levels (paths, PATH) of paths in units of delta, rc the class (0..R-1) of each element (None: one
    class): the rate tables are per quantizer and class. The passes before the last only measure rates,
    on a sample of about `rate_paths` paths."""
    sub = max(1, len(x) // rate_paths)
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

