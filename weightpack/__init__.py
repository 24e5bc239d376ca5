"""weightpack: compress model weights (safetensors) into .wpk containers and back, bit-exactly.

    import weightpack
    weightpack.pack("model.safetensors")                 # -> model.wpk
    weightpack.unpack("model.wpk", "restored/")          # -> restored/model.safetensors
    tensors = weightpack.load("model.wpk", device="auto")
    with weightpack.open("model.wpk") as f:
        w = f.get_tensor(f.keys()[0])
    weightpack.verify("model.wpk", against="model.safetensors").ok
"""

from .api import WpkFile, VerifyReport, inspect, load, open, pack, unpack, verify
from .errors import CheckpointError, FormatError, OutputError, RecipeError, VerifyError, WeightpackError

__version__ = "0.1.0"
__all__ = [
    "pack", "unpack", "load", "open", "inspect", "verify", "WpkFile", "VerifyReport",
    "WeightpackError", "CheckpointError", "FormatError", "OutputError", "RecipeError", "VerifyError",
]
