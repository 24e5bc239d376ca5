"""Coded bytes stored raw or with zstd, whichever is smaller, with trials only where a sample says zstd can
win: shared by the codecs (byte planes, packed tails, side information) and by carried files."""

from __future__ import annotations

import threading
from typing import Callable, Optional

import numpy as np
import zstandard

from ..errors import FormatError
from . import native

_compressors = threading.local()


def zstd(data: bytes, level: int) -> bytes:
    """zstd at `level`, with a compressor kept per thread and level (making one costs more than a chunk)."""
    by_level = getattr(_compressors, "by_level", None)
    if by_level is None:
        by_level = _compressors.by_level = {}
    c = by_level.get(level)
    if c is None:
        c = by_level[level] = zstandard.ZstdCompressor(level=level)
    return c.compress(data)


def unzstd(data, expected: int, where: str) -> bytes:
    """Decompress a zstd frame that must hold exactly `expected` bytes (checked before allocating), with a
    decompressor kept per thread."""
    try:
        size = zstandard.frame_content_size(data)
    except zstandard.ZstdError:
        raise FormatError(f"{where}: damaged zstd data") from None
    if size != expected:
        raise FormatError(f"{where}: zstd data declares {size} bytes, expected {expected}")
    d = getattr(_compressors, "decompressor", None)
    if d is None:
        d = _compressors.decompressor = zstandard.ZstdDecompressor()
    try:
        out = d.decompress(data, max_output_size=expected)
    except zstandard.ZstdError:
        raise FormatError(f"{where}: damaged zstd data") from None
    if len(out) != expected:
        raise FormatError(f"{where}: zstd data decodes to {len(out)} bytes, expected {expected}")
    return out


# A trial compression costs as much as the rest of a chunk's coding and rarely wins on weights (the byte
# planes of a chunk; its packed tails), so long data is first measured on a sample of PROBE_PIECES pieces
# spread over it: the order-0 entropy of each byte plane (what zstd's entropy stage can reach, a little
# optimistic) and zstd -1 of the sample (which sees repeats, where LZ matching wins). The trial is made
# where either says it can win; a level above FAST_ZSTD only where FAST_ZSTD comes close.
PROBE_PIECES, PROBE_PIECE = 8, 4096
PROBE_MIN = 4 * PROBE_PIECES * PROBE_PIECE
ENTROPY_SLACK = 1.0  # order-0 estimate against what must be beaten (zstd stays above its order-0 entropy)
REPEATS = 0.9  # zstd -1 of the sample below this share of its order-0 entropy: repeats, try LZ
BYTES_SLACK = 0.02  # a slow level is tried when zstd -3 of the whole comes within this of what it must beat
SKEWED = 0.998  # tails whose order-0 entropy is below this share of their size are compressed at the level's own
FAST_ZSTD = 3
BYTES_SLOW_ZSTD = 12  # the slow level of a trial against a known size (zstd -19 costs 5x more for ~0.3%)


def _sample(data, pieces: int = PROBE_PIECES, piece: int = PROBE_PIECE) -> bytes:
    step = len(data) // pieces
    return b"".join(bytes(data[k * step:k * step + piece]) for k in range(pieces))


def _order0_bytes(counts: np.ndarray, n: int) -> float:
    """Order-0 entropy, in bytes, of rows of n bytes, summed, from their byte counts (256 per row)."""
    c = counts[counts > 0].astype(np.float64)
    return float(-(c * np.log2(c / n)).sum()) / 8


def _sample_counts_numpy(data, planes: int, piece: int) -> np.ndarray:
    sample = np.frombuffer(_sample(data, PROBE_PIECES, piece), np.uint8).reshape(-1, planes).T
    return np.bincount((sample + np.arange(0, 256 * planes, 256, dtype=np.int64)[:, None]).ravel(),
                       minlength=256 * planes)


def _sample_counts_native(data, planes: int, piece: int) -> np.ndarray:
    counts = np.zeros(256 * planes, np.int64)
    buf = np.frombuffer(data, np.uint8)
    native.lib().wp_sample_counts(buf.ctypes.data, len(buf), planes, PROBE_PIECES, piece, counts)
    return counts


def _sample_counts(data, planes: int, piece: int) -> np.ndarray:
    """The byte counts of each plane of the sample _sample takes (256 per plane, plane by plane): in one pass
    by the compiled kernels (no copy of the sample), or with numpy."""
    return native.select({"numpy": _sample_counts_numpy, "native": _sample_counts_native})(data, planes, piece)


def _estimates(data, planes: int) -> tuple[float, Callable[[], float]]:
    """Estimates of zstd's size for long data, from a sample: its order-0 entropy per plane (bytes), and a
    function giving zstd -1 of the sample, scaled (it sees repeats)."""
    piece = PROBE_PIECE - PROBE_PIECE % planes
    size = PROBE_PIECES * piece
    scale = len(data) / size

    def lz() -> float:
        sample = np.frombuffer(_sample(data, PROBE_PIECES, piece), np.uint8).reshape(-1, planes).T
        return len(zstd(np.ascontiguousarray(sample).tobytes(), 1)) * scale

    return _order0_bytes(_sample_counts(data, planes, piece), size // planes) * scale, lz


def may_win(data, planes: int, beat: float) -> bool:
    """Whether zstd may code `data` (`planes` interleaved byte planes, grouped into planes before coding when
    planes > 1) in fewer than `beat` bytes: always for short data, else by a sample's estimates."""
    if len(data) < PROBE_MIN:
        return True
    entropy, lz = _estimates(data, planes)
    if entropy < beat * ENTROPY_SLACK:
        return True
    lz = lz()
    return lz < entropy * REPEATS and lz < beat * ENTROPY_SLACK / REPEATS


def compress_best(data: bytes, level: int, beat: Optional[int] = None) -> tuple[str, bytes]:
    """('zstd', frame) when zstd makes `data` smaller, else ('raw', data). With `beat`, a level above
    FAST_ZSTD is tried only where FAST_ZSTD comes within BYTES_SLACK of `beat` bytes."""
    z = zstd(data, min(level, FAST_ZSTD) if beat is not None else level)
    if beat is not None and level > FAST_ZSTD and len(z) < beat * (1 + BYTES_SLACK):
        slow = zstd(data, min(level, BYTES_SLOW_ZSTD))
        z = slow if len(slow) < len(z) else z
    return ("zstd", z) if len(z) < len(data) else ("raw", data)


def compress_tail(data: bytes, level: int) -> tuple[str, bytes]:
    """compress_best of a chunk's packed tails where a sample says zstd may make them smaller; a level above
    FAST_ZSTD only where the tails are not near-uniform (their order-0 entropy below SKEWED of their size)
    or FAST_ZSTD saves anything."""
    if len(data) < PROBE_MIN:
        return compress_best(data, level)
    entropy, lz = _estimates(data, 1)
    if entropy < len(data) * SKEWED:
        return compress_best(data, level)
    if entropy < len(data) or lz() < entropy * REPEATS:
        return compress_best(data, level, len(data) / (1 + BYTES_SLACK))
    return "raw", data


def unstore(codec: str, data, expected: int, where: str) -> bytes:
    if codec == "raw":
        if len(data) != expected:
            raise FormatError(f"{where}: raw part holds {len(data)} bytes, expected {expected}")
        return data
    if codec == "zstd":
        return unzstd(data, expected, where)
    raise FormatError(f"{where}: unknown part codec {codec!r}")
