"""Decoding on a torch device: ANS lanes (format 1.2), the lock-step decoders (torch, Triton under its
interpreter) and tensors rebuilt on the device, checked bit for bit against the CPU path.

On a machine without a GPU the device decoder runs with torch on the CPU (decoder="device"): the same code
a GPU runs, except the Triton kernel, which runs here under TRITON_INTERPRET=1. Tests that need a real GPU
skip without one."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import weightpack
from weightpack.coding import entropy, lockstep
from weightpack.coding.codecs.fields import plan as fields_plan
from weightpack.coding.codecs.trellis import plan as trellis_plan
from weightpack.errors import FormatError, WeightpackError

import craft
from conftest import CPU_DECODERS, cpu_decoder, under_every_cpu_decoder

HAVE_CUDA = torch.cuda.is_available()


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


# -- whole containers ------------------------------------------------------------------------------

@pytest.fixture
def small_lanes(monkeypatch):
    """Short lanes and chunks, so the lock-step decoder on the CPU takes few steps and tensors many chunks."""
    monkeypatch.setattr(entropy, "LANE", 64)
    monkeypatch.setattr(fields_plan, "CHUNK_TARGET", 4096)
    monkeypatch.setattr(trellis_plan, "CHUNK_TARGET", 8192)
    monkeypatch.setattr(trellis_plan, "SPLIT_TOLERANCE", float("inf"))  # trellis levels in lanes wherever possible


def _same(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)), k


def _patterns(dtype: str, n: int, rng) -> bytes:
    from test_coding import _bit_patterns

    return _bit_patterns(dtype, n, rng).tobytes()


def _every_dtype_checkpoint(path: Path) -> Path:
    rng = np.random.default_rng(11)
    header, data = {}, b""
    specs = [("F64", [40, 33]), ("F32", [64, 96]), ("F16", [3, 5]), ("BF16", [130, 70]), ("F8_E4M3", [300]),
             ("F8_E5M2", [17, 9]), ("F8_E8M0", [50]), ("U8", [2, 999]), ("I8", [77]), ("BOOL", [4, 4]),
             ("I64", [3, 7]), ("I32", [100]), ("U16", [5000]), ("I16", [64, 64]), ("F32", []), ("BF16", [0, 8])]
    for k, (dt, shape) in enumerate(specs):
        n = math.prod(shape)
        if dt == "BOOL":
            raw = (rng.random(n) < 0.3).astype(np.uint8).tobytes()
        elif dt == "I16":  # few distinct values: coded as whole 16-bit symbols
            raw = rng.integers(-40, 40, size=n).astype("<i2").tobytes()
        else:
            raw = _patterns(dt, n, rng)
        header[f"t{k}.{dt}"] = {"dtype": dt, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    # F32 rows upcast from BF16 among full rows, rows of very different scales: classes and trailing zeros
    x = (rng.standard_normal((300, 384)) * np.exp(2 * rng.standard_normal((300, 1)))).astype(np.float32)
    u = x.view(np.uint32).copy()
    u[::3] &= np.uint32(0xFFFF0000)
    header["mixed.F32"] = {"dtype": "F32", "shape": [300, 384], "data_offsets": [len(data), len(data) + u.nbytes]}
    data += u.tobytes()
    return craft.raw_safetensors(path, header, data)


def test_device_decoder_matches_host_for_every_dtype(tmp_path, small_lanes):
    src = _every_dtype_checkpoint(tmp_path / "all.safetensors")
    for recipe in ("lossless", "lossless-fast", "lossless-max"):
        pk = weightpack.pack(src, tmp_path / f"{recipe}.wpk", recipe=recipe).path
        host = weightpack.load(pk)
        _same(host, weightpack.load(pk, decoder="device"))
        with weightpack.open(pk, decoder="device") as f:
            assert torch.equal(f.get_tensor("mixed.F32"), host["mixed.F32"])


def test_device_decoder_matches_host_for_lossy_recipes(tmp_path, small_lanes):
    g = torch.Generator().manual_seed(3)
    tensors = {"a.weight": torch.randn(96, 200, generator=g),
               "b.weight": (torch.randn(128, 64, generator=g) * 0.02).to(torch.bfloat16),
               "c.weight": torch.randn(64, 64, generator=g).to(torch.float16),
               "d.weight": torch.randn(300, 100, generator=g), "c.bias": torch.randn(64, generator=g),
               # rows of widely different scales: many row classes, so trellis rests have many contexts
               "e.weight": torch.randn(256, 128, generator=g) * torch.exp(torch.randn(256, 1, generator=g))}
    src = craft.save_checkpoint(tmp_path / "m.safetensors", tensors)
    tcq = {"name": "t", "rules": [{"match": "*", "min_dims": 2, "stages": [{"name": "quantize", "mode": "tcq", "sqnr": 9}]}]}
    for recipe in ("int8", "int4", "int3", "ecsq", "q-tcq", "prune50-int4", "2of4-int4", "lowrank-auto", tcq):
        pk = weightpack.pack(src, tmp_path / "r.wpk", recipe=recipe, force=True).path
        if recipe in ("q-tcq", tcq):  # trellis levels in the lanes layout (several chunks): decoded on the device
            params = [p["stream"]["params"] for t in craft.read_container(pk).index["tensors"]
                      for p in t.get("parts", []) if p["name"] == "q"]
            assert len(params) == 5 and all(p.get("ans_lane") == trellis_plan.LANES_PER_ANS * 64 for p in params)
            assert max(p["classes"] for p in params) >= 4  # 16+ rest contexts: many runs per lane
        _same(weightpack.load(pk), weightpack.load(pk, decoder="device"))


def test_device_decoder_on_the_real_model(minilm, tmp_path):
    """all-MiniLM-L6-v2 as shipped (F32), default lanes: bit-identical to the CPU path and the source."""
    from safetensors.torch import load_file

    pk = weightpack.pack(minilm, tmp_path / "m.wpk", recipe="lossless").path
    got = weightpack.load(pk, decoder="device")
    src = load_file(str(minilm / "model.safetensors") if minilm.is_dir() else str(minilm))
    _same(dict(sorted(src.items(), key=lambda kv: list(got).index(kv[0]))), got)
    fields = [t["stream"]["params"] for t in craft.read_container(pk).index["tensors"]
              if t["stream"]["params"]["codec"] == "fields"]
    assert len(fields) > 90 and all(p["lane"] == entropy.LANE for p in fields)


def test_streams_before_format_1_2_still_decode(tmp_path, monkeypatch):
    """Heads written as one ANS stream per chunk (formats 1.0/1.1: no "lane" parameter) decode on both paths."""
    monkeypatch.setattr(entropy, "LANE", 0)
    src = craft.save_checkpoint(tmp_path / "m.safetensors")
    pk = weightpack.pack(src, tmp_path / "m.wpk").path
    idx = craft.read_container(pk).index
    assert all("lane" not in t["stream"]["params"] for t in idx["tensors"])
    assert any(p[1] == "ans" for t in idx["tensors"] for c in t["stream"]["chunks"] for p in c.get("parts", []))
    host = weightpack.load(pk)
    _same(host, weightpack.load(pk, decoder="device"))
    from safetensors.torch import load_file

    _same(load_file(str(src)), host)


def test_unpack_from_the_device_is_byte_identical(tmp_path, small_lanes):
    """unpack with the device decoder (here on the CPU) and `--device` (cpu: worker processes) restore
    the same files."""
    src = craft.make_sharded(tmp_path / "src", shards=2).parent
    pk = weightpack.pack(src / "model.safetensors.index.json", tmp_path / "m.wpk").path
    out = weightpack.unpack(pk, tmp_path / "out", device="cpu", decoder="device")
    assert craft.tree(out) == craft.tree(src)
    r = subprocess.run([sys.executable, "-m", "weightpack", "unpack", str(pk), "-o", str(tmp_path / "out2"),
                        "--device", "cpu", "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert craft.tree(tmp_path / "out2") == craft.tree(src)


def test_device_decoder_errors(tmp_path, small_lanes):
    src = craft.save_checkpoint(tmp_path / "m.safetensors")
    pk = weightpack.pack(src, tmp_path / "m.wpk").path

    def emb(idx):
        return next(t for t in idx["tensors"] if t["name"] == "embed.weight")["stream"]["chunks"][0]

    # damaged coded bytes: the crc32 is checked on the host before anything reaches the device
    bad = craft.patch_blob(pk, tmp_path / "crc.wpk", emb, 40, fix_crc=False)
    with pytest.raises(FormatError, match="checksum mismatch"):
        weightpack.load(bad, decoder="device")
    # the lane word counts no longer match the head part (crc fixed): refused before decoding
    bad = craft.patch_blob(pk, tmp_path / "lanes.wpk", emb, 0, mask=0x10)
    with pytest.raises(FormatError, match="lanes|corrupt"):
        weightpack.load(bad, decoder="device")
    with pytest.raises(FormatError):
        weightpack.load(bad)
    with pytest.raises(WeightpackError, match="unknown decoder"):
        weightpack.load(pk, decoder="gpu")
    if not HAVE_CUDA:
        with pytest.raises(WeightpackError, match="no CUDA GPU"):
            weightpack.load(pk, device="cuda", decoder="device")
        r = subprocess.run([sys.executable, "-m", "weightpack", "unpack", str(pk), "-o", str(tmp_path / "o"),
                            "--device", "cuda"], capture_output=True, text=True)
        assert r.returncode != 0 and "no CUDA GPU" in r.stderr and "Traceback" not in r.stderr
        assert not (tmp_path / "o").exists()


def test_every_crafted_lane_damage_is_an_error_or_exact(tmp_path, small_lanes):
    """Flip bits in the head part of a chunk (crc fixed, so only the decoders can tell): each decode is
    either refused with a FormatError or, where the flip left a valid stream, the CPU path's checksums
    catch it; the device path never crashes."""
    src = craft.save_checkpoint(tmp_path / "m.safetensors")
    pk = weightpack.pack(src, tmp_path / "m.wpk").path
    ref = weightpack.load(pk)
    rng = np.random.default_rng(4)

    def emb(idx):
        return next(t for t in idx["tensors"] if t["name"] == "embed.weight")["stream"]["chunks"][1]

    head_len = emb(craft.read_container(pk).index)["parts"][0][2]
    for k in range(12):
        bad = craft.patch_blob(pk, tmp_path / f"b{k}.wpk", emb, int(rng.integers(0, head_len)),
                               mask=1 << int(rng.integers(0, 8)))
        with pytest.raises(FormatError):
            weightpack.load(bad)
        try:
            got = weightpack.load(bad, decoder="device")
        except FormatError:
            continue
        assert set(got) == set(ref) and got["embed.weight"].shape == ref["embed.weight"].shape


@pytest.mark.skipif(not HAVE_CUDA, reason="needs a CUDA GPU")
def test_gpu_decode_matches_host(tmp_path, minilm):
    for recipe in ("lossless", "int4", "q-tcq"):
        pk = weightpack.pack(minilm, tmp_path / f"{recipe}.wpk", recipe=recipe).path
        host = weightpack.load(pk)
        got = weightpack.load(pk, device="cuda")
        assert all(x.is_cuda for x in got.values())
        _same(host, {k: v.cpu() for k, v in got.items()})


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
