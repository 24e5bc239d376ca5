"""Sharded containers: a model written as several .wpk files plus a small JSON index, read back as one.

Pack groups the tensors, in checkpoint order, into shards of at most `shard_size` *source* bytes (known
before anything is coded, so the grouping is deterministic and the shard count is known up front; a
tensor larger than the shard size gets a shard of its own). Each shard is a complete container: its
`files` hold, per source file it draws from, the source header (verbatim when the shard holds the whole
file, else a header naming just its tensors), so a shard inspects, verifies, loads and unpacks on its own.
The carried files ride in the first shard. The index `<stem>.wpk.index.json` holds what makes the set one
model again: every source file's header verbatim, the carried files, tensor -> shard, and each shard's
size, SHA-256 and container-index checksum (docs/FORMAT.md, "Sharded sets").

Every shard is written under a hidden temporary name; when all are complete they are renamed to their
names and the index last, so a failed or killed pack leaves no file under the index's name.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
import struct
from pathlib import Path, PurePosixPath
from typing import Callable, Optional

from . import metrics
from .checkpoint import Checkpoint, SafetensorsFile, file_sha256, validate_header
from .container import TRAILER, ContainerReader, OutputTree, carried_pieces, check_output_file, output_path
from .errors import FormatError, UsageError, WeightpackError
from .lazy import source_metadata
from .pipeline import decode_into_files, decode_tensors, pack_container, progress_bar
from .results import InspectReport, ShardRow
from .tensors import read_tensor, resolve_device, to_tensor, use_device_decoder, write_from_device

INDEX_SUFFIX = ".wpk.index.json"
INDEX_FORMAT = "weightpack-shards"
INDEX_VERSION = [1, 0]
MIN_SHARD_SIZE = 10**6  # 1 MB
MAX_INDEX = 256 << 20


# -- pack ----------------------------------------------------------------------------------------

def parse_shard_size(value: "int | str") -> int:
    """Bytes from an int or a string such as '5GB', '500MiB' (at least 1 MB)."""
    from .ratecontrol import parse_size

    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise UsageError(f"shard size {value!r}: expected bytes or a size such as '5GB'")
    try:
        n = parse_size(value) if isinstance(value, str) else value
    except UsageError:
        raise UsageError(f"shard size {value!r}: expected a size such as 5GB, 500MiB or 2000000") from None
    if n < MIN_SHARD_SIZE:
        raise UsageError(f"shard size {value!r}: must be at least 1 MB")
    return n


def plan_shards(ckpt: Checkpoint, shard_size: int) -> list[list[tuple[int, SafetensorsFile, object]]]:
    """Tensors in checkpoint order, cut into groups of at most `shard_size` source bytes (a bigger tensor
    alone); at least one group."""
    groups: list[list] = [[]]
    size = 0
    for fi, f, e in ckpt.tensors():
        if groups[-1] and size + e.nbytes > shard_size:
            groups.append([])
            size = 0
        groups[-1].append((fi, f, e))
        size += e.nbytes
    return groups


def _sub_header(f: SafetensorsFile, entries: list) -> str:
    header: dict = {}
    if f.metadata is not None:
        header["__metadata__"] = f.metadata
    off = 0
    for e in entries:
        header[e.name] = {"dtype": e.dtype, "shape": e.shape, "data_offsets": [off, off + e.nbytes]}
        off += e.nbytes
    return json.dumps(header, separators=(",", ":"), ensure_ascii=False)


def _sub_checkpoint(ckpt: Checkpoint, group: list, carried: list) -> Checkpoint:
    """The part of `ckpt` one shard holds: per source file, its tensors in the group (read from the source
    file at their offsets) under the file's header, or a header naming just them."""
    by_file: dict[int, list] = {}
    for fi, _, e in group:
        by_file.setdefault(fi, []).append(e)
    files = []
    for fi, entries in by_file.items():
        f = ckpt.files[fi]
        header = f.header_text if len(entries) == len(f.tensors) else _sub_header(f, entries)
        size = 8 + len(header.encode("utf-8")) + sum(e.nbytes for e in entries)
        files.append(SafetensorsFile(f.path, f.rel, header, f.metadata, entries, size))
    return Checkpoint(ckpt.kind, ckpt.root, files, carried)


