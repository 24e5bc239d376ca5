"""A stream bound to its record (format 1.3): each chunk's decoded-data checksum (crc32) is seeded with the
tensor's and part's names and the chunk's index, so a stream, a chunk list or a chunk moved to another place
in the index fails its checksum when decoded, at no cost (the checksum is computed anyway)."""

from __future__ import annotations

import zlib
from typing import Optional


def binding(tensor: str, part: Optional[str]) -> int:
    """The seed of a stream: the crc32 of the tensor's name and the part's name (never 0)."""
    text = f"{tensor}\0{part or ''}".encode("utf-8", "surrogatepass")
    return zlib.crc32(text) or 1


def chunk_seed(seed: int, i: int) -> int:
    """The crc32 seed of chunk i's decoded data: 0 (a plain crc32) for streams written before format 1.3
    (seed 0); else the stream's seed and the chunk's index."""
    return zlib.crc32(i.to_bytes(8, "little"), seed) if seed else 0
