"""The `trellis` codec on a torch device (device.py batches the work; this is what is particular to trellis
levels): a stream in the lanes layout takes two decodes. Its parities join the batch's first lock-step
decode; then the trellis walk on the device gives every element's quantizer, hence its rest's context, and
the rests join a second decode; the multiples are rebuilt from parity and rest. Streams in the step-major
layout are decoded on the host."""

from __future__ import annotations

import numpy as np

from ....errors import FormatError
from ....stages.tcq import GROUP, PATH, PQGROUP, PSKIP
from ...chunks import chunk_views
from ...lockstep import LaneSet, upload
from .codec import split_parts
from .plan import NAME, LevelPlan, split_row_classes


def on_device(plan: LevelPlan, lanes: LaneSet, device, where: str):
    """The rebuilder of a stream in the lanes layout, else None (decoded on the host)."""
    return TrellisOnDevice(plan, lanes, device, where) if plan.ans_lane and plan.alphabet > 1 else None


class TrellisOnDevice:
    """One trellis stream in the lanes layout being rebuilt on the device."""

    def __init__(self, plan: LevelPlan, lanes: LaneSet, device, where: str):
        self.plan, self.device, self.where = plan, device, where
        self.row = lanes.add_tables(plan.ptables)
        self.base = lanes.nsymbols  # its first parity in the first decode's output
        self.rests: list = []  # each chunk's rest part
        self.rest_base = 0  # its first rest in the second decode's output
        self.walked = None  # (parities, quantizers, rest keys) between the two decodes

    def add_chunk(self, lanes: LaneSet, i: int, rec: dict, payload, where: str) -> bool:
        """Chunk i's parities join the first decode; its rests wait for the second (their contexts need the
        quantizers, which need the parities)."""
        plan = self.plan
        a, b = plan.chunk_range(i)
        if rec.get("codec") != NAME:
            raise FormatError(f"{where}: unknown chunk codec {rec.get('codec')!r}")
        pdata, rdata = split_parts(plan, chunk_views(rec, payload, where), where)
        rc = np.bincount(split_row_classes(plan, a, b - a), minlength=plan.classes)
        lanes.add(pdata, rc.tolist(), self.row, plan.ans_lane, where)
        self.rests.append(rdata)
        return True

    def second_round(self, syms, lanes: LaneSet) -> None:
        """Parities in element order, the quantizers (the walk), the rests' contexts; the rests queued into
        `lanes` for the second decode."""
        import torch

        plan, dev = self.plan, self.device
        n, R = plan.n, plan.classes
        chunk_of = torch.arange(n, device=dev) // plan.chunk
        rc = _row_classes(plan, dev)
        order = torch.argsort(chunk_of * R + rc, stable=True) if R > 1 else None
        p = _ungroup(syms[self.base:self.base + n], order).to(torch.int64)
        q = walk_parities(p, dev)
        key = chunk_of * (4 * R) + (q * 2 + p) * R + rc
        counts = torch.bincount(key, minlength=plan.nchunks * 4 * R).reshape(plan.nchunks, 4 * R).cpu().numpy()
        self.walked = (p, q, key)
        if plan.rest > 1:
            row = lanes.add_tables(plan.tables)
            self.rest_base = lanes.nsymbols
            for rdata, c in zip(self.rests, counts):
                lanes.add(rdata, c.tolist(), row, plan.ans_lane, self.where)

    def values(self, syms, rests, host: list, tdt) -> "torch.Tensor":
        """The multiples of the step (int16)."""
        import torch

        plan = self.plan
        p, q, key = self.walked
        self.walked = None
        if plan.rest > 1:
            order = torch.argsort(key, stable=True)
            rs = _ungroup(rests[self.rest_base:self.rest_base + plan.n], order).to(torch.int64)
        else:
            rs = torch.zeros_like(p)
        k = 2 * (rs + plan.rlo) + p
        return (2 * k - q * torch.sign(k)).to(torch.int16)


def _row_classes(plan: LevelPlan, dev) -> "torch.Tensor":
    """The row class of every element of a trellis stream (int64, on the device)."""
    import torch

    if plan.classes == 1:
        return torch.zeros(plan.n, dtype=torch.int64, device=dev)
    rc = upload(plan.rcls.astype(np.int64), dev)
    return rc.repeat_interleave(plan.row)[:plan.n]


def _ungroup(grouped: "torch.Tensor", order) -> "torch.Tensor":
    """Symbols in coding order (grouped by a stable sort, `order`) back to element order."""
    if order is None:
        return grouped
    out = grouped.new_empty(grouped.shape)
    out[order] = grouped
    return out


_WALK = {}


def walk_parities(p: "torch.Tensor", dev) -> "torch.Tensor":
    """tcq.walk_parities on the device: the quantizer (int64) of each element from the levels' parities, 8
    steps per table lookup, every path of 256 elements starting in state 0."""
    import torch

    if dev not in _WALK:
        _WALK[dev] = (torch.as_tensor(PSKIP.astype(np.int64)).reshape(-1).to(dev),
                      torch.as_tensor(PQGROUP.astype(np.int64)).reshape(-1, GROUP).to(dev))
    skip, qgroup = _WALK[dev]
    m = p.numel()
    L = -(-m // PATH)
    padded = torch.zeros(L * PATH, dtype=torch.int64, device=dev)
    padded[:m] = p
    weights = (1 << torch.arange(GROUP, device=dev))
    b = (padded.reshape(L, -1, GROUP) * weights).sum(dim=-1)  # 8 parities -> a byte, first lowest
    q = torch.empty(L, b.shape[1], GROUP, dtype=torch.int64, device=dev)
    state = torch.zeros(L, dtype=torch.int64, device=dev)
    for i in range(b.shape[1]):
        idx = state * 256 + b[:, i]
        q[:, i] = qgroup[idx]
        state = skip[idx]
    return q.reshape(-1)[:m]