def stem_of(target: Path) -> str:
    name = target.name
    for suffix in (INDEX_SUFFIX, ".wpk"):
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def shard_name(stem: str, k: int, n: int) -> str:
    return f"{stem}-{k + 1:05d}-of-{n:05d}.wpk"


def _index_crc(path: Path) -> int:
    """The container-index checksum from a container's trailer: which pack a shard came from."""
    with open(path, "rb") as f:
        f.seek(-TRAILER.size, os.SEEK_END)
        return TRAILER.unpack(f.read(TRAILER.size))[2]


class ShardedPacker:
    """pipeline.pack_container for a sharded set, called as it is: (ckpt, target, recipe, ...) -> (tensor
    records, bytes written in all); `target` names the set (`<folder>/<stem>.wpk`)."""

    def __init__(self, shard_size: int):
        self.shard_size = shard_size
        self.names: list[str] = []

    def __call__(self, ckpt: Checkpoint, target: Path, rec, workers, force: bool, progress: bool,
                 index_extra: Optional[dict] = None, pool: Optional[Callable] = None) -> tuple[list, int]:
        folder, stem = target.parent, stem_of(target)
        groups = plan_shards(ckpt, self.shard_size)
        names = [shard_name(stem, k, len(groups)) for k in range(len(groups))]
        index_path = folder / (stem + INDEX_SUFFIX)
        for p in [index_path] + [folder / n for n in names]:
            check_output_file(p, force)
        token = f"{os.getpid()}-{os.urandom(4).hex()}"
        staged: list[Path] = []
        try:
            records, shards, weight_map, carried = [], [], {}, []
            for k, group in enumerate(groups):
                sub = _sub_checkpoint(ckpt, group, ckpt.carried if k == 0 else [])
                path = folder / f".{names[k]}.{token}.partial"
                staged.append(path)
                tensors, size = pack_container(sub, path, rec, workers, True, progress, index_extra, pool=pool)
                records += tensors
                for t in tensors:
                    weight_map[t["name"]] = names[k]
                shards.append({"name": names[k], "size": size, "sha256": file_sha256(path),
                               "index_crc32": _index_crc(path), "tensors": len(tensors)})
                if k == 0:
                    with ContainerReader(path) as r:
                        carried = [{"name": c["name"], "size": c["size"], "sha256": c["sha256"], "shard": names[0]}
                                   for c in r.index["carried"]]
            index = {
                "format": INDEX_FORMAT, "version": INDEX_VERSION, "source": {"kind": ckpt.kind},
                "recipe": rec.to_json(), "shard_size": self.shard_size,
                "files": [{"name": f.rel, "header": f.header_text} for f in ckpt.files],
                "carried": carried, "shards": shards, "weight_map": weight_map,
            }
            text = json.dumps(index, indent=1, ensure_ascii=False).encode("utf-8")
            tmp = folder / f".{index_path.name}.{token}.partial"
            staged.append(tmp)
            with open(tmp, "wb") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            for k, name in enumerate(names):  # the shards, then the index: a set without it is not a set
                check_output_file(folder / name, force)
                os.replace(staged[k], folder / name)
            check_output_file(index_path, force)
            os.replace(tmp, index_path)
        except BaseException:
            for p in staged:
                p.unlink(missing_ok=True)
            raise
        self.names = names
        return records, sum(s["size"] for s in shards) + len(text)

    def summary(self, target: Path) -> tuple[Path, list[str]]:
        """(the index's path, the shard files' names) of the set last written."""
        return target.parent / (stem_of(target) + INDEX_SUFFIX), list(self.names)

    def remove(self, target: Path) -> None:
        """Remove the set last written (rate control that never met its budget)."""
        for n in self.names:
            (target.parent / n).unlink(missing_ok=True)
        (target.parent / (stem_of(target) + INDEX_SUFFIX)).unlink(missing_ok=True)


# -- read ----------------------------------------------------------------------------------------

def is_set(path) -> bool:
    """A sharded set's index, or a folder holding exactly one."""
    p = Path(path)
    if p.name.endswith(INDEX_SUFFIX):
        return True
    return p.is_dir() and len(list(p.glob("*" + INDEX_SUFFIX))) == 1


