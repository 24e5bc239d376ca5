"""Low rank plus residual: W = A @ B + R, the factors from a truncated SVD, R left to the quantize stage.

A = U_r * S_r (rows x r) and B = V_r^T (r x cols) are stored as 8-bit integers with a float32 scale per row
of A and per column of B, so that the product is exact whatever the machine: the integer products summed
in float64 (exact below 2**53: 127 * 127 * r is far below), then scaled elementwise in float32,
`(a_scale[i] * b_scale[j]) * sum`. The residual R = W - that product is quantized by the next stage at the
tensor's error budget; the reconstruction is the product plus the decoded residual, in float32.

The rank: given in the recipe, or chosen per tensor (rank 0, `lowrank-auto`): a few ranks are tried and
each one's size estimated at equal error (the residual quantized at the step direct quantization would
use, on a sample of rows; the factors' entropy). A rank is taken only where it beats direct quantization;
on trained weights it rarely does (keeping 90% of the energy takes most of the parameters), and the pack
reports what it decided.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Optional

import torch

from .estimate import entropy_bits
from .params import LowRankParams, QuantParams

FACTOR_MAX = 127
SAMPLE_ROWS = 256  # rows of the residual the size estimate quantizes
MIN_GAIN = 0.01  # a rank must save at least this fraction of the direct size


def _as_matrix(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(w.shape[0], -1)


def factorize(w: torch.Tensor, rank: int, svd=None) -> dict[str, torch.Tensor]:
    """The 8-bit factors of the best rank-`rank` approximation of w (2+ dimensions, as rows x cols)."""
    m = _as_matrix(w).double()
    U, S, Vh = svd if svd is not None else torch.linalg.svd(m, full_matrices=False)
    # balance the singular values between the two factors so both have similar ranges
    a = U[:, :rank] * S[:rank].sqrt()
    b = S[:rank].sqrt()[:, None] * Vh[:rank]
    a_scale = (a.abs().amax(dim=1) / FACTOR_MAX).clamp_min(1e-30).float()
    b_scale = (b.abs().amax(dim=0) / FACTOR_MAX).clamp_min(1e-30).float()
    a_q = torch.round(a / a_scale.double()[:, None]).clamp(-FACTOR_MAX, FACTOR_MAX).to(torch.int8)
    b_q = torch.round(b / b_scale.double()[None, :]).clamp(-FACTOR_MAX, FACTOR_MAX).to(torch.int8)
    return {"lr_a": a_q, "lr_as": a_scale, "lr_b": b_q, "lr_bs": b_scale}


def product(parts: dict[str, torch.Tensor], shape: list[int]) -> torch.Tensor:
    """A @ B from the stored factors, exactly (see the module's note), float32, in the tensor's shape."""
    a_q, b_q = parts["lr_a"].double(), parts["lr_b"].double()
    if a_q.shape[1] != b_q.shape[0] or parts["lr_as"].numel() != a_q.shape[0] or parts["lr_bs"].numel() != b_q.shape[1]:
        raise ValueError("low-rank factors of mismatched shapes")
    total = (a_q @ b_q).float()  # exact integers: any summation order gives the same result
    scale = parts["lr_as"].float()[:, None] * parts["lr_bs"].float()[None, :]
    return (scale * total).reshape(shape)


def _entropy_bits(x: torch.Tensor) -> float:
    """Order-0 information content of a tensor's values, in bits."""
    return entropy_bits(torch.unique(x.reshape(-1), return_counts=True)[1].numpy())


def _level_bits(parts: dict[str, torch.Tensor], scale_rows: float) -> float:
    """Estimated coded size of quantized levels (order-0 entropy of q) scaled from a row sample."""
    return _entropy_bits(parts["q"]) * scale_rows


def choose_rank(w: torch.Tensor, quant: QuantParams, encode) -> tuple[int, dict, Optional[dict]]:
    """The rank with the smallest estimated size at the error direct quantization would have (0: none),
    the estimates, and the direct quantization's parts (reused when no rank is taken). `encode(x, params)`
    is the quantize stage."""
    m = _as_matrix(w)
    rows, cols = m.shape
    report = {"rank": 0, "tried": []}
    if min(rows, cols) < 8:
        return 0, report, None
    direct = encode(w, quant)
    if "step" not in direct:  # rtn: no common step to compare at
        return 0, report, direct
    step = float(direct["step"][0])
    pick = torch.linspace(0, rows - 1, min(rows, SAMPLE_ROWS)).round().long().unique()
    scale_rows = rows / len(pick)
    fixed = replace(quant, step=step, sqnr=0.0, relative=False)
    base = _level_bits(encode(m[pick], fixed), scale_rows)
    report["bits_direct"] = base
    svd = torch.linalg.svd(m.double(), full_matrices=False)
    best, best_bits = 0, base * (1 - MIN_GAIN)
    k = min(rows, cols)
    for r in sorted({max(1, k * f // 64) for f in (2, 4, 8, 16, 32)}):
        parts = factorize(w, r, svd)
        resid = m - product(parts, [rows, cols])
        bits = _level_bits(encode(resid[pick], fixed), scale_rows)
        bits += _entropy_bits(parts["lr_a"]) + _entropy_bits(parts["lr_b"]) + 32 * (rows + cols)
        report["tried"].append({"rank": r, "bits": bits})
        if bits < best_bits:
            best, best_bits = r, bits
    report["rank"] = best
    return best, report, direct


def residual_params(quant: QuantParams, w: torch.Tensor, resid: torch.Tensor) -> QuantParams:
    """The quantize parameters for the residual: the same error budget (or step) as for w itself."""
    ew = float(w.double().square().sum())
    er = float(resid.double().square().sum())
    if quant.step:
        if quant.relative and er > 0:  # the step is in units of the tensor's RMS: keep it in w's units
            return replace(quant, step=quant.step * math.sqrt(ew / er))
        return quant
    if quant.mode in ("ecsq", "tcq") and ew > 0 and er > 0:
        sq = quant.sqnr - 10 * math.log10(ew / er)
        if sq <= 0:  # the factors alone meet the budget: a step that makes every level of the residual zero
            return replace(quant, sqnr=0.0, relative=False, step=4 * float(resid.abs().max()) + 1e-30)
        return replace(quant, sqnr=min(90.0, sq))
    return quant


def decide(p: LowRankParams, w: torch.Tensor, quant: QuantParams, encode) -> tuple[int, dict, Optional[dict]]:
    """The rank to use: the recipe's, or (rank 0) the one choose_rank finds (see there)."""
    if p.rank:
        k = min(_as_matrix(w).shape)
        return min(p.rank, k), {"rank": min(p.rank, k), "tried": []}, None
    return choose_rank(w, quant, encode)
