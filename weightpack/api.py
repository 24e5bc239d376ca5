"""The public API: pack, unpack, load, open, inspect, verify. Glue over checkpoint, pipeline and container:
arguments checked, work handed to the module that does it, results typed (results.py)."""

from __future__ import annotations

import math
import os
import struct
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

if TYPE_CHECKING:
    import torch

from . import metrics, ratecontrol
from .checkpoint import open_checkpoint, validate_header
from .container import ContainerReader, OutputTree, carried_pieces, output_path, refuse_input_as_output
from .distributed import executor as run_on
from .errors import OutputError, UsageError
from .lazy import WpkFile, WpkSet, container_paths
from .metrics import stored_bytes
from .packed import is_packed_folder, unpack_folder
from .pipeline import decode_into_files, decode_tensors, pack_container, progress_bar
from .recipe import Recipe, load_recipe
from .results import InspectReport, LossySummary, LowRankChoice, PackResult, VerifyReport
from .tensors import resolve_device, to_tensor, use_device_decoder, write_from_device
from .verify import verify

__all__ = ["pack", "unpack", "load", "open_lazy", "inspect", "verify", "WpkFile", "VerifyReport", "PackResult",
           "InspectReport"]

PathLike = Union[str, os.PathLike]


def default_output(src: PathLike) -> Path:
    p = Path(src)
    if p.is_dir():
        return p.parent / (p.name.rstrip("/") + ".wpk")
    name = p.name
    for suffix in (".safetensors.index.json", ".safetensors"):
        if name.endswith(suffix):
            return p.with_name(name[: -len(suffix)] + ".wpk")
    return p.with_name(name + ".wpk")


def _absolute(path: Optional[PathLike]) -> Optional[str]:
    """An absolute path, keeping a trailing '/' (a folder to create): for workers on other machines."""
    if path is None:
        return None
    return os.path.abspath(path) + (os.sep if str(path).endswith(("/", os.sep)) else "")


