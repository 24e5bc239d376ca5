"""weightpack: compress model weights (safetensors) into .wpk containers and back, bit-exactly.

    import weightpack
    weightpack.pack("model.safetensors")                 # -> model.wpk
    weightpack.unpack("model.wpk", "restored/")          # -> restored/model.safetensors
    tensors = weightpack.load("model.wpk", device="auto")
    with weightpack.open("model.wpk") as f:
        w = f.get_tensor(f.keys()[0])
    weightpack.verify("model.wpk", against="model.safetensors").ok
"""

from .errors import CheckpointError, FormatError, OutputError, RecipeError, VerifyError, WeightpackError

__version__ = "0.1.0"
__all__ = [
    "pack", "unpack", "load", "open", "inspect", "verify", "WpkFile", "VerifyReport",
    "WeightpackError", "CheckpointError", "FormatError", "OutputError", "RecipeError", "VerifyError",
]
_API = ("pack", "unpack", "load", "open", "inspect", "verify", "WpkFile", "VerifyReport")


def __getattr__(name: str):
    # The API (numpy, zstandard, ...) is imported on first use, so that the command line can take over
    # Ctrl-C before its heavy imports (an interrupt while importing would otherwise print a traceback).
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'weightpack' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_API))
