"""The public API: pack, unpack, load, open, inspect, verify. Glue over checkpoint, pipeline and container."""

from __future__ import annotations

import builtins
import hashlib
import json
import math
import os
import shutil
import struct
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

if TYPE_CHECKING:
    import torch

import numpy as np
import zstandard
from tqdm import tqdm

from . import metrics
from .metrics import stored_bytes
from .checkpoint import Checkpoint, open_checkpoint, validate_header
from .container import (VERSION, ContainerReader, ContainerWriter, _temp_prefix, carried_pieces, check_output_file,
                        temp_output, tensor_blob_refs)
from .coding.storage import compress_best
from .dtypes import torch_dtype
from .errors import FormatError, OutputError, RecipeError, WeightpackError
from ._interrupt import output_committed
from .pipeline import decode_into_files, decode_tensors, pack_checkpoint, tensor_sha256
from .recipe import Recipe, load_recipe
from .stages import lossy

PathLike = Union[str, os.PathLike]


def _bar(total: int, desc: str, show: bool):
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not show,
                dynamic_ncols=True, leave=False)


def default_output(src: PathLike) -> Path:
    p = Path(src)
    if p.is_dir():
        return p.parent / (p.name.rstrip("/") + ".wpk")
    name = p.name
    for suffix in (".safetensors.index.json", ".safetensors"):
        if name.endswith(suffix):
            return p.with_name(name[: -len(suffix)] + ".wpk")
    return p.with_name(name + ".wpk")


def _output_path(dst: PathLike, name: str, create: bool = False) -> Path:
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


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _refuse_input_as_output(target: Path, inputs: list[Path]) -> None:
    for p in inputs:
        if _same_file(target, p):
            raise OutputError(f"{target}: is an input of this command; refusing to write over it")


def _check_targets(min_sqnr, bits, size, allocate) -> None:
    """The quality targets, checked in the caller's words before any work."""
    given = [n for n, v in (("min_sqnr", min_sqnr), ("bits", bits), ("size", size)) if v is not None]
    if len(given) > 1:
        raise RecipeError(f"--{given[0].replace('_', '-')} and --{given[1].replace('_', '-')} cannot be combined",
                          api=f"give at most one of min_sqnr, bits and size (got {' and '.join(given)})")
    if min_sqnr is not None and not (type(min_sqnr) in (int, float) and 0 < min_sqnr <= 90):
        raise RecipeError(f"--min-sqnr must be a number of dB above 0 and at most 90 (got {min_sqnr})",
                          api=f"min_sqnr must be a number of dB above 0 and at most 90 (got {min_sqnr!r})")
    if allocate is not None and bits is None and size is None:
        raise RecipeError(f"--allocate {allocate} applies to rate control: give --bits or --size with it",
                          api=f"allocate={allocate!r} applies to rate control: give bits or size with it")


