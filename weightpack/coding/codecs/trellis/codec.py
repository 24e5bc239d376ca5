"""The `trellis` codec: the levels of a tcq tensor (stages/tcq.py stores their multiples of the step),
entropy-coded under contexts from the trellis walk.

Files: plan.py (the plan: measure, record, read back), encode.py (the encoder), cpu.py (numpy and
constriction), native.py (the compiled kernels), device.py (torch, on a device).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ....errors import FormatError
from ....stages.tcq import paths, reconstruct, walk
from ... import native
from ...chunks import check_decoded, chunk_views
from . import cpu, native as compiled
from .encode import encode_chunk
from .plan import NAME, LevelPlan, check_params, make_plan, plan_from_record, split_row_classes

__all__ = ["NAME", "LevelPlan", "check_params", "make_plan", "plan_from_record", "encode_chunk", "decode_chunk"]

BACKENDS = {"numpy": cpu, "native": compiled}  # the codec's CPU decoders (coding/native.py chooses)


def backend():
    """The trellis codec's CPU decoder in use (cpu.py or native.py)."""
    return native.select(BACKENDS)


def split_parts(plan: LevelPlan, views: dict, where: str):
    """The parity and rest parts of a chunk in the lanes layout, checked: (parity bytes, rest bytes)."""
    if set(views) != {"parity", "rest"}:
        raise FormatError(f"{where}: malformed chunk parts")
    pcodec, pdata = views["parity"]
    rcodec, rdata = views["rest"]
    if pcodec != "lanes" or len(pdata) % 4 or rcodec != ("lanes" if plan.rest > 1 else "const") \
            or len(rdata) % 4 or (rcodec == "const" and len(rdata)):
        raise FormatError(f"{where}: malformed level parts")
    return pdata, rdata


def decode_chunk(plan: LevelPlan, i: int, rec: dict, payload, where: str, into: Optional[np.ndarray] = None) -> bytes:
    """Decode chunk i back to the raw bytes of its multiples (int16), checking its checksum."""
    if rec.get("codec") != NAME:
        raise FormatError(f"{where}: unknown chunk codec {rec.get('codec')!r}")
    a, b = plan.chunk_range(i)
    m = b - a
    parts = rec.get("parts")
    if plan.ans_lane and plan.alphabet > 1:
        pdata, rdata = split_parts(plan, chunk_views(rec, payload, where), where)
        out = backend().decode_split(plan, m, pdata, rdata, split_row_classes(plan, a, m), where)
    elif not isinstance(parts, list) or len(parts) != 1 or not isinstance(parts[0], list) or len(parts[0]) != 3 \
            or parts[0][0] != "levels" or parts[0][2] != len(payload):
        raise FormatError(f"{where}: malformed chunk parts")
    elif plan.alphabet == 1:
        if parts[0][1] != "const" or len(payload):
            raise FormatError(f"{where}: malformed level part")
        k = np.full(paths(np.zeros(m)).shape, plan.lo, dtype=np.int64)
        out = reconstruct(k, walk(k)).reshape(-1)[:m].astype("<i2")
    else:
        if parts[0][1] != "ans" or len(payload) % 4:  # (an ANS stream of symbol 0 only is empty)
            raise FormatError(f"{where}: malformed level part")
        out = backend().decode_step_major(plan, a, m, np.frombuffer(payload, dtype="<u4"), where)
    raw = out.tobytes()
    check_decoded(raw, plan.seed, i, rec, where)
    return raw
