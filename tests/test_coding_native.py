"""The compiled CPU kernels (weightpack/_native.c via coding/native.py): built where a compiler is, the
same symbols as constriction + numpy on every stream kind, and safe on hostile input."""

from __future__ import annotations

import os
import shutil
import sysconfig

import numpy as np
import pytest
import torch

import weightpack
from weightpack.coding import entropy, entropy_native, native
from weightpack.coding.codecs.fields import native as fields_native
from weightpack.coding.codecs.trellis import codec as TC
from weightpack.coding.codecs.trellis import native as trellis_native
from weightpack.stages import tcq as T
from weightpack.errors import FormatError

from conftest import CPU_DECODERS, cpu_decoder, under_every_cpu_decoder

needs_native = pytest.mark.skipif(not native.available(), reason="the compiled kernels were not built here")


@pytest.mark.skipif(bool(os.environ.get("WEIGHTPACK_NO_NATIVE")), reason="WEIGHTPACK_NO_NATIVE is set")
def test_kernels_are_built_where_a_compiler_is():
    """The extension is optional at install; where a C compiler and Python's headers are present its build
    must not have failed silently (the decoders would be 2-3x slower)."""
    headers = os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h"))
    if not (shutil.which("cc") or shutil.which("gcc")) or not headers:
        pytest.skip("no C compiler or no Python headers: the numpy decoders are used")
    assert native.available()


@needs_native
def test_ungroup_refuses_keys_that_disagree_with_their_counts():
    keys = np.array([0, 1, 1, 2, 0], dtype=np.uint8)
    grouped = np.arange(5, dtype=np.int32)
    assert trellis_native.ungroup(grouped, keys, np.array([2, 2, 1]), np.int32).tolist() == [0, 2, 3, 4, 1]
    for counts in ([3, 1, 1], [2, 2], [2, 2, 2], [5, 0, 0]):
        with pytest.raises(ValueError):
            trellis_native.ungroup(grouped, keys, np.array(counts), np.int32)


@needs_native
def test_lanes_on_hostile_payloads_never_crash():
    """Random words under random word counts and tables: a FormatError or symbols inside the alphabet,
    never a crash or a read outside the payload."""
    rng = np.random.default_rng(11)
    for trial in range(300):
        A = int(rng.integers(2, 300))
        C = int(rng.integers(1, 5))
        tables = [entropy.quantize_counts(rng.integers(0, 50, A) + 1) for _ in range(C)]
        counts = [int(c) for c in rng.integers(0, 300, C)]
        n = sum(counts)
        lane = int(rng.choice([64, 128]))
        nl = entropy.lane_count(n, lane)
        wc = rng.integers(0, 8, nl).astype("<u4")
        words = rng.integers(0, 2**32, int(wc.sum()), dtype=np.uint64).astype("<u4")
        if trial % 3 == 0:
            words[:] = 0
        payload = wc.tobytes() + words.tobytes()
        try:
            got = entropy_native.lanes_decode(payload, counts, entropy.Tables(tables).slots(), lane, "t")
        except FormatError:
            continue
        assert len(got) == n and (n == 0 or (got.min() >= 0 and got.max() < A))


def _ar_levels(n, rho, rng):
    x = np.zeros(n)
    e = rng.standard_normal(n)
    for i in range(1, n):
        x[i] = rho * x[i - 1] + e[i]
    return np.round(x * 1.5).astype(np.int64)


def test_step_major_with_previous_level_contexts():
    """Levels whose sign follows the previous one's: the step-major coder takes the previous-level context,
    and every CPU decoder decodes it to the same multiples."""
    rng = np.random.default_rng(5)
    r = T.multiples(_ar_levels(64 * 256 * 3, 0.95, rng))
    plan = TC.make_plan(r, [192, 256], lane=0)
    assert plan.prev == 1 and plan.ans_lane == 0
    u = r.view(np.uint16)
    coded = [TC.encode_chunk(plan, i, u[slice(*plan.chunk_range(i))]) for i in range(plan.nchunks)]
    back = TC.plan_from_record("I16", r.size, plan.params(), plan.side(), "t")
    out = under_every_cpu_decoder(
        lambda: b"".join(TC.decode_chunk(back, i, rec, memoryview(p), "t") for i, (rec, p) in enumerate(coded)))
    assert out == r.tobytes()


