"""The `trellis` codec's encoder (numpy and constriction; the decoders use the same symbol order): a chunk
of multiples turned back into levels (walking the trellis), then coded step-major (element j of every path,
contexts grouped within a step, one ANS stream) or, in the lanes layout, as parities and rests in ANS
lanes."""

from __future__ import annotations

from typing import Optional

import numpy as np

from ....stages.tcq import PATH, levels_of
from ... import entropy
from ...chunks import raw_crc, with_parts
from .plan import NAME, LevelPlan, element_contexts, order_by_context, rest_contexts, split_row_classes


def encode_chunk(plan: LevelPlan, i: int, u: np.ndarray) -> tuple[dict, bytes]:
    """Code chunk i of the multiples (int16 elements as uint16)."""
    raw = u.tobytes()
    rec = {"codec": NAME, "raw_crc": raw_crc(raw, plan.seed, i)}
    if plan.alphabet == 1:
        rec["parts"] = [["levels", "const", 0]]
        return rec, b""
    a, _ = plan.chunk_range(i)
    m = len(u)
    lv, q = levels_of(u.view(np.int16))
    if plan.ans_lane:
        return with_parts(rec, _encode_split(plan, a, m, lv, q))
    prev, rows = element_contexts(lv, a, plan.row)
    rc = plan.rcls[np.minimum(rows, len(plan.rcls) - 1)].astype(np.int64)
    ctx = plan.contexts_of(prev, q, rc)
    sym = (lv - plan.lo).astype(np.int32)
    models = plan.models()
    C = plan.contexts
    groups = []
    for j in range(PATH):
        active = -(-(m - j) // PATH)  # paths that have an element j
        order, counts = order_by_context(ctx[:active, j], C)
        s = sym[:active, j] if order is None else sym[:active, j][order]
        off = 0
        for c in np.flatnonzero(counts):
            groups.append((s[off:off + counts[c]], models[c]))
            off += counts[c]
    words = entropy.ans_encode(groups).astype("<u4").tobytes()
    rec["parts"] = [["levels", "ans", len(words)]]
    return rec, words


def _encode_split(plan: LevelPlan, a: int, m: int, lv: np.ndarray, q: np.ndarray) -> list:
    rc = split_row_classes(plan, a, m)
    k, qq = lv.reshape(-1)[:m], q.reshape(-1)[:m].astype(np.uint8)
    p = (k & 1).astype(np.uint8)
    R = plan.classes
    order, counts = order_by_context(rc, R)
    parts = [("parity", "lanes", entropy.lanes_encode(_gather(p, order), list(zip(counts.tolist(), plan.pmodels())),
                                                      plan.ans_lane))]
    if plan.rest > 1:
        order, counts = order_by_context(rest_contexts(plan, rc, p, qq), 4 * R)
        rs = ((k >> 1) - plan.rlo).astype(np.int32)
        parts.append(("rest", "lanes", entropy.lanes_encode(_gather(rs, order), list(zip(counts.tolist(), plan.models())),
                                                            plan.ans_lane)))
    else:
        parts.append(("rest", "const", b""))
    return parts


def _gather(x: np.ndarray, order: Optional[np.ndarray]) -> np.ndarray:
    return (x if order is None else x[order]).astype(np.int32)
