"""A packed model folder (weightpack.hf.save_pretrained): the model's small files (config, tokenizer, ...)
as they are, beside `model.wpk` holding its safetensors files; and its restoring to a plain model folder.
Below both api.py (whose unpack takes a packed folder) and hf.py (which writes them)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, Optional

from .container import ContainerReader, check_output_folder, move_into_place, temp_output
from .errors import FormatError

WEIGHTS = "model.wpk"  # the container inside a packed folder


def is_packed_folder(path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / WEIGHTS).is_file()


def unpack_folder(src: Path, dst: Optional[Path], force: bool, unpack: Callable[[Path, Path], Path]) -> Path:
    """Restore a packed folder to a plain one: the small files copied, `model.wpk` restored by
    `unpack(container, output)` (api.unpack's); `dst` defaults to the folder's name with `-unpacked`.
    Written beside the target and moved into place whole."""
    target = Path(dst) if dst is not None else src.parent / (src.name + "-unpacked")
    check_output_folder(target, force)
    stage = temp_output(target, folder=True)[1]
    try:
        out = stage / "out"
        unpack(src / WEIGHTS, out)
        if not out.is_dir():  # a single-file container restores to a file: keep its name, in the folder
            single = out
            out = stage / "folder"
            out.mkdir()
            with ContainerReader(src / WEIGHTS) as r:
                os.replace(single, out / r.index["files"][0]["name"])
        for p in sorted(src.rglob("*")):
            rel = p.relative_to(src)
            if p.is_dir():  # empty module folders too (sentence-transformers' 2_Normalize)
                (out / rel).mkdir(parents=True, exist_ok=True)
            elif p.is_file() and rel.as_posix() != WEIGHTS:
                if (out / rel).exists():
                    raise FormatError(f"{src}: {rel} is both a plain file and in {WEIGHTS}")
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(p, out / rel)
        move_into_place(out, target)
        return target
    finally:
        shutil.rmtree(stage, ignore_errors=True)
