"""The .wpk container: header, aligned blobs, JSON index, trailer. See docs/FORMAT.md.

    header   16 bytes  MAGIC, u16 major, u16 minor, u32 reserved (0)
    blobs    each starting at a multiple of ALIGN, zero padding between
    index    UTF-8 JSON, as one zstd frame (with its content size)
    trailer  32 bytes  u64 index offset, u64 index length, u32 crc32(index), u16 major, u16 minor, MAGIC

The writer streams blobs to a temporary file beside the target and renames it into place only when the
index and trailer are written, so the target name never holds a partial file; the same OutputTree (below)
writes unpack's files and folders. The reader checks the
trailer, the index checksum and every offset, length and size in the index before it reads or
allocates anything; blobs are checked against their crc32 when read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
import time
import zlib
from pathlib import Path
from typing import Iterable, Iterator, Optional

import zstandard

from .checkpoint import pread_exact
from .coding.native import crc32
from .coding.storage import compress_best
from .errors import CheckpointError, FormatError, OutputError
from .index import VERSION, BlobRef, CarriedFile, Index
from ._interrupt import output_committed, output_started

MAGIC = b"\x89WPK\r\n\x1a\n"
ALIGN = 64
INDEX_SLOW_ZSTD = 1 << 18  # index JSON up to this size is compressed at zstd -19, longer at -12
HEADER = struct.Struct("<8sHHI")
TRAILER = struct.Struct("<QQIHH8s")
MAX_INDEX = 1 << 30
SMALL_CARRIED = 64 << 20  # carried files up to this size are compressed whole, bigger ones streamed
PIECE = 1 << 20  # carried files are read, compressed, decompressed and checked in pieces of this size


class ContainerWriter:
    """Writes a container to a temporary file; `commit()` renames it to the target."""

    def __init__(self, target: Path, force: bool = False):
        self.target = Path(target)
        self.out = OutputTree(self.target, force)
        try:
            self.f = open(self.out.path(), "wb")
        except OSError as e:
            self.out.abort()
            raise OutputError(f"{self.target}: cannot write ({e.strerror or e})") from None
        self.pos = 0
        self._write(HEADER.pack(MAGIC, *VERSION, 0))

    def _write(self, data: bytes) -> None:
        """Write at the end; a failure (disk full, quota) names the target, not the temporary file."""
        try:
            self.f.write(data)
        except OSError as e:
            raise OutputError(f"{self.target}: cannot write ({e.strerror or e})") from None
        self.pos += len(data)

    def write_blob(self, data: bytes, crc: Optional[int] = None) -> BlobRef:
        """Write one blob; `crc` is its crc32 where the caller has it (computed by a worker)."""
        if crc is None:
            return self.write_blob_pieces([data])
        offset = self._align()
        self._write(data)
        return BlobRef(offset, len(data), crc)

    def _align(self) -> int:
        pad = (-self.pos) % ALIGN
        if pad:
            self._write(b"\0" * pad)
        return self.pos

    def write_blob_pieces(self, pieces: Iterable[bytes]) -> BlobRef:
        """Write a blob given in pieces (memory: one piece)."""
        offset, crc = self._align(), 0
        for piece in pieces:
            self._write(piece)
            crc = crc32(piece, crc)
        return BlobRef(offset, self.pos - offset, crc)

    def commit(self, index: Index) -> int:
        text = json.dumps(index.to_json(), separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        # zstd -19 costs ~0.5 s per MB of index: a big model's index (a few MB) is compressed at a level
        # whose time stays small beside the pack's
        raw = zstandard.ZstdCompressor(level=19 if len(text) <= INDEX_SLOW_ZSTD else 12).compress(text)
        offset = self.pos
        self._write(raw)
        self._write(TRAILER.pack(offset, len(raw), zlib.crc32(raw), *VERSION, MAGIC))
        try:
            self.f.flush()
            os.fsync(self.f.fileno())
            self.f.close()
        except OSError as e:
            raise OutputError(f"{self.target}: cannot write ({e.strerror or e})") from None
        self.out.commit()
        return offset + len(raw) + TRAILER.size

    def abort(self) -> None:
        try:
            self.f.close()
        finally:
            self.out.abort()

    def write_carried(self, name: str, path: Path) -> CarriedFile:
        """Store a non-tensor file of the checkpoint (its record for the index's "carried"): small ones
        whole (zstd -19 or raw, whichever is smaller), big ones streamed through zstd -3 (memory: a piece)."""
        try:
            size = path.stat().st_size
            if size <= SMALL_CARRIED:
                data = path.read_bytes()
                codec, blob = compress_best(data, 19)
                return CarriedFile(name, len(data), hashlib.sha256(data).hexdigest(), codec, self.write_blob(blob))
            h = hashlib.sha256()
            with open(path, "rb") as f:
                def pieces():
                    comp = zstandard.ZstdCompressor(level=3).compressobj(size=size)
                    n = 0
                    while piece := f.read(PIECE):
                        n += len(piece)
                        h.update(piece)
                        yield comp.compress(piece)
                    if n != size:
                        raise CheckpointError(f"{path}: changed while being read")
                    yield comp.flush()
                blob = self.write_blob_pieces(pieces())
            return CarriedFile(name, size, h.hexdigest(), "zstd", blob)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None

    def __enter__(self) -> "ContainerWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


# -- temporary outputs ---------------------------------------------------------------------------
# An output is written as `.NAME.PID.XXXXXXXX.partial` beside its target (a folder for a folder output)
# and renamed into place when complete. A run that was killed (kill -9, power loss) leaves its temporary
# file behind; the next run on the same target removes those whose process is gone.

def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


STALE_UNTAGGED = 24 * 3600  # temporaries of older versions (no process id in the name): removed after a day


def _temp_prefix(target: Path) -> str:
    return f".{target.name[:180]}."


def clean_stale_outputs(target: Path) -> list[Path]:
    """Remove the temporary files and folders that killed runs left for this target. Returns them."""
    prefix, removed = _temp_prefix(target), []
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return removed
    for e in entries:
        if not e.name.startswith(prefix) or not e.name.endswith((".partial", ".old")):
            continue
        middle = e.name[len(prefix):].split(".")
        if len(middle) == 3 and middle[0].isdigit():
            stale = int(middle[0]) != os.getpid() and not _alive(int(middle[0]))
        elif len(middle) == 2:
            try:
                stale = time.time() - e.stat(follow_symlinks=False).st_mtime > STALE_UNTAGGED
            except OSError:
                stale = False
        else:
            stale = False
        if not stale:
            continue
        p = Path(e.path)
        try:
            if e.is_dir(follow_symlinks=False):
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
        except OSError:
            pass
    return removed


def temp_output(target: Path, folder: bool = False) -> tuple[int | None, Path]:
    """A new temporary file (its descriptor and path) or folder (None, path) beside `target`, with the
    permissions a plain new file or folder gets under the umask; stale ones of killed runs removed first."""
    clean_stale_outputs(target)
    prefix = _temp_prefix(target) + f"{os.getpid()}."
    try:
        if folder:
            tmp = tempfile.mkdtemp(prefix=prefix, suffix=".partial", dir=target.parent)
            os.chmod(tmp, 0o777 & ~_umask())
            return None, Path(tmp)
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".partial", dir=target.parent)
        os.fchmod(fd, 0o666 & ~_umask())
        return fd, Path(tmp)
    except OSError as e:
        raise OutputError(f"{target}: cannot write ({e.strerror or e})") from None


def check_parent_folder(parent: Path) -> None:
    """An output's folder exists and can be written."""
    if not parent.is_dir():
        raise OutputError(f"{parent}: no such folder")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"{parent}: folder is not writable")


