"""The lanes layout (format 1.2): a sequence of symbols in coding order (runs of contexts) dealt round-robin
onto nl = ceil(n / lane) lanes, symbol i to lane i % nl, each lane its own ANS stream; the payload is nl
little-endian u32 word counts, then each lane's words. Shared by every coder of lanes (entropy.py with
constriction, entropy_native.py, lockstep.py on a device)."""

from __future__ import annotations

import numpy as np

from ..errors import FormatError


def lane_count(n: int, lane: int) -> int:
    """Lanes of n symbols, at most `lane` each."""
    return -(-n // lane)


def lanes_runs(run_counts: list[int], nl: int) -> np.ndarray:
    """How many of each lane's symbols fall in each run (runs of the whole sequence, in order): (nl, runs).
    Lane j holds positions k*nl + j; those at or past a run's start are k >= ceil((start - j) / nl)."""
    starts = np.concatenate([[0], np.cumsum(run_counts, dtype=np.int64)])
    j = np.arange(nl, dtype=np.int64)[:, None]
    return np.diff(np.maximum(0, -(-(starts[None, :] - j) // nl)), axis=1)


def lane_words(payload, n: int, lane: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """The words of a lanes payload and each lane's word count, checked against its length."""
    nl = lane_count(n, lane)
    if len(payload) < 4 * nl or len(payload) % 4:
        raise FormatError(f"{where}: malformed lanes part")
    counts = np.frombuffer(payload, "<u4", nl).astype(np.int64)
    words = np.frombuffer(payload, "<u4", offset=4 * nl)
    if int(counts.sum()) != len(words):  # a lane may hold no words: symbols 0 only, from state 0
        raise FormatError(f"{where}: malformed lanes part")
    return words, counts
