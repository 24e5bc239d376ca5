"""Decoded tensors as torch tensors: the device and the decoder chosen for a call, decoded bytes as a
tensor, one tensor of an open container, and a container decoded on a device into files. Used by load,
open, unpack (api.py), sharded sets (shards.py) and weightpack.hf; torch is imported on first use."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .container import ContainerReader
from .dtypes import torch_dtype
from .errors import FormatError, UsageError
from .index import TensorRecord
from .pipeline import decode_tensors

if TYPE_CHECKING:
    import torch

DECODERS = ("auto", "host", "device")


def resolve_device(device: "str | torch.device") -> "torch.device":
    """A torch device from what the caller gave ("auto": a GPU if there is one, else the CPU)."""
    import torch

    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"unknown device {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("device 'cuda' requested but no CUDA GPU is available (use --device auto or cpu)",
                         api="device 'cuda' requested but no CUDA GPU is available (use device='auto' or 'cpu')")
    return dev


def use_device_decoder(dev: "torch.device", decoder: str) -> bool:
    """Whether to decode on the device itself (device.py) rather than on the host's workers."""
    if decoder not in DECODERS:
        raise UsageError(f"unknown decoder {decoder!r} (use one of {', '.join(DECODERS)})")
    return decoder == "device" or (decoder == "auto" and dev.type != "cpu")


_SAME_WIDTH = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}


def _numpy_dtype(dt: "torch.dtype"):
    """The numpy dtype torch.from_numpy makes `dt` from, or None where numpy has none (bfloat16, float8)."""
    import torch

    return {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64, torch.int8: np.int8,
            torch.int16: np.int16, torch.int32: np.int32, torch.int64: np.int64, torch.uint8: np.uint8,
            torch.bool: np.bool_}.get(dt)


def to_tensor(t: TensorRecord, pieces: list[bytes], device: "torch.device") -> "torch.Tensor":
    """A decoded tensor (its record `t` and its bytes in pieces) as a torch tensor on `device`."""
    import torch

    dt = torch_dtype(t.dtype)
    if dt is None:
        raise UsageError(f"{t.where}: torch has no dtype for {t.dtype}")
    if len(pieces) == 1 and isinstance(pieces[0], np.ndarray) and pieces[0].flags.writeable:
        # ours already (decoded into it, or a reconstruction): no copy; shaped and typed by numpy where it has
        # the dtype, since torch's view and reshape release the GIL, and taking it back waits for the workers
        a = pieces[0].view(np.uint8)
        if a.nbytes == t.nbytes and dt.itemsize in _SAME_WIDTH:
            np_dt = _numpy_dtype(dt)
            x = torch.from_numpy(a.view(np_dt or _SAME_WIDTH[dt.itemsize]).reshape(t.shape))
            x = x if np_dt is not None else x.view(dt)  # bfloat16, float8: no numpy dtype
            return x.to(device) if device.type != "cpu" else x
        buf = torch.from_numpy(a)
    else:
        buf = torch.empty(t.nbytes, dtype=torch.uint8)
        view, off = memoryview(buf.numpy()), 0
        for p in pieces:
            view[off:off + len(p)] = p
            off += len(p)
    x = buf.view(dt).reshape(t.shape)
    return x.to(device) if device.type != "cpu" else x


def read_tensor(reader: ContainerReader, t: TensorRecord, device: "torch.device", on_device: bool) -> "torch.Tensor":
    """One tensor of an open container (its record `t`), decoded on the device or on the host."""
    if on_device:
        from . import device as on_device_decoder

        return dict(on_device_decoder.load(reader, device, names=[t.name]))[t.name]  # to the end: its checks
    for rec, pieces in decode_tensors(reader, [t], workers=1):
        return to_tensor(rec, pieces, device)
    raise FormatError(f"{t.where}: nothing decoded")


def write_from_device(r: ContainerReader, dev: "torch.device", targets: dict, progress) -> None:
    """Decode every tensor of `r` on `dev` and write it into its file at its offset (`targets`: name ->
    (path, offset)), one tensor at a time."""
    import torch

    from . import device as on_device

    for name, x in on_device.load(r, dev, progress, raw=True):
        path, offset = targets[name]
        with open(path, "r+b") as fh:
            fh.seek(offset)
            fh.write(x.reshape(-1).view(torch.uint8).cpu().numpy().tobytes() if x.numel() else b"")
