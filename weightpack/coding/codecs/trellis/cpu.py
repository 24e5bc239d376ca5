"""The `trellis` codec's decoders with numpy and constriction (the "numpy" backend): the lanes layout
(parities, the trellis walk, then the rests under contexts the walk gives) and the step-major layout (all
paths advanced together, one constriction call per context and step)."""

from __future__ import annotations

from typing import Optional

import numpy as np

from ....stages.tcq import NEXT, PATH, QUANT, walk_parities
from ... import entropy
from .plan import LevelPlan, multiple_table, order_by_context, rest_contexts


def decode_split(plan: LevelPlan, m: int, pdata, rdata, rc: np.ndarray, where: str) -> np.ndarray:
    """The multiples (int16) of a chunk in the lanes layout, from its parity and rest parts; rc: the row
    class of each element."""
    R = plan.classes
    order, counts = order_by_context(rc, R)
    p = _scatter(entropy.lanes_decode(pdata, counts.tolist(), plan.parity_tables(), plan.ans_lane, where),
                 order, np.uint8)
    q = walk_parities(p)
    if plan.rest > 1:
        order, counts = order_by_context(rest_contexts(plan, rc, p, q), 4 * R)
        rs = _scatter(entropy.lanes_decode(rdata, counts.tolist(), plan.coding_tables(), plan.ans_lane, where),
                      order, np.int32)
    else:
        rs = np.zeros(m, dtype=np.int32)
    return split_multiples(plan, p, rs, q)


def split_multiples(plan: LevelPlan, p: np.ndarray, rs: np.ndarray, q: np.ndarray) -> np.ndarray:
    """The multiples (int16) of levels given by parity and rest symbols, on quantizers q."""
    k = 2 * (rs.astype(np.int32) + plan.rlo) + p
    return (2 * k - q * np.sign(k)).astype("<i2")


def _scatter(grouped: np.ndarray, order: Optional[np.ndarray], dtype) -> np.ndarray:
    """Symbols in coding order back to element order (order None: the same)."""
    if order is None:
        return grouped.astype(dtype)
    out = np.empty(len(grouped), dtype=dtype)
    out[order] = grouped
    return out


def decode_step_major(plan: LevelPlan, a: int, m: int, words: np.ndarray, where: str) -> np.ndarray:
    """Step by step over the paths of a chunk: each path's context from its state, previous level and row;
    the symbols of each context decoded in one call; the multiples written as they come."""
    coder = entropy.Decoder(words, where)
    L = -(-m // PATH)
    models = plan.models()
    C, R = plan.contexts, plan.classes
    # per (state, symbol): the multiple it decodes to, and the next state; per symbol: its sign class
    k = np.arange(plan.alphabet) + plan.lo
    A = plan.alphabet
    multiple = multiple_table(plan).reshape(-1)  # [state * A + symbol]
    following = NEXT[:, k & 1].reshape(-1)
    sign_class = np.sign(k) + 1
    state_ctx = QUANT * (3 if plan.prev else 1) * R
    # the row class of every element, step-major
    rows = (a + np.arange(L)[None, :] * PATH + np.arange(PATH)[:, None]) // plan.row
    rc = plan.rcls[np.minimum(rows, len(plan.rcls) - 1)].astype(np.int64) if R > 1 else np.zeros((PATH, L), np.int64)
    out = np.zeros((PATH, L), dtype="<i2")  # step-major while decoding
    state = np.zeros(L, dtype=np.int64)
    prev = np.ones(L, dtype=np.int64)
    sym = np.empty(L, dtype=np.int64)
    for j in range(PATH):
        active = -(-(m - j) // PATH)
        if active <= 0:  # a chunk shorter than a path: no path has element j
            break
        st = state[:active]
        ctx = state_ctx[st] + rc[j, :active]
        if plan.prev:
            ctx += prev[:active] * R
        order, counts = order_by_context(ctx, C)
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