def pack(src: PathLike, dst: Optional[PathLike] = None, *, recipe: "str | Recipe | dict | None" = "lossless",
         level: Optional[int] = None, min_sqnr: Optional[float] = None, bits: Optional[float] = None,
         size: "int | str | None" = None, allocate: Optional[str] = None, workers: Optional[int] = None,
         force: bool = False, progress: bool = False, shard_size: "int | str | None" = None,
         executor: str = "local", ray_address: Optional[str] = None, _index_extra: Optional[dict] = None
         ) -> PackResult:
    """Pack a safetensors file, a sharded index (`*.safetensors.index.json`) or a model folder.

    `recipe` is a preset name, a TOML file, a dict or a Recipe; `level` (1-3) trades decode speed for
    size. At most one target overrides the recipe's quality: `min_sqnr` (dB): every matrix (2+ dimensions,
    floating point) trellis-coded with the coarsest step that keeps its SQNR at least this; `bits`: the
    ecsq/tcq matrices (q-tcq's when the recipe has none) get one step, the finest whose lossy tensors
    average at most this many bits per weight; `size` (bytes, or a string such as "9.5MiB"): the same, for
    the whole file at most this size. `allocate`: "absolute" (one step for all: the least total squared
    error), "relative" (one step in units of each tensor's RMS: the least sum over weights of relative
    errors) or "tensor" (in units of RMS x sqrt(size / 2**20): the least sum of the tensors' relative
    errors, each tensor counted once; the closest model outputs at equal size, ratecontrol.py); only with
    `bits` or `size` (default "absolute"). A recipe whose rules are not all ecsq/tcq cannot be combined with
    a target (its rules would be replaced): give the target alone, or a recipe of ecsq/tcq rules.
    Writes `dst` (default: beside `src`, with the `.wpk` suffix) atomically and returns a PackResult
    (results.py): path, bytes_in, bytes_out, ratio, seconds, tensors; `lossy` when some tensor is lossy (how
    many, their bits per weight, the worst SQNR and its tensor); `allocation` under `bits` or `size` (the
    step, the target, what was reached, and each lossy tensor's bits and SQNR); `lowrank` where a low-rank
    stage chose ranks. `to_json()` gives the dict that `weightpack pack --json` prints.

    `shard_size` (bytes, or "5GB", at least 1 MB): write a sharded set instead of one file,
    `<stem>-00001-of-0000N.wpk` ... and the index `<stem>.wpk.index.json` (then `path` is the index and
    `shards` lists the shard files; shards.py, docs/FORMAT.md). `executor="ray"` runs the work units as
    Ray tasks on the cluster at `ray_address` (distributed.py); the output is byte-identical.
    """
    t0 = time.perf_counter()
    budget = ratecontrol.check_targets(min_sqnr, bits, size, allocate)
    rec = load_recipe(recipe)
    if (min_sqnr is not None or budget is not None) and _fixed_rules(rec):
        flag = "--min-sqnr" if min_sqnr is not None else "--bits" if bits is not None else "--size"
        arg = flag[2:].replace("-", "_")
        raise UsageError(f"{flag} sets the quality of ecsq/tcq stages; recipe {rec.name} has other rules "
                         f"({_fixed_rules(rec)}), which it would drop: give {flag} without -r, or a recipe of "
                         f"ecsq/tcq rules (q-tcq, ecsq)",
                         api=f"{arg} sets the quality of ecsq/tcq stages; recipe {rec.name} has other rules "
                             f"({_fixed_rules(rec)}), which it would drop: give {arg} with no recipe, or a "
                             f"recipe of ecsq/tcq rules (q-tcq, ecsq)")
    if level is not None:
        rec = load_recipe({**rec.to_json(), "level": level}) if level != rec.level else rec
    if min_sqnr is not None:  # every matrix: trellis-coded quantization at that quality
        rec = load_recipe({"name": f"{rec.name}, min SQNR {min_sqnr} dB", "level": rec.level, "rules": [
            {"match": "*", "min_dims": 2, "stages": [{"name": "quantize", "mode": "tcq", "sqnr": min_sqnr}]}]})
    sharded = None
    if shard_size is not None:
        from . import shards

        sharded = shards.ShardedPacker(shards.parse_shard_size(shard_size))
    with run_on(executor, ray_address) as ex:
        if ex.pool is not None:  # workers elsewhere open the files by these paths
            src, dst = os.path.abspath(src), _absolute(dst)
        ckpt = open_checkpoint(src)
        target = output_path(dst, default_output(src).name) if dst is not None else default_output(src)
        refuse_input_as_output(target, [f.path for f in ckpt.files] + [p for _, p in ckpt.carried])

        def pack_once(r: Recipe, overwrite: bool = False) -> tuple[list, int]:
            write = sharded or pack_container
            return write(ckpt, target, r, workers, force or overwrite, progress, _index_extra, pool=ex.pool)

        allocation = None
        if budget is None:
            tensors, out_size = pack_once(rec)
        else:
            discard = (lambda: sharded.remove(target)) if sharded else (lambda: target.unlink(missing_ok=True))
            tensors, out_size, allocation = ratecontrol.pack_to_budget(ckpt, rec, budget, pack_once, discard,
                                                                       pool=ex.pool)
    shard_names = None
    if sharded is not None:
        target, shard_names = sharded.summary(target)
    bytes_in = sum(f.size for f in ckpt.files)
    return PackResult(
        path=str(target), bytes_in=bytes_in, bytes_out=out_size, ratio=out_size / bytes_in if bytes_in else 0.0,
        seconds=time.perf_counter() - t0, tensors=len(tensors), allocation=allocation, shards=shard_names,
        lowrank=[LowRankChoice(t["name"], t["lowrank"]["rank"]) for t in tensors if "lowrank" in t] or None,
        lossy=_lossy_summary(tensors),
    )


