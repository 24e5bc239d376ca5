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
from weightpack.coding import entropy, native
from weightpack.coding import trellis as T
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
    assert native.ungroup(grouped, keys, np.array([2, 2, 1]), np.int32).tolist() == [0, 2, 3, 4, 1]
    for counts in ([3, 1, 1], [2, 2], [2, 2, 2], [5, 0, 0]):
        with pytest.raises(ValueError):
            native.ungroup(grouped, keys, np.array(counts), np.int32)


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
            got = entropy.lanes_decode(payload, counts, entropy.Tables(tables), lane, "t")
        except FormatError:
            continue
        assert len(got) == n and (n == 0 or (got.min() >= 0 and got.max() < A))


def _ar_levels(n, rho, rng):
    x = np.zeros(n)
    e = rng.standard_normal(n)
    for i in range(1, n):
        x[i] = rho * x[i - 1] + e[i]
    return np.round(x * 1.5).astype(np.int64)


def test_step_major_with_previous_level_contexts(monkeypatch):
    """Levels whose sign follows the previous one's: the step-major coder takes the previous-level context,
    and every CPU decoder decodes it to the same multiples."""
    monkeypatch.setattr(entropy, "LANE", 0)
    rng = np.random.default_rng(5)
    r = T.multiples(_ar_levels(64 * 256 * 3, 0.95, rng))
    plan = T.make_plan(r, [192, 256])
    assert plan.prev == 1 and plan.ans_lane == 0
    u = r.view(np.uint16)
    coded = [T.encode_chunk(plan, i, u[slice(*plan.chunk_range(i))]) for i in range(plan.nchunks)]
    back = T.plan_from_record(r.size, plan.params(), plan.side(), "t")
    out = under_every_cpu_decoder(
        lambda: b"".join(T.decode_chunk(back, i, rec, memoryview(p), "t") for i, (rec, p) in enumerate(coded)))
    assert out == r.tobytes()


@pytest.mark.parametrize("recipe", ["lossless", "q-tcq"])
def test_real_model_loads_the_same_with_each_cpu_decoder(tmp_path, minilm, recipe):
    """MiniLM packed losslessly and with trellis-coded quantization: `load` with the compiled kernels (in
    threads) and with constriction + numpy (in processes), one and two workers, give the same bits, and the
    lossless one is the source."""
    from safetensors.torch import load_file

    pk = weightpack.pack(minilm, tmp_path / f"{recipe}.wpk", recipe=recipe)["path"]
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
    syms = rng.integers(0, 4, m).astype(np.int32)
    alphabet = np.array([1, 5, 9, 12], dtype=np.uint64)
    bcls = (np.arange(10) % 2).astype(np.uint8)
    btz = np.zeros(10, np.uint8)
    good = dict(ccount=np.array([500, 500]), tail=bytes(1000), bits=16, sign=0, tail_bits=8)
    out = native.fields(syms, alphabet, bcls, btz, L, m, where="t", **good)
    assert np.array_equal(out >> 8, alphabet[syms[np.argsort(np.repeat(bcls, L), kind="stable").argsort()]])
    bad_cases = [dict(good, ccount=np.array([400, 500])), dict(good, ccount=np.array([600, 400])),
                 dict(good, tail=bytes(999)), dict(good, tail=bytes(1001))]
    for kw in bad_cases:
        with pytest.raises(FormatError):
            native.fields(syms, alphabet, bcls, btz, L, m, where="t", **kw)
    for b, z in ((np.full(10, 2, np.uint8), btz), (bcls, np.full(10, 9, np.uint8))):
        with pytest.raises(FormatError):
            native.fields(syms, alphabet, b, z, L, m, where="t", **good)
    with pytest.raises(FormatError):
        native.fields(np.full(m, 4, np.int32), alphabet, bcls, btz, L, m, where="t", **good)
