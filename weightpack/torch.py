"""safetensors.torch's functions, in the same shapes, writing and reading .wpk containers.

    from weightpack.torch import save_file, load_file, save, load, save_model, load_model, safe_open

    save_file({"w": w}, "model.wpk", metadata={"format": "pt"}, recipe="int8")
    tensors = load_file("model.wpk", device="cuda")
    save_model(model, "model.wpk")                     # shared tensors stored once, ties recorded
    missing, unexpected = load_model(model, "model.wpk", strict=True)
    with safe_open("model.wpk", framework="pt") as f:  # or a folder of .wpk shards
        part = f.get_slice("w")[:, 1024:2048]          # decodes only the chunks the slice touches

Tensors are written as a safetensors file (exactly what safetensors.torch would write: `save_model` calls it)
in a temporary folder beside the target, packed, and the temporary file removed, so `weightpack unpack`
gives back that very file. Shared tensors: safetensors never stores a tensor twice; neither does weightpack.
`save_model` drops the same names as safetensors' `save_model` (and so writes the same file, with the same
`__metadata__` notes); `save_file` stores each exact alias (same storage, offset, shape, strides) once,
where safetensors' `save_file` refuses them. Either way the container's index records the dropped names
under the optional key `"tied"` ({dropped name: stored name}, docs/FORMAT.md): `load_file` gives back every
name, aliases as the very same tensor, and `load_model` re-ties an alias the model does not share itself.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

import torch

from . import api
from .container import temp_output
from .errors import FormatError, ModelLoadError, OutputError, UsageError
from .results import PackResult

PathLike = Union[str, os.PathLike]

__all__ = ["save_file", "load_file", "save", "load", "save_model", "load_model", "safe_open", "ModelLoadError"]


# -- save ------------------------------------------------------------------------------------------

def _stage_dir(target: Path) -> Path:
    if not target.parent.is_dir():
        raise OutputError(f"{target.parent}: no such folder")
    return temp_output(target, folder=True)[1]


def _source_name(target: Path) -> str:
    name = target.name
    return (name[:-4] if name.endswith(".wpk") else name) + ".safetensors"


def _pack_written(write, filename: PathLike, ties: dict, pack_kwargs: dict) -> PackResult:
    """Call write(path) to make the safetensors file in a temporary folder beside `filename`, pack it into
    `filename` (replacing it, as safetensors does unless force=False is given) with the ties recorded."""
    target = Path(filename)
    tmp = _stage_dir(target)
    try:
        src = tmp / _source_name(target)
        write(str(src))
        kwargs = {"force": True, **pack_kwargs}
        return api.pack(src, target, _index_extra={"tied": ties} if ties else None, **kwargs)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _exact_aliases(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Split off names that are exact aliases of another (same storage, offset, dtype, shape and strides):
    {kept name: tensor}, {alias: kept name}. The first name in sorted order is kept, as safetensors does."""
    from safetensors.torch import _find_shared_tensors

    seen: dict[tuple, str] = {}
    kept: dict[str, torch.Tensor] = {}
    ties: dict[str, str] = {}
    for name in sorted(tensors):
        t = tensors[name]
        if not isinstance(t, torch.Tensor):
            raise UsageError(f"tensor {name!r}: not a torch.Tensor ({type(t).__name__})")
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), t.dtype, tuple(t.shape),
               t.stride()) if t.numel() and t.device.type != "meta" else None
        if key is not None and key in seen:
            ties[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        kept[name] = t
    for group in _find_shared_tensors(kept):
        if len(group) > 1:
            raise UsageError(
                f"tensors {sorted(group)} share memory but are not the same view; clone them first "
                "(or use save_model, which keeps one of each group as safetensors does)")
    return {k: tensors[k] for k in tensors if k in kept}, ties


def save_file(tensors: dict[str, torch.Tensor], filename: PathLike, metadata: Optional[dict[str, str]] = None, *,
              recipe: Any = "lossless", level: Optional[int] = None, **pack_kwargs) -> PackResult:
    """Pack a dict of tensors into a container, like safetensors.torch.save_file.

    `recipe`, `level` and any other keyword (min_sqnr, bits, size, workers, progress, force) are `pack`'s.
    Exact aliases are stored once and come back shared from `load_file`. Returns pack's PackResult."""
    from safetensors.torch import save_file as st_save_file

    kept, ties = _exact_aliases(tensors)
    contiguous = {k: v.contiguous() for k, v in kept.items()}
    return _pack_written(lambda p: st_save_file(contiguous, p, metadata=metadata), filename, ties,
                         {"recipe": recipe, "level": level, **pack_kwargs})


def save(tensors: dict[str, torch.Tensor], metadata: Optional[dict[str, str]] = None, *,
         recipe: Any = "lossless", level: Optional[int] = None, **pack_kwargs) -> bytes:
    """The container's bytes for a dict of tensors (like safetensors.torch.save)."""
    with tempfile.TemporaryDirectory(prefix="weightpack-") as d:
        p = Path(d) / "tensors.wpk"
        save_file(tensors, p, metadata, recipe=recipe, level=level, **pack_kwargs)
        return p.read_bytes()


def save_model(model: torch.nn.Module, filename: PathLike, metadata: Optional[dict[str, str]] = None,
               force_contiguous: bool = True, *, recipe: Any = "lossless", level: Optional[int] = None,
               **pack_kwargs) -> PackResult:
    """Pack a model's state dict, like safetensors.torch.save_model: shared tensors stored once (the names
    safetensors drops, with its `__metadata__` notes), so that `weightpack unpack` gives exactly the file
    safetensors.torch.save_model writes. The dropped names are recorded as ties."""
    from safetensors.torch import _remove_duplicate_names
    from safetensors.torch import save_model as st_save_model

    ties = {alias: kept for kept, group in _remove_duplicate_names(model.state_dict()).items() for alias in group}
    md = dict(metadata) if metadata is not None else None
    return _pack_written(lambda p: st_save_model(model, p, md, force_contiguous), filename, ties,
                         {"recipe": recipe, "level": level, **pack_kwargs})


# -- load ------------------------------------------------------------------------------------------

def container_ties(path: PathLike) -> dict[str, str]:
    """The ties a container records ({alias: stored name}), checked: every alias new, every target stored."""
    from .container import ContainerReader

    paths = _paths(path)
    ties: dict[str, str] = {}
    stored: set[str] = set()
    for p in paths:
        with ContainerReader(p) as r:
            stored |= {t["name"] for t in r.index["tensors"]}
            tied = r.index.get("tied", {})
            if not isinstance(tied, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                     for k, v in tied.items()):
                raise FormatError(f"{p}: index: 'tied' must map names to names")
            ties.update(tied)
    for alias, target in ties.items():
        if alias in stored or target not in stored:
            raise FormatError(f"{path}: index: tie {alias!r} -> {target!r} does not name a stored tensor")
    return ties


def _paths(path) -> list[Path]:
    from .lazy import container_paths

    return container_paths(path) or [Path(path)]


def load_file(filename: "PathLike | list[PathLike]", device: "str | int | torch.device" = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a container (or a folder / list of container shards), like safetensors.torch.load_file;
    tied names come back as the same tensor object as the one stored."""
    dev = f"cuda:{device}" if isinstance(device, int) else device
    out: dict[str, torch.Tensor] = {}
    for p in _paths(filename):
        out.update(api.load(p, dev))
    for alias, target in container_ties(filename).items():
        out[alias] = out[target]
    return out


def load(data: bytes, device: "str | torch.device" = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a container given as bytes (like safetensors.torch.load)."""
    with tempfile.TemporaryDirectory(prefix="weightpack-") as d:
        p = Path(d) / "tensors.wpk"
        p.write_bytes(data)
        return load_file(p, device)


def _module_and_name(model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    owner, _, leaf = name.rpartition(".")
    return (model.get_submodule(owner) if owner else model), leaf


def _retie(model: torch.nn.Module, ties: dict[str, str]) -> set[str]:
    """Make each alias parameter the very parameter it was tied to in the container, where the model holds
    both as separate parameters; returns the aliases re-tied."""
    done = set()
    params = dict(model.named_parameters(remove_duplicate=False))
    for alias, target in ties.items():
        a, t = params.get(alias), params.get(target)
        if a is None or t is None or a is t:
            continue
        if a.shape != t.shape:
            raise ModelLoadError(f"tie {alias!r} -> {target!r}: shapes {list(a.shape)} and {list(t.shape)} differ")
        mod, leaf = _module_and_name(model, alias)
        setattr(mod, leaf, t)
        done.add(alias)
    return done


def load_model(model: torch.nn.Module, filename: "PathLike | list[PathLike]", strict: bool = True,
               device: "str | int | torch.device" = "cpu") -> tuple[list[str], list[str]]:
    """Fill a model from a container, like safetensors.torch.load_model; returns (missing, unexpected).

    Names the model shares among themselves are satisfied by the one stored (safetensors' rule); a tie the
    container records that the model does not share is restored (the alias becomes the same parameter).
    Under `strict`, missing or unexpected names raise ModelLoadError (a RuntimeError), listing them; a
    shape mismatch always does, before any parameter is changed."""
    from safetensors.torch import _remove_duplicate_names

    state_dict = load_file(filename, device=device)
    ties = container_ties(filename)
    for alias in ties:
        state_dict.pop(alias, None)  # stored once: the alias is filled through its tie
    model_state = model.state_dict()
    bad = [f"{k}: the file has {list(v.shape)}, the model {list(model_state[k].shape)}"
           for k, v in state_dict.items() if k in model_state and v.shape != model_state[k].shape]
    if bad:
        raise ModelLoadError(f"Error(s) in loading state_dict for {model.__class__.__name__}: size mismatch for "
                             + "; ".join(bad))
    _retie(model, ties)
    to_removes = _remove_duplicate_names(model.state_dict(), preferred_names=state_dict.keys())
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    missing = set(missing)  # re-tied aliases are now shared: the loop below accounts for them
    unexpected = list(unexpected)
    for group in to_removes.values():
        for name in group:
            if name not in missing:
                unexpected.append(name)
            else:
                missing.remove(name)
    if strict and (missing or unexpected):
        error = f"Error(s) in loading state_dict for {model.__class__.__name__}:"
        if missing:
            error += "\n    Missing key(s) in state_dict: " + ", ".join(f'"{k}"' for k in sorted(missing))
        if unexpected:
            error += "\n    Unexpected key(s) in state_dict: " + ", ".join(f'"{k}"' for k in sorted(unexpected))
        raise ModelLoadError(error)
    return sorted(missing), unexpected


def safe_open(filename: "PathLike | list[PathLike]", framework: str = "pt", device: "str | int" = "cpu"):
    """Lazy access, like safetensors.safe_open: keys(), metadata(), get_tensor(), get_slice(); a folder of
    .wpk shards or a list of them opens as one set. Use as a context manager."""
    if framework not in ("pt", "torch"):
        raise UsageError(f"framework {framework!r} is not supported (weightpack decodes to torch: use 'pt')")
    return api.open_lazy(filename, f"cuda:{device}" if isinstance(device, int) else device)
