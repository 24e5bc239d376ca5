"""The `bytes` codec: a stream of raw bytes in chunks of BYTES_CHUNK, each grouped into byte planes (plane j =
byte j of every element) and stored raw or with zstd, whichever is smaller. Used for dtypes without a field
layout (wide integers, sub-byte floats); a `fields` stream codes a chunk this way where it is smaller
(`encode_planes`, `decode_planes`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ....dtypes import DTYPES
from ....errors import FormatError
from ...chunks import ChunkCode, Chunked, StreamParams, check_decoded, chunk_size, chunk_views, raw_crc, with_parts
from ...storage import compress_best, unstore

NAME = "bytes"
BYTES_CHUNK = 1 << 20  # bytes per chunk


def planes(nbits: int) -> int:
    """Byte planes of elements of `nbits` bits (one for sub-byte elements)."""
    return nbits // 8 if nbits >= 8 else 1


@dataclass
class Plan(Chunked):
    """Everything needed to code (and decode) the chunks of a stream of bytes."""

    dtype: str
    n: int  # bytes
    chunk: int  # bytes per chunk (whole elements)
    zstd_level: int = 3
    seed: int = 0  # the stream's binding (format 1.3; 0 before)
    codec: str = NAME
    unit: int = 1  # bytes per stream element

    @property
    def itemsize_bits(self) -> int:
        return DTYPES[self.dtype].bits


    def params(self) -> dict:
        return {"codec": NAME, "chunk": self.chunk}

    def side(self) -> bytes:
        return b""

    def for_chunks(self, first: int, last: int) -> "Plan":
        return self


def make_plan(dtype: str, numel: int, zstd_level: int) -> Plan:
    p = planes(DTYPES[dtype].bits)
    return Plan(dtype, DTYPES[dtype].nbytes(numel), max(p, (BYTES_CHUNK // p) * p), zstd_level)


def check_params(dtype: str, numel: int, params: dict, where: str) -> StreamParams:
    if dtype not in DTYPES:
        raise FormatError(f"{where}: unknown dtype {dtype!r}")
    chunk = chunk_size(params, where)
    if set(params) != {"codec", "chunk"}:
        raise FormatError(f"{where}: malformed stream parameters")
    return StreamParams(NAME, chunk)


def plan_from_record(dtype: str, numel: int, params: dict, side: bytes, where: str) -> Plan:
    p = check_params(dtype, numel, params, where)
    if len(side):
        raise FormatError(f"{where}: unexpected side information")
    return Plan(dtype, DTYPES[dtype].nbytes(numel), p.chunk)


def encode_planes(raw, nplanes: int, level: int, beat: Optional[int] = None) -> list:
    """A chunk's parts: its bytes as planes, raw or zstd (a level above zstd -3 only where it comes close
    to `beat` bytes, when given)."""
    a = np.frombuffer(raw, dtype=np.uint8)
    if nplanes > 1:
        a = np.ascontiguousarray(a.reshape(-1, nplanes).T)
    codec, data = compress_best(a.tobytes(), level, beat)
    return [("data", codec, data)]


def decode_planes(parts: tuple, payload, nbytes: int, nplanes: int, where: str) -> bytes:
    """Inverse of encode_planes: the chunk's `nbytes` bytes."""
    if len(parts) != 1 or parts[0].name != "data":
        raise FormatError(f"{where}: malformed parts for the bytes codec")
    raw = unstore(parts[0].codec, payload, nbytes, where)
    if nplanes > 1:
        a = np.frombuffer(raw, dtype=np.uint8).reshape(nplanes, -1)
        return np.ascontiguousarray(a.T).tobytes()
    return bytes(raw)


def encode_chunk(plan: Plan, i: int, u: np.ndarray) -> tuple[ChunkCode, bytes]:
    """Code chunk `i` (its bytes, as a uint8 array); returns record and payload."""
    return with_parts(NAME, raw_crc(u, plan.seed, i), encode_planes(u, planes(plan.itemsize_bits), plan.zstd_level))


def decode_chunk(plan: Plan, i: int, rec: ChunkCode, payload, where: str, into: Optional[np.ndarray] = None):
    """Chunk i's bytes, checked against their checksum."""
    chunk_views(rec, payload, where)
    if rec.codec != NAME:
        raise FormatError(f"{where}: unknown chunk codec {rec.codec!r}")
    a, b = plan.chunk_range(i)
    raw = decode_planes(rec.parts, payload, b - a, planes(plan.itemsize_bits), where)
    check_decoded(raw, plan.seed, i, rec, where)
    return raw
