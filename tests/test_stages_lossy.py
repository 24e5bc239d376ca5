"""The chain of lossy stages for one tensor (stages/lossy.py): deterministic whatever the workers, tensors
with NaN or inf left lossless, and crafted lossy records refused."""

import subprocess
import sys

import pytest
import torch

import weightpack
from weightpack.errors import FormatError

import craft

CLI = [sys.executable, "-m", "weightpack"]


def test_lossy_packs_are_deterministic(tmp_path, minilm_cast):
    src = minilm_cast["BF16"]
    weightpack.pack(src, tmp_path / "a.wpk", recipe="int4", workers=1)
    weightpack.pack(src, tmp_path / "b.wpk", recipe="int4", workers=2)
    assert (tmp_path / "a.wpk").read_bytes() == (tmp_path / "b.wpk").read_bytes()


def test_tensors_with_nan_or_inf_stay_lossless_under_a_lossy_recipe(tmp_path):
    from safetensors.torch import save_file

    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(2))
    bad = w.clone()
    bad[3, 5], bad[7, 1] = float("nan"), float("inf")
    src = tmp_path / "nan.safetensors"
    save_file({"ok.weight": w, "bad.weight": bad}, str(src))
    weightpack.pack(src, tmp_path / "n.wpk", recipe="int8")
    rows = {r.name: r for r in weightpack.inspect(tmp_path / "n.wpk").tensors}
    assert rows["bad.weight"].stages == ["lossless"] and rows["ok.weight"].stages != ["lossless"]
    got = weightpack.load(tmp_path / "n.wpk")
    assert torch.equal(got["bad.weight"].view(torch.int32), bad.view(torch.int32))
    assert weightpack.verify(tmp_path / "n.wpk", against=src).ok


def test_crafted_lossy_records_are_refused(tmp_path, minilm):
    wpk = tmp_path / "q.wpk"
    weightpack.pack(minilm, wpk, recipe="int8")

    def first_lossy(idx):
        return next(t for t in idx["tensors"] if t["stages"])

    edits = {
        "part-shape": lambda idx: first_lossy(idx)["parts"][1].update(shape=[3]),
        "part-dtype": lambda idx: first_lossy(idx)["parts"][0].update(dtype="U8"),
        "bits": lambda idx: first_lossy(idx)["stages"][0].update(bits=12),
        "stage-name": lambda idx: first_lossy(idx)["stages"][0].update(name="prune"),
        "parts-missing": lambda idx: first_lossy(idx).update(parts=[]),
        "quality": lambda idx: first_lossy(idx).update(quality={"sqnr_db": "high", "rel_error": 0.1}),
        "decoded-hash": lambda idx: first_lossy(idx).update(decoded_sha256="0" * 64),
        "on-int": lambda idx: first_lossy(idx).update(dtype="I32"),
    }
    for name, edit in edits.items():
        bad = tmp_path / f"{name}.wpk"
        craft.rewrite_index(wpk, bad, edit)
        with pytest.raises(FormatError):
            weightpack.load(bad)
        r = subprocess.run(CLI + ["unpack", str(bad), "-o", str(tmp_path / f"{name}-out")], capture_output=True, text=True)
        assert r.returncode == 2 and r.stderr.startswith("weightpack: error:") and "Traceback" not in r.stderr, name
        assert not (tmp_path / f"{name}-out").exists()
