"""Quantization stage: round to nearest on a uniform grid, 2 to 8 bits.

Symmetric (levels -2^(b-1)+1 .. 2^(b-1)-1, one scale per group) or asymmetric (levels 0 .. 2^b-1, a scale
and a zero point per group); groups are the whole tensor, each output channel (row), or runs of `group`
elements along the input dimension of each row. Scales minimize the squared error: for each group the
clipping range is searched over a grid of fractions of the max-abs (or min/max) range.

encode(w, params) -> Parts: integer levels "q" (int8 or uint8, the tensor's shape), "scale" (float32,
one per group) and for asymmetric "zero" (uint8, one per group). decode(parts, params) -> float32 tensor.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from . import tcq
from .params import QuantParams

CLIP_GRID = torch.linspace(1.0, 0.5, 26).tolist()  # fractions of the range tried for error-minimizing scales


def _groups(w: torch.Tensor, p: QuantParams) -> torch.Tensor:
    """The tensor as (groups, elements per group). The last group of each row is padded with zeros: zero
    lies inside every group's range and quantizes exactly, so padding changes neither scales nor errors."""
    x = w.reshape(w.shape[0], -1) if w.dim() >= 2 else w.reshape(1, -1)
    if p.granularity == "tensor":
        return x.reshape(1, -1)
    if p.granularity == "channel":
        return x
    rows, cols = x.shape
    g = min(p.group, cols)
    pad = (-cols) % g
    if pad:
        x = torch.cat([x, torch.zeros(rows, pad, dtype=x.dtype, device=x.device)], dim=1)
    return x.reshape(rows * (x.shape[1] // g), g)


def _ungroup(q: torch.Tensor, shape: list[int], p: QuantParams) -> torch.Tensor:
    rows = shape[0] if len(shape) >= 2 else 1
    cols = math.prod(shape) // rows if rows else 0
    x = q.reshape(rows, -1)[:, :cols]
    return x.reshape(shape)


def _levels(p: QuantParams) -> tuple[int, int]:
    if p.symmetric:
        m = (1 << (p.bits - 1)) - 1
        return -m, m
    return 0, (1 << p.bits) - 1


def _quantize(g: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    return torch.clamp(torch.round(g / scale[:, None]) + zero[:, None], lo, hi)


SLICE = 1 << 20  # elements searched at a time: memory stays a few times this, whatever the tensor


def _search(g: torch.Tensor, p: QuantParams, lo: int, hi: int):
    """Levels, scale and zero point of each group (rows of g) with the least squared error."""
    best_err = torch.full((g.shape[0],), float("inf"))
    best = None
    for frac in (CLIP_GRID if p.search else [1.0]):
        if p.symmetric:
            scale = (g.abs().amax(dim=1) * frac / hi).clamp_min(torch.finfo(torch.float32).tiny)
            zero = torch.zeros_like(scale)
        else:
            mn, mx = g.amin(dim=1).clamp_max(0) * frac, g.amax(dim=1).clamp_min(0) * frac
            scale = ((mx - mn) / hi).clamp_min(torch.finfo(torch.float32).tiny)
            zero = torch.clamp(torch.round(-mn / scale), lo, hi)
        q = _quantize(g, scale, zero, lo, hi)
        err = ((q - zero[:, None]) * scale[:, None] - g).square().sum(dim=1)
        if best is None:
            best = [q, scale, zero]
        else:
            better = err < best_err
            best[0][better], best[1][better], best[2][better] = q[better], scale[better], zero[better]
        best_err = torch.minimum(err, best_err)
    return best


def encode(w: torch.Tensor, p: QuantParams) -> dict[str, torch.Tensor]:
    if p.mode == "ecsq":
        return _encode_ecsq(w.detach().to(torch.float32), p)
    if p.mode == "tcq":
        return _encode_tcq(w.detach().to(torch.float32), p)
    g = _groups(w.detach().to(torch.float32), p)
    lo, hi = _levels(p)
    step = max(1, SLICE // max(1, g.shape[1]))
    found = [_search(g[i:i + step], p, lo, hi) for i in range(0, g.shape[0], step)]
    q, scale, zero = (torch.cat([f[k] for f in found]) for k in range(3))
    parts = {"q": _ungroup(q, list(w.shape), p).to(torch.int8 if p.symmetric else torch.uint8),
             "scale": scale.to(torch.float32)}
    if not p.symmetric:
        parts["zero"] = zero.to(torch.uint8)
    return parts


def _mse(w: torch.Tensor, step: float) -> float:
    return float((torch.round(w / step) * step - w).square().sum(dtype=torch.float64)) / max(1, w.numel())


SAMPLE = 1 << 20  # elements the step search runs on before it is checked on the whole tensor


def _encode_ecsq(w: torch.Tensor, p: QuantParams) -> dict[str, torch.Tensor]:
    """The coarsest uniform step whose SQNR reaches p.sqnr, and the levels: a bisection in log-step on an
    evenly strided sample, then a short one on the whole tensor (whose result always meets the target)."""
    flat = w.reshape(-1)
    signal = float(flat.double().square().mean()) if flat.numel() else 0.0
    target = signal / 10 ** (p.sqnr / 10)
    if p.step:
        step = p.step * (math.sqrt(signal) if p.relative and signal > 0 else 1.0)
    elif target == 0:  # an all-zero (or empty) tensor
        step = 1.0
    else:
        sample = flat[:: max(1, flat.numel() // SAMPLE)].contiguous()
        goal = target * float(sample.double().square().mean()) / signal if sample.abs().max() > 0 else target
        lo, hi = math.sqrt(12 * target) / 8, math.sqrt(12 * target) * 4
        while _mse(sample, lo) > goal and lo > 1e-30:
            lo /= 4
        for _ in range(30):
            mid = math.sqrt(lo * hi)
            lo, hi = (mid, hi) if _mse(sample, mid) <= goal else (lo, mid)
        lo, hi = lo * 0.97, lo * 1.03  # the whole tensor's step is close: bisect again in a narrow bracket
        while _mse(flat, lo) > target and lo > 1e-30:
            lo *= 0.9
        for _ in range(6):
            mid = math.sqrt(lo * hi)
            lo, hi = (mid, hi) if _mse(flat, mid) <= target else (lo, mid)
        step = lo
    q = torch.round(w / step).to(torch.int64)
    offset = int(q.min()) if q.numel() else 0
    if q.numel() and int(q.max()) - offset > 65535:
        raise ValueError(f"SQNR {p.sqnr} dB needs more than 65536 levels for this tensor")
    return {"q": (q - offset).to(torch.int32), "step": torch.tensor([step], dtype=torch.float32),
            "offset": torch.tensor([offset], dtype=torch.int32)}


TCQ_SAMPLE_PATHS = (1 << 16) // tcq.PATH  # trellis paths the step search runs on before the whole tensor


def _tcq_levels(x, cols: int, delta: float, p: QuantParams):
    levels = tcq.search(x, cols, delta, p.lam)
    if levels.size and max(-int(levels.min()), int(levels.max())) > tcq.LEVEL_MAX:
        raise ValueError(f"the step is too fine for this tensor (levels beyond {tcq.LEVEL_MAX})")
    return levels


def _tcq_recon(r, delta: float):
    """The reconstruction of multiples of the step (float32 arithmetic: the same on every decoder)."""
    return r.astype(np.float32) * np.float32(delta)


def _encode_tcq(w: torch.Tensor, p: QuantParams) -> dict[str, torch.Tensor]:
    """Trellis-coded quantization at a fixed step, or at the coarsest step (within ~1%) whose SQNR reaches
    p.sqnr: the distortion of a trellis quantizer grows about as the square of its step, so the step is
    scaled by the square root of the distortion ratio measured on a sample of paths, then on the tensor."""
    x = w.reshape(-1).double().numpy()
    n = x.size
    cols = n // w.shape[0] if w.dim() >= 2 and w.shape[0] and n else max(1, n)
    signal = float(np.square(x).sum())
    target = signal / 10 ** (p.sqnr / 10)  # the squared error allowed
    if p.step:
        delta = p.step * (math.sqrt(signal / n) if p.relative and signal > 0 else 1.0)
    elif target == 0:
        delta = 1.0
    else:
        delta = math.sqrt(12 * target / n) / 2  # half the step of a uniform quantizer with that error
        stride = max(1, -(-n // tcq.PATH) // TCQ_SAMPLE_PATHS)
        if stride > 1:
            sample = tcq.paths_at(x, np.arange(0, -(-n // tcq.PATH), stride))
            goal = target * float(np.square(sample).sum()) / signal
            for _ in range(3):
                lv = tcq.search(x, cols, delta, p.lam, stride=stride)
                err = float(np.square(tcq.reconstruct(lv, tcq.walk(lv)) * delta - sample).sum())
                if goal <= 0 or err <= 0:
                    break
                delta *= math.sqrt(goal / err)
                if abs(err / goal - 1) < 0.005:
                    break
            delta *= 0.99  # the sample's estimate is within ~1% of the tensor's: aim a little fine
    best = None
    for _ in range(8):
        delta = float(np.float32(delta))  # the step as stored
        levels = tcq.multiples(_tcq_levels(x, cols, delta, p))
        err = sum(float(np.square(_tcq_recon(levels[a:a + SLICE], delta).astype(np.float64) - x[a:a + SLICE]).sum())
                  for a in range(0, n, SLICE))
        if p.step or target == 0 or delta < 1e-30:
            best = (levels, delta)
            break
        if err <= target:
            best = (levels, delta)
            if err >= 0.97 * target:
                break
            delta *= math.sqrt(target / err) * 0.995  # too fine: coarser, keeping this result if that misses
        elif best is not None:
            break
        else:
            delta *= min(0.995, math.sqrt(target / err))
    if best is None:
        raise ValueError(f"cannot reach {p.sqnr} dB with trellis-coded quantization")
    levels, delta = best
    return {"q": torch.from_numpy(levels).reshape(w.shape), "step": torch.tensor([delta], dtype=torch.float32)}


def decode(parts: dict[str, torch.Tensor], p: QuantParams, shape: list[int]) -> torch.Tensor:
    if p.mode == "tcq":  # q: the multiples of the step each element reconstructs to (tcq.py)
        return (parts["q"].to(torch.float32) * parts["step"].to(torch.float32)[0]).reshape(shape)
    if p.mode == "ecsq":
        q = parts["q"].to(torch.int64) + parts["offset"].to(torch.int64)[0]
        return (q.to(torch.float32) * parts["step"].to(torch.float32)[0]).reshape(shape)
    q = parts["q"].to(torch.float32)
    g = _groups(q.reshape(shape), p)
    zero = parts["zero"].to(torch.float32) if "zero" in parts else torch.zeros(g.shape[0], device=g.device)
    if parts["scale"].numel() != g.shape[0] or zero.numel() != g.shape[0]:
        raise ValueError("scale or zero point count does not match the groups")
    x = (g - zero[:, None]) * parts["scale"].to(torch.float32)[:, None]
    return _ungroup(x, shape, p)
