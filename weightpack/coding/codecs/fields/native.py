"""The `fields` codec with the compiled kernels (the "native" backend; weightpack/_native.c through ctypes):
the planning passes, a laned chunk split into head symbols and packed tails, its heads coded in ANS lanes
(coding/entropy_native.py), and decoded and joined with its tails in one pass, straight into the output
buffer. The same bytes and symbols as cpu.py (tests/test_coding_native.py); chunks of the layouts before format
1.2 (one ANS stream per chunk) are left to cpu.py."""

from __future__ import annotations

from typing import Optional

import ctypes

import numpy as np

from ....errors import FormatError
from ... import entropy_native, native
from ...storage import compress_tail, unstore
from . import cpu
from .blocks import block_counts, tail_size
from .layout import UINT, Layout


# -- the kernels' wrappers ---------------------------------------------------------------------------

def plan_scan(u: np.ndarray, lay: Layout, block: int, hist: np.ndarray, bsum: np.ndarray, blow: np.ndarray) -> None:
    """First planning pass over whole blocks of elements: hist[head value] += 1 (added to), and per block the
    sum of its head values (bsum) and the OR of its tail bits (blow), written for ceil(len(u) / block)
    blocks."""
    u = native.uint_view(u, lay.bits)
    nb = -(-len(u) // block)
    if len(hist) != 1 << lay.head or len(bsum) < nb or len(blow) < nb or hist.dtype != np.int64 \
            or native.lib().wp_plan_scan(u.ctypes.data, len(u), lay.bits, lay.head, lay.tail, block, hist, bsum, blow):
        raise ValueError("planning arguments disagree")


def class_hist(u: np.ndarray, lay: Layout, block: int, cls: np.ndarray, lut: np.ndarray, fine: np.ndarray) -> None:
    """Second planning pass: fine[class of the element's block, symbol of its head] += 1 (cls from the
    first block of u on)."""
    u = native.uint_view(u, lay.bits)
    nb = -(-len(u) // block)
    C, A = fine.shape
    cls = np.ascontiguousarray(cls, dtype=np.uint8)
    lut = np.ascontiguousarray(lut, dtype=np.int32)
    if len(cls) < nb or len(lut) != 1 << lay.head or (nb and int(cls[:nb].max()) >= C) or int(lut.max()) >= A \
            or fine.dtype != np.int64 or not fine.flags.c_contiguous \
            or native.lib().wp_class_hist(u.ctypes.data, len(u), lay.bits, lay.head, lay.tail, block, cls, lut, A,
                                          fine):
        raise ValueError("planning arguments disagree")


def fields_split(u: np.ndarray, bits: int, sign: int, head: int, tail: int, block: int, bcls: np.ndarray,
                 btz: np.ndarray, C: int, lut: Optional[np.ndarray]):
    """A fields chunk's head symbols grouped by block class, in coding order (uint16), with each one's class
    (uint8) -- (None, None) without a lut -- and its tail part (a uint8 array). All three are per-thread work
    arrays, valid until the next call."""
    u = native.uint_view(u, bits)
    m = len(u)
    bcls = np.ascontiguousarray(bcls, dtype=np.uint8)
    btz = np.ascontiguousarray(btz, dtype=np.uint8)
    sym = ctx = None
    if lut is not None:
        lut = np.ascontiguousarray(lut, dtype=np.int32)
        if len(lut) != 1 << head:
            raise ValueError("lut does not match the layout")
        sym, ctx = native.scratch("sym", m, np.uint16)[:m], native.scratch("ctx", m, np.uint8)[:m]
    cap = m * 8 + 64 if tail + sign else 1
    tail_buf = native.scratch("tail", cap, np.uint8)
    n = native.lib().wp_fields_split(u.ctypes.data, m, bits, sign, head, tail, block, bcls, btz, len(bcls), C,
                             lut.ctypes.data if lut is not None else None,
                             sym.ctypes.data if sym is not None else None,
                             ctx.ctypes.data if ctx is not None else None, tail_buf.ctypes.data, len(tail_buf),
                             native.scratch("split", m if tail + sign else 1, np.uint64))
    if n < 0:
        raise ValueError("chunk arguments disagree")
    return sym, ctx, tail_buf[:n]


def fields_join(syms: np.ndarray, alphabet: np.ndarray, bcls: np.ndarray, btz: np.ndarray, block: int, m: int,
                ccount: np.ndarray, tail, bits: int, sign: int, tail_bits: int, where: str,
                out: Optional[np.ndarray] = None) -> np.ndarray:
    """fields() in one pass, from uint16 symbols, into `out` (m elements of `bits`) when given."""
    if out is None:
        out = np.empty(m, dtype=np.dtype(f"<u{bits // 8}"))
    elif out.dtype.itemsize * 8 != bits or len(out) != m or not out.flags.c_contiguous:
        raise ValueError("output does not fit the chunk")
    n_tail = len(tail)
    buf = np.frombuffer(tail, dtype=np.uint8) if n_tail else np.zeros(1, np.uint8)
    if len(syms) != m or len(bcls) != len(btz):
        raise FormatError(f"{where}: malformed chunk")
    bad = native.lib().wp_fields_join(np.ascontiguousarray(syms, dtype=np.uint16), m,
                              np.ascontiguousarray(alphabet, dtype=np.uint64), len(alphabet),
                              np.ascontiguousarray(bcls, dtype=np.uint8), np.ascontiguousarray(btz, dtype=np.uint8),
                              len(bcls), block, len(ccount), np.ascontiguousarray(ccount, dtype=np.int64),
                              buf.ctypes.data, n_tail, bits, sign, tail_bits, out.ctypes.data)
    if bad:
        raise FormatError(f"{where}: entropy-coded data is corrupt")
    return out


# -- the backend ----------------------------------------------------------------------------------------

def encode(plan, bcls: np.ndarray, btz: np.ndarray, u: np.ndarray) -> list:
    """cpu.encode of a chunk, with the compiled kernels where its heads are laned."""
    if not plan.lane:
        return cpu.encode(plan, bcls, btz, u)
    lay = plan.layout
    coded = len(plan.alphabet) > 1
    sym, ctx, tail = fields_split(u, lay.bits, lay.sign, lay.head, lay.tail, plan.block, bcls, btz,
                                  max(1, plan.tables.shape[0]), plan.lut() if coded else None)
    parts = [("head", "lanes", entropy_native.lanes_encode(sym, ctx, plan.lane, plan.coding_tables().encoder()))
             if coded else ("head", "const", b"")]
    if lay.tail + lay.sign:
        codec, data = compress_tail(tail, plan.zstd_level)
        parts.append(("tail", codec, data))
    return parts


def decode(plan, m: int, bcls: np.ndarray, btz: np.ndarray, views: dict, where: str,
           out: Optional[np.ndarray] = None, crc_seed: Optional[int] = None) -> tuple[np.ndarray, Optional[int]]:
    """cpu.decode of a chunk, with the compiled kernels where its heads are laned: in one call
    (wp_fields_decode), heads decoded (direct slot tables), then put in place and joined with their tails in
    one pass into `out` when given, and the crc32 of the result."""
    if not (plan.lane and len(plan.alphabet) > 1) or m == 0:
        return cpu.decode(plan, m, bcls, btz, views, where, out, crc_seed)
    lay = plan.layout
    tail = b""
    if lay.tail + lay.sign:
        if int(btz.max(initial=0)) > lay.tail:
            raise FormatError(f"{where}: malformed trailing zeros")
        tcodec, tail = views["tail"]
        if tcodec != "raw":  # (a raw tail's length is checked by the kernel)
            size = tail_size(lay, block_counts(btz, lay.tail + 1, plan.block, m))
            tail = unstore(tcodec, tail, size, where + " tail")
    if out is None:
        out = np.empty(m, dtype=UINT[lay.bits])
    elif out.dtype.itemsize * 8 != lay.bits or len(out) != m or not out.flags.c_contiguous:
        raise ValueError("output does not fit the chunk")
    dslot, fc = plan.coding_tables().fast()
    C, A = fc.shape
    if dslot.shape != (C, 1 << entropy_native.SLOT_BITS) or len(plan.alphabet) != A or C != plan.tables.shape[0]:
        raise ValueError("slot tables do not fit")
    head = np.frombuffer(views["head"][1], np.uint8)
    n_tail = len(tail)
    tail = np.frombuffer(tail, np.uint8) if n_tail else np.zeros(1, np.uint8)
    alphabet = np.ascontiguousarray(plan.alphabet, dtype=np.uint64)
    bcls, btz = np.ascontiguousarray(bcls, dtype=np.uint8), np.ascontiguousarray(btz, dtype=np.uint8)
    if len(bcls) != len(btz):
        raise FormatError(f"{where}: malformed chunk")
    crc = ctypes.c_uint32()
    bad = native.lib().wp_fields_decode(
        head.ctypes.data, len(head), plan.lane, tail.ctypes.data, n_tail, m,
        bcls.ctypes.data, btz.ctypes.data, len(bcls), plan.block, C, dslot.ctypes.data, fc.ctypes.data, A,
        alphabet.ctypes.data, lay.bits, lay.sign, lay.tail, native.scratch("lanes_syms", m, np.uint16).ctypes.data,
        out.ctypes.data, crc_seed or 0, ctypes.byref(crc))
    if bad:
        errors = {-1: "malformed lanes part", -2: "entropy-coded data is corrupt (stream not used up)",
                  -3: "entropy-coded data is corrupt"}
        if bad not in errors:
            raise ValueError("chunk arguments disagree")
        raise FormatError(f"{where}: {errors[bad]}")
    return out, (crc.value if crc_seed is not None else None)
