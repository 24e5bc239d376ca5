"""Lock-step decoding of ANS lanes: every lane of many chunks (and tensors) advances one symbol per step.

The lanes payloads of entropy.lanes_encode are gathered on the host into one `LaneSet` (the words of all
lanes back to back, and per lane where its words are, how many symbols it holds, where they go and which
table decodes each of them), moved to the device as they are, and decoded there by one of two decoders
of the same algorithm:

* `decode_torch`: vectorized torch, one step of all lanes per iteration of a Python loop. Runs on any
  device; on the CPU it is what the test suite runs (it is not the fast CPU path: that is the codecs' CPU
  decoders, the compiled kernels in threads or constriction in worker processes; coding/native.py).
* `decode_triton`: a Triton kernel, one lane per program element, the step loop inside the kernel. Used on
  CUDA devices when Triton is installed; tests run it under Triton's interpreter (TRITON_INTERPRET=1).

Both implement constriction's AnsCoder decoding (64-bit state, 32-bit words, 24-bit precision) with the
stored 15-bit tables: the symbol of a state is found in a 2**15-entry table per context, indexed by bits
9..23 of the state (docs/FORMAT.md, "Head").
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field

import numpy as np

from ..errors import FormatError
from . import entropy
from .lanes import lane_words, lanes_runs

SLOTS = 1 << entropy.TABLE_BITS
SHIFT = entropy.MODEL_BITS - entropy.TABLE_BITS
NEVER = 1 << 62


def slot_table(f: np.ndarray) -> np.ndarray:
    """For each 15-bit slot of a stored table: its symbol s, f[s] and slot - cdf[s], packed in an int64
    (bits 0-11, 12-27, 28-43), so that one lookup gives all a decoding step needs."""
    f = np.asarray(f, dtype=np.int64)
    cdf = np.cumsum(f) - f
    sym = np.repeat(np.arange(len(f), dtype=np.int64), f)
    return sym | (f[sym] << 12) | ((np.arange(SLOTS, dtype=np.int64) - cdf[sym]) << 28)


@dataclass
class LaneSet:
    """Lanes of many lanes payloads, assembled on the host for one decode. Per lane: where its words are,
    how many symbols it holds, where they go (first position and stride), and its contexts: the table row
    it starts with (ctx0) and the lane steps at which another row takes over (bounds, strictly increasing,
    padded with NEVER) with those rows (ctxs)."""

    words: list = field(default_factory=list)  # u32 arrays
    nwords: int = 0
    cols: dict = field(default_factory=lambda: {k: [] for k in ("wstart", "wend", "nsym", "out", "stride", "ctx0",
                                                                 "bounds", "ctxs")})
    tables: list = field(default_factory=list)  # stored 15-bit tables, one per row
    nsymbols: int = 0  # output length

    def add_tables(self, tables: np.ndarray) -> int:
        """Register a stream's tables; returns the row of its first table."""
        row = len(self.tables)
        self.tables.extend(np.asarray(t, dtype=np.int64) for t in tables)
        return row

    def add(self, payload, run_counts: list[int], row: int, lane: int, where: str) -> int:
        """Add one lanes payload whose runs use table rows row, row+1, ...; returns where its symbols begin
        in the output (they come out in coding order, as entropy.lanes_decode returns them)."""
        C = len(run_counts)
        if C < 1:
            raise ValueError("a lanes payload has at least one run")
        n = int(sum(run_counts))
        words, wc = lane_words(payload, n, lane, where)
        nl = len(wc)
        base = self.nsymbols
        ends = self.nwords + np.cumsum(wc)
        self.words.append(words)
        self.nwords += len(words)
        j = np.arange(nl, dtype=np.int64)
        first = np.cumsum(lanes_runs(run_counts, nl), axis=1)[:, :-1]  # lane step where runs 1.. begin
        ctx0 = row + (first == 0).sum(axis=1)  # runs beginning at step 0 (empty runs too) are passed already
        # a row takes over at a step only where the next run does not begin at the same step (empty runs)
        keep = (first > 0) & np.concatenate([first[:, 1:] != first[:, :-1], np.ones((nl, 1), bool)], axis=1)
        order = np.argsort(~keep, axis=1, kind="stable")
        kept = np.take_along_axis(keep, order, axis=1)
        bounds = np.where(kept, np.take_along_axis(first, order, axis=1), NEVER)  # (nl, C - 1)
        ctxs = np.where(kept, row + 1 + order, 0)
        c = self.cols
        c["wstart"].append(ends - wc)
        c["wend"].append(ends)
        c["nsym"].append(-(-(n - j) // nl))
        c["out"].append(base + j)
        c["stride"].append(np.full(nl, nl, dtype=np.int64))
        c["ctx0"].append(ctx0)
        c["bounds"].append(bounds)
        c["ctxs"].append(ctxs)
        self.nsymbols += n
        return base

    # -- on the device -------------------------------------------------------------------------------
    def to(self, device) -> "DeviceLanes":
        import torch

        cuda = str(device).startswith("cuda")

        def up(x: np.ndarray):
            t = torch.from_numpy(np.ascontiguousarray(x))
            return t.pin_memory().to(device, non_blocking=True) if cuda else t.to(device)

        def col(k):
            parts = self.cols[k]
            return up(np.concatenate(parts).astype(np.int64, copy=False) if parts else np.zeros(0, np.int64))

        # context changes per lane: as many columns as the payload with the most runs needs (at least one)
        width = max([1] + [b.shape[1] for b in self.cols["bounds"]])

        def padded(k, fill):
            parts = [np.pad(b, ((0, 0), (0, width - b.shape[1])), constant_values=fill) for b in self.cols[k]]
            return up(np.concatenate(parts) if parts else np.zeros((0, width), np.int64))

        lut = np.stack([slot_table(f) for f in self.tables]) if self.tables else np.zeros((1, SLOTS), np.int64)
        # the words are copied once, from the mapped file into the (pinned) buffer the device copies from
        staging = torch.empty(max(1, self.nwords), dtype=torch.int32, pin_memory=cuda)
        if self.words:
            np.concatenate(self.words, out=staging.numpy().view(np.uint32)[:self.nwords])
        nsym = np.concatenate(self.cols["nsym"]) if self.cols["nsym"] else np.zeros(0, np.int64)
        return DeviceLanes(
            words=staging.to(device, non_blocking=True) if cuda else staging, wstart=col("wstart"), wend=col("wend"), nsym=col("nsym"), out=col("out"),
            stride=col("stride"), ctx0=col("ctx0"), bounds=padded("bounds", NEVER),
            ctxs=padded("ctxs", 0), lut=up(lut), nsymbols=self.nsymbols,
            steps=int(nsym.max()) if len(nsym) else 0)


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
    ctxs: object
    lut: object
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

    size = d.wend - d.wstart  # 0 words: state 0 (only symbol 0 was coded); 1 word: the state is below 2**32
    hi, lo = word(d.wend - 1), word(d.wend - 2)
    state = torch.where(size == 0, 0, torch.where(size == 1, hi, (hi << 32) | lo))
    ptr = d.wend - size.clamp(max=2)
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
    wstart, ctx0, bounds, ctxs = d.wstart[order], d.ctx0[order], d.bounds[order], d.ctxs[order]
    pos, stride = d.out[order], d.stride[order]
    lut = d.lut.reshape(-1)
    for t in range(d.steps):
        k = int(alive[t])
        if k < len(state):  # lanes that hold t symbols are done: each must have used all its words
            _check_used(ptr[k:], wstart[k:], state[k:], where)
            state, ptr, wstart, ctx0, bounds, ctxs, pos, stride = (
                x[:k] for x in (state, ptr, wstart, ctx0, bounds, ctxs, pos, stride))
        passed = (bounds <= t).sum(dim=1, keepdim=True)
        ctx = torch.where(passed[:, 0] == 0, ctx0, ctxs.gather(1, (passed - 1).clamp(min=0))[:, 0])
        q = state & 0xFFFFFF
        e = lut[ctx * SLOTS + (q >> SHIFT)]
        # state = (state >> 24) * f + q - cdf (24-bit f, cdf): the shift as an unsigned one; the product
        # wraps like the u64 arithmetic it stands for
        state = ((state >> 24) & 0xFFFFFFFFFF) * (((e >> 12) & 0xFFFF) << SHIFT) + ((e >> 28) << SHIFT) + (q & 511)
        need = (state >= 0) & (state < (1 << 32)) & (ptr > wstart)
        w = d.words[(ptr - 1).clamp(min=0)].to(torch.int64) & 0xFFFFFFFF
        state = torch.where(need, (state << 32) | w, state)
        ptr = ptr - need.to(torch.int64)
        out[pos + t * stride] = (e & 0xFFF).to(torch.int32)
    _check_used(ptr, wstart, state, where)
    return out


def _check_used(ptr, wstart, state, where: str) -> None:
    """A lane decoded to its end has read all its words and is back in the coder's initial state, 0."""
    if len(ptr) and bool(((ptr != wstart) | (state != 0)).any()):
        raise FormatError(f"{where}: entropy-coded data is corrupt (stream not used up)")


def upload(a: np.ndarray, device) -> "torch.Tensor":
    """A host array on `device` (through pinned memory on CUDA; a copy on the CPU, so that it may be written)."""
    import torch

    with warnings.catch_warnings():  # a read-only view of the mapped file: it is only ever read
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(np.ascontiguousarray(a))
    if str(device).startswith("cuda"):
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device) if str(device) != "cpu" else t.clone()


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
    def lanes_kernel(words, wstart, wend, nsym, outpos, stride, ctx0, bounds, ctxs, lut, out, left, nlanes, steps,
                     NB: tl.constexpr, BLOCK: tl.constexpr):
        lane = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        live = lane < nlanes
        lo = tl.load(wstart + lane, mask=live, other=0)
        hi = tl.load(wend + lane, mask=live, other=0)
        n = tl.load(nsym + lane, mask=live, other=0)
        base = tl.load(outpos + lane, mask=live, other=0)
        st = tl.load(stride + lane, mask=live, other=0)
        ctx = tl.load(ctx0 + lane, mask=live, other=0)
        nxt = tl.load(bounds + lane * NB, mask=live, other=0)  # the step where the next context begins
        k = tl.zeros([BLOCK], dtype=tl.int64)  # context changes passed
        size = hi - lo  # 0 words: state 0 (only symbol 0 was coded); 1 word: the state is below 2**32
        w1 = tl.load(words + hi - 1, mask=live & (size >= 1), other=0).to(tl.uint32).to(tl.uint64)
        w2 = tl.load(words + hi - 2, mask=live & (size >= 2), other=0).to(tl.uint32).to(tl.uint64)
        state = tl.where(size >= 2, (w1 << 32) | w2, w1)
        ptr = hi - tl.minimum(size, 2)
        for t in range(0, steps):
            act = live & (t < n)
            adv = act & (nxt <= t)  # bounds strictly increase: at most one change per step
            ctx = tl.where(adv, tl.load(ctxs + lane * NB + k, mask=adv, other=0), ctx)
            k = tl.where(adv, k + 1, k)
            nxt = tl.where(adv, tl.load(bounds + lane * NB + k, mask=adv & (k < NB), other=1 << 62), nxt)
            q = state & 0xFFFFFF
            e = tl.load(lut + ctx * 32768 + (q >> 9).to(tl.int64), mask=act, other=0)
            f = ((e >> 12) & 0xFFFF).to(tl.uint64)
            r = (e >> 28).to(tl.uint64)
            x = (state >> 24) * (f << 9) + (r << 9) + (q & 511)
            need = act & (x < 4294967296) & (ptr > lo)
            w = tl.load(words + ptr - 1, mask=need, other=0).to(tl.uint32).to(tl.uint64)
            x = tl.where(need, (x << 32) | w, x)
            ptr = tl.where(need, ptr - 1, ptr)
            state = tl.where(act, x, state)
            tl.store(out + base + t * st, (e & 0xFFF).to(tl.int32), mask=act)
        tl.store(left + lane, (ptr - lo) | (state != 0).to(tl.int64), mask=live)  # 0: used up, initial state

    _KERNEL = lanes_kernel
    return _KERNEL


TRITON_BLOCK = 32  # lanes per program: one warp; a batch holds thousands of lanes


def decode_triton(d: DeviceLanes, where: str, pending: list | None = None):
    """All lanes' symbols (int32, in output order), decoded by the Triton kernel on d's device. The check
    that every lane used up its words is appended to `pending` (checked later by `check_pending`, so the
    host does not wait for the device here), or done at once."""
    import torch

    dev = d.words.device
    out = torch.empty(d.nsymbols, dtype=torch.int32, device=dev)
    if d.nlanes == 0:
        return out
    left = torch.empty(d.nlanes, dtype=torch.int64, device=dev)
    grid = (-(-d.nlanes // TRITON_BLOCK),)
    _kernel()[grid](d.words, d.wstart, d.wend, d.nsym, d.out, d.stride, d.ctx0, d.bounds, d.ctxs, d.lut, out, left,
                    d.nlanes, d.steps, NB=d.bounds.shape[1], BLOCK=TRITON_BLOCK, num_warps=TRITON_BLOCK // 32)
    bad = (left != 0).any()
    if pending is None:
        check_pending([(bad, where)])
    else:
        pending.append((bad, where))
    return out


def check_pending(pending: list) -> None:
    for bad, where in pending:
        if bool(bad):
            raise FormatError(f"{where}: entropy-coded data is corrupt (stream not used up)")
    pending.clear()


def decoder_for(device) -> str:
    """'triton' on CUDA devices where Triton is installed (or where WEIGHTPACK_DECODER=triton, e.g. under
    TRITON_INTERPRET=1 on the CPU), else 'torch'."""
    forced = os.environ.get("WEIGHTPACK_DECODER")
    if forced in ("torch", "triton"):
        return forced
    return "triton" if str(device).startswith("cuda") and triton_available() else "torch"


_TRITON_BROKEN: list = []  # the first error of the Triton kernel on this machine, if it failed to run


def decode(lanes: LaneSet, device, where: str, pending: list | None = None):
    """Decode a LaneSet on `device` with the Triton kernel where it applies, else with torch. Should the
    kernel fail to compile or launch (a Triton or driver this code has not met), the torch decoder takes
    over, with a warning, for the rest of the process: slower, the same symbols."""
    d = lanes.to(device)
    if decoder_for(device) == "triton" and not _TRITON_BROKEN:
        try:
            return decode_triton(d, where, pending)
        except FormatError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure of the kernel itself
            _TRITON_BROKEN.append(e)
            warnings.warn(f"weightpack: the Triton lane decoder failed ({type(e).__name__}: {e}); "
                          "decoding with torch instead", RuntimeWarning, stacklevel=2)
    return decode_torch(d, where)
