"""What every codec's chunk record holds, read and written the same way (ChunkCode): named parts laid end to
end in the chunk's payload (`parts`: ChunkPart name, part codec, length), and the crc32 of the decoded bytes,
seeded with the stream's binding from format 1.3 (binding.py); the container adds the crc32 of the coded
payload and its place (index.Chunk)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from ..errors import FormatError
from .binding import chunk_seed
from .native import crc32

MAX_CHUNK = 1 << 22  # a reader refuses larger chunks: what one chunk may make it allocate is bounded


class Chunked:
    """A stream of n elements (bytes, for the bytes codec) coded in chunks of `chunk`, the last maybe shorter:
    what every codec's plan shares."""

    n: int
    chunk: int

    @property
    def nchunks(self) -> int:
        return -(-self.n // self.chunk)

    def chunk_range(self, i: int) -> tuple[int, int]:
        a = i * self.chunk
        return a, min(self.n, a + self.chunk)


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


class ChunkPart(NamedTuple):
    """One named part of a chunk's payload (the parts lie back to back in the order listed)."""

    name: str
    codec: str  # the part's own coding: raw, zstd, ans, lanes, const
    length: int

    def to_json(self) -> list:
        return [self.name, self.codec, self.length]


@dataclass(frozen=True, slots=True)
class ChunkCode:
    """A chunk as its codec codes it, before it has a place in the file: its codec, the crc32 of its decoded
    bytes and the parts of its payload. In the index it is an index.Chunk (which adds the blob)."""

    codec: str
    raw_crc: int
    parts: tuple[ChunkPart, ...]


def check_decoded(raw, seed: int, i: int, rec: ChunkCode, where: str) -> None:
    if raw_crc(raw, seed, i) != rec.raw_crc:
        raise FormatError(f"{where}: decoded data fails its checksum")


def payload_crc(payload) -> int:
    """The crc32 of a coded chunk as the container records it (computed where the chunk is coded)."""
    return crc32(payload)


def with_parts(codec: str, crc: int, parts: list) -> tuple[ChunkCode, bytes]:
    """The chunk's record with its parts [(name, part codec, data)] described, and its payload."""
    return (ChunkCode(codec, crc, tuple(ChunkPart(name, c, len(data)) for name, c, data in parts)),
            b"".join(data for _, _, data in parts))


def chunk_views(rec: ChunkCode, payload, where: str) -> dict:
    """The named parts of a chunk: name -> (part codec, bytes), checked against the payload's length."""
    if sum(p.length for p in rec.parts) != len(payload):
        raise FormatError(f"{where}: malformed chunk parts")
    views, off = {}, 0
    for name, codec, ln in rec.parts:
        views[name] = (codec, payload[off:off + ln])
        off += ln
    return views
