"""The `fields` codec with numpy and constriction (the "numpy" backend): the planning passes, and a chunk's
heads and tails coded and decoded. Decodes every layout (formats 1.0 to 1.3); holds the GIL, so the
pipelines run it in worker processes."""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from ....errors import FormatError
from ... import entropy
from ...native import crc32
from ...storage import compress_tail, unstore
from .blocks import BlockGroups, tail_size, tail_widths
from .layout import UINT, Layout, join, pack_bits, packed_size, split, tail_values, unpack_bits, work_dtype


def plan_scan(u: np.ndarray, lay: Layout, block: int, hist: np.ndarray, bsum: np.ndarray, blow: np.ndarray) -> None:
    """First planning pass over whole blocks of elements: hist[head value] += 1 (added to), and per block the
    sum of its head values (bsum, int64) and the OR of its tail bits (blow, uint64), written for
    ceil(len(u) / block) blocks."""
    head, v = split(u, lay)
    hist += np.bincount(head, minlength=1 << lay.head)
    starts = np.arange(0, len(u), block)
    bsum[:len(starts)] = np.add.reduceat(head.astype(np.float64), starts)  # sums of integers below 2**53
    if lay.tail:
        blow[:len(starts)] = np.bitwise_or.reduceat(v & np.uint64((1 << lay.tail) - 1), starts)


def class_hist(u: np.ndarray, lay: Layout, block: int, cls: np.ndarray, lut: np.ndarray, fine: np.ndarray) -> None:
    """Second planning pass: fine[class of the element's block, symbol of its head] += 1 (cls from the
    first block of u on)."""
    C, A = fine.shape
    head, _ = split(u, lay)
    ecls = np.repeat(cls[:math.ceil(len(u) / block)].astype(np.int64), block)[: len(u)]
    fine += np.bincount(ecls * A + lut[head], minlength=C * A).reshape(C, A)


def encode(plan, bcls: np.ndarray, btz: np.ndarray, u: np.ndarray) -> list:
    """A chunk's parts [(name, part codec, data)]: heads under their class's table (one ANS stream, or
    lanes), tails packed by trailing-zero group and stored raw or with zstd."""
    lay, L = plan.layout, plan.block
    m = len(u)
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


def decode(plan, m: int, bcls: np.ndarray, btz: np.ndarray, views: dict, where: str,
           out: Optional[np.ndarray] = None, crc_seed: Optional[int] = None) -> tuple[np.ndarray, Optional[int]]:
    """A chunk's m elements (uint of the dtype's width) from its checked parts (`out` is not used here), and
    with `crc_seed` their crc32 from it (else None)."""
    got = _decode(plan, m, bcls, btz, views, where)
    return got, (crc32(got, crc_seed) if crc_seed is not None else None)


def _decode(plan, m: int, bcls: np.ndarray, btz: np.ndarray, views: dict, where: str) -> np.ndarray:
    lay, L = plan.layout, plan.block
    wd = work_dtype(lay)
    hcodec, hdata = views["head"]
    A = len(plan.alphabet)
    alphabet = plan.alphabet.astype(wd)
    if A == 1:
        head = np.full(m, alphabet[0], dtype=wd)
    else:
        C = plan.tables.shape[0]
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
    widths = tail_widths(lay, g.counts)
    tcodec, tdata = views["tail"]
    tail = memoryview(unstore(tcodec, tdata, tail_size(lay, g.counts), where + " tail"))
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
