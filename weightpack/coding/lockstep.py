"""Lock-step decoding of ANS lanes: every lane of many chunks (and tensors) advances one symbol per step.

The lanes payloads of entropy.lanes_encode are gathered on the host into one `LaneSet` (the words of all
lanes back to back, and per lane where its words are, how many symbols it holds, where they go and which
table decodes each of them), moved to the device as they are, and decoded there by one of two decoders
of the same algorithm:

* `decode_torch`: vectorized torch, one step of all lanes per iteration of a Python loop. Runs on any
  device; on the CPU it is what the test suite runs (it is not the fast CPU path: that is constriction in
  worker processes).
* `decode_triton`: a Triton kernel, one lane per program element, the step loop inside the kernel. Used on
  CUDA devices when Triton is installed; tests run it under Triton's interpreter (TRITON_INTERPRET=1).

Both implement constriction's AnsCoder decoding (64-bit state, 32-bit words, 24-bit precision) with the
stored 15-bit tables: the symbol of a state is found in a 2**15-entry table per context, indexed by bits
9..23 of the state (docs/FORMAT.md, "Head").
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from ..errors import FormatError
from . import entropy

SLOTS = 1 << entropy.TABLE_BITS
SHIFT = entropy.MODEL_BITS - entropy.TABLE_BITS
MAX_BOUNDS = 8  # context changes within one lane: runs of a chunk (at most 8 classes) -> at most 7


@dataclass
class LaneSet:
    """Lanes of many lanes payloads, assembled on the host for one decode."""

    words: list = field(default_factory=list)  # u32 arrays
    nwords: int = 0
    wstart: list = field(default_factory=list)
    wend: list = field(default_factory=list)
    nsym: list = field(default_factory=list)
    out: list = field(default_factory=list)  # index of the lane's first symbol in the output
    stride: list = field(default_factory=list)
    ctx0: list = field(default_factory=list)  # table row of the lane's first run
    bounds: list = field(default_factory=list)  # lane steps where the next row starts (MAX_BOUNDS, padded)
    tables: list = field(default_factory=list)  # stored 15-bit tables, one per row
    nsymbols: int = 0  # output length

    def add_tables(self, tables: np.ndarray) -> int:
        """Register a stream's tables; returns the row of its first table."""
        row = len(self.tables)
        self.tables.extend(np.asarray(t, dtype=np.int64) for t in tables)
        return row

    def add(self, payload, run_counts: list[int], row: int, lane: int, where: str) -> int:
        """Add one lanes payload whose runs use table rows row, row+1, ...; returns where its symbols begin
        in the output (in coding order, as entropy.lanes_decode returns them)."""
        n = int(sum(run_counts))
        words, wc = entropy.lane_words(payload, n, lane, where)
        nl = len(wc)
        base = self.nsymbols
        ends = self.nwords + np.cumsum(wc)
        self.words.append(words)
        self.nwords += len(words)
        nonempty = [c for c in range(len(run_counts)) if run_counts[c]]
        for j in range(nl):
            per = entropy.lane_runs(list(run_counts), nl, j)
            k = np.cumsum(per)  # lane steps where each run ends
            # the lane's first symbol is in the first run whose end lies beyond step 0; later runs begin
            # at the ends of the earlier ones (empty runs begin and end at the same step: skipped)
            first = next(c for c in nonempty if k[c] > 0)
            b = [int(k[c - 1]) for c in range(first + 1, len(run_counts))]
            b += [1 << 62] * (MAX_BOUNDS - len(b))
            self.wstart.append(int(ends[j] - wc[j]))
            self.wend.append(int(ends[j]))
            self.nsym.append(-(-(n - j) // nl))
            self.out.append(base + j)
            self.stride.append(nl)
            self.ctx0.append(row + first)
            self.bounds.append(b)
        self.nsymbols += n
        return base

    # -- on the device -------------------------------------------------------------------------------
    def to(self, device) -> "DeviceLanes":
        import torch

        def t(x, dtype=torch.int64):
            return torch.as_tensor(np.asarray(x, dtype=np.int64), dtype=dtype).to(device, non_blocking=True)

        amax = max((len(x) for x in self.tables), default=1)
        freq = np.ones((max(1, len(self.tables)), amax), dtype=np.int64)
        cdf = np.zeros_like(freq)
        lut = np.zeros((max(1, len(self.tables)), SLOTS), dtype=np.int32)
        for r, f in enumerate(self.tables):
            freq[r, :len(f)] = f
            cdf[r, :len(f)] = np.cumsum(f) - f
            lut[r] = np.repeat(np.arange(len(f), dtype=np.int32), f)
        words = np.concatenate(self.words).view(np.int32) if self.words else np.zeros(1, np.int32)
        pinned = device is not None and str(device).startswith("cuda")
        wt = torch.from_numpy(words)
        if pinned:
            wt = wt.pin_memory()
        bounds = np.asarray(self.bounds, dtype=np.int64).reshape(-1, MAX_BOUNDS)
        return DeviceLanes(
            words=wt.to(device, non_blocking=True), wstart=t(self.wstart), wend=t(self.wend), nsym=t(self.nsym),
            out=t(self.out), stride=t(self.stride), ctx0=t(self.ctx0), bounds=t(bounds),
            lut=t(lut, torch.int32), freq=t(freq), cdf=t(cdf), nsymbols=self.nsymbols,
            steps=max(self.nsym, default=0))


@dataclass
class DeviceLanes:
    words: object
    wstart: object
    wend: object
    nsym: object
    out: object
    stride: object
    ctx0: object
    bounds: object
    lut: object
    freq: object
    cdf: object
    nsymbols: int
    steps: int

    @property
    def nlanes(self) -> int:
        return int(self.wstart.shape[0])


def _initial_state(d: DeviceLanes):
    """Each lane's state (the last one or two words) and the index of its next word to read (exclusive)."""
    import torch

    def word(i):
        return d.words[i.clamp(min=0)].to(torch.int64) & 0xFFFFFFFF

    one = (d.wend - d.wstart) == 1
    hi, lo = word(d.wend - 1), word(d.wend - 2)
    state = torch.where(one, hi, (hi << 32) | lo)
    ptr = torch.where(one, d.wend - 1, d.wend - 2)
    return state, ptr


def decode_torch(d: DeviceLanes, where: str):
    """All lanes' symbols (int32, in output order), decoded with vectorized torch on d's device."""
    import torch

    dev = d.words.device
    out = torch.empty(d.nsymbols, dtype=torch.int32, device=dev)
    if d.nlanes == 0:
        return out
    order = torch.argsort(d.nsym, descending=True, stable=True)  # active lanes are a prefix at every step
    nsym = d.nsym[order]
    counts = torch.bincount(nsym, minlength=d.steps + 1).cpu().numpy()
    alive = d.nlanes - np.cumsum(counts)  # lanes with more than t symbols
    state, ptr = _initial_state(d)
    state, ptr = state[order], ptr[order]
    wstart, ctx0, bounds = d.wstart[order], d.ctx0[order], d.bounds[order]
    pos, stride = d.out[order], d.stride[order]
    lut, freq, cdf = d.lut.reshape(-1), d.freq.reshape(-1), d.cdf.reshape(-1)
    amax = d.freq.shape[1]
    for t in range(d.steps):
        k = int(alive[t])
        if k < len(state):  # lanes that hold t symbols are done: each must have used all its words
            _check_used(ptr[k:], wstart[k:], where)
            state, ptr, wstart, ctx0, bounds, pos, stride = (
                x[:k] for x in (state, ptr, wstart, ctx0, bounds, pos, stride))
        ctx = ctx0 + (bounds <= t).sum(dim=1)
        q = state & 0xFFFFFF
        s = lut[ctx * SLOTS + (q >> SHIFT)].to(torch.int64)
        f = freq[ctx * amax + s]
        c = cdf[ctx * amax + s]
        # (state >> 24) as an unsigned shift; the product wraps like the u64 arithmetic it stands for
        state = ((state >> 24) & 0xFFFFFFFFFF) * (f << SHIFT) + q - (c << SHIFT)
        need = (state >= 0) & (state < (1 << 32)) & (ptr > wstart)
        w = d.words[(ptr - 1).clamp(min=0)].to(torch.int64) & 0xFFFFFFFF
        state = torch.where(need, (state << 32) | w, state)
        ptr = ptr - need.to(torch.int64)
        out[pos + t * stride] = s.to(torch.int32)
    _check_used(ptr, wstart, where)
    return out


def _check_used(ptr, wstart, where: str) -> None:
    if len(ptr) and bool((ptr != wstart).any()):
        raise FormatError(f"{where}: entropy-coded data is corrupt (stream not used up)")


# -- Triton ------------------------------------------------------------------------------------------

def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


_KERNEL = None


def _kernel():
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL
    import triton
    import triton.language as tl

    @triton.jit
    def lanes_kernel(words, wstart, wend, nsym, outpos, stride, ctx0, bounds, lut, freq, cdf, out, left,
                     nlanes, steps, amax, NB: tl.constexpr, BLOCK: tl.constexpr):
        lane = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        live = lane < nlanes
        lo = tl.load(wstart + lane, mask=live, other=0)
        hi = tl.load(wend + lane, mask=live, other=0)
        n = tl.load(nsym + lane, mask=live, other=0)
        base = tl.load(outpos + lane, mask=live, other=0)
        st = tl.load(stride + lane, mask=live, other=0)
        c0 = tl.load(ctx0 + lane, mask=live, other=0)
        one = (hi - lo) == 1
        w1 = tl.load(words + hi - 1, mask=live & (hi > lo), other=0).to(tl.uint32).to(tl.uint64)
        w2 = tl.load(words + hi - 2, mask=live & (hi - lo >= 2), other=0).to(tl.uint32).to(tl.uint64)
        state = tl.where(one, w1, (w1 << 32) | w2)
        ptr = tl.where(one, hi - 1, hi - 2)
        for t in range(0, steps):
            act = live & (t < n)
            ctx = c0
            for b in tl.static_range(NB):
                ctx += (tl.load(bounds + lane * NB + b, mask=act, other=0) <= t).to(tl.int64)
            q = state & 0xFFFFFF
            s = tl.load(lut + ctx * 32768 + (q >> 9).to(tl.int64), mask=act, other=0).to(tl.int64)
            f = tl.load(freq + ctx * amax + s, mask=act, other=1).to(tl.uint64)
            c = tl.load(cdf + ctx * amax + s, mask=act, other=0).to(tl.uint64)
            nxt = (state >> 24) * (f << 9) + q - (c << 9)
            need = act & (nxt < 4294967296) & (ptr > lo)
            w = tl.load(words + ptr - 1, mask=need, other=0).to(tl.uint32).to(tl.uint64)
            nxt = tl.where(need, (nxt << 32) | w, nxt)
            ptr = tl.where(need, ptr - 1, ptr)
            state = tl.where(act, nxt, state)
            tl.store(out + base + t * st, s.to(tl.int32), mask=act)
        tl.store(left + lane, ptr - lo, mask=live)

    _KERNEL = lanes_kernel
    return _KERNEL


TRITON_BLOCK = 128


def decode_triton(d: DeviceLanes, where: str):
    """All lanes' symbols (int32, in output order), decoded by the Triton kernel on d's device."""
    import torch

    dev = d.words.device
    out = torch.empty(d.nsymbols, dtype=torch.int32, device=dev)
    if d.nlanes == 0:
        return out
    left = torch.empty(d.nlanes, dtype=torch.int64, device=dev)
    grid = (-(-d.nlanes // TRITON_BLOCK),)
    _kernel()[grid](d.words, d.wstart, d.wend, d.nsym, d.out, d.stride, d.ctx0, d.bounds.contiguous(),
                    d.lut, d.freq, d.cdf, out, left, d.nlanes, d.steps, d.freq.shape[1],
                    NB=MAX_BOUNDS, BLOCK=TRITON_BLOCK)
    if bool((left != 0).any()):
        raise FormatError(f"{where}: entropy-coded data is corrupt (stream not used up)")
    return out


def decoder_for(device) -> str:
    """'triton' on CUDA devices where Triton is installed (or where WEIGHTPACK_DECODER=triton, e.g. under
    TRITON_INTERPRET=1 on the CPU), else 'torch'."""
    forced = os.environ.get("WEIGHTPACK_DECODER")
    if forced in ("torch", "triton"):
        return forced
    return "triton" if str(device).startswith("cuda") and triton_available() else "torch"


def decode(lanes: LaneSet, device, where: str):
    d = lanes.to(device)
    if decoder_for(device) == "triton":
        return decode_triton(d, where)
    return decode_torch(d, where)
