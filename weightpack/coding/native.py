"""The compiled CPU kernels (weightpack/_native.c): the one loader, and the one place that chooses the CPU
backend.

Two backends code the same bytes on the CPU: "native" (the kernels, called through ctypes, which releases
the GIL while they run) and "numpy" (constriction and numpy). `backend()` says which one is in use; each
codec (coding/codecs/*/) keeps its implementations for both side by side and takes the one `select` picks,
so no other module asks whether the kernels are built.

The extension is built when the package is installed (setuptools, `optional`: without a C compiler the
install still succeeds). Where it is missing or WEIGHTPACK_NO_NATIVE is set, the backend is "numpy";
`enabled(flag)` switches backends for a block (tests and benchmarks run both on the same bytes).

The ctypes wrappers live beside the code that calls them (coding/entropy_native.py for the ANS lanes,
each codec's native.py for its own kernels). Each wrapper checks the sizes it passes against each other, so
that the kernels' reads and writes stay inside the arrays whatever the container holds.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import threading
import zlib
from contextlib import contextmanager
from typing import Iterator, Optional

import numpy as np


_lib: Optional[ctypes.CDLL] = None
_tried = False
_use = True


def _arr(dtype):
    return np.ctypeslib.ndpointer(dtype=dtype, flags="C_CONTIGUOUS")


_I64 = ctypes.c_int64
ENC_SYM = np.dtype([("f", "<u4"), ("c", "<u4"), ("magic", "<u8"), ("pre", "<u4"), ("post", "<u4")])  # EncSym
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
    "wp_lanes_encode": (_I64, [_arr(np.uint16), _arr(np.uint8), _I64, _I64, _arr(ENC_SYM), _I64, _I64,
                               _arr(np.uint32), _arr(np.uint8), _I64]),
    "wp_fields_split": (_I64, [ctypes.c_void_p, _I64, _I64, _I64, _I64, _I64, _I64, _arr(np.uint8), _arr(np.uint8),
                               _I64, _I64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, _I64,
                               _arr(np.uint64)]),
    "wp_lanes_fast": (_I64, [ctypes.c_void_p, _I64, _arr(np.int64), _I64, _arr(np.int64), _I64, _arr(np.uint16),
                             _arr(np.uint32), _I64, _I64, _arr(np.uint16)]),
    "wp_simd": (_I64, [_I64]),
    "wp_crc32": (ctypes.c_uint32, [ctypes.c_void_p, _I64, ctypes.c_uint32]),
    "wp_fields_join": (_I64, [_arr(np.uint16), _I64, _arr(np.uint64), _I64, _arr(np.uint8), _arr(np.uint8), _I64,
                              _I64, _I64, _arr(np.int64), ctypes.c_void_p, _I64, _I64, _I64, _I64, ctypes.c_void_p]),
    "wp_fields_decode": (_I64, [ctypes.c_void_p, _I64, _I64, ctypes.c_void_p, _I64, _I64, ctypes.c_void_p,
                                ctypes.c_void_p, _I64, _I64, _I64, ctypes.c_void_p, ctypes.c_void_p, _I64,
                                ctypes.c_void_p, _I64, _I64, _I64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint32,
                                ctypes.POINTER(ctypes.c_uint32)]),
    "wp_sample_counts": (None, [ctypes.c_void_p, _I64, _I64, _I64, _I64, _arr(np.int64)]),
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
    """Whether the codecs use the compiled kernels (they are built and loaded, and not switched off)."""
    return _load() is not None and _use


def backend() -> str:
    """The CPU backend in use: "native" (the compiled kernels) or "numpy" (constriction and numpy)."""
    return "native" if available() else "numpy"


def select(impls: dict):
    """The implementation of the backend in use, from {"numpy": ..., "native": ...}."""
    return impls[backend()]


def lib() -> ctypes.CDLL:
    """The loaded kernels (only called by the native implementations, which `select` picks only when
    they are available)."""
    return _lib


@contextmanager
def enabled(flag: bool) -> Iterator[None]:
    """Inside the block the codecs use the compiled kernels (flag True; they must be built) or
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


def crc32(data, value: int = 0) -> int:
    """zlib.crc32(data, value): with carry-less multiplication where the kernels are built (~17 GB/s with
    AVX-512 here, against zlib's ~1-3), else zlib's."""
    lib = _load()
    if lib is None:
        return zlib.crc32(data, value)
    if isinstance(data, bytes):
        return lib.wp_crc32(data, len(data), value)
    buf = np.frombuffer(data, np.uint8)
    return lib.wp_crc32(buf.ctypes.data, len(buf), value)


_scratch = threading.local()


def scratch(name: str, n: int, dtype) -> np.ndarray:
    """A work array of at least n elements, kept per thread and reused (fresh large arrays cost page faults,
    which also serialize threads)."""
    a = getattr(_scratch, name, None)
    if a is None or len(a) < n or a.dtype != dtype:
        a = np.empty(max(n, 1), dtype)
        setattr(_scratch, name, a)
    return a


def uint_view(u: np.ndarray, bits: int) -> np.ndarray:
    """u as a contiguous array of unsigned `bits`-bit elements (ValueError if it is not one)."""
    u = np.ascontiguousarray(u)
    if u.dtype.itemsize * 8 != bits or u.dtype.kind != "u":
        raise ValueError("elements do not match the layout's width")
    return u
