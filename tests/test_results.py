"""results.py: the typed results are frozen, and to_json() is exactly what --json prints."""

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import weightpack
from weightpack.results import InspectReport, PackResult, TensorRow

CLI = [sys.executable, "-m", "weightpack"]


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    g = torch.Generator().manual_seed(5)
    p = tmp_path_factory.mktemp("res") / "m.safetensors"
    save_file({"a.weight": torch.randn(96, 128, generator=g), "n": torch.ones(96)}, str(p))
    return p


def test_pack_result_is_frozen_and_leaves_out_what_does_not_apply(src, tmp_path):
    res = weightpack.pack(src, tmp_path / "m.wpk", workers=1)
    assert isinstance(res, PackResult) and res.tensors == 2 and res.lossy is None and res.allocation is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.path = "x"
    assert list(res.to_json()) == ["path", "bytes_in", "bytes_out", "ratio", "seconds", "tensors"]
    lossy = weightpack.pack(src, tmp_path / "q.wpk", bits=3, workers=1)
    assert list(lossy.to_json()) == ["path", "bytes_in", "bytes_out", "ratio", "seconds", "tensors", "allocation",
                                     "lossy"]
    assert lossy.to_json()["allocation"]["target"] == {"bits_per_weight": 3}
    assert lossy.lossy.tensors == 1 and lossy.lossy.worst_tensor == "a.weight"


def test_cli_json_is_to_json(src, tmp_path):
    r = subprocess.run(CLI + ["pack", str(src), "-o", str(tmp_path / "c.wpk"), "--json", "-j", "1"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    printed = json.loads(r.stdout)
    assert list(printed) == ["path", "bytes_in", "bytes_out", "ratio", "seconds", "tensors"]
    rep = weightpack.inspect(tmp_path / "c.wpk")
    assert isinstance(rep, InspectReport) and all(isinstance(t, TensorRow) for t in rep.tensors)
    r = subprocess.run(CLI + ["inspect", str(tmp_path / "c.wpk"), "--json"], capture_output=True, text=True)
    assert json.loads(r.stdout) == json.loads(json.dumps(rep.to_json()))
    assert list(json.loads(r.stdout)) == ["path", "format_version", "source_kind", "recipe", "files", "carried",
                                          "tensors", "totals"]
    assert "shard" not in json.loads(r.stdout)["tensors"][0]


def test_inspect_of_a_set_names_each_rows_shard(src, tmp_path):
    res = weightpack.pack(src, tmp_path / "s.wpk", shard_size="1MB", workers=1)
    rep = weightpack.inspect(res.path).to_json()
    assert list(rep) == ["path", "format_version", "source_kind", "recipe", "files", "carried", "shards", "tensors",
                         "totals"]
    assert {t["shard"] for t in rep["tensors"]} == set(res.shards) and rep["shards"][0]["tensors"] == 2
