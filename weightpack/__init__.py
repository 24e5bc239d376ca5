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

from .api import WpkFile, VerifyReport, inspect, load, open, pack, unpack, verify
from .diff import DiffReport, diff
from .errors import CheckpointError, FormatError, OutputError, RecipeError, VerifyError, WeightpackError

__version__ = "0.1.0"
__all__ = [
    "pack", "unpack", "load", "open", "inspect", "verify", "diff", "WpkFile", "VerifyReport", "DiffReport",
    "WeightpackError", "CheckpointError", "FormatError", "OutputError", "RecipeError", "VerifyError",
]
