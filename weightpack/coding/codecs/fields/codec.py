"""The `fields` codec: each element split into [sign][head][tail] (layout.py); heads entropy-coded under a
context model (each block -- a row of a matrix -- in one of C classes ranked by its mean head value, one
table per class; C = 1 is order-0 coding), tails bit-packed minus the trailing zeros their block shares and
stored raw or with zstd. A chunk is coded as byte planes instead (the `bytes` chunk codec) where that is
smaller.

Files: plan.py (the plan: measure, record, read back), blocks.py (the block grouping every decoder
undoes), cpu.py (numpy and constriction), native.py (the compiled kernels), device.py (torch, on a device).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ....errors import FormatError
from ...binding import chunk_seed
from ...chunks import ChunkCode, check_decoded, chunk_views, raw_crc, with_parts
from ...storage import may_win
from ..bytes import codec as bytes_codec
from .blocks import part_names
from .layout import UINT
from .plan import NAME, Plan, backend, check_params, make_plan, plan_from_record

__all__ = ["NAME", "Plan", "check_params", "make_plan", "plan_from_record", "encode_chunk", "decode_chunk"]


def encode_chunk(plan: Plan, i: int, u: np.ndarray) -> tuple[ChunkCode, bytes]:
    """Code chunk `i` (elements as a raw uint array); returns record and payload."""
    raw = u.view(np.uint8)  # the chunk's bytes, not copied
    codec = NAME
    planes = bytes_codec.planes(plan.itemsize_bits)
    parts = backend().encode(plan, *plan.chunk_blocks(i, len(u)), u)
    size = sum(len(p[2]) for p in parts)
    if plan.try_bytes and may_win(raw, planes, size):
        alt = bytes_codec.encode_planes(raw, planes, plan.zstd_level, beat=size)
        if len(alt[0][2]) < size:
            codec, parts = bytes_codec.NAME, alt
    return with_parts(codec, raw_crc(raw, plan.seed, i), parts)


def decode_chunk(plan: Plan, i: int, rec: ChunkCode, payload, where: str, into: Optional[np.ndarray] = None):
    """Chunk i's raw bytes (bytes-like), checked against their checksum; decoded into `into` (a uint8 array
    of the chunk's size) where the compiled kernels decode it."""
    a, b = plan.chunk_range(i)
    m = b - a
    views = chunk_views(rec, payload, where)
    codec = rec.codec
    if codec == bytes_codec.NAME:
        raw = bytes_codec.decode_planes(rec.parts, payload, m * plan.unit,
                                        bytes_codec.planes(plan.itemsize_bits), where)
        check_decoded(raw, plan.seed, i, rec, where)
    elif codec == NAME:
        out = None
        if into is not None and len(into) == m * plan.unit:
            out = into.view(UINT[plan.itemsize_bits])
        got, crc = decode_fields(plan, i, m, views, where, out, chunk_seed(plan.seed, i))
        raw = got.view(np.uint8)
        if crc != rec.raw_crc:
            raise FormatError(f"{where}: decoded data fails its checksum")
    else:
        raise FormatError(f"{where}: unknown chunk codec {codec!r}")
    return raw


def check_head(plan: Plan, views: dict, where: str) -> None:
    """A fields chunk's parts are the layout's, and its head part is the one its plan codes."""
    if set(views) != part_names(plan.layout):
        raise FormatError(f"{where}: malformed chunk parts")
    hcodec, hdata = views["head"]
    if len(plan.alphabet) == 1:
        if hcodec != "const" or len(hdata):
            raise FormatError(f"{where}: malformed head part")
    elif hcodec != ("lanes" if plan.lane else "ans") or len(hdata) % 4:
        # (an ANS stream may be empty: symbol 0 only, encoded from state 0)
        raise FormatError(f"{where}: malformed head part")


def decode_fields(plan: Plan, i: int, m: int, views: dict, where: str, out: Optional[np.ndarray] = None,
                  crc_seed: Optional[int] = None) -> tuple[np.ndarray, Optional[int]]:
    """A fields chunk's m elements (uint of the dtype's width; written into `out` where the compiled kernels
    decode it), and with `crc_seed` their crc32 from it (else None)."""
    bcls, btz = plan.chunk_blocks(i, m)
    check_head(plan, views, where)
    return backend().decode(plan, m, bcls, btz, views, where, out, crc_seed)
