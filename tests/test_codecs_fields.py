"""The fields codec (coding/codecs/fields/): bit fields of a value and bit-plane packing (layout.py) round
trip; streams of every bit pattern of every dtype at every level (through the registry, which gives wide
integers and sub-byte types the bytes codec) decoded by every CPU decoder; the context model's classes, cheap
constant tensors, validated side information, damaged chunks refused, and level 3 never larger than level 2."""

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from weightpack.coding.codecs import registry
from weightpack.coding.codecs.fields import codec as fields
from weightpack.coding.codecs.fields.layout import UINT, join, layout_for, pack_bits, packed_size, split, tail_values, unpack_bits
from weightpack.dtypes import DTYPES
from weightpack.errors import FormatError

from conftest import under_every_cpu_decoder


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


def _bit_patterns(dtype: str, n: int, rng) -> np.ndarray:
    """Random raw values plus every special pattern: ±0, ±inf, NaN payloads, subnormals, extremes."""
    W = DTYPES[dtype].bits
    u = rng.integers(0, 2**63, size=n, dtype=np.uint64).astype(UINT[W])
    dt = DTYPES[dtype]
    if dt.is_float and dt.mantissa is not None:
        E, M = dt.exponent, dt.mantissa
        s = (1 << (W - 1)) if dt.signed_float else 0
        ones = (1 << E) - 1
        special = [0, s, ones << M, s | ones << M, (ones << M) | 1, (ones << M) | ((1 << M) - 1) if M else 0,
                   1, (1 << M) - 1 if M else 0, s | 1, (1 << W) - 1]
        k = min(n, len(special))
        u[:k] = np.array(special[:k], dtype=np.uint64).astype(UINT[W])
    return u


@pytest.mark.parametrize("level", [1, 2, 3])
@pytest.mark.parametrize("dtype", ["F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0", "U8", "I8", "BOOL"])
def test_stream_round_trip_every_bit_pattern(dtype, level):
    rng = np.random.default_rng(hash((dtype, level)) % 2**32)
    for shape in ([3000], [37, 130], [5, 3], [1], [2, 70000], [9000, 8]):
        n = math.prod(shape)
        u = _bit_patterns(dtype, n, rng)
        _round_trip(dtype, shape, u, level)


def _round_trip(dtype, shape, u, level):
    """Code a stream and decode it with every CPU decoder (compiled kernels, constriction + numpy)."""
    plan = fields.make_plan(dtype, shape, lambda a, c: u[a:a + c], level)
    recs = [registry.encode_chunk(plan, i, u[slice(*plan.chunk_range(i))]) for i in range(plan.nchunks)]
    back = registry.plan_from_record(dtype, u.size, plan.params(), plan.side(), "t")
    out = under_every_cpu_decoder(
        lambda: b"".join(registry.decode_chunk(back, i, r, memoryview(p), "t") for i, (r, p) in enumerate(recs)))
    assert out == u.tobytes()
    return plan, recs


def test_rows_with_trailing_zeros_and_scale_classes_round_trip():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((700, 384)) * np.exp(rng.standard_normal((700, 1)))).astype(np.float32)
    u = x.view(np.uint32).copy().ravel()
    u = u.reshape(700, 384)
    u[::7] &= np.uint32(0xFFFF0000)  # rows upcast from BF16
    u[3::11] &= np.uint32(0xFFFFE000)  # rows upcast from F16
    u = u.ravel()
    plan, recs = _round_trip("F32", [700, 384], u, 2)
    assert plan.tables.shape[0] > 1  # the context model earned its keep on rows of different scales
    assert len(set(plan.tz.tolist())) == 3
    size = sum(len(p) for _, p in recs)
    assert size < 0.8 * u.nbytes


def test_constant_and_sparse_tensors_are_cheap():
    u = np.zeros(100000, dtype=np.uint16)
    plan, recs = _round_trip("BF16", [100, 1000], u, 2)
    assert sum(len(p) for _, p in recs) < 200
    u[::97] = np.float32(0.5).view(np.uint32) >> 16
    plan, recs = _round_trip("BF16", [100, 1000], u, 2)
    assert sum(len(p) for _, p in recs) < 4000


def test_corrupt_chunks_are_format_errors_never_garbage(each_cpu_decoder):
    rng = np.random.default_rng(5)
    u = (rng.standard_normal(50000) * 0.02).astype(np.float32).view(np.uint32)
    plan, recs = _round_trip("F32", [50, 1000], u, 2)
    rec, payload = recs[0]
    back = registry.plan_from_record("F32", u.size, plan.params(), plan.side(), "t")
    for pos in rng.integers(0, len(payload), size=60):
        bad = bytearray(payload)
        bad[pos] ^= 1 << int(rng.integers(0, 8))
        with pytest.raises(FormatError):
            registry.decode_chunk(back, 0, rec, memoryview(bytes(bad)), "t")


def test_side_information_is_validated():
    u = (np.random.default_rng(2).standard_normal(4096) * 0.1).astype(np.float16).view(np.uint16)
    plan = fields.make_plan("F16", [64, 64], lambda a, c: u[a:a + c], 2)
    params, side = plan.params(), plan.side()
    for bad in ({**params, "alphabet": params["alphabet"] + 1}, {**params, "block": 0},
                {**params, "layout": [16, 1, 20, 0]}, {**params, "codec": "magic"}, {**params, "chunk": -5}):
        with pytest.raises(FormatError):
            registry.plan_from_record("F16", u.size, bad, side, "t")
    with pytest.raises(FormatError):
        registry.plan_from_record("F16", u.size, params, side[:-3], "t")


def test_16bit_integers_with_few_distinct_values_are_entropy_coded():
    rng = np.random.default_rng(11)
    u = np.clip(np.round(rng.standard_normal(200000) * 40) + 1000, 0, 65535).astype(np.uint16)
    plan, recs = _round_trip("U16", [400, 500], u, 2)
    assert plan.codec == "fields" and sum(len(p) for _, p in recs) < 0.5 * u.nbytes
    many = rng.integers(0, 65536, size=50000, dtype=np.uint16)
    plan, _ = _round_trip("I16", [50000], many, 2)
    assert plan.codec == "bytes"


def test_level_3_is_never_larger_than_level_2(tmp_path):
    """Special values mixed with noise, small tensors where an extra head bit's tables do not pay, fp16 and
    bf16: the smallest level stays the smallest (level 3 measures level 2's layout too)."""
    import os

    import torch
    import weightpack
    from craft import save_checkpoint

    g = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    specials = [0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-40, -1e-45, 65504.0, 1.0, -1.0]
    t = {}
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        for k, shape in enumerate([(64, 100), (7, 33), (1000,), (3, 4, 5), (16, 3, 3, 3)]):
            x = torch.tensor(rng.choice(specials, size=int(np.prod(shape))), dtype=torch.float64).reshape(shape)
            noise = torch.randn(shape, generator=g, dtype=torch.float64) * 10 ** float(rng.uniform(-3, 1))
            t[f"{dt}.{k}"] = torch.where(torch.rand(shape, generator=g) < 0.5, x, noise).to(dt)
    src = save_checkpoint(tmp_path / "special.safetensors", t)
    sizes = {}
    for level in (2, 3):
        out = tmp_path / f"L{level}.wpk"
        weightpack.pack(src, out, level=level)
        sizes[level] = os.path.getsize(out)
    assert sizes[3] <= sizes[2], sizes
