"""Bit fields of a value and bit-plane packing (coding/fields.py): round-trip properties."""

import numpy as np
from hypothesis import given, settings, strategies as st

from weightpack.coding.fields import UINT, join, layout_for, pack_bits, packed_size, split, tail_values, unpack_bits
from weightpack.dtypes import DTYPES


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 64), st.integers(0, 300), st.integers(0, 2**32))
def test_pack_bits_round_trip(width, n, seed):
    rng = np.random.default_rng(seed)
    v = rng.integers(0, 2**63, size=n, dtype=np.uint64) & np.uint64((1 << width) - 1 if width < 64 else 2**64 - 1)
    if width == 64:
        v |= rng.integers(0, 2, size=n, dtype=np.uint64) << np.uint64(63)
    data = pack_bits(v, width)
    assert len(data) == packed_size(n, width)
    assert np.array_equal(unpack_bits(data, n, width), v)


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(["F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0", "U8", "I8", "BOOL"]),
       st.integers(0, 5), st.integers(0, 2**32))
def test_fields_split_join_round_trip(dtype, k, seed):
    lay = layout_for(DTYPES[dtype], k)
    assert lay is not None and lay.valid()
    rng = np.random.default_rng(seed)
    W = lay.bits
    u = rng.integers(0, 2**63, size=257, dtype=np.uint64)
    u = (u ^ (u << np.uint64(7))).astype(UINT[W])
    head, v = split(u, lay)
    for tz in range(lay.tail + 1):
        keep = u.astype(np.uint64) & ~np.uint64((1 << tz) - 1)  # values with tz trailing zeros
        head, v = split(keep.astype(UINT[W]), lay)
        t, w = tail_values(v, lay, tz)
        assert w == lay.tail - tz + lay.sign
        assert np.array_equal(join(head, t, lay, tz).astype(UINT[W]), keep.astype(UINT[W]))
