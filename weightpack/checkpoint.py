"""Checkpoints in: one safetensors file, a sharded set with its index, or a model folder.

Tensors are read one at a time with positioned reads (never the whole file), so memory stays bounded by
the largest tensor. The safetensors header is parsed and validated here because unpack reproduces each
source file byte for byte: it writes the original header bytes back and streams each tensor's data to
its original offset, which needs the exact header text and offsets that the safetensors API hides.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterator, Optional

from .dtypes import DTYPES
from .errors import CheckpointError

MAX_HEADER = 100 * 1024 * 1024  # safetensors' own bound on the header size
MAX_NAME, MAX_PATH = 255, 4095  # Linux's bounds on a file name component and a path (bytes)
INDEX_SUFFIX = ".safetensors.index.json"


@dataclass
class TensorEntry:
    name: str
    dtype: str
    shape: list[int]
    begin: int  # absolute offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class SafetensorsFile:
    """A parsed, validated safetensors file (header only; data is read on demand)."""

    path: Path
    rel: str  # name relative to the checkpoint root, POSIX style
    header_text: str
    metadata: Optional[dict]
    tensors: list[TensorEntry]  # in data-offset order
    size: int

    def read(self, entry: TensorEntry) -> bytearray:
        return read_exact(self.path, entry.begin, entry.nbytes)


def pread_exact(fd: int, offset: int, length: int, error: type = CheckpointError, what: str = "file") -> bytes:
    """Exactly `length` bytes at `offset` of an open file; `error` if the file ends first."""
    return pread_into(fd, offset, bytearray(length), error, what)


def pread_into(fd: int, offset: int, buf, error: type = CheckpointError, what: str = "file"):
    """Fill the writable buffer `buf` from `offset` of an open file; `error` if the file ends first."""
    view, got = memoryview(buf).cast("B"), 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n <= 0:
            raise error(f"{what}: ended early (truncated?)")
        got += n
    return buf


def read_exact(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb", buffering=0) as f:
        return pread_exact(f.fileno(), offset, length, CheckpointError, str(path))


def file_sha256(path: Path) -> str:
    """The SHA-256 of a whole file (read in pieces)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def is_text(s: str) -> bool:
    """Whether a str from JSON is real text: JSON's escapes can make lone surrogates ("\\ud800"), which
    no file name, file or terminal can hold."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _short(v) -> str:
    """A value for an error message: its repr, cut short (never an internal object's repr at length)."""
    r = ascii(v) if isinstance(v, str) else (type(v).__name__ if isinstance(v, (dict, list)) else repr(v))
    return r if len(r) <= 40 else r[:37] + "..."


def validate_header(header_text: str, data_size: int, where: str) -> tuple[Optional[dict], list[TensorEntry]]:
    """Check a safetensors header against the data size; return metadata and entries (offsets relative to data)."""
    try:
        header = json.loads(header_text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{where}: header is not valid JSON ({e.msg if hasattr(e, 'msg') else e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{where}: header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and (
        not isinstance(metadata, dict) or not all(isinstance(v, str) and is_text(v) and is_text(k)
                                                  for k, v in metadata.items())
    ):
        raise CheckpointError(f"{where}: __metadata__ must map strings to strings (valid UTF-8 text)")
    entries = []
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise CheckpointError(f"{where}: tensor {name!r} has a malformed entry")
        dtype, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if not is_text(name):
            raise CheckpointError(f"{where}: a tensor name is not valid UTF-8 text ({ascii(name)})")
        if type(dtype) is not str or dtype not in DTYPES:
            raise CheckpointError(f"{where}: tensor {name!r} has unsupported dtype {_short(dtype)}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise CheckpointError(f"{where}: tensor {name!r} has a malformed shape")
        if not (isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs)):
            raise CheckpointError(f"{where}: tensor {name!r} has malformed data_offsets")
        begin, end = offs
        if not 0 <= begin <= end <= data_size:
            raise CheckpointError(f"{where}: tensor {name!r} lies outside the file (truncated?)")
        if end - begin != DTYPES[dtype].nbytes(math.prod(shape)):
            raise CheckpointError(f"{where}: tensor {name!r}: {end - begin} bytes do not match dtype {dtype} and shape {shape}")
        entries.append(TensorEntry(name, dtype, list(shape), begin, end))
    entries.sort(key=lambda e: (e.begin, e.end))
    pos = 0
    for e in entries:
        if e.begin != pos:
            raise CheckpointError(f"{where}: tensor {e.name!r} overlaps another or leaves a gap")
        pos = e.end
    if pos != data_size:
        raise CheckpointError(f"{where}: {data_size - pos} bytes after the last tensor (not a safetensors file?)")
    return metadata, entries


def open_safetensors(path: Path, rel: str) -> SafetensorsFile:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{path}: not a safetensors file (header length {n} does not fit)")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: not a safetensors file (header is not UTF-8)") from None
    metadata, entries = validate_header(text, size - 8 - n, str(path))
    for e in entries:
        e.begin += 8 + n
        e.end += 8 + n
    return SafetensorsFile(path, rel, text, metadata, entries, size)


@dataclass
class Checkpoint:
    """What pack reads: tensor files (in order) and, from a folder, the other files carried along."""

    kind: str  # "file", "sharded" or "folder"
    root: Path
    files: list[SafetensorsFile]
    carried: list[tuple[str, Path]] = field(default_factory=list)  # (relative name, path)

    def tensors(self) -> Iterator[tuple[int, SafetensorsFile, TensorEntry]]:
        for i, f in enumerate(self.files):
            for e in f.tensors:
                yield i, f, e

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for _, _, e in self.tensors())


def _load_index(path: Path) -> tuple[list[str], dict[str, str]]:
    try:
        index = json.loads(path.read_text("utf-8"))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: not a valid index (JSON expected)") from None
    wm = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
        raise CheckpointError(f"{path}: index has no valid weight_map")
    shards = sorted(set(wm.values()))
    for s in shards:
        check_relative_name(s, str(path))
    return shards, wm


def check_relative_name(name: str, where: str) -> str:
    """A relative POSIX path with no '..', no absolute part and no empty component."""
    p = PurePosixPath(name)
    if not is_text(name):
        raise CheckpointError(f"{where}: file name {ascii(name)} is not valid UTF-8 text")
    if (
        not name
        or "\\" in name
        or "\x00" in name
        or p.is_absolute()
        or any(part in ("", ".", "..") for part in name.split("/"))
    ):
        raise CheckpointError(f"{where}: unsafe file name {name!r}")
    if len(name.encode("utf-8")) > MAX_PATH or any(len(part.encode("utf-8")) > MAX_NAME for part in name.split("/")):
        raise CheckpointError(f"{where}: file name {name[:40]!r}... is too long for a file system "
                              f"({MAX_NAME} bytes a component, {MAX_PATH} in all)")
    return name


def _sharded(index_path: Path, root: Path, rel_prefix: str = "") -> list[SafetensorsFile]:
    shards, wm = _load_index(index_path)
    files = []
    for s in shards:
        p = root / s
        if not p.is_file():
            raise CheckpointError(f"{index_path}: shard {s} is missing")
        files.append(open_safetensors(p, rel_prefix + s))
    present = {e.name: f.rel for f in files for e in f.tensors}
    for t, s in wm.items():
        if present.get(t) != rel_prefix + s:
            raise CheckpointError(f"{index_path}: tensor {t!r} is not in shard {s}")
    return files


def open_checkpoint(src: str | os.PathLike) -> Checkpoint:
    """Open a safetensors file, a `*.safetensors.index.json` with its shards, or a model folder."""
    path = Path(src)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_dir():
        return _open_folder(path)
    if path.name.endswith(INDEX_SUFFIX):
        files = _sharded(path, path.parent)
        return Checkpoint("sharded", path.parent, files, [(path.name, path)])
    return Checkpoint("file", path.parent, [open_safetensors(path, path.name)])


def _open_folder(root: Path) -> Checkpoint:
    rels = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if d not in (".git", ".cache"))
        for fn in filenames:
            p = Path(dirpath) / fn
            rel = p.relative_to(root).as_posix()
            if fn.endswith((".wpk", ".partial")):  # our own outputs (and unfinished ones) are not model files
                continue
            if not is_text(rel):  # a name that is not UTF-8 on disk (os.walk gives it surrogate escapes)
                raise CheckpointError(f"{root}: file name {ascii(rel)} is not valid UTF-8 (rename it to pack this folder)")
            if p.is_file():  # follows a link to a regular file (Hugging Face cache snapshots are links)
                rels.append(rel)
    rels.sort()
    tensor_rels = [r for r in rels if r.endswith(".safetensors")]
    if not tensor_rels:
        raise CheckpointError(f"{root}: no .safetensors files in this folder")
    files = [open_safetensors(root / r, r) for r in tensor_rels]
    # A sharded index in the folder must agree with the shards found beside it.
    for r in rels:
        if r.endswith(INDEX_SUFFIX):
            prefix = r[: r.rfind("/") + 1]
            listed = {f.rel for f in _sharded(root / r, (root / r).parent, prefix)}
            missing = listed - set(tensor_rels)
            if missing:
                raise CheckpointError(f"{root / r}: shard {sorted(missing)[0]} is missing")
    carried = [(r, root / r) for r in rels if not r.endswith(".safetensors")]
    return Checkpoint("folder", root, files, carried)
