"""The container's index as typed values (docs/FORMAT.md, "The index").

Each type reads its JSON with `from_json(obj, ..., where)`, which checks every structural claim the format
makes (types, ranges, offsets inside the file, chunk counts, parts that match the stages, file headers that
match the tensor records) and raises a one-line FormatError ("index: WHERE: WHAT") on the first that fails;
`to_json()` gives back the JSON the writer writes, key for key and in the same order (so a container's bytes
do not depend on how its index was built). The reader (container.ContainerReader) returns an `Index`; the
writer (pipeline.py) builds the records through the same types. Keys a type does not know are kept in its
`extra` and written back after the known ones (the top-level "tied" of weightpack.torch is one).

Codec-specific stream parameters (`Stream.params`) and stage parameters (`TensorRecord.stages`) stay JSON
objects: each belongs to its codec (coding/codecs/registry.py) or stage (stages/params.py), which validate
them; the low-rank note (`TensorRecord.lowrank`) is recorded for information and not read back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from .checkpoint import check_relative_name, is_text, validate_header
from .coding.chunks import ChunkCode, ChunkPart
from .coding.codecs.registry import check_params
from .dtypes import DTYPES
from .errors import CheckpointError, FormatError
from .stages.params import chain_parts, params_of

# the format this writer writes (a reader reads any 1.x); 1.3: chunks' decoded-data checksums are bound to their
# stream (coding/binding.py)
VERSION = (1, 3)
FIRST_BLOB = 16  # no blob starts before the end of the container's 16-byte header (container.HEADER)
TRAILER_BYTES = 32  # the container's trailer (container.TRAILER), after the last blob and the index
CHUNK_CODECS = ("fields", "bytes", "trellis")
SOURCE_KINDS = ("file", "sharded", "folder")


def _fail(where: str, what: str):
    raise FormatError(f"index: {where}: {what}")


def _get(d: Any, key: str, typ, where: str):
    if not isinstance(d, dict) or key not in d:
        _fail(where, f"missing {key!r}")
    v = d[key]
    ok = (type(v) is int) if typ is int else isinstance(v, typ)
    if not ok:
        _fail(where, f"{key!r} has the wrong type")
    if typ is str and not is_text(v):
        _fail(where, f"{key!r} is not valid UTF-8 text")
    return v


def _where(name: str) -> str:
    """A tensor as validation messages name it (escaped where it is not printable)."""
    return f"tensor {ascii(name)[1:-1]!r}" if not name.isprintable() else f"tensor {name!r}"


def _finite(v) -> bool:
    """A JSON number that fits a float (JSON integers have no bound)."""
    if type(v) is int:
        return abs(v) < 1 << 1000
    return type(v) is float and math.isfinite(v)


def _extra(obj: dict, known: frozenset) -> dict:
    """The keys of a JSON object that its type does not know (kept, and written back)."""
    return {k: v for k, v in obj.items() if k not in known}


def _with_extra(out: dict, extra: dict) -> dict:
    out.update(extra)
    return out


@dataclass(frozen=True, slots=True)
class BlobRef:
    """The bytes [offset, offset + length) of the container, whose zlib crc32 is `crc32`."""

    offset: int
    length: int
    crc32: int

    @classmethod
    def from_json(cls, obj: Any, limit: int, where: str) -> "BlobRef":
        """`limit`: where the blobs end (the file's size less its trailer)."""
        off = _get(obj, "offset", int, where)
        ln = _get(obj, "length", int, where)
        crc = _get(obj, "crc32", int, where)
        if off < FIRST_BLOB or ln < 0 or off + ln > limit:
            _fail(where, "offset or length outside the file")
        return cls(off, ln, crc)

    def to_json(self) -> dict:
        return {"offset": self.offset, "length": self.length, "crc32": self.crc32}


def _parts(parts: Any) -> Optional[tuple[ChunkPart, ...]]:
    """A chunk's parts from JSON, or None when malformed."""
    if not isinstance(parts, list) or not all(
        isinstance(p, list) and len(p) == 3 and isinstance(p[0], str) and isinstance(p[1], str)
        and type(p[2]) is int and p[2] >= 0 for p in parts
    ):
        return None
    return tuple(ChunkPart(*p) for p in parts)


_CHUNK_KEYS = frozenset(("codec", "raw_crc", "parts", "offset", "length", "crc32"))


@dataclass(frozen=True, slots=True)
class Chunk:
    """A coded chunk of a stream: a ChunkCode (coding/chunks.py: what its codec wrote) at a blob of the file."""

    codec: str
    raw_crc: int
    parts: tuple[ChunkPart, ...]
    offset: int
    length: int
    crc32: int
    extra: dict = field(default_factory=dict)

    @property
    def blob(self) -> BlobRef:
        return BlobRef(self.offset, self.length, self.crc32)

    @classmethod
    def placed(cls, code: ChunkCode, blob: BlobRef) -> "Chunk":
        """A chunk's record once its payload is written at `blob`."""
        return cls(code.codec, code.raw_crc, code.parts, blob.offset, blob.length, blob.crc32)

    @classmethod
    def from_json(cls, obj: Any, limit: int, where: str) -> "Chunk":
        ref = BlobRef.from_json(obj, limit, where)
        raw_crc = _get(obj, "raw_crc", int, where)
        codec = _get(obj, "codec", str, where)
        if codec not in CHUNK_CODECS:
            _fail(where, "unknown codec")
        parts = _parts(_get(obj, "parts", list, where))
        if parts is None or sum(p.length for p in parts) != ref.length:
            _fail(where, "malformed parts")
        return cls(codec, raw_crc, parts, ref.offset, ref.length, ref.crc32, _extra(obj, _CHUNK_KEYS))

    def to_json(self) -> dict:
        return _with_extra({"codec": self.codec, "raw_crc": self.raw_crc, "parts": [p.to_json() for p in self.parts],
                            "offset": self.offset, "length": self.length, "crc32": self.crc32}, self.extra)


_STREAM_KEYS = frozenset(("params", "side", "chunks"))


@dataclass(frozen=True)
class Stream:
    """A tensor's (or part's) coded bytes: the codec's parameters (a JSON object its codec validates and
    reads: coding/codecs/), its side information (fields, trellis) and its chunks."""

    params: dict
    side: Optional[BlobRef]
    chunks: tuple[Chunk, ...]
    extra: dict = field(default_factory=dict)

    @property
    def codec(self) -> str:
        return self.params["codec"]

    @property
    def chunk(self) -> int:
        """Elements (bytes for the bytes codec) per chunk."""
        return self.params["chunk"]

    @classmethod
    def from_json(cls, obj: Any, dtype: str, numel: int, limit: int, w: str) -> "Stream":
        params = _get(obj, "params", dict, w)
        p = check_params(dtype, numel, params, w)
        side = obj.get("side")
        if (side is not None) != (p.codec in ("fields", "trellis")):
            _fail(w, "side information missing or unexpected")
        side_ref = BlobRef.from_json(side, limit, w + " side information") if side is not None else None
        chunks = _get(obj, "chunks", list, w)
        n = numel if p.codec != "bytes" else DTYPES[dtype].nbytes(numel)
        if len(chunks) != -(-n // p.chunk):
            _fail(w, f"{len(chunks)} chunks recorded, {-(-n // p.chunk)} expected")
        return cls(params, side_ref, tuple(Chunk.from_json(ch, limit, f"{w} chunk {k}") for k, ch in enumerate(chunks)),
                   _extra(obj, _STREAM_KEYS))

    def to_json(self) -> dict:
        return _with_extra({"params": self.params, "side": self.side.to_json() if self.side is not None else None,
                            "chunks": [c.to_json() for c in self.chunks]}, self.extra)


_PART_KEYS = frozenset(("name", "dtype", "shape", "stream"))


@dataclass(frozen=True)
class Part:
    """One coded output of a tensor's lossy stages (`q`, `scale`, ...), with its own stream."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    stream: Stream
    extra: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return DTYPES[self.dtype].nbytes(math.prod(self.shape))

    def to_json(self) -> dict:
        return _with_extra({"name": self.name, "dtype": self.dtype, "shape": list(self.shape),
                            "stream": self.stream.to_json()}, self.extra)


@dataclass(frozen=True)
class Quality:
    """What a lossy tensor's reconstruction costs, measured at pack time (None: no error / no signal)."""

    sqnr_db: Optional[float]
    rel_error: Optional[float]

    @classmethod
    def from_json(cls, obj: Any, where: str) -> "Quality":
        if not isinstance(obj, dict) or set(obj) != {"sqnr_db", "rel_error"} or not all(
                v is None or _finite(v) for v in obj.values()):
            _fail(where, "malformed quality")
        return cls(obj["sqnr_db"], obj["rel_error"])

    def to_json(self) -> dict:
        return {"sqnr_db": self.sqnr_db, "rel_error": self.rel_error}


_TENSOR_KEYS = frozenset(("name", "file", "dtype", "shape", "nbytes", "sha256", "stages", "stream",
                          "decoded_sha256", "quality", "parts", "lowrank"))


@dataclass(frozen=True)
class TensorRecord:
    """A tensor: where it belongs (`file`: an index into Index.files), what it is, the SHA-256 of its
    original bytes, and either its `stream` (no stages) or its lossy `stages` (JSON objects: stages/params.py)
    with the hash and quality of their reconstruction and one Part per output."""

    name: str
    file: int
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    sha256: str
    stages: list = field(default_factory=list)
    stream: Optional[Stream] = None
    decoded_sha256: Optional[str] = None
    quality: Optional[Quality] = None
    parts: tuple[Part, ...] = ()
    lowrank: Optional[dict] = None  # what a low-rank stage decided (for information)
    extra: dict = field(default_factory=dict)

    @property
    def where(self) -> str:
        """How messages name the tensor."""
        return f"tensor {self.name!r}"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def chain(self) -> list:
        """The stage chain as stage parameters (stages/params.py)."""
        return params_of(self.stages, self.dtype, self.shape, self.where)

    def streams(self) -> list[tuple[str, Stream]]:
        """The tensor's streams, labelled: its own, or one per part."""
        if self.stages:
            return [(f"part {x.name!r}", x.stream) for x in self.parts]
        return [("", self.stream)]

    def blob_refs(self) -> list[tuple[str, BlobRef]]:
        """Every blob of the tensor, with a label: for checksum checks."""
        out = []
        for label, st in self.streams():
            prefix = label + " " if label else ""
            if st.side is not None:
                out.append((prefix + "side information", st.side))
            out += [(f"{prefix}chunk {k}", ch.blob) for k, ch in enumerate(st.chunks)]
        return out

    @classmethod
    def from_json(cls, t: Any, nfiles: int, limit: int) -> "TensorRecord":
        name = _get(t, "name", str, "tensor")
        w = _where(name)
        fi = _get(t, "file", int, w)
        if not 0 <= fi < nfiles:
            _fail(w, "file number out of range")
        dtype = _get(t, "dtype", str, w)
        if dtype not in DTYPES:
            _fail(w, f"unknown dtype {dtype!r}")
        shape = _get(t, "shape", list, w)
        if not all(type(d) is int and 0 <= d < 1 << 48 for d in shape) or len(shape) > 64:
            _fail(w, "malformed shape")
        numel = math.prod(shape)
        nbytes = _get(t, "nbytes", int, w)
        if nbytes != DTYPES[dtype].nbytes(numel) or nbytes > 1 << 48:
            _fail(w, "nbytes does not match dtype and shape")
        sha = _get(t, "sha256", str, w)
        stages = _get(t, "stages", list, w)
        rec = dict(name=name, file=fi, dtype=dtype, shape=tuple(shape), nbytes=nbytes, sha256=sha, stages=stages,
                   lowrank=t.get("lowrank"), extra=_extra(t, _TENSOR_KEYS))
        if not stages:
            return cls(stream=Stream.from_json(_get(t, "stream", dict, w), dtype, numel, limit, w), **rec)
        chain = params_of(stages, dtype, shape, w)
        decoded = _get(t, "decoded_sha256", str, w)
        quality = Quality.from_json(_get(t, "quality", dict, w), w)
        specs = chain_parts(chain, shape)
        parts = _get(t, "parts", list, w)
        if [_get(x, "name", str, w) for x in parts] != list(specs):
            _fail(w, "parts do not match the stages")
        typed = []
        for x in parts:
            pw = f"{w} part {x['name']!r}"
            pdtype, pshape = specs[x["name"]]
            got = _get(x, "shape", list, pw)
            if _get(x, "dtype", str, pw) != pdtype or not all(type(d) is int for d in got) or got != pshape:
                _fail(pw, "dtype or shape does not match the stages")
            stream = Stream.from_json(_get(x, "stream", dict, pw), pdtype, math.prod(pshape), limit, pw)
            typed.append(Part(x["name"], pdtype, tuple(pshape), stream, _extra(x, _PART_KEYS)))
        return cls(decoded_sha256=decoded, quality=quality, parts=tuple(typed), **rec)

    def to_json(self) -> dict:
        out = {"name": self.name, "file": self.file, "dtype": self.dtype, "shape": list(self.shape),
               "nbytes": self.nbytes, "sha256": self.sha256, "stages": self.stages}
        if self.stream is not None:
            out["stream"] = self.stream.to_json()
        if self.decoded_sha256 is not None:
            out["decoded_sha256"] = self.decoded_sha256
        if self.quality is not None:
            out["quality"] = self.quality.to_json()
        if self.stages:
            out["parts"] = [p.to_json() for p in self.parts]
        if self.lowrank is not None:
            out["lowrank"] = self.lowrank
        return _with_extra(out, self.extra)


def _output_name(entry: Any, seen: set[str], where: str) -> str:
    """A file name unpack will write: safe (relative, no '..') and not listed before."""
    name = _get(entry, "name", str, where)
    try:
        check_relative_name(name, "index")
    except CheckpointError as e:
        raise FormatError(str(e)) from None
    if name in seen:
        _fail(f"{where} {name}", "listed twice")
    seen.add(name)
    return name


_FILE_KEYS = frozenset(("name", "header"))


@dataclass(frozen=True)
class SourceFile:
    """A safetensors file of the source: its relative name and its JSON header, verbatim."""

    name: str
    header: str
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return _with_extra({"name": self.name, "header": self.header}, self.extra)


_CARRIED_KEYS = frozenset(("name", "size", "sha256", "codec", "blob"))


@dataclass(frozen=True)
class CarriedFile:
    """A non-tensor file of the source (config, tokenizer, ...), stored raw or as one zstd frame."""

    name: str
    size: int
    sha256: str
    codec: str
    blob: BlobRef
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return _with_extra({"name": self.name, "size": self.size, "sha256": self.sha256, "codec": self.codec,
                            "blob": self.blob.to_json()}, self.extra)


_INDEX_KEYS = frozenset(("format", "version", "source", "recipe", "files", "carried", "tensors"))


@dataclass(frozen=True)
class Index:
    """A container's index. `source_kind` is "file", "sharded" or "folder"; `recipe` is the packer's recipe
    (recipe.Recipe.to_json: for information); `extra` holds the optional top-level keys ("tied")."""

    version: tuple[int, int]
    source_kind: str
    recipe: dict
    files: tuple[SourceFile, ...]
    carried: tuple[CarriedFile, ...]
    tensors: tuple[TensorRecord, ...]
    extra: dict = field(default_factory=dict)
    source_extra: dict = field(default_factory=dict)

    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @classmethod
    def from_json(cls, index: dict, file_size: int) -> "Index":
        """Check every structural claim of the index against the file (of `file_size` bytes, trailer
        included) before anything is read."""
        limit = file_size - TRAILER_BYTES
        if index.get("format") != "weightpack":
            _fail("top", "not a weightpack index")
        version = _get(index, "version", list, "top")
        if len(version) != 2 or not all(type(v) is int for v in version) or version[0] != VERSION[0]:
            _fail("top", "malformed version")
        source = _get(index, "source", dict, "top")
        kind = _get(source, "kind", str, "source")
        if kind not in SOURCE_KINDS:
            _fail("source", "unknown kind")
        recipe = _get(index, "recipe", dict, "top")
        if "name" in recipe:
            _get(recipe, "name", str, "recipe")
        files_json = _get(index, "files", list, "top")
        names_seen: set[str] = set()
        files = []
        for i, f in enumerate(files_json):
            name = _output_name(f, names_seen, f"file {i}")
            files.append(SourceFile(name, _get(f, "header", str, f"file {name}"), _extra(f, _FILE_KEYS)))
        carried = []
        for c in _get(index, "carried", list, "top"):
            name = _output_name(c, names_seen, "carried file")
            size = _get(c, "size", int, name)
            if size < 0 or size > 1 << 40:
                _fail(name, "size out of range")
            sha = _get(c, "sha256", str, name)
            codec = _get(c, "codec", str, name)
            if codec not in ("raw", "zstd"):
                _fail(name, "unknown codec")
            blob = BlobRef.from_json(_get(c, "blob", dict, name), limit, name)
            carried.append(CarriedFile(name, size, sha, codec, blob, _extra(c, _CARRIED_KEYS)))
        tensors, tensor_names = [], set()
        for t in _get(index, "tensors", list, "top"):
            name = _get(t, "name", str, "tensor")
            if name in tensor_names:
                _fail(_where(name), "listed twice")
            tensor_names.add(name)
            tensors.append(TensorRecord.from_json(t, len(files), limit))
        out = cls(tuple(version), kind, recipe, tuple(files), tuple(carried), tuple(tensors),
                  _extra(index, _INDEX_KEYS), _extra(source, frozenset(("kind",))))
        out._check_headers()
        return out

    def _check_headers(self) -> None:
        """Each safetensors header must describe exactly the tensors recorded for its file."""
        by_file: dict[int, dict[str, TensorRecord]] = {}
        for t in self.tensors:
            by_file.setdefault(t.file, {})[t.name] = t
        for i, f in enumerate(self.files):
            recs = by_file.get(i, {})
            try:
                _, entries = validate_header(f.header, sum(r.nbytes for r in recs.values()), f"index: file {f.name}")
            except CheckpointError as e:
                raise FormatError(str(e)) from None
            if {e.name for e in entries} != set(recs) or any(
                recs[e.name].dtype != e.dtype or list(recs[e.name].shape) != e.shape for e in entries
            ):
                _fail(f"file {f.name}", "header does not match the tensor records")

    def to_json(self) -> dict:
        return _with_extra({
            "format": "weightpack", "version": list(self.version),
            "source": _with_extra({"kind": self.source_kind}, self.source_extra), "recipe": self.recipe,
            "files": [f.to_json() for f in self.files], "carried": [c.to_json() for c in self.carried],
            "tensors": [t.to_json() for t in self.tensors],
        }, self.extra)