def _lossy_summary(tensors: list[dict]) -> Optional[LossySummary]:
    """How many tensors are lossy, their weights and bits per weight, the worst SQNR and its tensor."""
    rows = [t for t in tensors if t["stages"]]
    if not rows:
        return None
    sqnrs = [(t["quality"]["sqnr_db"], t["name"]) for t in rows if t["quality"]["sqnr_db"] is not None]
    worst = min(sqnrs) if sqnrs else (None, None)
    weights = sum(math.prod(t["shape"]) for t in rows)
    return LossySummary(tensors=len(rows), weights=weights,
                        bits_per_weight=8.0 * sum(stored_bytes(t) for t in rows) / weights,
                        worst_sqnr_db=worst[0], worst_tensor=worst[1])


def _fixed_rules(rec: Recipe) -> str:
    """The recipe's rules that a quality target cannot adjust (not a lone ecsq/tcq quantize stage), named."""
    from .stages.params import QuantParams

    fixed = [r.match for r in rec.rules
             if not any(isinstance(s, QuantParams) and s.mode in ratecontrol.ADJUSTABLE for s in r.stages)]
    return ", ".join(fixed)


# -- unpack --------------------------------------------------------------------------------------

def unpack(src: PathLike, dst: Optional[PathLike] = None, *, force: bool = False, workers: Optional[int] = None,
           progress: bool = False, device: "str | torch.device | None" = None, decoder: str = "auto",
           executor: str = "local", ray_address: Optional[str] = None) -> Path:
    """Restore safetensors from a container: the same files, tensors, headers and `__metadata__`.

    A single-file source restores to `dst` (a file path, or a folder to put the original name in: an
    existing one, or a path ending in '/', created if its parent exists); a sharded or folder source
    restores to the folder `dst` (default: beside the container, without `.wpk`; a `.safetensors` name is an
    error), with its index and carried files; a packed model folder (weightpack.hf.save_pretrained) restores
    to a plain model folder. `dst` is never the container itself. Returns the path written. With `device` (a GPU, or with
    decoder="device" any device), tensors are decoded on that torch device (see `load`) and written from
    there, one at a time; on the CPU they are decoded by workers (threads with the C kernels, else processes).
    `src` may be a sharded set (its `*.wpk.index.json`, or its folder): the set restores as one model.
    `executor="ray"` decodes on the Ray cluster at `ray_address` (workers write into the output files, so
    they must see the same storage).
    """
    if is_packed_folder(src):  # a packed model folder (weightpack.hf): small files beside model.wpk
        return unpack_folder(Path(src), dst, force, lambda wpk, out: unpack(
            wpk, out, workers=workers, progress=progress, device=device, decoder=decoder, executor=executor,
            ray_address=ray_address))
    dev = resolve_device(device) if device is not None else None
    if dev is not None and not use_device_decoder(dev, decoder):
        dev = None
    with run_on(executor, ray_address) as ex:
        if ex.pool is not None:
            src, dst = os.path.abspath(src), _absolute(dst)
        return _unpack(src, dst, force, workers, progress, dev, ex.pool)


