"""The public API (api.py) end to end, on the real all-MiniLM-L6-v2 weights and on generated checkpoints:
pack, unpack, load, open, inspect and verify; devices; missing inputs."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import weightpack
from weightpack import WeightpackError
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


@pytest.mark.parametrize("level", [1, 2, 3])
def test_levels_round_trip_and_order_by_size(tmp_path, minilm_cast, level):
    src = minilm_cast["BF16"]
    res = weightpack.pack(src, tmp_path / f"l{level}.wpk", level=level)
    assert weightpack.verify(tmp_path / f"l{level}.wpk", against=src).ok
    assert res.ratio < {1: 0.67, 2: 0.66, 3: 0.66}[level]


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


def test_missing_input_api(tmp_path):
    missing = tmp_path / "nope.wpk"
    for call in (lambda: weightpack.pack(tmp_path / "nope.safetensors", tmp_path / "x.wpk"),
                 lambda: weightpack.unpack(missing, tmp_path / "x"),
                 lambda: weightpack.inspect(missing),
                 lambda: weightpack.verify(missing),
                 lambda: weightpack.load(missing),
                 lambda: weightpack.open(missing)):
        with pytest.raises(WeightpackError):
            call()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# == devices =======================================================================================

def test_cuda_without_gpu(base):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is available here")
    for call in (lambda: weightpack.load(base["single_wpk"], device="cuda"),
                 lambda: weightpack.load(base["single_wpk"], device="cuda:0"),
                 lambda: weightpack.load(base["single_wpk"], device=torch.device("cuda")),
                 lambda: weightpack.open(base["single_wpk"], device="cuda")):
        with pytest.raises(WeightpackError) as e:
            call()
        assert "cuda" in str(e.value).lower() and "\n" not in str(e.value)


def test_unknown_device(base):
    for dev in ("tpu9", "bogus", "", "cuda:x"):
        with pytest.raises(WeightpackError):
            weightpack.load(base["single_wpk"], device=dev)


def test_open_unknown_tensor(base):
    with weightpack.open(base["single_wpk"]) as f:
        with pytest.raises(KeyError):
            f.get_tensor("no.such.tensor")


# == verify ========================================================================================

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


def test_verify_cli_gates_on_quality(tmp_path, minilm):
    wpk = tmp_path / "q.wpk"
    weightpack.pack(minilm, wpk, recipe="int4")
    ok = subprocess.run(CLI + ["verify", str(wpk), "--against", str(minilm), "--min-sqnr", "10"], capture_output=True, text=True)
    assert ok.returncode == 0 and "lossy tensors within SQNR >= 10 dB" in ok.stdout
    bad = subprocess.run(CLI + ["verify", str(wpk), "--against", str(minilm), "--min-sqnr", "30"], capture_output=True, text=True)
    assert bad.returncode == 1 and "below 30.0 dB" in bad.stderr and "ok" not in bad.stdout
    rel = subprocess.run(CLI + ["verify", str(wpk), "--max-rel-error", "0.001"], capture_output=True, text=True)
    assert rel.returncode == 1 and "relative error" in rel.stderr
