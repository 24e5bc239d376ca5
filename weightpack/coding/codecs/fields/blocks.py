"""The block side information of a `fields` chunk: each block (a row of a matrix) has a class (its heads'
table) and a count of trailing zeros its tails share. Symbols and tails are grouped by those keys in
coding order; every decoder (numpy, native, device) undoes the same grouping."""

from __future__ import annotations

import numpy as np

from .layout import Layout, packed_size


def block_counts(bkeys: np.ndarray, nkeys: int, L: int, m: int) -> np.ndarray:
    """Elements per key of blocks of L (the last one m - (nb - 1) L long)."""
    lengths = np.full(len(bkeys), L, dtype=np.int64)
    if len(bkeys):
        lengths[-1] = m - (len(bkeys) - 1) * L
    return np.bincount(bkeys, weights=lengths, minlength=nkeys)[:nkeys].astype(np.int64)


class BlockGroups:
    """Elements of a chunk grouped by a per-block key (class or trailing zeros), in block order.

    Works on rows of the (blocks x L) view, so gathering and scattering copy whole rows.
    """

    def __init__(self, bkeys: np.ndarray, nkeys: int, L: int, m: int):
        self.L, self.m, self.nb = L, m, len(bkeys)
        self.last = m - (self.nb - 1) * L  # length of the last (maybe partial) block
        self.uniform = self.nb == 0 or int(bkeys.min()) == int(bkeys.max())
        self.rows = [np.flatnonzero(bkeys == k) for k in range(nkeys)]
        self.counts = block_counts(bkeys, nkeys, L, m).tolist()

    def keys(self):
        return [k for k, c in enumerate(self.counts) if c]

    def _split_last(self, k):
        rows = self.rows[k]
        if len(rows) and rows[-1] == self.nb - 1 and self.last != self.L:
            return rows[:-1], True
        return rows, False

    def gather(self, x: np.ndarray, k: int) -> np.ndarray:
        if self.uniform:
            return x if self.counts[k] else x[:0]
        rows, partial = self._split_last(k)
        full = x[: (self.nb - 1) * self.L + (self.L if self.last == self.L else 0)]
        g = full.reshape(-1, self.L)[rows].reshape(-1)
        return np.concatenate([g, x[(self.nb - 1) * self.L:]]) if partial else g

    def scatter(self, out: np.ndarray, k: int, values: np.ndarray) -> None:
        if self.uniform:
            out[:] = values
            return
        rows, partial = self._split_last(k)
        nfull = len(rows) * self.L
        whole = out[: (self.nb - 1) * self.L + (self.L if self.last == self.L else 0)].reshape(-1, self.L)
        whole[rows] = values[:nfull].reshape(-1, self.L)
        if partial:
            out[(self.nb - 1) * self.L:] = values[nfull:]


def part_names(lay: Layout) -> set:
    """The parts of a `fields` chunk: heads, and tails where the layout has any."""
    return {"head", "tail"} if lay.tail + lay.sign else {"head"}


def tail_widths(lay: Layout, tz_counts) -> dict:
    """The packed width of the tails of each trailing-zero count present in a chunk."""
    return {tz: lay.tail - tz + lay.sign for tz, c in enumerate(tz_counts) if c}


def tail_size(lay: Layout, tz_counts) -> int:
    """Bytes of a chunk's tail part: every trailing-zero group's tails packed at its width."""
    return sum(packed_size(int(tz_counts[tz]), w) for tz, w in tail_widths(lay, tz_counts).items())
