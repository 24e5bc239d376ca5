"""Pruning stage: zero the smallest-magnitude weights (unstructured, or n:m structured along each row).

Encode-only: the zeros it makes are quantized to exact zeros by the quantization stage that follows
(level 0, or the zero point), and are cheap to code because the context model sees how frequent they are.
"""

from __future__ import annotations

import torch

from .params import PruneParams


def apply(w: torch.Tensor, p: PruneParams) -> torch.Tensor:
    """A copy of `w` with the pruned weights set to zero."""
    x = w.detach().clone()
    if x.numel() == 0:
        return x
    if p.m:
        rows = x.shape[0] if x.dim() >= 2 else 1
        flat = x.reshape(rows, -1)
        cols = flat.shape[1]
        pad = (-cols) % p.m
        padded = torch.cat([flat, torch.zeros(rows, pad, dtype=x.dtype)], dim=1) if pad else flat
        groups = padded.reshape(-1, p.m)
        keep = torch.zeros_like(groups, dtype=torch.bool)
        keep.scatter_(1, groups.abs().topk(p.n, dim=1).indices, True)
        pruned = torch.where(keep, groups, torch.zeros((), dtype=x.dtype)).reshape(rows, -1)[:, :cols]
        return pruned.reshape(x.shape)
    k = int(p.sparsity * x.numel())
    if k == 0:
        return x
    flat = x.reshape(-1)
    mag = flat.abs()
    thr = mag.kthvalue(k).values  # the k-th smallest magnitude: O(n), unlike a sort
    below = mag < thr
    ties = torch.nonzero(mag == thr).reshape(-1)[: k - int(below.sum())]  # exactly k zeros, ties by position
    flat[below] = 0
    flat[ties] = 0
    return flat.reshape(x.shape)
