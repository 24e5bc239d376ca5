"""Which codecs rebuild their streams on a torch device: the codec's name -> its device.py's `on_device(plan,
lanes, device, where)`, which gives the stream's rebuilder or None where its layout is decoded on the host.

A rebuilder queues each chunk's ANS lanes into the batch (`add_chunk`, False for a chunk the host must
decode), queues what a second lock-step decode needs once the first one's symbols are known
(`second_round`), and gives the stream's elements on the device (`values`). The `bytes` codec has none: its
chunks are decoded on the host and copied up."""

from __future__ import annotations

from .fields import device as fields_device
from .trellis import device as trellis_device

ON_DEVICE = {"fields": fields_device.on_device, "trellis": trellis_device.on_device}


def rebuilder(plan, lanes, device, where: str):
    """The device rebuilder of a stream (its tables registered in `lanes`), or None: decoded on the host."""
    make = ON_DEVICE.get(plan.codec)
    return make(plan, lanes, device, where) if make is not None else None
