"""What every codec's chunk record holds, read and written the same way: named parts laid end to end in the
chunk's payload (`parts`: [name, part codec, length]), the crc32 of the coded payload, and the crc32 of the
decoded bytes, seeded with the stream's binding from format 1.3 (binding.py)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import FormatError
from .binding import chunk_seed
from .native import crc32

MAX_CHUNK = 1 << 22  # a reader refuses larger chunks: what one chunk may make it allocate is bounded


@dataclass(frozen=True)
class StreamParams:
    """A stream's parameters as validated by its codec's check_params (codecs add their own fields)."""

    codec: str
    chunk: int  # elements (bytes for the bytes codec) per chunk


def chunk_size(params: dict, where: str) -> int:
    """The `chunk` parameter of a stream, checked against MAX_CHUNK."""
    chunk = params.get("chunk")
    if type(chunk) is not int or not 1 <= chunk <= MAX_CHUNK:
        raise FormatError(f"{where}: chunk size out of range")
    return chunk


def raw_crc(raw, seed: int, i: int) -> int:
    """The crc32 of chunk i's decoded bytes, seeded with its stream's binding (0 before format 1.3)."""
    return crc32(raw, chunk_seed(seed, i))


def check_decoded(raw, seed: int, i: int, rec: dict, where: str) -> None:
    if raw_crc(raw, seed, i) != rec.get("raw_crc"):
        raise FormatError(f"{where}: decoded data fails its checksum")


def payload_crc(payload) -> int:
    """The crc32 of a coded chunk as the container records it (computed where the chunk is coded)."""
    return crc32(payload)


def with_parts(rec: dict, parts: list) -> tuple[dict, bytes]:
    """The chunk record with its parts [(name, part codec, data)] described, and its payload."""
    rec["parts"] = [[name, codec, len(data)] for name, codec, data in parts]
    return rec, b"".join(data for _, _, data in parts)


def chunk_views(rec: dict, payload, where: str) -> dict:
    """The named parts of a chunk: name -> (part codec, bytes), checked against the payload's length."""
    parts = rec.get("parts")
    if not isinstance(parts, list) or not all(
        isinstance(p, list) and len(p) == 3 and isinstance(p[0], str) and isinstance(p[1], str)
        and type(p[2]) is int and p[2] >= 0 for p in parts
    ) or sum(p[2] for p in parts) != len(payload):
        raise FormatError(f"{where}: malformed chunk parts")
    views, off = {}, 0
    for name, codec, ln in parts:
        views[name] = (codec, payload[off:off + ln])
        off += ln
    return views
