"""transformers and sentence-transformers models in and out of containers (the optional extra `weightpack[hf]`).

    from transformers import AutoModelForCausalLM
    from weightpack.hf import save_pretrained, from_pretrained, unpack

    save_pretrained(model, "packed/", tokenizer=tok, recipe="int8")   # a folder: config, tokenizer, model.wpk
    save_pretrained(model, "model.wpk")                                # or one self-contained container
    model = from_pretrained(AutoModelForCausalLM, "packed/", device="cuda", dtype=torch.bfloat16)
    st = from_pretrained(SentenceTransformer, "minilm.wpk")          # sentence-transformers folders too
    unpack("packed/", "plain/")                                        # back to a plain HF folder

save_pretrained calls the model's own `save_pretrained` (so what is written, and which tied weights are
left out, is exactly what transformers or sentence-transformers write) into a temporary folder beside the
target, and packs it. A `.wpk` target holds everything (the small files are carried); a folder target gets
the small files as they are, plus `model.wpk` holding the safetensors files (and their shard index).

from_pretrained builds the model from the carried config with its parameters on the meta device (no
memory), then decodes the container one tensor at a time, straight onto `device` (on a GPU the device
decoder runs there), and puts each in place; parameters the model shares (tied embeddings) are filled once
and stay shared. Nothing is written to disk but the small files (config, tokenizer; for sentence-transformers
also the weights of modules other than the transformer, e.g. a Dense layer), in a temporary folder.
transformers is imported here only: `import weightpack` never imports it.
"""

from __future__ import annotations

import builtins
import os
import shutil
import struct
import tempfile
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Union

from . import api
from .checkpoint import validate_header
from .container import ContainerReader, carried_pieces, check_output_folder, move_into_place, temp_output
from .errors import CheckpointError, FormatError, ModelLoadError, OutputError, UsageError
from .packed import WEIGHTS, is_packed_folder
from .results import PackResult
from .tensors import resolve_device, to_tensor, use_device_decoder

PathLike = Union[str, os.PathLike]

__all__ = ["save_pretrained", "from_pretrained", "unpack", "is_packed_folder"]


def _is_weights_file(name: str) -> bool:
    return name.endswith(".safetensors") or name.endswith(".safetensors.index.json")


# -- save --------------------------------------------------------------------------------------------

def save_pretrained(model: Any, dst: PathLike, *, tokenizer: Any = None, files: "Iterable[PathLike]" = (),
                    recipe: Any = "lossless", level: Optional[int] = None, force: bool = False,
                    **pack_kwargs) -> PackResult:
    """Save a transformers model (or a SentenceTransformer) as a packed folder or one `.wpk` file.

    The model's own `save_pretrained` writes config, generation config and weights (safetensors), and
    `tokenizer` (anything with `save_pretrained`: a tokenizer, a processor) adds its files, and `files`
    (paths: a README, a license, a chat template) are copied in by their names; all of it goes
    into `dst`: a path ending in `.wpk` is one container with everything carried, any other path a folder
    with the small files as they are and `model.wpk`. `recipe`, `level` and the other keywords are
    `weightpack.pack`'s. Returns pack's result, with `path` the container written."""
    target = Path(dst)
    single = target.suffix == ".wpk"
    if single and not target.parent.is_dir():
        raise OutputError(f"{target.parent}: no such folder")
    if not single:
        check_output_folder(target, force)
    stage = temp_output(target, folder=True)[1]
    try:
        src = stage / "model"
        save = getattr(model, "save_pretrained", None) or getattr(model, "save", None)
        if save is None:
            raise UsageError(f"{type(model).__name__} has no save_pretrained: use weightpack.torch.save_model")
        save(str(src))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(src))
        for f in files:
            f = Path(f)
            if not f.is_file():
                raise CheckpointError(f"{f}: no such file")
            shutil.copyfile(f, src / f.name)
        if not any(p.name.endswith(".safetensors") for p in src.rglob("*")):
            raise CheckpointError(f"{type(model).__name__}.save_pretrained wrote no safetensors file")
        if single:
            return api.pack(src, target, recipe=recipe, level=level, force=force, **pack_kwargs)
        # a folder: the weights (safetensors files and shard index) in model.wpk, the rest beside it
        weights = stage / "weights"
        for p in sorted(src.rglob("*")):
            rel = p.relative_to(src)
            if p.is_file() and _is_weights_file(p.name):
                (weights / rel).parent.mkdir(parents=True, exist_ok=True)
                os.replace(p, weights / rel)
        res = api.pack(weights, src / WEIGHTS, recipe=recipe, level=level, **pack_kwargs)
        shutil.rmtree(weights)
        move_into_place(src, target)
        return replace(res, path=str(target / WEIGHTS))
    finally:
        shutil.rmtree(stage, ignore_errors=True)


