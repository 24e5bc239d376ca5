"""End-to-end tests on the real all-MiniLM-L6-v2 weights and on generated checkpoints."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import weightpack
from conftest import copy_tree, make_sharded, minilm_dir, sha256

CLI = [sys.executable, "-m", "weightpack"]


def cli(*args, check=True):
    r = subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True)
    if check:
        assert r.returncode == 0, r.stderr
    return r


@pytest.mark.parametrize("dtype", ["F32", "BF16", "F16"])
def test_real_model_round_trips_bit_exactly(tmp_path, minilm_cast, dtype):
    src = minilm_cast[dtype]
    res = weightpack.pack(src, tmp_path / "m.wpk")
    bars = {"F32": 0.816, "BF16": 0.66, "F16": 0.85}  # loose guards; docs/BENCHMARKS.md has the measured figures
    assert res.ratio < bars[dtype]
    out = weightpack.unpack(tmp_path / "m.wpk", tmp_path / "out.safetensors")
    assert sha256(out) == sha256(src)  # the whole file, header and metadata included
    assert weightpack.verify(tmp_path / "m.wpk", against=src).ok


def test_load_open_and_inspect(tmp_path, minilm):
    wpk = tmp_path / "m.wpk"
    weightpack.pack(minilm, wpk)
    ref = load_file(str(minilm))
    got = weightpack.load(wpk)
    assert set(got) == set(ref)
    for k in ref:
        assert got[k].dtype == ref[k].dtype and got[k].shape == ref[k].shape
        assert torch.equal(got[k].view(torch.uint8) if got[k].dtype != torch.int64 else got[k],
                           ref[k].view(torch.uint8) if ref[k].dtype != torch.int64 else ref[k])
    with weightpack.open(wpk) as f, safe_open(str(minilm), "pt") as g:
        assert sorted(f.keys()) == sorted(g.keys())
        assert f.metadata() == g.metadata() == {"format": "pt"}
        name = "encoder.layer.3.attention.self.query.weight"
        assert torch.equal(f.get_tensor(name), g.get_tensor(name))
        with pytest.raises(KeyError):
            f.get_tensor("nope")
    rep = weightpack.inspect(wpk)
    assert rep.totals.tensors == len(ref)
    row = next(r for r in rep.tensors if r.name == "embeddings.word_embeddings.weight")
    assert row.shape == [30522, 384] and row.codec in ("ctx", "order0") and 20 < row.bits_per_weight < 28
    r = cli("inspect", wpk, "--json")
    assert json.loads(r.stdout)["totals"]["bytes_before"] == rep.totals.bytes_before
    r = cli("inspect", wpk)
    assert "word_embeddings" in r.stdout and "bits per weight" in r.stdout


def test_load_on_missing_gpu_is_a_clear_error(tmp_path, minilm):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    weightpack.pack(minilm, tmp_path / "m.wpk")
    with pytest.raises(weightpack.WeightpackError, match="no CUDA GPU"):
        weightpack.load(tmp_path / "m.wpk", device="cuda")
    assert weightpack.load(tmp_path / "m.wpk", device="auto")["pooler.dense.bias"].device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_load_on_gpu(tmp_path, minilm):
    weightpack.pack(minilm, tmp_path / "m.wpk")
    got = weightpack.load(tmp_path / "m.wpk", device="cuda")
    ref = load_file(str(minilm))
    for k in ref:
        assert got[k].is_cuda and torch.equal(got[k].cpu(), ref[k])


def test_same_bytes_whatever_the_number_of_workers(tmp_path, minilm_cast):
    src = minilm_cast["BF16"]
    weightpack.pack(src, tmp_path / "a.wpk", workers=1)
    weightpack.pack(src, tmp_path / "b.wpk", workers=2)
    weightpack.pack(src, tmp_path / "c.wpk", workers=2, force=True)
    assert sha256(tmp_path / "a.wpk") == sha256(tmp_path / "b.wpk") == sha256(tmp_path / "c.wpk")
    weightpack.unpack(tmp_path / "a.wpk", tmp_path / "one.safetensors", workers=1)
    weightpack.unpack(tmp_path / "a.wpk", tmp_path / "two.safetensors", workers=2)
    assert sha256(tmp_path / "one.safetensors") == sha256(tmp_path / "two.safetensors") == sha256(src)


@pytest.mark.parametrize("level", [1, 2, 3])
def test_levels_round_trip_and_order_by_size(tmp_path, minilm_cast, level):
    src = minilm_cast["BF16"]
    res = weightpack.pack(src, tmp_path / f"l{level}.wpk", level=level)
    assert weightpack.verify(tmp_path / f"l{level}.wpk", against=src).ok
    assert res.ratio < {1: 0.67, 2: 0.66, 3: 0.66}[level]


def _all_dtypes_checkpoint(path):
    g = torch.Generator().manual_seed(0)
    t = {
        "f64": torch.randn(33, 17, generator=g, dtype=torch.float64),
        "f32": torch.randn(300, 70, generator=g),
        "f16": torch.randn(64, 129, generator=g).half(),
        "bf16": torch.randn(129, 64, generator=g).bfloat16(),
        "f8e4m3": torch.randn(50, 40, generator=g).to(torch.float8_e4m3fn),
        "f8e5m2": torch.randn(50, 40, generator=g).to(torch.float8_e5m2),
        "f8e4m3fnuz": torch.randn(30, 20, generator=g).to(torch.float8_e4m3fnuz),
        "f8e5m2fnuz": torch.randn(30, 20, generator=g).to(torch.float8_e5m2fnuz),
        "c64": torch.randn(17, 9, generator=g, dtype=torch.complex64),
        "i64": torch.arange(1000, dtype=torch.int64),
        "i32": torch.randint(-2**31, 2**31 - 1, (77,), generator=g, dtype=torch.int32),
        "i16": torch.randint(-300, 300, (5, 5), generator=g, dtype=torch.int16),
        "i8": torch.randint(-128, 127, (1000,), generator=g, dtype=torch.int8),
        "u8": torch.randint(0, 255, (3, 3, 3), generator=g, dtype=torch.uint8),
        "bool": torch.rand(999, generator=g) > 0.3,
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "specials": torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-45, -1e-45, 3.4e38]),
    }
    nan_payload = torch.from_numpy(np.array([0x7FC00001, 0xFFC12345, 0x7F800001], dtype=np.uint32).view(np.float32))
    t["nan_payloads"] = nan_payload
    t["bf16_specials"] = torch.from_numpy(np.array([0x7FC1, 0xFF81, 0x0001, 0x8000, 0x7F80], dtype=np.uint16).view(np.int16)).view(torch.bfloat16)
    save_file(t, str(path), metadata={"format": "pt", "note": "every dtype"})
    return t


def test_every_dtype_and_bit_pattern_round_trips(tmp_path):
    src = tmp_path / "all.safetensors"
    ref = _all_dtypes_checkpoint(src)
    for level in (1, 2, 3):
        wpk = tmp_path / f"all{level}.wpk"
        weightpack.pack(src, wpk, level=level)
        out = weightpack.unpack(wpk, tmp_path / f"out{level}.safetensors")
        assert sha256(out) == sha256(src)
    got = weightpack.load(tmp_path / "all2.wpk")
    for k, v in ref.items():
        assert got[k].shape == v.shape and got[k].dtype == v.dtype
        assert got[k].reshape(-1).view(torch.uint8).tolist() == v.reshape(-1).view(torch.uint8).tolist()


def test_sharded_checkpoint(tmp_path, minilm):
    tensors = load_file(str(minilm))
    idx = make_sharded(tensors, tmp_path / "src", 3, metadata={"format": "pt"})
    r = cli("pack", idx, "-o", tmp_path / "s.wpk", "-q")
    assert r.stdout == ""
    cli("unpack", tmp_path / "s.wpk", "-o", tmp_path / "out")
    for p in sorted((tmp_path / "src").iterdir()):
        assert sha256(tmp_path / "out" / p.name) == sha256(p)
    assert sorted(x.name for x in (tmp_path / "out").iterdir()) == sorted(x.name for x in (tmp_path / "src").iterdir())
    assert cli("verify", tmp_path / "s.wpk", "--against", idx).stdout.startswith("ok")


def test_model_folder_carries_its_other_files(tmp_path):
    src = copy_tree(minilm_dir(), tmp_path / "minilm")
    cli("pack", src, "-o", tmp_path / "f.wpk")
    rep = weightpack.inspect(tmp_path / "f.wpk")
    assert "tokenizer.json" in rep.carried and "1_Pooling/config.json" in rep.carried
    cli("unpack", tmp_path / "f.wpk", "-o", tmp_path / "back")
    before = sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file())
    after = sorted(p.relative_to(tmp_path / "back").as_posix() for p in (tmp_path / "back").rglob("*") if p.is_file())
    assert before == after
    for rel in before:
        assert sha256(src / rel) == sha256(tmp_path / "back" / rel), rel


def test_verify_catches_a_different_source(tmp_path, minilm):
    weightpack.pack(minilm, tmp_path / "m.wpk")
    t = load_file(str(minilm))
    t["pooler.dense.bias"] = t["pooler.dense.bias"].clone()
    t["pooler.dense.bias"][0] = float(np.nextafter(np.float32(t["pooler.dense.bias"][0].item()), np.float32(1)))  # one ulp
    other = tmp_path / "other.safetensors"
    save_file(t, str(other), metadata={"format": "pt"})
    r = cli("verify", tmp_path / "m.wpk", "--against", other, check=False)
    assert r.returncode == 1 and "pooler.dense.bias" in r.stderr and "ok" not in r.stdout
    rep = weightpack.verify(tmp_path / "m.wpk", against=other)
    assert not rep.ok and len(rep.problems) == 1


def test_cli_help_and_recipes():
    r = cli("--help")
    for cmd in ("pack", "unpack", "inspect", "verify", "recipes"):
        assert cmd in r.stdout
    for cmd in ("pack", "unpack", "inspect", "verify"):
        assert "usage:" in cli(cmd, "--help").stdout
    r = cli("recipes")
    assert "lossless" in r.stdout and "lossless-max" in r.stdout