def _index_path(path) -> Path:
    p = Path(path)
    if p.is_dir():
        found = sorted(p.glob("*" + INDEX_SUFFIX))
        if len(found) != 1:
            raise FormatError(f"{p}: expected one *{INDEX_SUFFIX} in this folder, found {len(found)}")
        return found[0]
    return p


def _no_duplicates(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise FormatError(f"key {k!r} is given twice")
        d[k] = v
    return d


def _safe_name(name, where: str) -> str:
    if not isinstance(name, str):
        raise FormatError(f"{where}: a file name is not a string")
    p = PurePosixPath(name)
    if (not name or "\\" in name or "\x00" in name or p.is_absolute()
            or any(part in ("", ".", "..") for part in name.split("/"))):
        raise FormatError(f"{where}: file name {name!r} leaves the index's folder or is malformed")
    return name


def _need(d: dict, key: str, typ, where: str):
    v = d.get(key) if isinstance(d, dict) else None
    if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
        raise FormatError(f"{where}: {key!r} is missing or not a {typ.__name__}")
    return v


def read_index(path: Path) -> dict:
    """The index, parsed and checked for structure (not yet against the shards)."""
    w = str(path)
    try:
        if path.stat().st_size > MAX_INDEX:
            raise FormatError(f"{w}: index too large")
        idx = json.loads(path.read_bytes().decode("utf-8"), object_pairs_hook=_no_duplicates)
    except OSError as e:
        raise FormatError(f"{w}: cannot read ({e.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise FormatError(f"{w}: not a valid sharded-set index (JSON expected)") from None
    except FormatError as e:
        raise FormatError(f"{w}: {e}") from None
    if not isinstance(idx, dict) or idx.get("format") != INDEX_FORMAT:
        raise FormatError(f"{w}: not a weightpack sharded-set index")
    version = idx.get("version")
    if not (isinstance(version, list) and len(version) == 2 and version[0] == INDEX_VERSION[0]):
        raise FormatError(f"{w}: unsupported index version {version!r}")
    kind = _need(_need(idx, "source", dict, w), "kind", str, w + " source")
    if kind not in ("file", "sharded", "folder"):
        raise FormatError(f"{w}: unknown source kind {kind!r}")
    seen: set[str] = set()
    for f in _need(idx, "files", list, w):
        name = _safe_name(_need(f, "name", str, w + " files"), w)
        _need(f, "header", str, f"{w} file {name}")
        if name in seen:
            raise FormatError(f"{w}: file {name} is listed twice")
        seen.add(name)
    shards = _need(idx, "shards", list, w)
    if not shards:
        raise FormatError(f"{w}: lists no shards")
    shard_names = set()
    for s in shards:
        name = _safe_name(_need(s, "name", str, w + " shards"), w)
        if name in shard_names:
            raise FormatError(f"{w}: shard {name} is listed twice")
        shard_names.add(name)
        _need(s, "size", int, f"{w} shard {name}")
        _need(s, "sha256", str, f"{w} shard {name}")
        _need(s, "index_crc32", int, f"{w} shard {name}")
    for c in _need(idx, "carried", list, w):
        name = _safe_name(_need(c, "name", str, w + " carried"), w)
        if name in seen:
            raise FormatError(f"{w}: file {name} is listed twice")
        seen.add(name)
        if _need(c, "shard", str, f"{w} carried {name}") not in shard_names:
            raise FormatError(f"{w}: carried file {name} names shard {c['shard']}, which the index does not list")
    for t, s in _need(idx, "weight_map", dict, w).items():
        if s not in shard_names:
            raise FormatError(f"{w}: tensor {t!r} names shard {s!r}, which the index does not list")
    return idx


class ShardSet:
    """An opened sharded set: the index, every shard opened and checked against it (presence, size, which
    pack it came from, the tensors it holds). `readers` are in shard order."""

    def __init__(self, path):
        self.index_path = _index_path(path)
        self.folder = self.index_path.parent
        self.index = read_index(self.index_path)
        self.readers: list[tuple[str, ContainerReader]] = []
        try:
            self._open_shards()
        except BaseException:
            self.close()
            raise

    def _open_shards(self) -> None:
        w = str(self.index_path)
        wm = self.index["weight_map"]
        expected: dict[str, set] = {}
        for t, s in wm.items():
            expected.setdefault(s, set()).add(t)
        owner: dict[str, str] = {}
        for s in self.index["shards"]:
            name = s["name"]
            p = self.folder / name
            if not p.is_file():
                raise FormatError(f"{w}: shard {name} is missing")
            if p.stat().st_size != s["size"]:
                raise FormatError(f"shard {name}: {p.stat().st_size} bytes, the index says {s['size']} "
                                  "(damaged, or from another pack)")
            try:
                r = ContainerReader(p)
            except FormatError as e:
                raise FormatError(f"shard {name}: {e}") from None
            self.readers.append((name, r))
            if _index_crc(p) != s["index_crc32"]:
                raise FormatError(f"shard {name}: not the shard the index lists (from another pack?)")
            held = set()
            for t in r.index["tensors"]:
                if t["name"] in owner:
                    raise FormatError(f"tensor {t['name']!r} is claimed by shards {owner[t['name']]} and {name}")
                owner[t["name"]] = name
                held.add(t["name"])
            if held != expected.get(name, set()):
                odd = sorted(held ^ expected.get(name, set()))[0]
                raise FormatError(f"shard {name}: holds other tensors than the index says (e.g. {odd!r})")
        for t in wm:
            if t not in owner:
                raise FormatError(f"{w}: tensor {t!r} is in no shard")
        # every source file's header names exactly the tensors the shards hold for it, dtype and shape alike
        records = {t["name"]: (t, r.index["files"][t["file"]]["name"]) for _, r in self.readers
                   for t in r.index["tensors"]}
        listed = {f["name"] for f in self.index["files"]}
        for t, fn in records.values():
            if fn not in listed:
                raise FormatError(f"{w}: tensor {t['name']!r} belongs to file {fn}, which the index does not list")
        for f in self.index["files"]:
            try:
                _, entries = validate_header(f["header"], sum(rec["nbytes"] for rec, fn in records.values()
                                                              if fn == f["name"]), f["name"])
            except WeightpackError as e:
                raise FormatError(f"{w}: file {f['name']}: {e}") from None
            for e in entries:
                rec = records.get(e.name)
                if rec is None or rec[1] != f["name"] or (rec[0]["dtype"], rec[0]["shape"]) != (e.dtype, e.shape):
                    raise FormatError(f"{w}: file {f['name']}: tensor {e.name!r} does not match the shards")

    def close(self) -> None:
        for _, r in self.readers:
            r.close()
        self.readers = []

    def __enter__(self) -> "ShardSet":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def size(self) -> int:
        return sum(s["size"] for s in self.index["shards"]) + self.index_path.stat().st_size

    def tensors(self):
        for name, r in self.readers:
            for t in r.index["tensors"]:
                yield name, r, t


def _named(shard: str, fn, *args, **kw):
    """Run fn; a FormatError names the shard it came from."""
    try:
        return fn(*args, **kw)
    except FormatError as e:
        raise FormatError(f"shard {shard}: {e}") from None


def decode_set(ss: ShardSet, workers, progress, pool=None):
    """(record, decoded pieces) for every tensor of the set, shard by shard."""
    for name, r in ss.readers:
        it = decode_tensors(r, r.index["tensors"], workers, progress, pool=pool)
        while True:
            try:
                item = next(it)
            except StopIteration:
                break
            except FormatError as e:
                raise FormatError(f"shard {name}: {e}") from None
            yield item


# -- the API over a set (called by api.py and verify.py) -------------------------------------------

def load(path, dev, workers, decoder: str, progress: bool) -> dict:
    with ShardSet(path) as ss:
        with progress_bar(sum(t["nbytes"] for _, _, t in ss.tensors()), "load", progress) as bar:
            if use_device_decoder(dev, decoder):
                from . import device as on_device

                out = {}
                for name, r in ss.readers:
                    out.update(_named(name, lambda: dict(on_device.load(r, dev, bar.update))))
                return out
            return {t["name"]: to_tensor(t, pieces, dev) for t, pieces in decode_set(ss, workers, bar.update)}


class ShardedWpkFile:
    """`weightpack.open` over a set: keys(), metadata(), get_tensor(name) from the shard that holds it."""

    def __init__(self, path, device, decoder: str):
        self.device = resolve_device(device)
        self._on_device = use_device_decoder(self.device, decoder)
        self._set = ShardSet(path)
        self._where = {t["name"]: (name, r, t) for name, r, t in self._set.tensors()}

    def keys(self) -> list[str]:
        return list(self._where)

    def metadata(self) -> Optional[dict]:
        return source_metadata(self._set.index["files"])

    def get_tensor(self, name: str):
        hit = self._where.get(name)
        if hit is None:
            raise KeyError(name)
        shard, r, t = hit
        return _named(shard, lambda: read_tensor(r, t, self.device, self._on_device))

    def close(self) -> None:
        self._set.close()

    def __enter__(self) -> "ShardedWpkFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def inspect(path) -> InspectReport:
    with ShardSet(path) as ss:
        reps = [(name, metrics.inspect_report(r)) for name, r in ss.readers]
        rows = [replace(row, shard=name) for name, rep in reps for row in rep.tensors]
        idx = ss.index
        source = sum(8 + len(f["header"].encode("utf-8")) for f in idx["files"]) + sum(x.bytes_before for x in rows)
        return InspectReport(
            path=str(ss.index_path), format_version=idx["version"], source_kind=idx["source"]["kind"],
            recipe=idx.get("recipe", {}).get("name") if isinstance(idx.get("recipe"), dict) else None,
            files=[f["name"] for f in idx["files"]], carried=[c["name"] for c in idx["carried"]],
            shards=[ShardRow(s["name"], s["size"], len(rep.tensors)) for s, (_, rep) in zip(idx["shards"], reps)],
            tensors=rows, totals=metrics.totals(rows, sum(rep.totals.weights for _, rep in reps), source, ss.size),
        )


def unpack(path, dst, force: bool, workers, progress: bool, dev, pool=None) -> Path:
    """Restore the source files of a set: every file's header verbatim, each tensor decoded from its
    shard into its place, the carried files from their shard; atomically, as api.unpack."""
    with ShardSet(path) as ss:
        idx = ss.index
        single = (idx["source"]["kind"] == "file" and len(idx["files"]) == 1 and not idx["carried"]
                  and "/" not in idx["files"][0]["name"])
        if single:
            name = idx["files"][0]["name"]
            target = ss.folder / name if dst is None else output_path(dst, name)
        else:
            target = Path(dst) if dst is not None else ss.folder / (stem_of(ss.index_path) or "unpacked")
        out = OutputTree(target, force, folder=not single)
        try:
            records = {t["name"]: t for _, _, t in ss.tensors()}
            targets = {}
            for f in idx["files"]:
                p = out.path(f["name"])
                header = f["header"].encode("utf-8")
                _, entries = validate_header(f["header"], sum(records[e]["nbytes"] for e in _names(f["header"])),
                                             f["name"])
                with open(p, "wb") as fh:
                    fh.write(struct.pack("<Q", len(header)) + header)
                    fh.truncate(8 + len(header) + sum(e.nbytes for e in entries))
                for e in entries:
                    targets[e.name] = (str(p), 8 + len(header) + e.begin)
            with progress_bar(sum(t["nbytes"] for t in records.values()), "unpack", progress) as bar:
                for name, r in ss.readers:
                    mine = {t["name"]: targets[t["name"]] for t in r.index["tensors"]}
                    if dev is None:
                        _named(name, decode_into_files, r, mine, workers, bar.update, pool=pool)
                    else:
                        _named(name, write_from_device, r, dev, mine, bar.update)
            readers = dict(ss.readers)
            for c in idx["carried"]:
                r = readers[c["shard"]]
                held = {x["name"]: x for x in r.index["carried"]}.get(c["name"])
                if held is None or (held["size"], held["sha256"]) != (c["size"], c["sha256"]):
                    raise FormatError(f"shard {c['shard']}: does not hold carried file {c['name']} as the index says")
                with open(out.path(c["name"]), "wb") as fh:
                    for piece in _named(c["shard"], lambda: list(carried_pieces(r, held))):
                        fh.write(piece)
            out.commit()
        except BaseException:
            out.abort()
            raise
    return target


def _names(header_text: str) -> list[str]:
    h = json.loads(header_text)
    return [k for k in h if k != "__metadata__"]
