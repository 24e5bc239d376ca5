"""weightpack: compress model weights (safetensors) into .wpk containers and back, bit-exactly.

    import weightpack
    weightpack.pack("model.safetensors")                 # -> model.wpk
    weightpack.unpack("model.wpk", "restored/")          # -> restored/model.safetensors
    tensors = weightpack.load("model.wpk", device="auto")
    with weightpack.open("model.wpk") as f:
        w = f.get_tensor(f.keys()[0])
    weightpack.verify("model.wpk", against="model.safetensors").ok
    weightpack.diff("model.safetensors", "model-int4.wpk").summary()

safetensors.torch's functions in the same shapes are in `weightpack.torch` (save_file, load_file, save, load,
save_model, load_model, safe_open); transformers and sentence-transformers models in and out in
`weightpack.hf` (save_pretrained, from_pretrained, unpack; the extra `weightpack[hf]`).
"""

import os as _os
import sys as _sys


def _started_as_command() -> bool:
    """Whether this process is the `weightpack` command (`python -m weightpack` or the console script)."""
    argv = getattr(_sys, "orig_argv", None) or []
    if "-m" in argv:
        return argv[argv.index("-m") + 1:argv.index("-m") + 2] == ["weightpack"]
    return bool(_sys.argv) and _os.path.basename(_sys.argv[0]) == "weightpack"


if _started_as_command():  # Ctrl-C while the command starts: one line, exit 130 (cli.main takes over)
    from ._interrupt import exit_on_sigint

    exit_on_sigint()

from .errors import (BudgetError, CheckpointError, ClusterError, FormatError, ModelLoadError, OutputError,  # noqa: E402
                     RecipeError, UsageError, VerifyError, WeightpackError)
from .diff import DiffReport, diff  # noqa: E402  (bound here: the submodule's name must stay the function)
from .verify import verify  # noqa: E402  (the same)

__version__ = "0.1.0"
__all__ = [
    "pack", "unpack", "load", "open", "inspect", "verify", "diff", "WpkFile", "PackResult", "InspectReport",
    "VerifyReport", "DiffReport", "WeightpackError", "CheckpointError", "FormatError", "RecipeError", "UsageError",
    "BudgetError", "OutputError", "ClusterError", "ModelLoadError", "VerifyError",
]
# the API (api.py) by its public names; `open` is api.open_lazy (api.py leaves the builtin's name alone)
_API = {"pack": "pack", "unpack": "unpack", "load": "load", "open": "open_lazy", "inspect": "inspect",
        "WpkFile": "WpkFile", "PackResult": "PackResult", "InspectReport": "InspectReport",
        "VerifyReport": "VerifyReport"}


def __getattr__(name: str):
    # api.py is imported on first use (diff and verify are bound above: their submodules' names must stay the
    # functions). When started as the command, Ctrl-C is taken over above, before any of these imports.
    if name in _API:
        from . import api

        return getattr(api, _API[name])
    raise AttributeError(f"module 'weightpack' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_API))