def _unpack(src, dst, force: bool, workers, progress: bool, dev, pool) -> Path:
    from . import shards

    if shards.is_set(src):
        return shards.unpack(src, dst, force, workers, progress, dev, pool=pool)
    with ContainerReader(src) as r:
        idx = r.index
        single = (idx["source"]["kind"] == "file" and len(idx["files"]) == 1 and not idx["carried"]
                  and "/" not in idx["files"][0]["name"])
        srcp = Path(src)
        if single:
            name = idx["files"][0]["name"]
            target = srcp.parent / name if dst is None else output_path(dst, name, create=True)
        else:
            target = Path(dst) if dst is not None else srcp.with_name(srcp.name.removesuffix(".wpk") or "unpacked")
            if target.name.endswith(".safetensors") and not target.is_dir():
                n = len(idx["files"]) + len(idx["carried"])
                raise OutputError(f"{target}: this container restores a folder ({n} files), not one .safetensors "
                                  f"file: give a folder to restore it into")
        refuse_input_as_output(target, [srcp])
        if not single and target.is_dir() and srcp.resolve().is_relative_to(target.resolve()):
            raise OutputError(f"{target}: holds the container being unpacked; refusing to replace it")
        out = OutputTree(target, force, folder=not single)
        try:
            targets = {}
            by_file: dict[int, list] = {}
            for t in idx["tensors"]:
                by_file.setdefault(t["file"], []).append(t)
            for fi, f in enumerate(idx["files"]):
                path = out.path(f["name"])
                header = f["header"].encode("utf-8")
                total = 8 + len(header) + sum(t["nbytes"] for t in by_file.get(fi, []))
                _, entries = validate_header(f["header"], total - 8 - len(header), f["name"])
                with open(path, "wb") as fh:
                    fh.write(struct.pack("<Q", len(header)) + header)
                    fh.truncate(total)
                for e in entries:
                    targets[e.name] = (str(path), 8 + len(header) + e.begin)
            with progress_bar(sum(t["nbytes"] for t in idx["tensors"]), "unpack", progress) as bar:
                if dev is None:
                    decode_into_files(r, targets, workers, bar.update, pool=pool)
                else:
                    write_from_device(r, dev, targets, bar.update)
            for c in idx["carried"]:
                with open(out.path(c["name"]), "wb") as fh:
                    for piece in carried_pieces(r, c):
                        fh.write(piece)
            out.commit()
        except OSError as e:  # writing the output (reads of the container raise FormatError)
            out.abort()
            raise OutputError(f"{target}: cannot write ({e.strerror or e})") from None
        except BaseException:
            out.abort()
            raise
    return target


# -- load / open ---------------------------------------------------------------------------------

def load(path: PathLike, device: "str | torch.device" = "cpu", workers: Optional[int] = None, *,
         decoder: str = "auto", progress: bool = False) -> "dict[str, torch.Tensor]":
    """Decode every tensor of a container into a dict of torch tensors on `device` ("cpu", "cuda", "auto").

    `decoder`: "host" decodes on the CPU with workers (then copies to the device); "device"
    decodes on the device itself (device.py: lock-step ANS lanes, reconstruction in torch); "auto" (the
    default) is "device" for a GPU and "host" for the CPU.
    """
    from . import shards

    dev = resolve_device(device)
    if shards.is_set(path):  # a sharded set (its index or its folder): one dict over every shard
        return shards.load(path, dev, workers, decoder, progress)
    with ContainerReader(path) as r:
        with progress_bar(sum(t["nbytes"] for t in r.index["tensors"]), "load", progress) as bar:
            if use_device_decoder(dev, decoder):
                from . import device as on_device

                return dict(on_device.load(r, dev, bar.update))
            return {t["name"]: to_tensor(t, pieces, dev)
                    for t, pieces in decode_tensors(r, r.index["tensors"], workers, bar.update)}


def open_lazy(path: "PathLike | list[PathLike]", device: "str | torch.device" = "cpu", decoder: str = "auto"):
    """Open a container for lazy, per-tensor access (like safetensors' safe_open; see `load` for `decoder`).
    A sharded set (its `*.wpk.index.json`, or its folder) opens as one model, checked against its index
    (shards.py); a folder of `.wpk` files or a list of them opens as one set of shards (lazy.WpkSet).
    Public as `weightpack.open` (a name this module leaves to the builtin)."""
    from . import shards

    if not isinstance(path, (list, tuple)) and shards.is_set(path):
        return shards.ShardedWpkFile(path, device, decoder)
    paths = container_paths(path)
    if paths is not None:
        return WpkSet(paths, device, decoder)
    return WpkFile(path, device, decoder)


# -- inspect -------------------------------------------------------------------------------------

def inspect(path: PathLike) -> InspectReport:
    """Per-tensor rows (name, dtype, shape, stages, bytes before/after, bits per weight, codec) and totals;
    for a sharded set also `shards` and each row's `shard`. `to_json()` gives what `inspect --json` prints."""
    from . import shards

    if shards.is_set(path):
        return shards.inspect(path)
    with ContainerReader(path) as r:
        return metrics.inspect_report(r)
