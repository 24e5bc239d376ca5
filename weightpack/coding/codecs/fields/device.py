"""The `fields` codec on a torch device (device.py batches the work; this is what is particular to fields):
a laned stream's heads join the batch's lock-step decode, and the stream is rebuilt there with torch:
alphabet lookup, class grouping undone by a per-block offset, tails unpacked from their bit planes (chunks
of equal length as rows of one operation), sign | head | tail joined, the result viewed as its dtype.
Chunks stored as byte planes are decoded on the host and written over their elements."""

from __future__ import annotations

import numpy as np

from ....errors import FormatError
from ...chunks import ChunkCode, chunk_views
from ...lockstep import LaneSet, upload
from ...storage import unstore
from .blocks import BlockGroups, part_names
from .layout import UINT, packed_size, subplanes
from .plan import NAME, Plan


def on_device(plan: Plan, lanes: LaneSet, device, where: str):
    """The rebuilder of a stream whose heads are in ANS lanes (format 1.2 on), else None (decoded on the host)."""
    return FieldsOnDevice(plan, lanes, device) if plan.lane else None


def _work(bits: int):
    import torch

    return torch.int32 if bits <= 16 else torch.int64


class FieldsOnDevice:
    """One laned fields stream being rebuilt on the device: what the host prepared, finished after the batch's
    decode."""

    def __init__(self, plan: Plan, lanes: LaneSet, device):
        self.plan, self.device = plan, device
        self.row = lanes.add_tables(plan.tables) if len(plan.alphabet) > 1 else 0
        self.lane_chunks: list = []  # (a, m, symbol base, BlockGroups of classes)
        self.tails: list = []  # (a, m, BlockGroups of trailing zeros, [(tz, count, width, offset)])
        self.tail_bytes: list = []
        self.tail_size = 0

    def add_chunk(self, lanes: LaneSet, i: int, rec: ChunkCode, payload, where: str) -> bool:
        """Queue chunk i's heads into `lanes` and keep its tails; False for a chunk stored as byte planes (the
        host decodes it)."""
        if rec.codec != NAME:
            return False
        plan = self.plan
        lay, L = plan.layout, plan.block
        a, b = plan.chunk_range(i)
        m = b - a
        views = chunk_views(rec, payload, where)
        if set(views) != part_names(lay):
            raise FormatError(f"{where}: malformed chunk parts")
        bcls, btz = plan.chunk_blocks(i, m)
        hcodec, hdata = views["head"]
        if len(plan.alphabet) == 1:
            if hcodec != "const" or len(hdata):
                raise FormatError(f"{where}: malformed head part")
        else:
            if hcodec != "lanes" or len(hdata) % 4:
                raise FormatError(f"{where}: malformed head part")
            g = BlockGroups(bcls, plan.tables.shape[0], L, m)
            base = lanes.add(hdata, g.counts, self.row, plan.lane, where)
            self.lane_chunks.append((a, m, base, g))
        if lay.tail + lay.sign:
            g = BlockGroups(btz, lay.tail + 1, L, m)
            groups, size = [], 0
            for tz in g.keys():
                width = lay.tail - tz + lay.sign
                groups.append((tz, g.counts[tz], width, self.tail_size + size))
                size += packed_size(g.counts[tz], width)
            tcodec, tdata = views["tail"]
            self.tail_bytes.append(unstore(tcodec, tdata, size, where + " tail"))
            self.tails.append((a, m, g, groups))
            self.tail_size += size
        return True

    def second_round(self, syms, lanes: LaneSet) -> None:
        """Nothing: a fields stream is decoded in one round."""

    def values(self, syms, rests, host: list, tdt) -> "torch.Tensor":
        """The stream's elements (flat, as `tdt`); host: (first element, raw bytes) of the chunks decoded on
        the host."""
        return _as_dtype(self._values(syms, host), self.plan.layout.bits, tdt)

    def _values(self, syms, host: list) -> "torch.Tensor":
        """The elements as unsigned values in the working integer dtype."""
        import torch

        plan, dev = self.plan, self.device
        lay, n = plan.layout, plan.n
        work = _work(lay.bits)
        alphabet = torch.as_tensor(plan.alphabet, dtype=work).to(dev)
        if len(plan.alphabet) == 1:
            head = alphabet[0].expand(n).clone()
        else:
            head = self._heads(syms, alphabet, host)
        if lay.tail + lay.sign:
            tail, tz = self._tails(work)
            t = lay.tail - tz
            v = (head << lay.tail) | ((tail & ((1 << t) - 1)) << tz)
            if lay.sign:
                v |= (tail >> t) << (lay.bits - 1)
        else:
            v = head
        for first, raw in host:  # chunks stored as bytes
            u = np.frombuffer(raw, UINT[lay.bits])
            v[first:first + len(u)] = upload(u.astype(np.int64 if lay.bits > 16 else np.int32, copy=False)
                                             if lay.bits < 64 else u.view(np.int64), dev).to(work)
        return v

    def _heads(self, syms, alphabet, host: list) -> "torch.Tensor":
        """Head values in element order: the symbols of each chunk are grouped by class (blocks.py)."""
        import torch

        plan = self.plan
        L, n = plan.block, plan.n
        chunks = self.lane_chunks
        if not chunks:
            return torch.zeros(n, dtype=alphabet.dtype, device=self.device)
        shift = chunks[0][2] - chunks[0][0]
        if not host and all(g.uniform and base - a == shift for a, _, base, g in chunks):
            return alphabet[syms[shift:shift + n].to(torch.int64)]  # the symbols are the elements, in order
        # the symbol of element e is e + delta[e // L]; blocks of chunks decoded on the host point at some
        # symbol, maybe another stream's, clamped into this alphabet (their heads are overwritten)
        nblocks = -(-n // L)
        delta = -np.arange(nblocks, dtype=np.int64) * L
        for a, m, base, g in chunks:
            b0 = a // L
            start = base
            for c, rows in enumerate(g.rows):
                if len(rows):
                    delta[b0 + rows] = start + np.arange(len(rows), dtype=np.int64) * L - (a + rows * L)
                    start += g.counts[c]
        d = upload(delta, self.device)
        idx = torch.arange(n, dtype=torch.int64, device=self.device) + d.repeat_interleave(L)[:n]
        return alphabet[syms[idx.clamp_(0, syms.numel() - 1)].to(torch.int64).clamp_(max=len(alphabet) - 1)]

    def _tails(self, work) -> tuple["torch.Tensor", "torch.Tensor | int"]:
        """Tail values in element order and the trailing-zero count (one int, or one per element)."""
        import torch

        plan, dev = self.plan, self.device
        L, n = plan.block, plan.n
        buf = upload(np.frombuffer(b"".join(self.tail_bytes), np.uint8), dev)
        tail = torch.zeros(n, dtype=work, device=dev)
        uniform = [(a, m, groups[0]) for a, m, g, groups in self.tails if len(groups) == 1]
        # chunks with one trailing-zero group and equal length are unpacked together, one row each
        by_shape: dict = {}
        for a, m, (tz, cnt, width, off) in uniform:
            by_shape.setdefault((m, width), []).append((a, off))
        for (m, width), items in by_shape.items():
            offs = upload(np.asarray([off for _, off in items], dtype=np.int64), dev)
            rows = buf[offs[:, None] + torch.arange(packed_size(m, width), device=dev)]
            vals = unpack_bits(rows, m, width, work)
            starts = upload(np.asarray([a for a, _ in items], dtype=np.int64), dev)
            tail[(starts[:, None] + torch.arange(m, device=dev)).reshape(-1)] = vals.reshape(-1)
        for a, m, g, groups in self.tails:
            if len(groups) == 1:
                continue
            for tz, cnt, width, off in groups:
                vals = unpack_bits(buf[off:off + packed_size(cnt, width)][None], cnt, width, work)[0]
                pos = g.gather(np.arange(a, a + m, dtype=np.int64), tz)
                tail[upload(pos, dev)] = vals
        tzs = plan.tz if len(plan.tz) else np.zeros(1, np.uint8)
        if int(tzs.min()) == int(tzs.max()):
            return tail, int(tzs[0])
        tz = upload(tzs.astype(np.int64), dev).to(work).repeat_interleave(L)[:n]
        return tail, tz


def unpack_bits(rows: "torch.Tensor", n: int, width: int, work) -> "torch.Tensor":
    """layout.unpack_bits on the device, for each row of a (rows, packed_size(n, width)) uint8 tensor."""
    import torch

    v = torch.zeros(rows.shape[0], n, dtype=work, device=rows.device)
    off, shift = 0, 0
    for w in subplanes(width):
        if w == 8:
            plane = rows[:, off:off + n]
            off += n
        else:
            size = -(-n * w // 8)
            g = rows[:, off:off + size].to(torch.int32)
            off += size
            shifts = torch.arange(0, 8, w, dtype=torch.int32, device=rows.device)
            plane = ((g[:, :, None] >> shifts) & ((1 << w) - 1)).reshape(rows.shape[0], -1)[:, :n]
        v |= plane.to(work) << shift
        shift += w
    return v


def _as_dtype(v: "torch.Tensor", bits: int, tdt) -> "torch.Tensor":
    """Unsigned `bits`-bit values held in a wider signed integer tensor, reinterpreted as `tdt`."""
    import torch

    if bits == 8:
        return v.to(torch.uint8).view(tdt)
    if bits == 16:
        return torch.where(v >= 1 << 15, v - (1 << 16), v).to(torch.int16).view(tdt)
    if bits == 32:
        return torch.where(v >= 1 << 31, v - (1 << 32), v).to(torch.int32).view(tdt)
    return v.view(tdt)