# -- the packed model: containers and small files ------------------------------------------------------

class _Packed:
    """What from_pretrained reads: the containers, and a folder with the small files (the packed folder
    itself, or a temporary one with the carried files of a single container)."""

    def __init__(self, src: PathLike):
        self.src = Path(src)
        self._tmp: Optional[Path] = None
        if self.src.is_dir():
            self.containers = sorted(p for p in self.src.iterdir() if p.suffix == ".wpk" and p.is_file())
            if not self.containers:
                raise FormatError(f"{self.src}: no .wpk container in this folder")
            self.folder = self.src
        elif self.src.is_file():
            self.containers = [self.src]
            self._tmp = Path(tempfile.mkdtemp(prefix="weightpack-hf-"))
            self.folder = self._tmp
            with ContainerReader(self.src) as r:
                for c in r.index.carried:
                    if not _is_weights_file(c.name):
                        _write_pieces(self.folder / c.name, carried_pieces(r, c))
        else:
            raise FormatError(f"{self.src}: no such file or folder")

    def names(self) -> list[str]:
        return sorted(p.relative_to(self.folder).as_posix() for p in self.folder.rglob("*") if p.is_file()
                      and p.suffix != ".wpk")

    def require(self, *names: str) -> None:
        missing = [n for n in names if not (self.folder / n).is_file()]
        if missing:
            have = ", ".join(self.names()) or "none"
            raise CheckpointError(
                f"{self.src}: no {' or '.join(missing)} in the packed model (files carried: {have}); "
                "pack the whole model folder (save_pretrained writes config.json), or build the model yourself "
                "and fill it with weightpack.torch.load_model")

    def extract_module_weights(self) -> None:
        """Write the safetensors files of sub-folders (sentence-transformers modules other than the
        transformer: Dense, ...) into the small-files folder, where their modules load them."""
        for path in self.containers:
            with ContainerReader(path) as r:
                for fi, f in enumerate(r.index.files):
                    if "/" in f.name and not (self.folder / f.name).exists():
                        if self._tmp is None:  # a packed folder: do not write into it
                            self._copy_to_tmp()
                        _write_source_file(r, fi, self.folder / f.name)

    def _copy_to_tmp(self) -> None:
        self._tmp = Path(tempfile.mkdtemp(prefix="weightpack-hf-"))
        for n in self.names():
            (self._tmp / n).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.folder / n, self._tmp / n)
        self.folder = self._tmp

    def close(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)


def _write_pieces(path: Path, pieces) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with builtins.open(path, "wb") as fh:
        for piece in pieces:
            fh.write(piece)


def _write_source_file(r: ContainerReader, fi: int, path: Path) -> None:
    """Rebuild one safetensors file of a container byte for byte (its header, then each tensor in place)."""
    from .pipeline import decode_tensors

    f = r.index.files[fi]
    recs = [t for t in r.index.tensors if t.file == fi]
    header = f.header.encode("utf-8")
    _, entries = validate_header(f.header, sum(t.nbytes for t in recs), f.name)
    where = {e.name: 8 + len(header) + e.begin for e in entries}
    path.parent.mkdir(parents=True, exist_ok=True)
    with builtins.open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(header)) + header)
        fh.truncate(8 + len(header) + sum(t.nbytes for t in recs))
        for t, pieces in decode_tensors(r, recs, workers=1):
            fh.seek(where[t.name])
            for p in pieces:
                fh.write(p)


def _decoded(paths: list[Path], device, root_only: bool, decoder: str = "auto") -> Iterator[tuple[str, "Any"]]:
    """(name, tensor on device), one at a time, for the tensors of the containers (of files at the root of
    the model folder only, with root_only: a sentence-transformers transformer's own weights)."""
    from .pipeline import decode_tensors

    dev = resolve_device(device)
    for path in paths:
        with ContainerReader(path) as r:
            recs = [t for t in r.index.tensors if not root_only or "/" not in r.index.files[t.file].name]
            if use_device_decoder(dev, decoder):
                from . import device as on_device

                yield from on_device.load(r, dev, names=[t.name for t in recs])
            else:
                for t, pieces in decode_tensors(r, recs, None):
                    yield t.name, to_tensor(t, pieces, dev)


