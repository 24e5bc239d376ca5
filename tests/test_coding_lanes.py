"""The lanes layout (coding/lanes.py): symbols dealt round-robin onto lanes, each lane its own ANS stream."""

import numpy as np

from weightpack.coding import entropy


def test_lane_layout_is_round_robin():
    """Symbol i is in lane i % nl: each lane, decoded alone, holds every nl-th symbol."""
    syms = (np.arange(1000) % 7).astype(np.int32)
    f = entropy.quantize_counts(np.bincount(syms))
    m = entropy.make_model(f)
    payload = entropy.lanes_encode(syms, [(1000, m)], 256)
    nl = entropy.lane_count(1000, 256)
    words, counts = entropy.lane_words(payload, 1000, 256, "t")
    assert nl == 4 and len(counts) == 4
    end = 0
    for j in range(nl):
        mine = entropy.ans_decode(words[end:end + counts[j]], [(len(syms[j::nl]), m)], "t")[0]
        end += counts[j]
        assert np.array_equal(mine, syms[j::nl])