@pytest.mark.parametrize("recipe", ["lossless", "q-tcq"])
def test_real_model_loads_the_same_with_each_cpu_decoder(tmp_path, minilm, recipe):
    """MiniLM packed losslessly and with trellis-coded quantization: `load` with the compiled kernels (in
    threads) and with constriction + numpy (in processes), one and two workers, give the same bits, and the
    lossless one is the source."""
    from safetensors.torch import load_file

    pk = weightpack.pack(minilm, tmp_path / f"{recipe}.wpk", recipe=recipe).path
    got = {}
    for name in CPU_DECODERS:
        for workers in (1, 2):
            with cpu_decoder(name):
                got[name, workers] = weightpack.load(pk, workers=workers)
    first = next(iter(got.values()))
    for tensors in got.values():
        assert tensors.keys() == first.keys()
        for k in first:
            assert torch.equal(tensors[k].view(torch.uint8), first[k].view(torch.uint8)), k
    if recipe == "lossless":
        src = load_file(str(minilm))
        assert all(torch.equal(first[k], src[k]) for k in src)


@needs_native
def test_fields_kernel_refuses_inconsistent_side_information():
    """Class counts that do not add up, classes or trailing zeros out of range, a tail of the wrong length:
    a FormatError, never a read or write outside the arrays."""
    rng = np.random.default_rng(2)
    m, L = 1000, 100
    syms = rng.integers(0, 4, m).astype(np.uint16)
    alphabet = np.array([1, 5, 9, 12], dtype=np.uint64)
    bcls = (np.arange(10) % 2).astype(np.uint8)
    btz = np.zeros(10, np.uint8)
    good = dict(ccount=np.array([500, 500]), tail=bytes(1000), bits=16, sign=0, tail_bits=8)
    out = fields_native.fields_join(syms, alphabet, bcls, btz, L, m, where="t", **good)
    assert np.array_equal(out >> 8, alphabet[syms[np.argsort(np.repeat(bcls, L), kind="stable").argsort()]])
    bad_cases = [dict(good, ccount=np.array([400, 500])), dict(good, ccount=np.array([600, 400])),
                 dict(good, tail=bytes(999)), dict(good, tail=bytes(1001))]
    for kw in bad_cases:
        with pytest.raises(FormatError):
            fields_native.fields_join(syms, alphabet, bcls, btz, L, m, where="t", **kw)
    for b, z in ((np.full(10, 2, np.uint8), btz), (bcls, np.full(10, 9, np.uint8))):
        with pytest.raises(FormatError):
            fields_native.fields_join(syms, alphabet, b, z, L, m, where="t", **good)
    with pytest.raises(FormatError):
        fields_native.fields_join(np.full(m, 4, np.uint16), alphabet, bcls, btz, L, m, where="t", **good)


# -- the compiled encoders write what constriction and numpy write -------------------------------------

SIMD_LEVELS = [0, 1]  # the portable loops; AVX-512 where the CPU has it (else the portable loops again)


@needs_native
@pytest.mark.parametrize("level", SIMD_LEVELS)
def test_lanes_encoder_writes_constrictions_bytes_and_both_decoders_read_them(level):
    """Random symbols, contexts, tables and lane sizes (1 to hundreds of lanes, groups of 32 part full): the
    compiled lanes encoder's payload, at each vector level, is byte-identical to the constriction encoder's,
    and both decoders (constriction, compiled) give the symbols back."""
    rng = np.random.default_rng(5 + level)
    for trial in range(200):
        A = int(rng.integers(2, 600 if trial % 4 else 4096))
        C = int(rng.integers(1, 9))
        skew = rng.random() * 3
        tables = [entropy.quantize_counts((rng.random(A) ** (1 + 4 * skew) * 1000).astype(np.int64) + (k % 2))
                  for k in range(C)]
        counts = [int(c) for c in rng.integers(0, 3000, C)]
        if trial % 10 == 0:
            counts[0] = 0
        syms = np.concatenate([rng.choice(A, size=c, p=t / t.sum()) for c, t in zip(counts, tables)]).astype(np.int32)
        if trial % 7 == 0:
            syms[:] = 0  # a lane of symbol 0 only may stay at state 0 (no words)
        lane = int(rng.choice([64, 128, 1024, 1 << 14]))
        tabs = entropy.Tables(tables)
        ctx = np.repeat(np.arange(C, dtype=np.uint8), counts)
        with native.simd(level):
            got = entropy_native.lanes_encode(syms.astype(np.uint16), ctx, lane, tabs.encoder()).tobytes()
        want = entropy.lanes_encode(syms, [(c, m) for c, m in zip(counts, tabs.models())], lane)
        assert got == want, trial
        assert np.array_equal(entropy.lanes_decode(got, counts, tabs, lane, "t"), syms)
        assert np.array_equal(entropy_native.lanes_decode(got, counts, tabs.slots(), lane, "t"), syms)