# -- build and fill --------------------------------------------------------------------------------

@contextmanager
def _params_on_meta():
    """Modules built inside get their parameters on the meta device (no memory); buffers stay real (the
    rotary tables and position ids computed at construction are kept)."""
    import torch

    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            p = module._parameters[name]
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def _build(model_cls: Any, config: Any) -> Any:
    with _params_on_meta():
        if hasattr(model_cls, "from_config"):  # AutoModel* classes
            return model_cls.from_config(config)
        if hasattr(model_cls, "_from_config"):  # a concrete PreTrainedModel class
            return model_cls._from_config(config)
        return model_cls(config)


def _fill(model: Any, tensors: Iterator, device, dtype, ties: dict[str, str], strict: bool) -> dict:
    """Put each decoded tensor in its place (parameters the model shares set once for all their names),
    then move the remaining buffers to the device. Returns {"missing": [...], "unexpected": [...]}."""
    import torch

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    places: dict[str, list[tuple[Any, str, bool]]] = {}  # name -> every (module, attr, is_param) sharing it
    by_id: dict[int, list[tuple[Any, str, bool]]] = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        for leaf, p in list(mod._parameters.items()) + list(mod._buffers.items()):
            if p is None:
                continue
            loc = (mod, leaf, leaf in mod._parameters)
            by_id.setdefault(id(p), []).append(loc)
            places[f"{mname}.{leaf}" if mname else leaf] = by_id[id(p)]
    prefix = getattr(model, "base_model_prefix", "") or ""

    def place(name: str) -> Optional[str]:
        if name in places:
            return name
        if prefix and name.startswith(prefix + ".") and name[len(prefix) + 1:] in places:
            return name[len(prefix) + 1:]
        if prefix and f"{prefix}.{name}" in places:
            return f"{prefix}.{name}"
        return None

    filled: set[int] = set()
    unexpected: list[str] = []
    stored: dict[str, Any] = {}
    for name, x in tensors:
        key = place(name)
        if key is None:
            unexpected.append(name)
            continue
        locs = places[key]
        mod, leaf, is_param = locs[0]
        cur = getattr(mod, leaf)
        if list(x.shape) != list(cur.shape):
            raise ModelLoadError(f"tensor {name!r}: the container has shape {list(x.shape)}, the model "
                                  f"{list(cur.shape)} (is this the model the container was packed from?)")
        if dtype is not None and x.is_floating_point():
            x = x.to(dtype)
        new = torch.nn.Parameter(x, requires_grad=cur.requires_grad) if is_param else x
        for m, lf, isp in locs:
            (m._parameters if isp else m._buffers)[lf] = new
        filled.add(id(locs))
        stored[name] = new
    for alias, target in ties.items():  # ties the container records (weightpack.torch.save_model)
        a, t = place(alias), place(target)
        if a is not None and t is not None and id(places[a]) not in filled and target in stored:
            for m, lf, isp in places[a]:
                (m._parameters if isp else m._buffers)[lf] = stored[target]
            filled.add(id(places[a]))
    missing = sorted(name for name, locs in places.items()
                     if id(locs) not in filled and any(isp for _, _, isp in locs)
                     and getattr(locs[0][0], locs[0][1]).device.type == "meta")
    if missing and strict:
        raise ModelLoadError(f"the container has no tensor for {len(missing)} parameter(s) of "
                              f"{type(model).__name__}: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    dev = resolve_device(device)
    for name in missing:  # strict=False: zeros, as a visible placeholder
        for m, lf, isp in places[name]:
            cur = getattr(m, lf)
            m._parameters[lf] = torch.nn.Parameter(torch.zeros(cur.shape, dtype=dtype or cur.dtype, device=dev),
                                                   requires_grad=cur.requires_grad)
    for mod in model.modules():
        for leaf, b in list(mod._buffers.items()):
            if b is not None and b.device != dev:
                mod._buffers[leaf] = b.to(dev)
    return {"missing": missing, "unexpected": unexpected}


def _is_sentence_transformer(cls: Any) -> bool:
    return isinstance(cls, type) and any(c.__module__.startswith("sentence_transformers") for c in cls.__mro__)


def from_pretrained(cls: Any, packed: PathLike, *, device: Any = "cpu", dtype: Any = None, strict: bool = True,
                    decoder: str = "auto", **kwargs) -> Any:
    """Build a model from a packed folder or a `.wpk` file and fill it from the container, on `device`.

    `cls`: an AutoModel* class, a concrete transformers model class, or SentenceTransformer (or another
    sentence-transformers model class: the folder's modules.json says what it holds). `dtype`: cast
    floating-point weights (default: as stored). `decoder`: as for `weightpack.load` ("auto": on the
    device itself for a GPU, host workers for the CPU). Other keywords go to the SentenceTransformer constructor.
    A container without config.json is an error that says what it carries; under `strict` so is a model
    parameter the container lacks (with strict=False it is zeros). Returns the model in eval mode."""
    p = _Packed(packed)
    try:
        if _is_sentence_transformer(cls):
            return _sentence_transformer(cls, p, device, dtype, strict, decoder, kwargs)
        p.require("config.json")
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(p.folder), local_files_only=True)
        model = _build(cls, config)
        ties = _ties(p.containers)
        report = _fill(model, _decoded(p.containers, device, True, decoder), device, dtype, ties, strict)
        if hasattr(model, "generation_config") and (p.folder / "generation_config.json").is_file():
            from transformers import GenerationConfig

            model.generation_config = GenerationConfig.from_pretrained(str(p.folder), local_files_only=True)
        model.weightpack_load_report = report
        return model.eval()
    finally:
        p.close()


