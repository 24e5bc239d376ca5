"""Decoded tensors as torch tensors: the device and the decoder chosen for a call, decoded bytes as a
tensor, one tensor of an open container, and a container decoded on a device into files. Used by load,
open, unpack (api.py), sharded sets (shards.py) and weightpack.hf; torch is imported on first use."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .container import ContainerReader
from .dtypes import torch_dtype
from .errors import FormatError, UsageError
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


def to_tensor(t: dict, pieces: list[bytes], device: "torch.device") -> "torch.Tensor":
    """A decoded tensor (its record `t` and its bytes in pieces) as a torch tensor on `device`."""
    import torch

    dt = torch_dtype(t["dtype"])
    if dt is None:
        raise UsageError(f"tensor {t['name']!r}: torch has no dtype for {t['dtype']}")
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


def read_tensor(reader: ContainerReader, t: dict, device: "torch.device", on_device: bool) -> "torch.Tensor":
    """One tensor of an open container (its record `t`), decoded on the device or on the host."""
    if on_device:
        from . import device as on_device_decoder

        return dict(on_device_decoder.load(reader, device, names=[t["name"]]))[t["name"]]  # to the end: its checks
    for rec, pieces in decode_tensors(reader, [t], workers=1):
        return to_tensor(rec, pieces, device)
    raise FormatError(f"tensor {t['name']!r}: nothing decoded")


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
