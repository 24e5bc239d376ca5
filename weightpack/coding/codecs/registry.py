"""The codec registry: the container's codec name -> the codec (its folder's codec.py), and the calls every
stream goes through whatever its codec.

A codec is a module with (the `Codec` protocol):
    NAME                                   its name in the container's stream parameters and chunk records
    check_params(dtype, numel, params, where) -> StreamParams    validate a stream's parameters (the reader)
    plan_from_record(dtype, numel, params, side, where) -> plan  the plan a stream's record describes
    encode_chunk(plan, i, elements) -> (chunk record, payload)
    decode_chunk(plan, i, rec, payload, where, into=None) -> the chunk's raw bytes, checksum checked
and a plan with `codec`, `n`, `chunk`, `nchunks`, `chunk_range(i)`, `unit` (bytes per element),
`itemsize_bits`, `seed`, `params()`, `side()` and `for_chunks(first, last)`. How a plan is made is the
codec's own (fields.codec.make_plan for raw tensors, which may choose bytes; trellis.codec.make_plan for tcq
levels). Rebuilding streams on a device is in each codec's device.py (device_codecs.py maps them).
"""

from __future__ import annotations

from typing import Optional, Protocol, Union

import numpy as np

from ...errors import FormatError
from ..chunks import StreamParams
from .bytes import codec as bytes_codec
from .fields import codec as fields_codec
from .trellis import codec as trellis_codec


class Codec(Protocol):
    NAME: str

    def check_params(self, dtype: str, numel: int, params: dict, where: str) -> StreamParams: ...

    def plan_from_record(self, dtype: str, numel: int, params: dict, side: bytes, where: str): ...

    def encode_chunk(self, plan, i: int, u: np.ndarray) -> tuple[dict, bytes]: ...

    def decode_chunk(self, plan, i: int, rec: dict, payload, where: str, into: Optional[np.ndarray] = None): ...


Plan = Union[fields_codec.Plan, bytes_codec.Plan, trellis_codec.LevelPlan]
CODECS: dict[str, Codec] = {c.NAME: c for c in (fields_codec, bytes_codec, trellis_codec)}


def _codec(params, where: str) -> Codec:
    if not isinstance(params, dict) or not isinstance(params.get("codec"), str) or params["codec"] not in CODECS:
        raise FormatError(f"{where}: unknown stream codec")
    return CODECS[params["codec"]]


def check_params(dtype: str, numel: int, params, where: str) -> StreamParams:
    """Validate a stream's parameters against its tensor's dtype and size (types, ranges, consistency)."""
    return _codec(params, where).check_params(dtype, numel, params, where)


def plan_from_record(dtype: str, numel: int, params, side: bytes, where: str):
    """Rebuild a stream's plan from a container record, validating everything before allocating."""
    return _codec(params, where).plan_from_record(dtype, numel, params, side, where)


def encode_chunk(plan, i: int, u: np.ndarray) -> tuple[dict, bytes]:
    """Code chunk `i` of a stream (its elements as a raw uint array: bytes for the bytes codec)."""
    return CODECS[plan.codec].encode_chunk(plan, i, u)


def decode_chunk(plan, i: int, rec: dict, payload, where: str, into: Optional[np.ndarray] = None):
    """Decode one chunk's payload back to its raw bytes (bytes-like), checking its checksum; into `into` (a
    uint8 array of the chunk's size) when given, which is then returned."""
    raw = CODECS[plan.codec].decode_chunk(plan, i, rec, payload, where, into)
    if into is not None and raw is not into:
        if len(raw) != len(into):
            raise FormatError(f"{where}: decoded {len(raw)} bytes, expected {len(into)}")
        into[:] = np.frombuffer(raw, np.uint8)
        return into
    return raw