def pack(src: PathLike, dst: Optional[PathLike] = None, *, recipe: "str | Recipe | dict | None" = "lossless",
         level: Optional[int] = None, min_sqnr: Optional[float] = None, bits: Optional[float] = None,
         size: "int | str | None" = None, allocate: Optional[str] = None, workers: Optional[int] = None,
         force: bool = False, progress: bool = False, shard_size: "int | str | None" = None,
         executor: str = "local", ray_address: Optional[str] = None, _index_extra: Optional[dict] = None) -> dict:
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
    Writes `dst` (default: beside `src`, with the `.wpk` suffix) atomically and returns a summary:
    ``{"path", "bytes_in", "bytes_out", "ratio", "seconds", "tensors"}``, plus ``"lossy"`` when some
    tensor is lossy (how many, their bits per weight, the worst SQNR and its tensor), ``"allocation"`` under
    `bits` or `size` (the step, the target, what was reached, and each lossy tensor's bits and SQNR).

    `shard_size` (bytes, or "5GB", at least 1 MB): write a sharded set instead of one file,
    `<stem>-00001-of-0000N.wpk` ... and the index `<stem>.wpk.index.json` (then "path" is the index and
    "shards" lists the shard files; shards.py, docs/FORMAT.md). `executor="ray"` runs the work units as
    Ray tasks on the cluster at `ray_address` (distributed.py); the output is byte-identical.
    """
    t0 = time.perf_counter()
    _check_targets(min_sqnr, bits, size, allocate)
    rec = load_recipe(recipe)
    if (min_sqnr is not None or bits is not None or size is not None) and _fixed_rules(rec):
        flag = "--min-sqnr" if min_sqnr is not None else "--bits" if bits is not None else "--size"
        arg = flag[2:].replace("-", "_")
        raise RecipeError(f"{flag} sets the quality of ecsq/tcq stages; recipe {rec.name} has other rules "
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
    pack_once = _pack_once
    if shard_size is not None:
        from . import shards

        pack_once = shards.sharded_packer(shards.parse_shard_size(shard_size))
    with _executor(executor, ray_address) as ex:
        if ex.pool is not None:  # workers elsewhere open the files by these paths
            src, dst = os.path.abspath(src), (os.path.abspath(dst) + (os.sep if str(dst).endswith(("/", os.sep)) else "")
                                              if dst is not None else None)
        ckpt = open_checkpoint(src)
        target = _output_path(dst, default_output(src).name) if dst is not None else default_output(src)
        _refuse_input_as_output(target, [f.path for f in ckpt.files] + [p for _, p in ckpt.carried])
        if bits is None and size is None:
            tensors, out_size = pack_once(ckpt, target, rec, workers, force, progress, _index_extra, pool=ex.pool)
            extra = {}
        else:
            tensors, out_size, extra = _pack_to_budget(ckpt, target, rec, bits, size, allocate, workers, force,
                                                       progress, _index_extra, pool=ex.pool, pack_once=pack_once)
    if shard_size is not None:
        target, extra["shards"] = pack_once.summary(target)
    decided = [t for t in tensors if "lowrank" in t]
    if decided:  # what a low-rank stage chose, tensor by tensor (rank 0: quantized directly)
        extra["lowrank"] = [{"name": t["name"], "rank": t["lowrank"]["rank"]} for t in decided]
    lossy_rows = [t for t in tensors if t["stages"]]
    if lossy_rows:
        sqnrs = [(t["quality"]["sqnr_db"], t["name"]) for t in lossy_rows if t["quality"]["sqnr_db"] is not None]
        worst = min(sqnrs) if sqnrs else (None, None)
        weights = sum(math.prod(t["shape"]) for t in lossy_rows)
        extra["lossy"] = {"tensors": len(lossy_rows), "weights": weights,
                          "bits_per_weight": 8.0 * sum(stored_bytes(t) for t in lossy_rows) / weights,
                          "worst_sqnr_db": worst[0], "worst_tensor": worst[1]}
    bytes_in = sum(f.size for f in ckpt.files)
    return {"path": str(target), "bytes_in": bytes_in, "bytes_out": out_size,
            "ratio": out_size / bytes_in if bytes_in else 0.0, "seconds": time.perf_counter() - t0,
            "tensors": len(tensors), **extra}


def _fixed_rules(rec: Recipe) -> str:
    """The recipe's rules that a quality target cannot adjust (not a lone ecsq/tcq quantize stage), named."""
    from .stages.params import QuantParams

    fixed = [r.match for r in rec.rules
             if not any(isinstance(s, QuantParams) and s.mode in ("ecsq", "tcq") for s in r.stages)]
    return ", ".join(fixed)


def _executor(kind: Optional[str], address: Optional[str]):
    from .distributed import executor

    return executor(kind, address)


def _pack_once(ckpt, target: Path, rec: Recipe, workers, force: bool, progress: bool,
               index_extra: Optional[dict] = None, pool=None) -> tuple[list, int]:
    with ContainerWriter(target, force) as w, _bar(ckpt.total_bytes, "pack", progress) as bar:
        tensors = pack_checkpoint(ckpt, w, rec, workers, bar.update, pool=pool)
        carried = [_carry(w, name, path) for name, path in ckpt.carried]
        index = {
            "format": "weightpack", "version": list(VERSION),
            "source": {"kind": ckpt.kind}, "recipe": rec.to_json(),
            "files": [{"name": f.rel, "header": f.header_text} for f in ckpt.files],
            "carried": carried, "tensors": tensors,
        }
        index.update(index_extra or {})  # optional keys (weightpack.torch: "tied")
        return tensors, w.commit(index)


BUDGET_TRIES = 3
BUDGET_MARGIN = 0.004  # the estimate is within ~0.5% at high rates: aim a little low rather than pack twice


def _pack_to_budget(ckpt, target: Path, rec: Recipe, bits, size, allocate: str, workers, force: bool,
                    progress: bool, index_extra: Optional[dict] = None, pool=None, pack_once=None):
    """Rate control (ratecontrol.py): estimate the step, pack, measure; when the result is over the budget,
    scale the budget by what the estimate missed and pack again. A result that never fits is removed."""
    from . import ratecontrol

    allocate = "absolute" if allocate is None else allocate
    if allocate not in ratecontrol.ALLOCATIONS:
        raise RecipeError(f"--allocate must be one of {', '.join(ratecontrol.ALLOCATIONS)}",
                          api=f"allocate must be one of {', '.join(ratecontrol.ALLOCATIONS)} (got {allocate!r})")
    if bits is not None and not (isinstance(bits, (int, float)) and 0 < bits <= 32):
        raise RecipeError(f"--bits must be a number of bits per weight above 0 and at most 32 (got {bits})",
                          api=f"bits must be a number of bits per weight above 0 and at most 32 (got {bits!r})")
    limit = ratecontrol.parse_size(size) if isinstance(size, str) else size
    if limit is not None and (type(limit) is not int or limit <= 0):
        raise RecipeError(f"--size must be a positive number of bytes (got {size})",
                          api=f"size must be a positive number of bytes (got {size!r})")
    rec = ratecontrol.default_recipe(rec)
    samples, fixed_lossy, fixed_other, lossy_weights = ratecontrol.collect(ckpt, rec, pool=pool)
    if not lossy_weights:
        raise RecipeError("rate control: the recipe quantizes no tensor of this checkpoint")
    goal = bits * lossy_weights if bits is not None else 8.0 * limit
    fixed = fixed_lossy if bits is not None else fixed_lossy + fixed_other  # --bits counts lossy tensors only
    budget = goal * (1 - BUDGET_MARGIN)
    for attempt in range(BUDGET_TRIES):
        step = ratecontrol.find_step(samples, fixed, budget, allocate)
        tensors, out_size = (pack_once or _pack_once)(ckpt, target, ratecontrol.with_step(rec, step, allocate, samples),
                                                      workers, force or attempt > 0, progress, index_extra, pool=pool)
        lossy_rows = [t for t in tensors if t["stages"]]
        lossy_bits = 8.0 * sum(stored_bytes(t) for t in lossy_rows)
        reached = lossy_bits if bits is not None else 8.0 * out_size
        if reached <= goal:
            break
        budget *= goal / reached * 0.998
    else:
        if pack_once is None or pack_once is _pack_once:
            target.unlink(missing_ok=True)
        else:
            pack_once.remove(target)
        what = f"{bits} bits per weight" if bits is not None else f"{limit} bytes"
        raise WeightpackError(f"rate control: could not meet {what} (closest: "
                              f"{reached / lossy_weights if bits is not None else reached / 8:.4g})")
    allocation = {
        "step": step, "allocate": allocate, "target": {"bits_per_weight": bits} if bits is not None else {"bytes": limit},
        "bits_per_weight": lossy_bits / lossy_weights, "bytes": out_size,
        "tensors": [{"name": t["name"], "bits_per_weight": 8.0 * stored_bytes(t) / math.prod(t["shape"]),
                     "sqnr_db": t["quality"]["sqnr_db"]} for t in lossy_rows],
    }
    return tensors, out_size, {"allocation": allocation}


SMALL_FILE = 64 << 20


def _carry(w: ContainerWriter, name: str, path: Path) -> dict:
    """Store a non-tensor file: small ones whole (zstd -19 or raw), big ones streamed through zstd."""
    try:
        size = path.stat().st_size
        if size <= SMALL_FILE:
            data = path.read_bytes()
            codec, blob = compress_best(data, 19)
            return {"name": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                    "codec": codec, "blob": w.write_blob(blob)}
        h = hashlib.sha256()
        with builtins.open(path, "rb") as f:
            def pieces():
                comp = zstandard.ZstdCompressor(level=3).compressobj(size=size)
                n = 0
                while piece := f.read(1 << 20):
                    n += len(piece)
                    h.update(piece)
                    yield comp.compress(piece)
                if n != size:
                    raise WeightpackError(f"{path}: changed while being read")
                yield comp.flush()
            blob = w.write_blob_pieces(pieces())
        return {"name": name, "size": size, "sha256": h.hexdigest(), "codec": "zstd", "blob": blob}
    except OSError as e:
        raise WeightpackError(f"{path}: cannot read ({e.strerror})") from None


# -- unpack --------------------------------------------------------------------------------------

class _OutputTree:
    """Output files written under a temporary name and moved into place only when complete."""

    def __init__(self, target: Path, single: bool, force: bool):
        self.target, self.single, self.force = target, single, force
        if single:
            check_output_file(target, force)
            fd, self.tmp = temp_output(target)
            os.close(fd)
        else:
            if target.exists() and not target.is_dir():
                raise OutputError(f"{target}: exists and is not a folder")
            if target.is_dir() and any(target.iterdir()) and not force:
                raise OutputError(f"{target}: folder exists and is not empty (use --force to replace it)",
                                  api=f"{target}: folder exists and is not empty (pass force=True to replace it)")
            parent = target.parent
            if not parent.is_dir():
                raise OutputError(f"{parent}: no such folder")
            if not os.access(parent, os.W_OK):
                raise OutputError(f"{parent}: folder is not writable")
            _, self.tmp = temp_output(target, folder=True)

    def path(self, rel: str) -> Path:
        if self.single:
            return self.tmp
        p = self.tmp.joinpath(*rel.split("/"))
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.exists() or p.is_symlink():
            raise FormatError(f"file {rel} is listed twice")
        return p

    def commit(self) -> None:
        if self.single:
            check_output_file(self.target, self.force)
            output_committed()
            os.replace(self.tmp, self.target)
            return
        output_committed()
        old = None
        if self.target.exists():
            old = Path(tempfile.mkdtemp(prefix=f"{_temp_prefix(self.target)}{os.getpid()}.", suffix=".old",
                                        dir=self.target.parent))
            os.rename(self.target, old / "x")
        os.rename(self.tmp, self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        if self.single:
            self.tmp.unlink(missing_ok=True)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


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
    if Path(src).is_dir():  # a packed model folder (weightpack.hf): small files beside model.wpk
        from .hf import is_packed_folder, unpack as unpack_folder

        if is_packed_folder(src):
            return unpack_folder(src, dst, force=force, workers=workers, progress=progress, device=device,
                                 decoder=decoder)
    dev = _device(device) if device is not None else None
    if dev is not None and not _use_device_decoder(dev, decoder):
        dev = None
    with _executor(executor, ray_address) as ex:
        if ex.pool is not None:
            src = os.path.abspath(src)
            dst = (os.path.abspath(dst) + (os.sep if str(dst).endswith(("/", os.sep)) else "")) if dst is not None else None
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
            target = srcp.parent / name if dst is None else _output_path(dst, name, create=True)
        else:
            target = Path(dst) if dst is not None else srcp.with_name(srcp.name.removesuffix(".wpk") or "unpacked")
            if target.name.endswith(".safetensors") and not target.is_dir():
                n = len(idx["files"]) + len(idx["carried"])
                raise OutputError(f"{target}: this container restores a folder ({n} files), not one .safetensors "
                                  f"file: give a folder to restore it into")
        _refuse_input_as_output(target, [srcp])
        if not single and target.is_dir() and srcp.resolve().is_relative_to(target.resolve()):
            raise OutputError(f"{target}: holds the container being unpacked; refusing to replace it")
        out = _OutputTree(target, single, force)
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
                with builtins.open(path, "wb") as fh:
                    fh.write(struct.pack("<Q", len(header)) + header)
                    fh.truncate(total)
                for e in entries:
                    targets[e.name] = (str(path), 8 + len(header) + e.begin)
            with _bar(sum(t["nbytes"] for t in idx["tensors"]), "unpack", progress) as bar:
                if dev is None:
                    decode_into_files(r, targets, workers, bar.update, pool=pool)
                else:
                    _write_from_device(r, dev, targets, bar.update)
            for c in idx["carried"]:
                with builtins.open(out.path(c["name"]), "wb") as fh:
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


def _write_from_device(r: ContainerReader, dev: "torch.device", targets: dict, progress) -> None:
    import torch

    from . import device as on_device

    for name, x in on_device.load(r, dev, progress, raw=True):
        path, offset = targets[name]
        with builtins.open(path, "r+b") as fh:
            fh.seek(offset)
            fh.write(x.reshape(-1).view(torch.uint8).cpu().numpy().tobytes() if x.numel() else b"")


# -- load / open ---------------------------------------------------------------------------------

def _device(device: "str | torch.device") -> "torch.device":
    import torch

    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise WeightpackError(f"unknown device {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise WeightpackError("device 'cuda' requested but no CUDA GPU is available (use --device auto or cpu)",
                              api="device 'cuda' requested but no CUDA GPU is available (use device='auto' or 'cpu')")
    return dev


def _to_tensor(t: dict, pieces: list[bytes], device: "torch.device") -> "torch.Tensor":
    import torch

    dt = torch_dtype(t["dtype"])
    if dt is None:
        raise WeightpackError(f"tensor {t['name']!r}: torch has no dtype for {t['dtype']}")
    if len(pieces) == 1 and isinstance(pieces[0], np.ndarray) and pieces[0].flags.writeable:
        buf = torch.from_numpy(pieces[0])  # a reconstruction: ours already, no copy
    else:
        buf = torch.empty(t["nbytes"], dtype=torch.uint8)
        view, off = memoryview(buf.numpy()), 0
        for p in pieces:
            view[off:off + len(p)] = p
            off += len(p)
    x = buf.view(dt).reshape(t["shape"])
    return x.to(device) if device.type != "cpu" else x


DECODERS = ("auto", "host", "device")


def _use_device_decoder(dev: "torch.device", decoder: str) -> bool:
    if decoder not in DECODERS:
        raise WeightpackError(f"unknown decoder {decoder!r} (use one of {', '.join(DECODERS)})")
    return decoder == "device" or (decoder == "auto" and dev.type != "cpu")


def load(path: PathLike, device: "str | torch.device" = "cpu", workers: Optional[int] = None, *,
         decoder: str = "auto", progress: bool = False) -> "dict[str, torch.Tensor]":
    """Decode every tensor of a container into a dict of torch tensors on `device` ("cpu", "cuda", "auto").

    `decoder`: "host" decodes on the CPU with workers (then copies to the device); "device"
    decodes on the device itself (device.py: lock-step ANS lanes, reconstruction in torch); "auto" (the
    default) is "device" for a GPU and "host" for the CPU.
    """
    from . import shards

    dev = _device(device)
    if shards.is_set(path):  # a sharded set (its index or its folder): one dict over every shard
        return shards.load(path, dev, workers, decoder, progress)
    with ContainerReader(path) as r:
        with _bar(sum(t["nbytes"] for t in r.index["tensors"]), "load", progress) as bar:
            if _use_device_decoder(dev, decoder):
                from . import device as on_device

                return dict(on_device.load(r, dev, bar.update))
            return {t["name"]: _to_tensor(t, pieces, dev)
                    for t, pieces in decode_tensors(r, r.index["tensors"], workers, bar.update)}


def source_metadata(files: list) -> Optional[dict]:
    """The `__metadata__` of the first source file (an index's "files") that has one."""
    for f in files:
        md = json.loads(f["header"]).get("__metadata__")
        if md is not None:
            return md
    return None


def read_tensor(reader: ContainerReader, t: dict, device: "torch.device", on_device: bool) -> "torch.Tensor":
    """One tensor of an open container (its record `t`), decoded on the device or on the host."""
    if on_device:
        from . import device as on_device_decoder

        return dict(on_device_decoder.load(reader, device, names=[t["name"]]))[t["name"]]  # to the end: its checks
    for rec, pieces in decode_tensors(reader, [t], workers=1):
        return _to_tensor(rec, pieces, device)
    raise FormatError(f"tensor {t['name']!r}: nothing decoded")


class WpkFile:
    """Lazy access to a container, like safetensors' `safe_open`: keys(), metadata(), get_tensor(name)."""

    def __init__(self, path: PathLike, device: "str | torch.device" = "cpu", decoder: str = "auto"):
        self.device = _device(device)
        self._on_device = _use_device_decoder(self.device, decoder)
        self._r = ContainerReader(path)
        self._by_name = {t["name"]: t for t in self._r.index["tensors"]}

    def keys(self) -> list[str]:
        return list(self._by_name)

    def metadata(self) -> Optional[dict]:
        """The `__metadata__` of the (first) source file, as safetensors' safe_open gives it."""
        return source_metadata(self._r.index["files"])

    def get_tensor(self, name: str) -> "torch.Tensor":
        t = self._by_name.get(name)
        if t is None:
            raise KeyError(name)
        return read_tensor(self._r, t, self.device, self._on_device)

    def get_slice(self, name: str):
        """A lazy view of one tensor, like safe_open's get_slice: get_shape(), get_dtype(), and `[...]`
        (integers, slices, `...`), which decodes only the chunks the slice needs (lazy.py)."""
        from .lazy import TensorSlice

        return TensorSlice(self, name)

    def close(self) -> None:
        self._r.close()

    def __enter__(self) -> "WpkFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open(path: "PathLike | list[PathLike]", device: "str | torch.device" = "cpu", decoder: str = "auto"):  # noqa: A001
    """Open a container for lazy, per-tensor access (like safetensors' safe_open; see `load` for `decoder`).
    A sharded set (its `*.wpk.index.json`, or its folder) opens as one model, checked against its index
    (shards.py); a folder of `.wpk` files or a list of them opens as one set of shards (lazy.WpkSet)."""
    from . import shards
    from .lazy import WpkSet, container_paths

    if not isinstance(path, (list, tuple)) and shards.is_set(path):
        return shards.ShardedWpkFile(path, device, decoder)
    paths = container_paths(path)
    if paths is not None:
        return WpkSet(paths, device, decoder)
    return WpkFile(path, device, decoder)


# -- inspect / verify ----------------------------------------------------------------------------

def inspect(path: PathLike) -> dict:
    """Per-tensor rows (name, dtype, shape, stages, bytes before/after, bits per weight, codec) and totals;
    for a sharded set also "shards" and each row's "shard"."""
    from . import shards

    if shards.is_set(path):
        return shards.inspect(path)
    with ContainerReader(path) as r:
        return metrics.inspect_report(r)


@dataclass
class VerifyReport:
    ok: bool
    checked: int = 0
    problems: list[str] = field(default_factory=list)
    quality: dict[str, dict] = field(default_factory=dict)  # lossy tensors: name -> {sqnr_db, rel_error}

    def to_json(self) -> dict:
        return {"ok": self.ok, "tensors_checked": self.checked, "problems": self.problems, "quality": self.quality}


def check_decoded(items, src: dict, decoded: dict, quality: dict, problems: list) -> int:
    """verify's check of decoded tensors ((record, pieces) from the decoder): a plain tensor's SHA-256 against
    its record (kept in `decoded`), a lossy one's quality against the source where there is one (its
    reconstruction was checked against decoded_sha256 by the decoder). Returns how many were checked; a
    FormatError ends the run as a problem."""
    checked = 0
    try:
        for t, pieces in items:
            checked += 1
            if t["stages"]:
                quality[t["name"]] = _lossy_quality(t, pieces, src.get(t["name"]))
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


def verify(path: PathLike, against: Optional[PathLike] = None, *, min_sqnr: Optional[float] = None,
           max_rel_error: Optional[float] = None, workers: Optional[int] = None,
           progress: bool = False, executor: str = "local", ray_address: Optional[str] = None) -> VerifyReport:
    """Check every checksum and decode every tensor against its recorded SHA-256.

    With `against` (the source checkpoint), also require every lossless tensor, the metadata and the
    carried files to equal the source's (by hash), and measure each lossy tensor's quality against the
    source; without it, lossy tensors are judged by the quality recorded at pack time. `min_sqnr` (dB)
    and `max_rel_error` bound that quality for every lossy tensor.

    Returns a report; `report.ok` is False on any difference or missed bound. Structural damage raises
    FormatError. `path` may be a sharded set (its index or folder): every shard's SHA-256 is checked too.
    `executor="ray"` decodes on the Ray cluster at `ray_address`.
    """
    from . import shards

    with _executor(executor, ray_address) as ex:
        if ex.pool is not None:
            path, against = os.path.abspath(path), os.path.abspath(against) if against is not None else None
        if shards.is_set(path):
            return shards.verify(path, against, min_sqnr, max_rel_error, workers, progress, pool=ex.pool)
        return _verify(path, against, min_sqnr, max_rel_error, workers, progress, ex.pool)


def _verify(path, against, min_sqnr, max_rel_error, workers, progress: bool, pool) -> VerifyReport:
    problems: list[str] = []
    quality: dict[str, dict] = {}
    checked = 0
    ckpt = open_checkpoint(against) if against is not None else None
    src = {e.name: (f, e) for _, f, e in ckpt.tensors()} if ckpt else {}
    with ContainerReader(path) as r:
        idx = r.index
        for t in idx["tensors"]:
            for label, ref in tensor_blob_refs(t):
                data = r._pread(ref["offset"], ref["length"])
                if zlib.crc32(data) != ref["crc32"]:
                    problems.append(f"tensor {t['name']!r} {label}: checksum mismatch")
        for c in idx["carried"]:
            try:
                for _ in carried_pieces(r, c):  # checks crc32, size and SHA-256
                    pass
            except FormatError as e:
                problems.append(str(e))
        decoded: dict[str, str] = {}
        if not problems:
            with _bar(sum(t["nbytes"] for t in idx["tensors"]), "verify", progress) as bar:
                checked += check_decoded(decode_tensors(r, idx["tensors"], workers, bar.update, pool=pool), src,
                                         decoded, quality, problems)
        if ckpt is not None and not problems:
            problems += _compare_with_source(idx, decoded, ckpt, src)
        problems += _quality_problems(quality, min_sqnr, max_rel_error)
    return VerifyReport(not problems, checked, problems, quality)


def _lossy_quality(t: dict, pieces: list[bytes], source) -> dict:
    if source is None:
        return dict(t["quality"], measured="at pack time")
    f, e = source
    if (e.dtype, e.shape) != (t["dtype"], t["shape"]):
        return dict(t["quality"], measured="at pack time")  # reported as a mismatch by _compare_with_source
    return dict(lossy.quality_against(t, b"".join(pieces), f.read(e)), measured="against the source")


def _quality_problems(quality: dict[str, dict], min_sqnr: Optional[float], max_rel: Optional[float]) -> list[str]:
    out = []
    for name, q in quality.items():
        sqnr, rel = q.get("sqnr_db"), q.get("rel_error")
        if min_sqnr is not None and sqnr is not None and sqnr < min_sqnr:
            out.append(f"tensor {name!r}: SQNR {sqnr:.2f} dB is below {min_sqnr} dB")
        if max_rel is not None and (rel is None or rel > max_rel):
            out.append(f"tensor {name!r}: relative error {rel} is above {max_rel}")
    return out


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with builtins.open(path, "rb") as f:
        while piece := f.read(1 << 20):
            h.update(piece)
    return h.hexdigest()


def _compare_with_source(idx: dict, decoded: dict[str, str], ckpt: Checkpoint, src: dict) -> list[str]:
    problems = []
    packed = {t["name"]: t for t in idx["tensors"]}
    for name in sorted(set(src) - set(packed)):
        problems.append(f"tensor {name!r} is in the source but not in the container")
    for name in sorted(set(packed) - set(src)):
        problems.append(f"tensor {name!r} is in the container but not in the source")
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
    for f in idx["files"]:
        md = json.loads(f["header"]).get("__metadata__")
        if f["name"] in src_meta and src_meta[f["name"]] != md:
            problems.append(f"file {f['name']}: __metadata__ differs from the source")
    carried_src = {name: p for name, p in ckpt.carried}
    for c in idx["carried"]:
        p = carried_src.get(c["name"])
        if p is not None and _file_sha256(p) != c["sha256"]:
            problems.append(f"file {c['name']}: differs from the source")
    return problems