def check_output_file(target: Path, force: bool) -> None:
    if target.is_dir():
        raise OutputError(f"{target}: is a folder")
    if target.exists() and not force:
        raise OutputError(f"{target}: already exists (use --force to overwrite)",
                          api=f"{target}: already exists (pass force=True to overwrite)")
    check_parent_folder(target.parent)


def check_output_folder(target: Path, force: bool) -> None:
    if target.exists() and not target.is_dir():
        raise OutputError(f"{target}: exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not force:
        raise OutputError(f"{target}: folder exists and is not empty (use --force to replace it)",
                          api=f"{target}: folder exists and is not empty (pass force=True to replace it)")
    check_parent_folder(target.parent)


class OutputTree:
    """An output written under a temporary name beside its target (temp_output) and moved into place by
    commit(): one file (`path()` is its temporary name), or with `folder` a folder of files (`path(rel)`
    names one in it, its folders made), which replaces an existing folder target whole. abort() removes the
    temporary output: a failure, a crash or Ctrl-C never leaves a partial output under the target's name.
    Every output of weightpack is written through one: containers (ContainerWriter), unpacked files."""

    def __init__(self, target: Path, force: bool, folder: bool = False):
        self.target, self.force, self.folder = Path(target), force, folder
        if folder:
            check_output_folder(self.target, force)
        else:
            check_output_file(self.target, force)
        output_started()
        fd, self.tmp = temp_output(self.target, folder=folder)
        if fd is not None:
            os.close(fd)

    def path(self, rel: str = "") -> Path:
        if not self.folder:
            return self.tmp
        p = self.tmp.joinpath(*rel.split("/"))
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.exists() or p.is_symlink():
            raise FormatError(f"file {rel} is listed twice")
        return p

    def commit(self) -> None:
        if not self.folder:
            check_output_file(self.target, self.force)
            output_committed()
            os.replace(self.tmp, self.target)
            return
        output_committed()
        move_into_place(self.tmp, self.target)

    def abort(self) -> None:
        if self.folder:
            shutil.rmtree(self.tmp, ignore_errors=True)
        else:
            self.tmp.unlink(missing_ok=True)


def move_into_place(folder: Path, target: Path) -> None:
    """Rename a complete folder to `target`; an existing target is first renamed aside (a `.old` temporary,
    removed after), so the name never holds a mix of the two."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f"{_temp_prefix(target)}{os.getpid()}.", suffix=".old", dir=target.parent))
        os.rename(target, old / "x")
    os.rename(folder, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def output_path(dst: "str | os.PathLike", name: str, create: bool = False) -> Path:
    """`dst` itself, or `dst/name` when `dst` is a folder (an existing one, or any path ending in '/',
    which is created when `create` and its parent exists)."""
    d = Path(dst)
    if str(dst).endswith(("/", os.sep)) or d.is_dir():
        if not d.is_dir():
            if not create or not d.parent.is_dir() or d.exists():
                raise OutputError(f"{d}: no such folder")
            try:
                d.mkdir()
            except OSError as e:
                raise OutputError(f"{d}: cannot create the folder ({e.strerror})") from None
        return d / name
    return d


def refuse_input_as_output(target: Path, inputs: list[Path]) -> None:
    """An output may not be one of the command's inputs (the same file under any name)."""
    for p in inputs:
        try:
            same = target.exists() and p.exists() and os.path.samefile(target, p)
        except OSError:
            same = False
        if same:
            raise OutputError(f"{target}: is an input of this command; refusing to write over it")


class ContainerReader:
    """A validated container: `index` (an index.Index, built by its validation) exists only once the whole
    index has passed."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self.f = open(self.path, "rb", buffering=0)
        except FileNotFoundError:
            raise FormatError(f"{self.path}: no such file") from None
        except IsADirectoryError:
            raise FormatError(f"{self.path}: is a folder, not a .wpk file") from None
        except OSError as e:
            raise FormatError(f"{self.path}: cannot read ({e.strerror})") from None
        try:
            self.size = os.fstat(self.f.fileno()).st_size
            self.index = Index.from_json(self._read_index(), self.size)
        except BaseException:
            self.f.close()
            raise

    def close(self) -> None:
        self.f.close()

    def fileno(self) -> int:
        """The open container's file descriptor (the device decoder maps the file)."""
        return self.f.fileno()

    def __enter__(self) -> "ContainerReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _pread(self, offset: int, length: int) -> bytes:
        return pread_exact(self.f.fileno(), offset, length, FormatError, f"{self.path}")

    def _read_index(self) -> dict:
        where = str(self.path)
        if self.size < HEADER.size + TRAILER.size:
            raise FormatError(f"{where}: not a weightpack file (too short)")
        magic, major, minor, reserved = HEADER.unpack(self._pread(0, HEADER.size))
        if magic != MAGIC:
            raise FormatError(f"{where}: not a weightpack file (bad magic)")
        if reserved != 0:
            raise FormatError(f"{where}: damaged header (reserved field is not zero)")
        t_off, t_len, t_crc, t_major, t_minor, t_magic = TRAILER.unpack(
            self._pread(self.size - TRAILER.size, TRAILER.size))
        if t_magic != MAGIC:
            raise FormatError(f"{where}: truncated or damaged (no trailer)")
        if (major, minor) != (t_major, t_minor):
            raise FormatError(f"{where}: damaged (header and trailer versions differ)")
        if major != VERSION[0]:
            raise FormatError(f"{where}: format version {major}.{minor} is not supported (this reader: {VERSION[0]}.x)")
        self.version = (major, minor)
        if t_off < HEADER.size or t_len > MAX_INDEX or t_off + t_len != self.size - TRAILER.size:
            raise FormatError(f"{where}: truncated or damaged (index position)")
        raw = self._pread(t_off, t_len)
        if zlib.crc32(raw) != t_crc:
            raise FormatError(f"{where}: damaged index (checksum mismatch)")
        try:
            size = zstandard.frame_content_size(raw)
            if not 0 <= size <= MAX_INDEX:
                raise FormatError(f"{where}: damaged index (declared size {size})")
            text = zstandard.ZstdDecompressor().decompress(raw, max_output_size=size)
            index = json.loads(text.decode("utf-8"))
        except zstandard.ZstdError:
            raise FormatError(f"{where}: damaged index (not zstd)") from None
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise FormatError(f"{where}: damaged index (not JSON)") from None
        if not isinstance(index, dict):
            raise FormatError(f"{where}: damaged index (not an object)")
        self.index_offset = t_off
        return index

    def blob_intact(self, ref: BlobRef) -> bool:
        """Whether a blob matches its crc32 (read in pieces: memory stays at one piece)."""
        crc = 0
        for piece in _iter_read(_BlobReader(self, ref)):
            crc = crc32(piece, crc)
        return crc == ref.crc32

    def read_blob(self, ref: BlobRef, what: str) -> bytes:
        data = self._pread(ref.offset, ref.length)
        if crc32(data) != ref.crc32:
            raise FormatError(f"{self.path}: {what}: checksum mismatch (damaged data)")
        return data


class _BlobReader:
    """A file-like view of one blob, read in pieces (for streaming decompression)."""

    def __init__(self, reader: "ContainerReader", ref: BlobRef):
        self.r, self.pos, self.end = reader, ref.offset, ref.offset + ref.length

    def read(self, n: int = -1) -> bytes:
        n = self.end - self.pos if n < 0 else min(n, self.end - self.pos)
        data = self.r._pread(self.pos, n) if n > 0 else b""
        self.pos += len(data)
        return data


def carried_pieces(reader: "ContainerReader", c: CarriedFile) -> Iterator[bytes]:
    """The bytes of a carried file, in pieces, checked against its crc32, size and SHA-256 as they pass.

    Memory stays at one piece whatever size the index or a zstd frame claims."""
    where = f"carried file {c.name}"
    if not reader.blob_intact(c.blob):
        raise FormatError(f"{where}: checksum mismatch (damaged data)")
    src = _BlobReader(reader, c.blob)
    if c.codec == "zstd":
        try:
            declared = zstandard.frame_content_size(reader._pread(c.blob.offset, min(18, c.blob.length)))
        except zstandard.ZstdError:
            raise FormatError(f"{where}: damaged zstd data") from None
        if declared != c.size:
            raise FormatError(f"{where}: zstd data declares {declared} bytes, expected {c.size}")
        src = zstandard.ZstdDecompressor().stream_reader(src, read_across_frames=False)
    h, total = hashlib.sha256(), 0
    try:
        for piece in _iter_read(src):
            total += len(piece)
            if total > c.size:
                raise FormatError(f"{where}: more data than its recorded size")
            h.update(piece)
            yield piece
    except zstandard.ZstdError:
        raise FormatError(f"{where}: damaged zstd data") from None
    if total != c.size or h.hexdigest() != c.sha256:
        raise FormatError(f"{where}: size or SHA-256 mismatch")


def _iter_read(f) -> Iterator[bytes]:
    while True:
        piece = f.read(PIECE)
        if not piece:
            return
        yield piece


