"""Low rank plus residual: exact factor products, the rank decision, round trips, refusals."""

import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import weightpack
from weightpack.errors import FormatError, RecipeError
from weightpack.recipe import load_recipe
from weightpack.stages import lowrank

import craft

CLI = [sys.executable, "-m", "weightpack"]


@pytest.fixture(scope="module")
def mats(tmp_path_factory):
    g = torch.Generator().manual_seed(3)
    low = (torch.randn(512, 12, generator=g) @ torch.randn(12, 320, generator=g)) * 0.05
    low += torch.randn(512, 320, generator=g) * 0.004
    full = torch.randn(384, 256, generator=g) * 0.02
    p = tmp_path_factory.mktemp("lr") / "m.safetensors"
    save_file({"low.weight": low, "full.weight": full, "norm": torch.ones(7)}, str(p))
    return p


def test_factor_product_is_exact_and_close():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(200, 90, generator=g) @ torch.randn(90, 150, generator=g)
    parts = lowrank.factorize(w, 90)
    got = lowrank.product(parts, [200, 150])
    ref = (parts["lr_as"].double()[:, None] * parts["lr_bs"].double()[None, :]).float() * \
        (parts["lr_a"].long() @ parts["lr_b"].long()).float()  # integer sums: the reference is exact
    assert torch.equal(got, ref)
    assert float((got - w).square().sum() / w.square().sum()) < 1e-3  # 8-bit factors of an exact rank-90 matrix
    with pytest.raises(ValueError):
        lowrank.product({**parts, "lr_bs": parts["lr_bs"][:-1]}, [200, 150])


def test_lowrank_auto_factorizes_only_where_it_pays(tmp_path, mats):
    r = subprocess.run(CLI + ["pack", str(mats), "-o", str(tmp_path / "a.wpk"), "-r", "lowrank-auto"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "low rank: 1 of 2 matrices factorized: low.weight" in r.stdout and "no rank saved bits" in r.stdout
    weightpack.pack(mats, tmp_path / "t.wpk", recipe="q-tcq")
    rows = {x.name: x for x in weightpack.inspect(tmp_path / "a.wpk").tensors}
    direct = {x.name: x for x in weightpack.inspect(tmp_path / "t.wpk").tensors}
    assert rows["low.weight"].stages[0].startswith("lowrank")
    assert rows["low.weight"].bytes_after < 0.5 * direct["low.weight"].bytes_after
    assert rows["full.weight"].stages == direct["full.weight"].stages == ["tcq22.8dB"]
    assert rows["full.weight"].bytes_after == direct["full.weight"].bytes_after
    assert min(x.quality["sqnr_db"] for x in rows.values() if x.quality) >= 22.8
    assert weightpack.verify(tmp_path / "a.wpk", against=mats, min_sqnr=22.8).ok
    back, out = weightpack.load(tmp_path / "a.wpk"), load_file(str(weightpack.unpack(tmp_path / "a.wpk", tmp_path / "o.safetensors")))
    assert all(torch.equal(back[k], out[k]) for k in out) and torch.equal(out["norm"], torch.ones(7))


def test_fixed_rank_and_recipe_checks(tmp_path, mats):
    rec = {"name": "r8", "rules": [{"match": "*", "min_dims": 2, "stages": [
        {"name": "lowrank", "rank": 8}, {"name": "quantize", "mode": "tcq", "sqnr": 30.0}]}]}
    weightpack.pack(mats, tmp_path / "r.wpk", recipe=rec)
    rows = [x for x in weightpack.inspect(tmp_path / "r.wpk").tensors if x.stages != ["lossless"]]
    assert all(x.stages[0].startswith("lowrank8+") and x.quality["sqnr_db"] >= 30 for x in rows)
    for bad, msg in (([{"name": "lowrank", "rank": -1}, {"name": "quantize"}], "rank"),
                     ([{"name": "quantize"}, {"name": "lowrank"}], "stages must be"),
                     ([{"name": "lowrank", "rnk": 3}, {"name": "quantize"}], "rnk")):
        with pytest.raises(RecipeError, match=msg):
            load_recipe({"rules": [{"stages": bad}]})

    def first_lr(idx):
        return next(t for t in idx["tensors"] if t["stages"] and t["stages"][0]["name"] == "lowrank")

    edits = {
        "rank-zero": lambda idx: first_lr(idx)["stages"][0].update(rank=0),
        "rank-big": lambda idx: first_lr(idx)["stages"][0].update(rank=10**6),
        "factor-shape": lambda idx: first_lr(idx)["parts"][0].update(shape=[3, 3]),
        "no-factors": lambda idx: first_lr(idx).update(parts=first_lr(idx)["parts"][4:]),
    }
    for name, edit in edits.items():
        bad = tmp_path / f"{name}.wpk"
        craft.rewrite_index(tmp_path / "r.wpk", bad, edit)
        with pytest.raises(FormatError):
            weightpack.load(bad)


def test_lowrank_on_the_real_model_says_what_it_decided(tmp_path, minilm):
    """Trained weights: only the smooth position embeddings are worth factorizing."""
    rec = {"name": "x", "rules": [{"match": "embeddings.*", "min_dims": 2, "stages": [
        {"name": "lowrank"}, {"name": "quantize", "mode": "tcq", "sqnr": 22.8}]}]}
    res = weightpack.pack(minilm, tmp_path / "m.wpk", recipe=rec)
    ranks = {d.name: d.rank for d in res.lowrank}
    assert ranks["embeddings.word_embeddings.weight"] == 0 and ranks["embeddings.position_embeddings.weight"] > 0
    assert weightpack.verify(tmp_path / "m.wpk", against=minilm, min_sqnr=22.8).ok
    sizes = {x.name: x.bits_per_weight for x in weightpack.inspect(tmp_path / "m.wpk").tensors}
    assert sizes["embeddings.position_embeddings.weight"] < 3.5  # q-tcq: ~4.1 at this quality
    assert math.isfinite(sizes["embeddings.word_embeddings.weight"])
