"""verify: the checks of a container or a sharded set, and the comparison with the source checkpoint.

In order: every blob against its crc32 and every carried file against its size and SHA-256 (for a set,
first each shard file against the SHA-256 the set's index records); then, when nothing is damaged, every
tensor decoded (its chunks' checksums checked by the decoder), a plain tensor's bytes against its recorded
SHA-256, a lossy one's quality measured (against the source when there is one, else as recorded at pack
time); then, with the source, the names, dtypes, shapes, hashes, metadata and carried files compared; last
the quality bounds. Every finding is one line in the report; structural damage that stops the reading
raises FormatError.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Optional

from .checkpoint import Checkpoint, file_sha256, open_checkpoint
from .container import ContainerReader, carried_pieces, tensor_blob_refs
from .distributed import executor as run_on
from .errors import FormatError, VerifyError
from .pipeline import decode_tensors, progress_bar, tensor_sha256
from .results import VerifyReport
from .stages import lossy


def verify(path, against=None, *, min_sqnr: Optional[float] = None, max_rel_error: Optional[float] = None,
           workers: Optional[int] = None, progress: bool = False, executor: str = "local",
           ray_address: Optional[str] = None, check: bool = False) -> VerifyReport:
    """Check every checksum and decode every tensor against its recorded SHA-256.

    With `against` (the source checkpoint), also require every lossless tensor, the metadata and the
    carried files to equal the source's (by hash), and measure each lossy tensor's quality against the
    source; without it, lossy tensors are judged by the quality recorded at pack time. `min_sqnr` (dB)
    and `max_rel_error` bound that quality for every lossy tensor.

    Returns a VerifyReport; `report.ok` is False on any difference or missed bound, or with `check` a
    VerifyError (carrying the report) is raised instead. Structural damage raises FormatError. `path` may
    be a sharded set (its index or folder): every shard's SHA-256 is checked too. `executor="ray"` decodes
    on the Ray cluster at `ray_address`.
    """
    from . import shards

    with run_on(executor, ray_address) as ex:
        if ex.pool is not None:  # workers elsewhere open the files by these paths
            path, against = os.path.abspath(path), os.path.abspath(against) if against is not None else None
        check_one = verify_set if shards.is_set(path) else verify_container
        report = check_one(path, against, min_sqnr, max_rel_error, workers, progress, ex.pool)
    return raise_on_problems(report) if check else report


def verify_container(path, against, min_sqnr: Optional[float], max_rel_error: Optional[float], workers,
                     progress: bool, pool=None) -> VerifyReport:
    """The checks of one container (see the module's docstring); `against`: the source checkpoint or None."""
    problems: list[str] = []
    quality: dict[str, dict] = {}
    checked = 0
    ckpt = open_checkpoint(against) if against is not None else None
    src = source_tensors(ckpt)
    with ContainerReader(path) as r:
        idx = r.index
        problems += blob_problems(r) + carried_problems(r)
        decoded: dict[str, str] = {}
        if not problems:
            with progress_bar(sum(t["nbytes"] for t in idx["tensors"]), "verify", progress) as bar:
                checked = check_decoded(decode_tensors(r, idx["tensors"], workers, bar.update, pool=pool), src,
                                        decoded, quality, problems)
        if ckpt is not None and not problems:
            problems += compare_with_source({t["name"]: t for t in idx["tensors"]}, idx["files"], idx["carried"],
                                            decoded, ckpt, src, "the container")
    problems += quality_problems(quality, min_sqnr, max_rel_error)
    return VerifyReport(not problems, checked, problems, quality)


def verify_set(path, against, min_sqnr: Optional[float], max_rel_error: Optional[float], workers,
               progress: bool, pool=None) -> VerifyReport:
    """The checks of a sharded set: each shard file's SHA-256 against the set's index, then as for one
    container, shard by shard, with the source compared against the set as a whole."""
    from .shards import ShardSet, decode_set

    problems: list[str] = []
    quality: dict[str, dict] = {}
    checked = 0
    ckpt = open_checkpoint(against) if against is not None else None
    src = source_tensors(ckpt)
    with ShardSet(path) as ss:
        idx = ss.index
        for s, (name, r) in zip(idx["shards"], ss.readers):
            if file_sha256(r.path) != s["sha256"]:
                problems.append(f"shard {name}: SHA-256 differs from the index (damaged)")
            problems += blob_problems(r, f"shard {name}: ") + carried_problems(r, f"shard {name}: ")
        decoded: dict[str, str] = {}
        if not problems:
            with progress_bar(sum(t["nbytes"] for _, _, t in ss.tensors()), "verify", progress) as bar:
                checked = check_decoded(decode_set(ss, workers, bar.update, pool=pool), src, decoded, quality,
                                        problems)
        if ckpt is not None and not problems:
            problems += compare_with_source({t["name"]: t for _, _, t in ss.tensors()}, idx["files"],
                                            idx["carried"], decoded, ckpt, src, "the set")
    problems += quality_problems(quality, min_sqnr, max_rel_error)
    return VerifyReport(not problems, checked, problems, quality)


def raise_on_problems(report: VerifyReport) -> VerifyReport:
    """The report, or a VerifyError carrying it when it has problems (verify(..., check=True))."""
    if not report.ok:
        n = len(report.problems)
        raise VerifyError(f"verify failed: {n} problem{'s' if n != 1 else ''} (the first: {report.problems[0]})",
                          report=report)
    return report


def source_tensors(ckpt: Optional[Checkpoint]) -> dict:
    """The source's tensors by name: (its file, its entry)."""
    return {e.name: (f, e) for _, f, e in ckpt.tensors()} if ckpt is not None else {}


def blob_problems(r: ContainerReader, prefix: str = "") -> list[str]:
    """Every blob of every tensor against its crc32 (memory: one piece at a time)."""
    return [f"{prefix}tensor {t['name']!r} {label}: checksum mismatch"
            for t in r.index["tensors"] for label, ref in tensor_blob_refs(t) if not r.blob_intact(ref)]


def carried_problems(r: ContainerReader, prefix: str = "") -> list[str]:
    """Every carried file read through (its crc32, size and SHA-256 checked on the way)."""
    problems = []
    for c in r.index["carried"]:
        try:
            for _ in carried_pieces(r, c):
                pass
        except FormatError as e:
            problems.append(f"{prefix}{e}")
    return problems


def check_decoded(items: Iterable, src: dict, decoded: dict, quality: dict, problems: list) -> int:
    """The check of decoded tensors ((record, pieces) from the decoder): a plain tensor's SHA-256 against
    its record (kept in `decoded`), a lossy one's quality against the source where there is one (its
    reconstruction was checked against decoded_sha256 by the decoder). Returns how many were checked; a
    FormatError ends the run as a problem."""
    checked = 0
    try:
        for t, pieces in items:
            checked += 1
            if t["stages"]:
                quality[t["name"]] = lossy_quality(t, pieces, src.get(t["name"]))
                continue
            hasher = hashlib.sha256()
            for p in pieces:
                hasher.update(p)
            decoded[t["name"]] = hasher.hexdigest()
            if decoded[t["name"]] != t["sha256"]:
                problems.append(f"tensor {t['name']!r}: decoded data differs from the packed source")
    except FormatError as e:
        problems.append(str(e))
    return checked


def lossy_quality(t: dict, pieces: list[bytes], source) -> dict:
    """A lossy tensor's quality: measured against the source's tensor (`source`: (file, entry)) when it
    has the same dtype and shape, else as recorded at pack time."""
    if source is None:
        return dict(t["quality"], measured="at pack time")
    f, e = source
    if (e.dtype, e.shape) != (t["dtype"], t["shape"]):
        return dict(t["quality"], measured="at pack time")  # reported as a mismatch by compare_with_source
    return dict(lossy.quality_against(t, b"".join(pieces), f.read(e)), measured="against the source")


def quality_problems(quality: dict[str, dict], min_sqnr: Optional[float], max_rel: Optional[float]) -> list[str]:
    out = []
    for name, q in quality.items():
        sqnr, rel = q.get("sqnr_db"), q.get("rel_error")
        if min_sqnr is not None and sqnr is not None and sqnr < min_sqnr:
            out.append(f"tensor {name!r}: SQNR {sqnr:.2f} dB is below {min_sqnr} dB")
        if max_rel is not None and (rel is None or rel > max_rel):
            out.append(f"tensor {name!r}: relative error {rel} is above {max_rel}")
    return out


def compare_with_source(packed: dict[str, dict], files: list[dict], carried: list[dict], decoded: dict[str, str],
                        ckpt: Checkpoint, src: dict, holder: str) -> list[str]:
    """What differs between what was packed (tensor records by name, the index's files and carried files;
    `decoded`: the SHA-256 of each plain tensor as decoded) and the source checkpoint. `holder` names the
    packed side in the messages ("the container", "the set")."""
    problems = []
    for name in sorted(set(src) - set(packed)):
        problems.append(f"tensor {name!r} is in the source but not in {holder}")
    for name in sorted(set(packed) - set(src)):
        problems.append(f"tensor {name!r} is in {holder} but not in the source")
    for name in sorted(set(src) & set(packed)):
        f, e = src[name]
        t = packed[name]
        if (e.dtype, e.shape) != (t["dtype"], t["shape"]):
            problems.append(f"tensor {name!r}: dtype/shape {t['dtype']}{t['shape']} differs from the source's {e.dtype}{e.shape}")
            continue
        source_hash = tensor_sha256(f.path, e)
        if source_hash != t["sha256"]:  # lossy or not: the container records the SHA-256 of what it packed
            problems.append(f"tensor {name!r}: differs from the packed source (SHA-256)")
        elif not t["stages"] and source_hash != decoded.get(name):
            problems.append(f"tensor {name!r}: decoded data differs from the source")
    src_meta = {f.rel: f.metadata for f in ckpt.files}
    for f in files:
        md = json.loads(f["header"]).get("__metadata__")
        if f["name"] in src_meta and src_meta[f["name"]] != md:
            problems.append(f"file {f['name']}: __metadata__ differs from the source")
    carried_src: dict[str, Path] = dict(ckpt.carried)
    for c in carried:
        p = carried_src.get(c["name"])
        if p is not None and file_sha256(p) != c["sha256"]:
            problems.append(f"file {c['name']}: differs from the source")
    return problems
