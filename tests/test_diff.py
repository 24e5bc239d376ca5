"""weightpack diff A B: identical, lossy and mismatched inputs, exit codes and JSON."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import weightpack
from conftest import make_sharded

CLI = [sys.executable, "-m", "weightpack", "diff"]


def cli(*args):
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("diff")
    g = torch.Generator().manual_seed(3)
    tensors = {"a.weight": torch.randn(64, 96, generator=g), "a.bias": torch.randn(64, generator=g),
               "emb": torch.randn(50, 32, generator=g).to(torch.bfloat16), "ids": torch.arange(12)}
    save_file(tensors, str(d / "m.safetensors"), metadata={"format": "pt"})
    weightpack.pack(d / "m.safetensors", d / "m.wpk", workers=1)
    weightpack.pack(d / "m.safetensors", d / "m8.wpk", recipe="int8", workers=1)
    return tensors, d


def test_identical_inputs_exit_0(ckpt):
    tensors, d = ckpt
    rep = weightpack.diff(d / "m.safetensors", d / "m.wpk")
    assert rep.identical and rep.summary().startswith("identical: 4 tensors")
    assert all(t["status"] == "identical" and t["bits_per_weight_a"] is None and t["bits_per_weight_b"] > 0
               for t in rep.tensors)
    r = cli(d / "m.wpk", d / "m.safetensors")
    assert r.returncode == 0, r.stderr
    assert "identical" in r.stdout
    # a sharded set and a folder of the same tensors are the same checkpoint
    idx = make_sharded(tensors, d / "sharded", 2)
    assert cli(idx, d / "m.wpk").returncode == 0
    assert cli(d / "sharded", d / "m.safetensors").returncode == 0


def test_lossy_container_differs_with_errors(ckpt):
    tensors, d = ckpt
    r = cli(d / "m.safetensors", d / "m8.wpk", "--json")
    assert r.returncode == 1, r.stderr
    rep = json.loads(r.stdout)
    assert not rep["identical"] and rep["added"] == rep["removed"] == rep["renamed"] == []
    rows = {t["name"]: t for t in rep["tensors"]}
    w = rows["a.weight"]
    assert w["status"] == "changed" and 30 < w["sqnr_db"] < 60 and 0 < w["rel_error"] < 0.05
    err = torch.from_numpy(weightpack.load(d / "m8.wpk")["a.weight"].numpy()) - tensors["a.weight"]
    assert w["max_abs_error"] == pytest.approx(float(err.abs().max()), rel=1e-6)
    assert 7 < w["bits_per_weight_b"] < 9 and w["bits_per_weight_a"] is None
    assert rows["ids"]["status"] == "identical"
    assert rep["summary"].startswith("differ: ") and "worst SQNR" in rep["summary"]
    text = cli(d / "m.safetensors", d / "m8.wpk")
    assert text.returncode == 1 and "a.weight" in text.stdout and "ids" not in text.stdout
    assert text.stdout.strip().splitlines()[-1].startswith("differ: ")


def test_mismatched_inputs(ckpt, tmp_path):
    tensors, d = ckpt
    other = dict(tensors)
    other["a.bias"] = tensors["a.bias"].to(torch.float16)  # dtype changed
    other["emb"] = tensors["emb"].reshape(32, 50)  # shape changed
    other["token_ids"] = other.pop("ids")  # renamed
    del other["a.weight"]  # removed
    other["new"] = torch.ones(3)  # added
    save_file(other, str(tmp_path / "o.safetensors"))
    weightpack.pack(tmp_path / "o.safetensors", tmp_path / "o.wpk", workers=1)
    rep = weightpack.diff(d / "m.wpk", tmp_path / "o.wpk")
    assert not rep.identical
    rows = {t["name"]: t for t in rep.tensors}
    assert rows["a.bias"]["status"] == "dtype" and rows["a.bias"]["sqnr_db"] > 60
    assert rows["emb"]["status"] == "shape" and rows["emb"]["shape_b"] == [32, 50]
    assert rep.renamed == [{"from": "ids", "to": "token_ids"}]
    assert rep.removed == ["a.weight"] and rep.added == ["new"]
    r = cli(d / "m.wpk", tmp_path / "o.wpk")
    assert r.returncode == 1
    assert "renamed: ids -> token_ids" in r.stdout and "removed: a.weight" in r.stdout and "added: new" in r.stdout
    assert "F32->F16" in r.stdout and "50x32->32x50" in r.stdout


def test_bad_input_exit_2(ckpt, tmp_path):
    _, d = ckpt
    r = cli(tmp_path / "missing.safetensors", d / "m.wpk")
    assert r.returncode == 2 and "no such file" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    (tmp_path / "junk.wpk").write_bytes(b"\x89WPK\r\n\x1a\n" + b"\0" * 10)
    r = cli(tmp_path / "junk.wpk", d / "m.wpk")
    assert r.returncode == 2 and "weightpack: error:" in r.stderr
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    assert cli(tmp_path / "junk.safetensors", d / "m.wpk").returncode == 2
    assert cli(d / "m.wpk").returncode == 2  # usage
