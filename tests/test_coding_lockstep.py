"""The parallel lanes decoder (coding/lockstep.py): every lane one symbol per step, in vectorized torch and
as a Triton kernel (here under its interpreter), decoding what constriction decodes; damaged lanes refused;
a kernel that fails to run falls back to torch with a warning."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import weightpack
from weightpack.coding import entropy, lockstep
from weightpack.errors import FormatError

import craft
from conftest import CPU_DECODERS, cpu_decoder, under_every_cpu_decoder


def _lanes_decode(payload, counts, tables, lane, where="t"):
    """entropy.lanes_decode by every CPU decoder (the compiled kernels, constriction): the same symbols."""
    return under_every_cpu_decoder(
        lambda: entropy.lanes_decode(payload, list(counts), entropy.Tables(tables), lane, where), np.array_equal)


def _lanes_decode_fails(payload, counts, tables, lane, match):
    for name in CPU_DECODERS:
        with cpu_decoder(name), pytest.raises(FormatError, match=match):
            entropy.lanes_decode(payload, list(counts), entropy.Tables(tables), lane, "t")


def _runs(rng, C, A, counts):
    tables, runs, syms = [], [], []
    for c in range(C):
        p = rng.dirichlet(np.full(A, 0.3))
        s = rng.choice(A, size=counts[c], p=p).astype(np.int32)
        f = entropy.quantize_counts(np.bincount(s, minlength=A) + 1)
        tables.append(f)
        runs.append((counts[c], entropy.make_model(f)))
        syms.append(s)
    return np.stack(tables), runs, np.concatenate(syms)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), C=st.sampled_from([1, 2, 3, 4, 8, 16, 64]), A=st.integers(2, 300),
       lane=st.sampled_from([64, 128, 1024]), sizes=st.lists(st.integers(0, 700), min_size=64, max_size=64))
def test_lanes_round_trip_constriction_and_lockstep(seed, C, A, lane, sizes):
    """Any runs of contexts (empty ones too; up to 64, as trellis rests have), any lane size: constriction
    decodes the lanes, and the lock-step decoder decodes the same bytes to the same symbols, with two
    payloads of different run counts in one batch."""
    rng = np.random.default_rng(seed)
    counts = [x // (C // 8 + 1) for x in sizes[:C]]
    if sum(counts) == 0:
        counts[0] = 1
    tables, runs, syms = _runs(rng, C, A, counts)
    payload = entropy.lanes_encode(syms, runs, lane)
    assert len(payload) // 4 >= entropy.lane_count(len(syms), lane)
    assert np.array_equal(_lanes_decode(payload, counts, tables, lane), syms)
    ls = lockstep.LaneSet()
    other = np.arange(37, dtype=np.int32) % 3
    f3 = entropy.quantize_counts(np.array([5, 3, 2]))
    b0 = ls.add(entropy.lanes_encode(other, [(37, entropy.make_model(f3))], 64), [37], ls.add_tables(f3[None]), 64, "o")
    b1 = ls.add(payload, counts, ls.add_tables(tables), lane, "t")
    got = lockstep.decode_torch(ls.to("cpu"), "t").numpy()
    assert np.array_equal(got[b0:b0 + 37], other) and np.array_equal(got[b1:], syms)


def test_streams_of_symbol_zero_only_are_empty_and_decode(tmp_path):
    """ANS coding of symbol 0 from the initial state 0 writes no words: a lane (or, before format 1.2, a
    chunk) of the smallest head only is an empty stream, valid for every decoder."""
    f = entropy.quantize_counts(np.array([90, 10]))
    m = entropy.make_model(f)
    payload = entropy.lanes_encode(np.zeros(300, np.int32), [(300, m)], 64)
    assert payload == bytes(4 * entropy.lane_count(300, 64))
    assert not _lanes_decode(payload, [300], [f], 64).any()
    ls = lockstep.LaneSet()
    ls.add(payload, [300], ls.add_tables(f[None]), 64, "t")
    assert not lockstep.decode_torch(ls.to("cpu"), "t").any()
    x = torch.randn(1024, 512)
    x[:600] = 0  # the first chunk's heads are all the smallest head (zero)
    src = craft.save_checkpoint(tmp_path / "z.safetensors", {"w": x})
    for lane in (0, 64):  # one stream per chunk (format 1.1), and lanes
        entropy_lane = entropy.LANE
        entropy.LANE = lane
        try:
            pk = weightpack.pack(src, tmp_path / f"z{lane}.wpk", recipe="lossless-fast", force=True).path
        finally:
            entropy.LANE = entropy_lane
        assert torch.equal(weightpack.load(pk)["w"], x)
        assert torch.equal(weightpack.load(pk, decoder="device")["w"], x)


def test_lockstep_refuses_damaged_lanes():
    rng = np.random.default_rng(1)
    tables, runs, syms = _runs(rng, 2, 20, [900, 400])
    payload = bytearray(entropy.lanes_encode(syms, runs, 256))
    nl = entropy.lane_count(len(syms), 256)
    # a lane declaring one word more than it holds: the payload no longer adds up
    bad = bytearray(payload)
    bad[0] += 1
    with pytest.raises(FormatError, match="malformed lanes"):
        lockstep.LaneSet().add(bytes(bad), [900, 400], 0, 256, "t")
    _lanes_decode_fails(bytes(bad), [900, 400], tables, 256, "malformed lanes")
    # an extra word at the start of lane 0 (words are read from the end): never reached, so not used up
    counts = np.frombuffer(bytes(payload[:4 * nl]), "<u4").copy()
    counts[0] += 1
    extra = counts.astype("<u4").tobytes() + b"\x01\0\0\0" + bytes(payload[4 * nl:])
    ls = lockstep.LaneSet()
    ls.add(extra, [900, 400], ls.add_tables(tables), 256, "t")
    with pytest.raises(FormatError, match="not used up"):
        lockstep.decode_torch(ls.to("cpu"), "t")
    _lanes_decode_fails(extra, [900, 400], tables, 256, "corrupt")


@pytest.mark.skipif(not lockstep.triton_available(), reason="Triton is not installed")
def test_triton_kernel_under_the_interpreter():
    """The Triton kernel (what a GPU runs) decodes the same lanes as constriction, including a damaged lane."""
    script = textwrap.dedent("""
        import numpy as np
        from weightpack.coding import entropy, lockstep
        from weightpack.errors import FormatError
        rng = np.random.default_rng(5)
        ls, want = lockstep.LaneSet(), []
        for C, lane, counts in [(1, 64, [300]), (4, 64, [50, 0, 200, 90]), (8, 128, [9, 0, 0, 40, 3, 0, 60, 1]),
                                (20, 64, [5, 0, 17, 0, 0, 30, 2, 1, 0, 9, 40, 0, 3, 3, 0, 8, 70, 0, 1, 6])]:
            A = 30
            tables, runs, syms = [], [], []
            for c in range(C):
                s = rng.choice(A, size=counts[c], p=rng.dirichlet(np.full(A, 0.3))).astype(np.int32)
                f = entropy.quantize_counts(np.bincount(s, minlength=A) + 1)
                tables.append(f); runs.append((counts[c], entropy.make_model(f))); syms.append(s)
            syms = np.concatenate(syms)
            base = ls.add(entropy.lanes_encode(syms, runs, lane), counts, ls.add_tables(np.stack(tables)), lane, "t")
            want.append((base, syms))
        got = lockstep.decode_triton(ls.to("cpu"), "t").numpy()
        for base, syms in want:
            assert np.array_equal(got[base:base + len(syms)], syms)
        assert np.array_equal(got, lockstep.decode_torch(ls.to("cpu"), "t").numpy())
        # one word too many in a lane
        syms = (np.arange(200) % 5).astype(np.int32)
        f = entropy.quantize_counts(np.bincount(syms))
        p = entropy.lanes_encode(syms, [(200, entropy.make_model(f))], 64)
        nl = entropy.lane_count(200, 64)
        c = np.frombuffer(p[:4 * nl], "<u4").copy(); c[1] += 1
        words = np.frombuffer(p[4 * nl:], "<u4")
        bad = c.astype("<u4").tobytes() + words[:c[0]].tobytes() + b"\\7\\0\\0\\0" + words[c[0]:].tobytes()
        ls = lockstep.LaneSet(); ls.add(bad, [200], ls.add_tables(f[None]), 64, "t")
        try:
            lockstep.decode_triton(ls.to("cpu"), "t")
        except FormatError as e:
            assert "not used up" in str(e)
        else:
            raise SystemExit("damage not found")
        print("ok")
    """)
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_a_failing_triton_kernel_falls_back_to_torch(monkeypatch):
    """Where the kernel cannot run (an unknown Triton or driver), the torch decoder gives the same symbols,
    with a warning; damaged data is still an error, not a fallback."""
    syms = (np.arange(500) % 9).astype(np.int32)
    f = entropy.quantize_counts(np.bincount(syms))
    payload = entropy.lanes_encode(syms, [(500, entropy.make_model(f))], 64)
    ls = lockstep.LaneSet()
    ls.add(payload, [500], ls.add_tables(f[None]), 64, "t")

    def broken(*a, **k):
        raise RuntimeError("no kernel here")

    monkeypatch.setenv("WEIGHTPACK_DECODER", "triton")
    monkeypatch.setattr(lockstep, "decode_triton", broken)
    monkeypatch.setattr(lockstep, "_TRITON_BROKEN", [])
    with pytest.warns(RuntimeWarning, match="decoding with torch instead"):
        assert np.array_equal(lockstep.decode(ls, "cpu", "t").numpy(), syms)

    def damaged(*a, **k):
        raise FormatError("t: entropy-coded data is corrupt")

    monkeypatch.setattr(lockstep, "_TRITON_BROKEN", [])
    monkeypatch.setattr(lockstep, "decode_triton", damaged)
    with pytest.raises(FormatError):
        lockstep.decode(ls, "cpu", "t")