def _ties(paths: list[Path]) -> dict[str, str]:
    ties: dict[str, str] = {}
    for path in paths:
        with ContainerReader(path) as r:
            t = r.index.extra.get("tied", {})
            if isinstance(t, dict):
                ties.update({k: v for k, v in t.items() if isinstance(k, str) and isinstance(v, str)})
    return ties


def _transformer_module_class():
    try:
        from sentence_transformers.base.modules.transformer import TRANSFORMER_TASK_TO_AUTO_MODEL, Transformer
    except ImportError:  # sentence-transformers before 6
        from sentence_transformers.models import Transformer

        TRANSFORMER_TASK_TO_AUTO_MODEL = {}
    return Transformer, TRANSFORMER_TASK_TO_AUTO_MODEL


def _sentence_transformer(cls: Any, p: _Packed, device, dtype, strict: bool, decoder: str, kwargs: dict) -> Any:
    """sentence-transformers builds its modules from the folder's small files; its transformer module's
    `_load_model` (which would read the weights from disk) is replaced, for this call, by a build on the
    meta device filled from the container."""
    p.require("modules.json", "config.json")
    p.extract_module_weights()
    Transformer, tasks = _transformer_module_class()
    original = Transformer._load_model
    folder = str(p.folder)
    reports = []

    def load_from_container(self, model_name_or_path, transformer_task=None, config=None, *args, **kw):
        if os.path.abspath(str(model_name_or_path)) != os.path.abspath(folder) or config is None:
            return original(self, model_name_or_path, transformer_task, config, *args, **kw)
        from transformers import AutoModel

        model = _build(tasks.get(transformer_task) or AutoModel, config)
        reports.append(_fill(model, _decoded(p.containers, device, True, decoder), device, dtype,
                             _ties(p.containers), strict))
        return model

    Transformer._load_model = load_from_container
    try:
        model = cls(folder, device=str(resolve_device(device)), local_files_only=True, **kwargs)
    finally:
        Transformer._load_model = original
    if not reports:
        raise CheckpointError(f"{p.src}: the sentence-transformers model has no transformer module at its root")
    model.weightpack_load_report = reports[0]
    return model.eval()


# -- unpack ----------------------------------------------------------------------------------------------

def unpack(packed: PathLike, dst: Optional[PathLike] = None, *, force: bool = False, **unpack_kwargs) -> Path:
    """A plain HF folder from a packed folder or a `.wpk` of a folder: the small files as they are and the
    safetensors files restored (byte-identical to what was packed, for lossless recipes). `dst` defaults
    to the packed folder's name with `-unpacked` (for a `.wpk`: as `weightpack.unpack`, which this is:
    packed.py restores a packed folder)."""
    return api.unpack(packed, dst, force=force, **unpack_kwargs)
