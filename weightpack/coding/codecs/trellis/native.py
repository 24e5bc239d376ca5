"""The `trellis` codec's decoders with the compiled kernels (the "native" backend; weightpack/_native.c
through ctypes): the same symbols as cpu.py without its sorts (ungrouping by context, the trellis walk and
the rests' contexts in one pass each), the step-major layout decoded in one kernel call per chunk, and the
ANS lanes by entropy_native's bucketed decoder."""

from __future__ import annotations

import numpy as np

from ....errors import FormatError
from ....stages.tcq import PATH
from ... import entropy_native, native
from .plan import LevelPlan, multiple_table

# -- the kernels' wrappers ---------------------------------------------------------------------------

def ungroup(grouped: np.ndarray, keys: np.ndarray, counts: np.ndarray, dtype) -> np.ndarray:
    """Symbols in coding order (the runs of each key, in key order, stable) back to element order."""
    n = len(keys)
    if len(grouped) != n:
        raise ValueError("keys and symbols disagree")
    out = np.empty(n, dtype=dtype)
    fn = native.lib().wp_ungroup_u8 if out.dtype == np.uint8 else native.lib().wp_ungroup_i32
    if fn(np.ascontiguousarray(grouped, dtype=np.int32), np.ascontiguousarray(keys, dtype=np.uint8), n,
          np.ascontiguousarray(counts, dtype=np.int64), len(counts), out):
        raise ValueError("keys and counts disagree")
    return out


def walk(p: np.ndarray, path: int) -> np.ndarray:
    """The trellis quantizer (uint8) of each element of flat level parities, paths from element 0."""
    p = np.ascontiguousarray(p, dtype=np.uint8)
    q = np.empty(len(p), dtype=np.uint8)
    native.lib().wp_walk(p, len(p), path, q)
    return q


def split_contexts(p: np.ndarray, q: np.ndarray, rc: np.ndarray, R: int) -> tuple[np.ndarray, np.ndarray]:
    """Rest contexts (q * 2 + p) * R + rc (uint8) of every element, and how many of each."""
    n = len(p)
    rc = np.ascontiguousarray(rc, dtype=np.uint8)
    if len(q) != n or len(rc) != n or not 1 <= R <= 64 or (n and int(rc.max()) >= R):
        raise ValueError("contexts out of range")
    ctx = np.empty(n, dtype=np.uint8)
    counts = np.zeros(4 * R, dtype=np.int64)
    native.lib().wp_split_contexts(np.ascontiguousarray(p, dtype=np.uint8), np.ascontiguousarray(q, dtype=np.uint8), rc, n,
                           R, ctx, counts)
    return ctx, counts


def split_multiples(p: np.ndarray, rs: np.ndarray, q: np.ndarray, rlo: int) -> np.ndarray:
    """The multiples (int16) of levels given by parity and rest symbols, on quantizers q."""
    n = len(p)
    if len(rs) != n or len(q) != n:
        raise ValueError("length mismatch")
    out = np.empty(n, dtype="<i2")
    native.lib().wp_split_multiples(np.ascontiguousarray(p, dtype=np.uint8), np.ascontiguousarray(rs, dtype=np.int32),
                            np.ascontiguousarray(q, dtype=np.uint8), n, rlo, out)
    return out


def step_major(words: np.ndarray, m: int, path: int, a: int, row: int, rcls: np.ndarray, R: int, prev: int, lo: int,
               slots: tuple, multiple: np.ndarray, where: str) -> np.ndarray:
    """The multiples (int16) of one step-major trellis chunk of m elements starting at element a."""
    bucket, cdf = slots
    C = 2 * (3 if prev else 1) * R
    A = multiple.shape[1]
    rcls = np.ascontiguousarray(rcls, dtype=np.uint8)
    if bucket.shape[0] != C or cdf.shape[1] != A + 1 or multiple.shape[0] != 8 or not len(rcls) \
            or int(rcls.max()) >= R or m < 1 or row < 1 or a < 0:
        raise FormatError(f"{where}: malformed level stream")
    L = -(-m // path)
    scratch = np.empty(-(-(2 * L * path + 24 * L + 16 * C + 8) // 8), dtype=np.int64)
    out = np.zeros(L * path, dtype="<i2")
    ok = native.lib().wp_step_major(np.ascontiguousarray(words, dtype=np.uint32), len(words), m, path, a, row, rcls,
                            len(rcls), R, prev, lo, bucket, cdf, A,
                            np.ascontiguousarray(multiple, dtype="<i2"), scratch, out)
    if not ok:
        raise FormatError(f"{where}: entropy-coded data is corrupt (stream not used up)")
    return out[:m]


# -- the backend ----------------------------------------------------------------------------------------

def decode_split(plan: LevelPlan, m: int, pdata, rdata, rc: np.ndarray, where: str) -> np.ndarray:
    """cpu.decode_split with the compiled kernels: the same symbols, without sorts (one pass each)."""
    counts = np.bincount(rc, minlength=plan.classes)
    grouped = entropy_native.lanes_decode(pdata, counts.tolist(), plan.parity_tables().slots(), plan.ans_lane, where)
    p = ungroup(grouped, rc, counts, np.uint8)
    q = walk(p, PATH)
    if plan.rest > 1:
        ctx, counts = split_contexts(p, q, rc, plan.classes)
        grouped = entropy_native.lanes_decode(rdata, counts.tolist(), plan.coding_tables().slots(), plan.ans_lane,
                                              where)
        rs = ungroup(grouped, ctx, counts, np.int32)
    else:
        rs = np.zeros(m, dtype=np.int32)
    return split_multiples(p, rs, q, plan.rlo)


def decode_step_major(plan: LevelPlan, a: int, m: int, words: np.ndarray, where: str) -> np.ndarray:
    """cpu.decode_step_major in one kernel call."""
    return step_major(words, m, PATH, a, plan.row, plan.rcls, plan.classes, plan.prev, plan.lo,
                      plan.coding_tables().slots(), multiple_table(plan), where)
