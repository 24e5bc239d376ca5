"""The compiled CPU kernels (weightpack/_native.c) behind the decoders' hot loops, called through ctypes.

constriction decodes one run of symbols per call and finds each symbol by a binary search of its table;
the trellis decoder around it is a handful of numpy passes over every element (sorts by context, scatters,
the state walk). The kernels do the same work in compiled loops over the same bytes, and ctypes releases
the GIL while they run.

The extension is built when the package is installed (setuptools, `optional`: without a C compiler the
install still succeeds). Where it is missing or WEIGHTPACK_NO_NATIVE is set, `available()` is False and the
decoders use constriction and numpy, which decode the same symbols (the test suite runs both).

Each wrapper checks the sizes it passes against each other, so that the kernels' reads and writes stay
inside the arrays whatever the container holds.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import threading
from contextlib import contextmanager
from typing import Iterator, Optional

import numpy as np

from ..errors import FormatError

SLOT_BITS = 15  # entropy.TABLE_BITS: a symbol is found by bits 9..23 of the state
BUCKETS = 1 << 12  # slots are looked up 8 at a time, then the symbol is found by its cumulative frequency
_lib: Optional[ctypes.CDLL] = None
_tried = False
_use = True


def _arr(dtype):
    return np.ctypeslib.ndpointer(dtype=dtype, flags="C_CONTIGUOUS")


_I64 = ctypes.c_int64
_ENC_SYM = np.dtype([("f", "<u4"), ("c", "<u4"), ("magic", "<u8"), ("pre", "<u4"), ("post", "<u4")])  # EncSym
_SIGNATURES = {
    "wp_lanes": (_I64, [_arr(np.uint32), _I64, _arr(np.int64), _I64, _arr(np.int64), _I64, _arr(np.uint16),
                        _arr(np.uint32), _I64, _arr(np.int32)]),
    "wp_ungroup_u8": (_I64, [_arr(np.int32), _arr(np.uint8), _I64, _arr(np.int64), _I64, _arr(np.uint8)]),
    "wp_ungroup_i32": (_I64, [_arr(np.int32), _arr(np.uint8), _I64, _arr(np.int64), _I64, _arr(np.int32)]),
    "wp_walk": (None, [_arr(np.uint8), _I64, _I64, _arr(np.uint8)]),
    "wp_split_contexts": (None, [_arr(np.uint8), _arr(np.uint8), _arr(np.uint8), _I64, _I64, _arr(np.uint8),
                                 _arr(np.int64)]),
    "wp_split_multiples": (None, [_arr(np.uint8), _arr(np.int32), _arr(np.uint8), _I64, _I64, _arr(np.int16)]),
    "wp_plan_scan": (_I64, [ctypes.c_void_p, _I64, _I64, _I64, _I64, _I64, _arr(np.int64), _arr(np.int64),
                             _arr(np.uint64)]),
    "wp_class_hist": (_I64, [ctypes.c_void_p, _I64, _I64, _I64, _I64, _I64, _arr(np.uint8), _arr(np.int32), _I64,
                             _arr(np.int64)]),
    "wp_lanes_encode": (_I64, [_arr(np.uint16), _arr(np.uint8), _I64, _I64, _arr(_ENC_SYM), _I64, _I64,
                               _arr(np.uint32), _arr(np.uint8), _I64]),
    "wp_fields_split": (_I64, [ctypes.c_void_p, _I64, _I64, _I64, _I64, _I64, _I64, _arr(np.uint8), _arr(np.uint8),
                               _I64, _I64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, _I64,
                               _arr(np.uint64)]),
    "wp_lanes_fast": (_I64, [ctypes.c_void_p, _I64, _arr(np.int64), _I64, _arr(np.int64), _I64, _arr(np.uint16),
                             _arr(np.uint32), _I64, _I64, _arr(np.uint16)]),
    "wp_simd": (_I64, [_I64]),
    "wp_fields_join": (_I64, [_arr(np.uint16), _I64, _arr(np.uint64), _I64, _arr(np.uint8), _arr(np.uint8), _I64,
                              _I64, _I64, _arr(np.int64), ctypes.c_void_p, _I64, _I64, _I64, _I64, ctypes.c_void_p]),
    "wp_step_major": (_I64, [_arr(np.uint32), _I64, _I64, _I64, _I64, _I64, _arr(np.uint8), _I64, _I64, _I64, _I64,
                             _arr(np.uint16), _arr(np.uint32), _I64, _arr(np.int16),
                             _arr(np.int64), _arr(np.int16)]),
}


def _load() -> Optional[ctypes.CDLL]:
    global _lib, _tried
    if not _tried:
        _tried = True
        if not os.environ.get("WEIGHTPACK_NO_NATIVE"):
            try:
                # WEIGHTPACK_NATIVE_LIB: another build of the same kernels (scripts/sanitize.sh: AddressSanitizer)
                spec = importlib.util.find_spec("weightpack._native")
                origin = os.environ.get("WEIGHTPACK_NATIVE_LIB") or (spec.origin if spec is not None else None)
                if origin:
                    lib = ctypes.CDLL(origin)
                    for name, (res, args) in _SIGNATURES.items():
                        fn = getattr(lib, name)
                        fn.restype, fn.argtypes = res, args
                    _lib = lib
            except (OSError, AttributeError, ImportError):
                _lib = None
    return _lib


def available() -> bool:
    """Whether the decoders use the compiled kernels (they are built and loaded, and not switched off)."""
    return _load() is not None and _use


@contextmanager
def enabled(flag: bool) -> Iterator[None]:
    """Inside the block the decoders use the compiled kernels (flag True; they must be built) or
    constriction and numpy (False): tests and benchmarks run both on the same bytes. Not thread-safe."""
    global _use
    if flag and _load() is None:
        raise RuntimeError("the compiled kernels are not built")
    saved, _use = _use, flag
    try:
        yield
    finally:
        _use = saved


@contextmanager
def simd(level: int) -> Iterator[int]:
    """Inside the block the kernels use vector instructions (level 1: AVX-512 where the CPU has it) or only
    their portable loops (0); yields the level in use. Both give the same results (tests run both). The
    kernels choose the best level once, at first use, by themselves. Not thread-safe."""
    lib = _load()
    if lib is None:
        raise RuntimeError("the compiled kernels are not built")
    saved = lib.wp_simd(-1)
    try:
        yield lib.wp_simd(level)
    finally:
        lib.wp_simd(saved)


def slot_tables(tables) -> tuple[np.ndarray, np.ndarray]:
    """For stored 15-bit tables (one per context, any alphabets up to 2**12, each summing to 2**15): per
    context the symbol of every 8th slot (uint16, 4096 buckets) and the cumulative frequencies (uint32,
    A + 1 per context, padded with 2**15), as the kernels' ans_step reads them."""
    C = max(len(tables), 1)
    A = max((len(f) for f in tables), default=1)
    bucket = np.zeros((C, BUCKETS), dtype=np.uint16)
    cdf = np.full((C, A + 1), 1 << SLOT_BITS, dtype=np.uint32)
    cdf[:, 0] = 0
    for c, f in enumerate(tables):
        f = np.asarray(f, dtype=np.int64)
        cdf[c, 1:len(f) + 1] = np.cumsum(f)
        bucket[c] = np.repeat(np.arange(len(f), dtype=np.uint16), f)[::(1 << SLOT_BITS) // BUCKETS]
    return bucket, cdf


def fast_slots(tables) -> tuple[np.ndarray, np.ndarray]:
    """For stored 15-bit tables (one per context, all of alphabet A): the symbol of every slot (uint16, 2**15
    per context) and each symbol's frequency | cumulative frequency << 16 (uint32), as wp_lanes_fast reads
    them."""
    f = np.asarray(np.stack(tables), dtype=np.int64)
    C, A = f.shape
    dslot = np.empty((C, 1 << SLOT_BITS), np.uint16)
    for c in range(C):
        dslot[c] = np.repeat(np.arange(A, dtype=np.uint16), f[c])
    fc = (f | ((np.cumsum(f, axis=1) - f) << 16)).astype(np.uint32)
    return dslot, fc


def lanes_fast(words: np.ndarray, wcount: np.ndarray, ccount: np.ndarray, lane: int, fast: tuple,
               where: str) -> np.ndarray:
    """The symbols (uint16, coding order) of a lanes payload whose sequence runs through the contexts in
    order, ccount[c] symbols of context c (entropy.lanes_encode's layout), with the direct slot tables of
    fast_slots."""
    dslot, fc = fast
    ccount = np.ascontiguousarray(ccount, dtype=np.int64)
    n = int(ccount.sum())
    nl = -(-n // lane)
    if len(wcount) != nl or int(wcount.sum()) != len(words) or len(ccount) != dslot.shape[0] \
            or int(ccount.min(initial=0)) < 0:
        raise FormatError(f"{where}: malformed lanes part")
    words = np.ascontiguousarray(words, dtype=np.uint32)
    out = np.empty(n, dtype=np.uint16)
    if dslot.shape[1] != 1 << SLOT_BITS or not dslot.flags.c_contiguous or fc.shape[0] != dslot.shape[0]:
        raise ValueError("slot tables do not fit")
    bad = _lib.wp_lanes_fast(words.ctypes.data, len(words), np.ascontiguousarray(wcount, dtype=np.int64), nl,
                             ccount, len(ccount), dslot, fc, fc.shape[1], n, out)
    if bad >= 0:
        raise FormatError(f"{where}: entropy-coded data is corrupt (stream not used up)")
    return out


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
    bad = _lib.wp_fields_join(np.ascontiguousarray(syms, dtype=np.uint16), m,
                              np.ascontiguousarray(alphabet, dtype=np.uint64), len(alphabet),
                              np.ascontiguousarray(bcls, dtype=np.uint8), np.ascontiguousarray(btz, dtype=np.uint8),
                              len(bcls), block, len(ccount), np.ascontiguousarray(ccount, dtype=np.int64),
                              buf.ctypes.data, n_tail, bits, sign, tail_bits, out.ctypes.data)
    if bad:
        raise FormatError(f"{where}: entropy-coded data is corrupt")
    return out


def lanes(words: np.ndarray, wcount: np.ndarray, per: np.ndarray, slots: tuple, where: str) -> np.ndarray:
    """Decode lanes: lane j (of nl) holds per[j, c] symbols of context c, contexts in order, and they go to
    positions t * nl + j of the output (int32, coding order)."""
    bucket, cdf = slots
    nl, C = per.shape
    n = int(per.sum())
    if len(wcount) != nl or int(wcount.sum()) != len(words) or C > bucket.shape[0] or int(per.min(initial=0)) < 0 \
            or not np.array_equal(per.sum(axis=1), -(-(n - np.arange(nl)) // max(nl, 1))):  # lane j: t * nl + j < n
        raise FormatError(f"{where}: malformed lanes part")
    out = np.empty(n, dtype=np.int32)
    bad = _lib.wp_lanes(np.ascontiguousarray(words, dtype=np.uint32), len(words),
                        np.ascontiguousarray(wcount, dtype=np.int64), nl, np.ascontiguousarray(per, dtype=np.int64),
                        C, bucket, cdf, cdf.shape[1], out)
    if bad >= 0:
        raise FormatError(f"{where}: entropy-coded data is corrupt (stream not used up)")
    return out


def ungroup(grouped: np.ndarray, keys: np.ndarray, counts: np.ndarray, dtype) -> np.ndarray:
    """Symbols in coding order (the runs of each key, in key order, stable) back to element order."""
    n = len(keys)
    if len(grouped) != n:
        raise ValueError("keys and symbols disagree")
    out = np.empty(n, dtype=dtype)
    fn = _lib.wp_ungroup_u8 if out.dtype == np.uint8 else _lib.wp_ungroup_i32
    if fn(np.ascontiguousarray(grouped, dtype=np.int32), np.ascontiguousarray(keys, dtype=np.uint8), n,
          np.ascontiguousarray(counts, dtype=np.int64), len(counts), out):
        raise ValueError("keys and counts disagree")
    return out


def walk(p: np.ndarray, lane: int) -> np.ndarray:
    """The trellis quantizer (uint8) of each element of flat level parities, lanes from element 0."""
    p = np.ascontiguousarray(p, dtype=np.uint8)
    q = np.empty(len(p), dtype=np.uint8)
    _lib.wp_walk(p, len(p), lane, q)
    return q


def split_contexts(p: np.ndarray, q: np.ndarray, rc: np.ndarray, R: int) -> tuple[np.ndarray, np.ndarray]:
    """Rest contexts (q * 2 + p) * R + rc (uint8) of every element, and how many of each."""
    n = len(p)
    rc = np.ascontiguousarray(rc, dtype=np.uint8)
    if len(q) != n or len(rc) != n or not 1 <= R <= 64 or (n and int(rc.max()) >= R):
        raise ValueError("contexts out of range")
    ctx = np.empty(n, dtype=np.uint8)
    counts = np.zeros(4 * R, dtype=np.int64)
    _lib.wp_split_contexts(np.ascontiguousarray(p, dtype=np.uint8), np.ascontiguousarray(q, dtype=np.uint8), rc, n,
                           R, ctx, counts)
    return ctx, counts


def split_multiples(p: np.ndarray, rs: np.ndarray, q: np.ndarray, rlo: int) -> np.ndarray:
    """The multiples (int16) of levels given by parity and rest symbols, on quantizers q."""
    n = len(p)
    if len(rs) != n or len(q) != n:
        raise ValueError("length mismatch")
    out = np.empty(n, dtype="<i2")
    _lib.wp_split_multiples(np.ascontiguousarray(p, dtype=np.uint8), np.ascontiguousarray(rs, dtype=np.int32),
                            np.ascontiguousarray(q, dtype=np.uint8), n, rlo, out)
    return out


def step_major(words: np.ndarray, m: int, lane: int, a: int, row: int, rcls: np.ndarray, R: int, prev: int, lo: int,
               slots: tuple, multiple: np.ndarray, where: str) -> np.ndarray:
    """The multiples (int16) of one step-major trellis chunk of m elements starting at element a."""
    bucket, cdf = slots
    C = 2 * (3 if prev else 1) * R
    A = multiple.shape[1]
    rcls = np.ascontiguousarray(rcls, dtype=np.uint8)
    if bucket.shape[0] != C or cdf.shape[1] != A + 1 or multiple.shape[0] != 8 or not len(rcls) \
            or int(rcls.max()) >= R or m < 1 or row < 1 or a < 0:
        raise FormatError(f"{where}: malformed level stream")
    L = -(-m // lane)
    scratch = np.empty(-(-(2 * L * lane + 24 * L + 16 * C + 8) // 8), dtype=np.int64)
    out = np.zeros(L * lane, dtype="<i2")
    ok = _lib.wp_step_major(np.ascontiguousarray(words, dtype=np.uint32), len(words), m, lane, a, row, rcls,
                            len(rcls), R, prev, lo, bucket, cdf, A,
                            np.ascontiguousarray(multiple, dtype="<i2"), scratch, out)
    if not ok:
        raise FormatError(f"{where}: entropy-coded data is corrupt (stream not used up)")
    return out[:m]



# -- encoding ------------------------------------------------------------------------------------------

_scratch = threading.local()


def scratch(name: str, n: int, dtype) -> np.ndarray:
    """A work array of at least n elements, kept per thread and reused (fresh large arrays cost page faults,
    which also serialize threads)."""
    a = getattr(_scratch, name, None)
    if a is None or len(a) < n or a.dtype != dtype:
        a = np.empty(max(n, 1), dtype)
        setattr(_scratch, name, a)
    return a


def _uint_view(u: np.ndarray, bits: int) -> np.ndarray:
    u = np.ascontiguousarray(u)
    if u.dtype.itemsize * 8 != bits or u.dtype.kind != "u":
        raise ValueError("elements do not match the layout's width")
    return u


def plan_scan(u: np.ndarray, bits: int, head: int, tail: int, block: int, hist: np.ndarray, bsum: np.ndarray,
              blow: np.ndarray) -> None:
    """First planning pass over whole blocks of elements: hist[head value] += 1 (added to), and per block the
    sum of its head values (bsum) and the OR of its tail bits (blow), written for ceil(len(u) / block)
    blocks."""
    u = _uint_view(u, bits)
    nb = -(-len(u) // block)
    if len(hist) != 1 << head or len(bsum) < nb or len(blow) < nb or hist.dtype != np.int64 \
            or _lib.wp_plan_scan(u.ctypes.data, len(u), bits, head, tail, block, hist, bsum, blow):
        raise ValueError("planning arguments disagree")


def class_hist(u: np.ndarray, bits: int, head: int, tail: int, block: int, cls: np.ndarray, lut: np.ndarray,
               fine: np.ndarray) -> None:
    """Second planning pass: fine[class of the element's block, symbol of its head] += 1."""
    u = _uint_view(u, bits)
    nb = -(-len(u) // block)
    C, A = fine.shape
    cls = np.ascontiguousarray(cls, dtype=np.uint8)
    lut = np.ascontiguousarray(lut, dtype=np.int32)
    if len(cls) < nb or len(lut) != 1 << head or (nb and int(cls[:nb].max()) >= C) or int(lut.max()) >= A \
            or fine.dtype != np.int64 or not fine.flags.c_contiguous \
            or _lib.wp_class_hist(u.ctypes.data, len(u), bits, head, tail, block, cls, lut, A, fine):
        raise ValueError("planning arguments disagree")


def fields_split(u: np.ndarray, bits: int, sign: int, head: int, tail: int, block: int, bcls: np.ndarray,
                 btz: np.ndarray, C: int, lut: Optional[np.ndarray]):
    """A fields chunk's head symbols grouped by block class, in coding order (uint16), with each one's class
    (uint8) -- (None, None) without a lut -- and its tail part (a uint8 array). All three are per-thread work
    arrays, valid until the next call."""
    u = _uint_view(u, bits)
    m = len(u)
    bcls = np.ascontiguousarray(bcls, dtype=np.uint8)
    btz = np.ascontiguousarray(btz, dtype=np.uint8)
    sym = ctx = None
    if lut is not None:
        lut = np.ascontiguousarray(lut, dtype=np.int32)
        if len(lut) != 1 << head:
            raise ValueError("lut does not match the layout")
        sym, ctx = scratch("sym", m, np.uint16)[:m], scratch("ctx", m, np.uint8)[:m]
    cap = m * 8 + 64 if tail + sign else 1
    tail_buf = scratch("tail", cap, np.uint8)
    n = _lib.wp_fields_split(u.ctypes.data, m, bits, sign, head, tail, block, bcls, btz, len(bcls), C,
                             lut.ctypes.data if lut is not None else None,
                             sym.ctypes.data if sym is not None else None,
                             ctx.ctypes.data if ctx is not None else None, tail_buf.ctypes.data, len(tail_buf),
                             scratch("split", m if tail + sign else 1, np.uint64))
    if n < 0:
        raise ValueError("chunk arguments disagree")
    return sym, ctx, tail_buf[:n]


_magic: Optional[tuple] = None


def _division_table() -> tuple:
    """For every 15-bit frequency f (index f): magic, pre and post of its division (enc_tables)."""
    global _magic
    if _magic is None:
        f = np.arange(1 << SLOT_BITS, dtype=np.int64)
        f[0] = 1
        S = [55 + (int(d) - 1).bit_length() for d in f]
        magic = np.array([-(-(1 << s) // int(d)) for s, d in zip(S, f)], dtype=np.uint64)
        S = np.array(S, dtype=np.int64)
        _magic = (magic, np.maximum(0, 64 - S).astype(np.uint32), np.maximum(0, S - 64).astype(np.uint32))
    return _magic


def enc_tables(tables) -> np.ndarray:
    """Stored 15-bit tables (C rows of one alphabet) as the encoder reads them: per symbol its frequency f,
    cumulative frequency, and the division by f as a multiply (Granlund & Montgomery): for y < 2**55,
    y // f == (y * magic) >> S with S = 55 + l, 2**l >= f, magic = ceil(2**S / f) < 2**57, computed as
    mulhi(y << pre, magic) >> post (pre = 64 - S or 0, post = S - 64 or 0)."""
    f = np.asarray(tables, dtype=np.int64)
    if f.size and not (1 <= int(f.min()) and int(f.max()) < 1 << SLOT_BITS):
        raise ValueError("frequencies out of range")
    magic, pre, post = _division_table()
    tab = np.zeros(f.shape, _ENC_SYM)
    tab["f"] = f
    tab["c"] = np.cumsum(f, axis=1) - f
    tab["magic"], tab["pre"], tab["post"] = magic[f], pre[f], post[f]
    return tab


def lanes_encode(sym: np.ndarray, ctx: np.ndarray, lane: int, tab: np.ndarray) -> bytes:
    """entropy.lanes_encode of symbols whose runs of contexts are given element by element (ctx); tab from
    enc_tables. The payload is a per-thread work array, valid until the next call."""
    n = len(sym)
    if len(ctx) != n:
        raise ValueError("symbols and contexts disagree")
    nl = -(-n // lane)
    out = scratch("lanes_out", 4 * nl + 4 * (n + 2 * nl) + 8, np.uint8)
    size = _lib.wp_lanes_encode(np.ascontiguousarray(sym, np.uint16), np.ascontiguousarray(ctx, np.uint8), n, lane,
                                tab, tab.shape[0], tab.shape[1], scratch("lanes", 4 * (lane + 2), np.uint32), out,
                                len(out))
    if size < 0:
        raise ValueError("symbols outside their tables")
    return out[:size]
