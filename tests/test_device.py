"""Decoding on a torch device (device.py): whole containers decoded by the device decoder, checked bit for bit
against the CPU path, for every dtype and every lossy recipe; unpack from the device; damage refused.

On a machine without a GPU the device decoder runs with torch on the CPU (decoder="device"): the same code
a GPU runs, except the Triton kernel (tests/test_coding_lockstep.py runs it under its interpreter). Tests that
need a real GPU skip without one."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import weightpack
from weightpack.coding import entropy
from weightpack.coding.codecs.fields import plan as fields_plan
from weightpack.coding.codecs.trellis import plan as trellis_plan
from weightpack.errors import FormatError, WeightpackError

import craft


HAVE_CUDA = torch.cuda.is_available()


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
    from test_codecs_fields import _bit_patterns

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