@needs_native
def test_lanes_encoder_refuses_symbols_outside_their_tables():
    tabs = entropy.Tables([entropy.quantize_counts(np.array([3, 1, 1]))])
    with pytest.raises(ValueError):
        entropy_native.lanes_encode(np.array([0, 3], np.uint16), np.zeros(2, np.uint8), 64, tabs.encoder())
    with pytest.raises(ValueError):
        entropy_native.lanes_encode(np.array([0, 1], np.uint16), np.array([0, 1], np.uint8), 64, tabs.encoder())


def _random_tensor(rng, dtype: str, n: int) -> np.ndarray:
    """Raw elements with the structure that matters to planning: scaled rows, rows with trailing zeros."""
    import weightpack.dtypes as D
    bits = D.DTYPES[dtype].bits
    u = rng.integers(0, 1 << bits, n, dtype=np.uint64)
    if dtype in ("F32", "F16", "BF16", "F64"):
        t = torch.from_numpy(rng.standard_normal(n) * np.exp(rng.standard_normal() * 3))
        t = t.to({"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}[dtype])
        u = t.view({16: torch.int16, 32: torch.int32, 64: torch.int64}[bits]).numpy().view(f"u{bits // 8}")
        u = u.copy()
        if n >= 512:
            u[:256] &= np.array((1 << bits) - (1 << min(bits // 2, 7)), dtype=np.uint64).astype(u.dtype)  # low bits zero in a few rows
    return u.astype(f"u{bits // 8}") if bits >= 8 else u


@needs_native
@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32", "F64", "U8", "I16", "F8_E4M3"])
@pytest.mark.parametrize("level", [1, 2, 3])
def test_compiled_planning_and_chunk_coding_write_the_same_bytes(dtype, level):
    """make_plan and encode_chunk with the compiled kernels and with numpy + constriction: the same plan and
    byte-identical chunks, on shapes whose blocks and chunks do not divide evenly."""
    from weightpack.coding.codecs import registry
    from weightpack.coding.codecs.fields import codec as fields

    rng = np.random.default_rng(hash((dtype, level)) % 2**32)
    for shape in ([1000, 300], [3, 77777], [5000], [1], [2, 1 << 17]):
        n = int(np.prod(shape))
        u = _random_tensor(rng, dtype, n)
        if dtype == "I16":
            u = (rng.integers(-40, 40, n).astype(np.int16)).view(np.uint16)

        def run():
            plan = fields.make_plan(dtype, shape, lambda a, c: u[a:a + c], level)
            chunks = [registry.encode_chunk(plan, i, u[slice(*plan.chunk_range(i))]) for i in range(plan.nchunks)]
            return plan.params(), plan.side(), chunks

        with native.enabled(False):
            want = run()
        with native.enabled(True):
            got = run()
        assert got[0] == want[0] and got[1] == want[1]
        assert got[2] == want[2]


@needs_native
def test_zstd_probe_counts_the_same_sample_as_numpy():
    """storage's probe (may zstd win?) counts the bytes of each plane of its sample in one compiled pass:
    the same counts, so the same estimates and decisions, as numpy's sample and bincount."""
    from weightpack.coding import storage

    rng = np.random.default_rng(8)
    for planes in (1, 2, 3, 4, 8):
        for n in (storage.PROBE_MIN, storage.PROBE_MIN + 13, 1_000_003):
            data = (rng.standard_normal(n) * 20).astype(np.int64).astype(np.uint8)
            piece = storage.PROBE_PIECE - storage.PROBE_PIECE % planes
            got = storage._sample_counts(data, planes, piece)
            with native.enabled(False):
                want = storage._sample_counts(data.tobytes(), planes, piece)
            assert np.array_equal(got, want), (planes, n)
            assert got.sum() == storage.PROBE_PIECES * piece


# -- vector kernels: the same symbols as the portable loops and constriction ---------------------------


@needs_native
@pytest.mark.parametrize("level", SIMD_LEVELS)
def test_fast_lanes_decode_constrictions_streams_at_each_vector_level(level):
    """Fields heads' lanes (wp_lanes_fast) on random tables, contexts (boundaries anywhere, also inside a
    step of eight lanes), lane sizes and counts (1 to 80 lanes, the last ones a symbol shorter): the
    symbols constriction encoded, with the vector kernel (level 1, where the CPU has it) and without."""
    rng = np.random.default_rng(17 + level)
    with native.simd(level):
        for trial in range(150):
            A = int(rng.integers(2, 700 if trial % 5 else 4096))
            C = int(rng.integers(1, 9))
            tables = [entropy.quantize_counts((rng.random(A) ** (1 + 4 * rng.random() * 3) * 1000).astype(np.int64) + 1)
                      for _ in range(C)]
            lane = int(rng.choice([16, 64, 128, 1 << 14]))
            n = int(rng.integers(0, 80 * lane if lane < 1 << 14 else 40000))
            cuts = np.sort(rng.integers(0, n + 1, C - 1))
            counts = np.diff(np.concatenate([[0], cuts, [n]])).astype(np.int64)
            syms = np.concatenate([rng.choice(A, size=int(c), p=t / t.sum()) for c, t in zip(counts, tables)]
                                  ).astype(np.int32) if n else np.zeros(0, np.int32)
            if trial % 9 == 0:
                syms[:] = 0
            tabs = entropy.Tables(tables)
            payload = entropy.lanes_encode(syms, [(int(c), m) for c, m in zip(counts, tabs.models())], lane)
            words, wc = entropy.lane_words(payload, n, lane, "t")
            got = entropy_native.lanes_fast(words, wc, counts, lane, tabs.fast(), "t")
            assert np.array_equal(got, syms.astype(np.uint16)), trial
            if len(words):  # a damaged word: an error or symbols inside the alphabet, never a crash
                bad = words.copy()
                bad[int(rng.integers(len(bad)))] ^= np.uint32(1 << int(rng.integers(32)))
                try:
                    out = entropy_native.lanes_fast(bad, wc, counts, lane, tabs.fast(), "t")
                except FormatError:
                    continue
                assert int(out.max(initial=0)) < A


@needs_native
@pytest.mark.parametrize("level", SIMD_LEVELS)
@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32", "F64", "U8", "F8_E4M3"])
def test_fields_chunks_decode_alike_at_each_vector_level(level, dtype):
    """Fields chunks of every tail width (byte planes and 4-, 2-, 1-bit planes, groups starting at odd
    places) decoded by the compiled kernels at each vector level give the bytes numpy and constriction give."""
    from weightpack.coding.codecs import registry
    from weightpack.coding.codecs.fields import codec as fields

    rng = np.random.default_rng(hash((dtype, level, "join")) % 2**32)
    with native.simd(level):
        for lvl in (1, 2, 3):
            for shape in ([1000, 300], [3, 7777], [333], [2, 1 << 17]):
                n = int(np.prod(shape))
                u = _random_tensor(rng, dtype, n)
                plan = fields.make_plan(dtype, shape, lambda a, c: u[a:a + c], lvl)
                for i in range(plan.nchunks):
                    a, b = plan.chunk_range(i)
                    rec, payload = registry.encode_chunk(plan, i, u[a:b])
                    with native.enabled(False):
                        want = bytes(registry.decode_chunk(plan, i, rec, payload, "t"))
                    got = bytes(registry.decode_chunk(plan, i, rec, payload, "t"))
                    assert got == want == u[a:b].tobytes(), (lvl, shape, i)


@needs_native
def test_join_of_16_bit_elements_is_the_same_at_each_vector_level():
    """wp_fields_join on 16-bit elements, random side information: block sizes that are not multiples of 8
    or 32 (groups starting inside a byte of the sub-byte planes, partial vectors at block ends), every tail
    width with and without a sign, alphabets that fit in registers and ones that need a gather, several
    trailing-zero groups; the vector kernel writes what the portable loop writes, and both refuse a symbol
    outside the alphabet."""
    from weightpack.coding.codecs.fields.layout import packed_size

    rng = np.random.default_rng(5)
    for trial in range(300):
        L = int(rng.choice([1, 3, 8, 31, 32, 33, 100, 384, 1000]))
        m = int(rng.integers(0, 4000))
        nb = -(-m // L)
        S = int(rng.integers(0, 2))
        T = int(rng.integers(0, 16 - S))
        A = int(rng.choice([1, 2, 17, 32, 33, 64, 65, 300, 4096]))
        C = int(rng.integers(1, 5))
        bcls = rng.integers(0, C, nb).astype(np.uint8)
        btz = rng.integers(0, T + 1, nb).astype(np.uint8) if trial % 3 else np.zeros(nb, np.uint8)
        sizes = np.full(nb, L)
        if nb:
            sizes[-1] = m - (nb - 1) * L
        ccount = np.array([sizes[bcls == c].sum() for c in range(C)], dtype=np.int64)
        tcount = [int(sizes[btz == z].sum()) for z in range(T + 1)]
        n_tail = sum(packed_size(k, T - z + S) for z, k in enumerate(tcount) if k) if T + S else 0
        tail = rng.integers(0, 256, n_tail, dtype=np.uint8).tobytes()
        syms = rng.integers(0, A, m).astype(np.uint16)
        alphabet = rng.integers(0, 1 << (16 - T - S), A).astype(np.uint64)
        args = (alphabet, bcls, btz, L, m, ccount, tail, 16, S, T, "t")
        got = {}
        for level in SIMD_LEVELS:
            with native.simd(level):
                got[level] = fields_native.fields_join(syms, *args).copy()
        assert np.array_equal(got[0], got[1]), trial
        if m:
            bad = syms.copy()
            bad[int(rng.integers(m))] = A
            for level in SIMD_LEVELS:
                with native.simd(level), pytest.raises(FormatError):
                    fields_native.fields_join(bad, *args)


@needs_native
def test_split_of_16_bit_elements_is_the_same_at_each_vector_level():
    """wp_fields_split on 16-bit elements: head symbols (heads of up to 9 bits from registers, up to 12
    gathered) and packed tails (trailing-zero groups whose blocks do not fill whole vectors,
    every tail width with and without a sign) are the same bytes with the vector kernels and without."""
    rng = np.random.default_rng(6)
    for trial in range(300):
        L = int(rng.choice([1, 5, 31, 32, 33, 100, 384, 1000]))
        m = int(rng.integers(1, 5000))
        nb = -(-m // L)
        S = int(rng.integers(0, 2))
        H = int(rng.integers(1, 13 - S))
        T = 16 - S - H
        C = int(rng.integers(1, 5))
        bcls = rng.integers(0, C, nb).astype(np.uint8)
        btz = rng.integers(0, T + 1, nb).astype(np.uint8) if trial % 3 else np.zeros(nb, np.uint8)
        u = rng.integers(0, 1 << 16, m).astype(np.uint16)
        lut = rng.integers(0, 4096, 1 << H).astype(np.int32)
        got = []
        for level in SIMD_LEVELS:
            with native.simd(level):
                sym, ctx, tail = fields_native.fields_split(u, 16, S, H, T, L, bcls, btz, C, lut)
                got.append((sym.copy(), ctx.copy(), tail.copy()))
        (s0, c0, t0), (s1, c1, t1) = got
        assert np.array_equal(s0, s1) and np.array_equal(c0, c1) and np.array_equal(t0, t1), trial


@needs_native
@pytest.mark.parametrize("level", SIMD_LEVELS)
def test_crc32_is_zlibs(level):
    """The kernels' crc32 (carry-less multiplication, 16- and 64-byte folds, byte table for the rest) is
    zlib.crc32 on every length around the fold sizes, any start value and misaligned starts."""
    import zlib

    rng = np.random.default_rng(3)
    buf = rng.integers(0, 256, 70000, dtype=np.uint8)
    with native.simd(level):
        for n in list(range(0, 600)) + [1023, 1024, 1025, 4096, 65536, 69990]:
            off = int(rng.integers(0, 8))
            v = int(rng.integers(0, 2**32))
            d = buf[off:off + n]
            assert native.crc32(d, v) == zlib.crc32(d.tobytes(), v), n
            assert native.crc32(d.tobytes(), v) == zlib.crc32(d.tobytes(), v), n
            assert native.crc32(memoryview(d.tobytes())) == zlib.crc32(d.tobytes()), n
