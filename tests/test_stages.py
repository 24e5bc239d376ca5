"""The quantization stage: round-trip properties alone, then through recipes, containers and verify."""

import math
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings, strategies as st
from safetensors.torch import load_file

import weightpack
from weightpack.errors import FormatError, RecipeError
from weightpack.recipe import load_recipe
from weightpack.stages import quantize as Q
from weightpack.stages.params import QuantParams

import craft

CLI = [sys.executable, "-m", "weightpack"]


def sqnr(a, b):
    a, b = a.double(), b.double()
    return 10 * math.log10(a.square().sum() / (a - b).square().sum())


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 8), st.booleans(), st.sampled_from(["tensor", "channel", "group"]),
       st.sampled_from([[37, 100], [5, 3, 4], [1000], [1, 7], [64, 64]]), st.integers(1, 200), st.integers(0, 2**31))
def test_quantize_round_trip_properties(bits, symmetric, granularity, shape, group, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * torch.rand(1, generator=g).item() * 3
    p = QuantParams(bits=bits, symmetric=symmetric, granularity=granularity, group=group, search=False)
    parts = Q.encode(w, p)
    assert {k: [v.shape and list(v.shape)][0] for k, v in parts.items()} == {k: s for k, (_, s) in p.parts(shape).items()}
    lo, hi = (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    q = parts["q"].to(torch.int32)
    assert int(q.min()) >= lo and int(q.max()) <= hi
    x = Q.decode(parts, p, shape)
    assert x.shape == w.shape
    # Without clipping every value is within half a step of its group's grid (plus float rounding).
    step = parts["scale"].max().item()
    assert (x - w).abs().max().item() <= step * (0.5 + 1e-4) + 1e-6
    searched = QuantParams(bits=bits, symmetric=symmetric, granularity=granularity, group=group)
    y = Q.decode(Q.encode(w, searched), searched, shape)
    assert (y - w).square().sum() <= (x - w).square().sum() * (1 + 1e-6) + 1e-12  # the search never loses


def test_more_bits_finer_groups_better_quality():
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(1)) * 0.02
    q = [sqnr(w, Q.decode(Q.encode(w, p), p, [256, 512]))
         for p in (QuantParams(bits=b, symmetric=False, granularity="group", group=64) for b in (2, 3, 4, 8))]
    assert q == sorted(q) and q[-1] > 40 and 19 < q[2] < 22  # 4-bit near the Gaussian optimum (~20 dB)
    ch = QuantParams(bits=4, symmetric=True, granularity="channel")
    gr = QuantParams(bits=4, symmetric=True, granularity="group", group=32)
    assert sqnr(w, Q.decode(Q.encode(w, gr), gr, [256, 512])) > sqnr(w, Q.decode(Q.encode(w, ch), ch, [256, 512]))


@pytest.mark.parametrize("bad, key", [({"bits": 9}, "bits"), ({"bits": "4"}, "bits"), ({"granularity": "row"}, "granularity"),
                                      ({"group": 0}, "group"), ({"symmetric": 1}, "symmetric"), ({"bitz": 4}, "bitz")])
def test_stage_parameters_are_checked(bad, key):
    with pytest.raises(RecipeError, match=key):
        load_recipe({"rules": [{"match": "*", "stages": [{"name": "quantize", **bad}]}]})


@pytest.mark.parametrize("recipe, max_bpw, min_db", [("int8", 7.6, 29), ("int4", 4.1, 13), ("int3", 3.4, 11)])
def test_presets_on_the_real_model(tmp_path, minilm, recipe, max_bpw, min_db):
    wpk = tmp_path / f"{recipe}.wpk"
    weightpack.pack(minilm, wpk, recipe=recipe)
    rep = weightpack.inspect(wpk)
    assert rep.totals.bits_per_weight < max_bpw
    lossy_rows = [r for r in rep.tensors if r.stages != ["lossless"]]
    assert len(lossy_rows) == 40 and all(len(r.shape) == 2 for r in lossy_rows)
    ref, got = load_file(str(minilm)), weightpack.load(wpk)
    out = weightpack.unpack(wpk, tmp_path / "out.safetensors")
    back = load_file(str(out))
    for k, v in ref.items():
        assert torch.equal(got[k], back[k]) and got[k].dtype == v.dtype
        if v.dim() == 2 and v.is_floating_point():
            row = next(r for r in rep.tensors if r.name == k)
            assert abs(row.quality["sqnr_db"] - sqnr(v, got[k])) < 1e-6 and sqnr(v, got[k]) > min_db
        else:
            assert torch.equal(got[k], v)  # norms and biases stay exact
    report = weightpack.verify(wpk, against=minilm, min_sqnr=min_db)
    assert report.ok and len(report.quality) == 40
    assert not weightpack.verify(wpk, against=minilm, min_sqnr=60).ok


def test_verify_cli_gates_on_quality(tmp_path, minilm):
    wpk = tmp_path / "q.wpk"
    weightpack.pack(minilm, wpk, recipe="int4")
    ok = subprocess.run(CLI + ["verify", str(wpk), "--against", str(minilm), "--min-sqnr", "10"], capture_output=True, text=True)
    assert ok.returncode == 0 and "lossy tensors within SQNR >= 10 dB" in ok.stdout
    bad = subprocess.run(CLI + ["verify", str(wpk), "--against", str(minilm), "--min-sqnr", "30"], capture_output=True, text=True)
    assert bad.returncode == 1 and "below 30.0 dB" in bad.stderr and "ok" not in bad.stdout
    rel = subprocess.run(CLI + ["verify", str(wpk), "--max-rel-error", "0.001"], capture_output=True, text=True)
    assert rel.returncode == 1 and "relative error" in rel.stderr


def test_lossy_packs_are_deterministic(tmp_path, minilm_cast):
    src = minilm_cast["BF16"]
    weightpack.pack(src, tmp_path / "a.wpk", recipe="int4", workers=1)
    weightpack.pack(src, tmp_path / "b.wpk", recipe="int4", workers=2)
    assert (tmp_path / "a.wpk").read_bytes() == (tmp_path / "b.wpk").read_bytes()


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


@pytest.mark.parametrize("shape", [[64, 100], [1000], [3, 5, 8]])
def test_pruning_patterns(shape):
    from weightpack.stages import prune
    from weightpack.stages.params import PruneParams

    w = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    x = prune.apply(w, PruneParams(sparsity=0.3))
    assert int((x == 0).sum()) == int(0.3 * w.numel())
    kept = x != 0
    assert torch.equal(x[kept], w[kept]) and w[~kept].abs().max() <= w[kept].abs().min()
    y = prune.apply(w, PruneParams(n=2, m=4))
    rows = shape[0] if len(shape) > 1 else 1
    flat = y.reshape(rows, -1)
    full = flat[:, : flat.shape[1] // 4 * 4].reshape(rows, -1, 4)
    assert int((full != 0).sum(dim=2).max()) <= 2
    for sym in (True, False):  # pruned zeros come back as exact zeros after quantization
        p = QuantParams(bits=4, symmetric=sym, granularity="group", group=32)
        back = Q.decode(Q.encode(y, p), p, shape)
        assert torch.all(back[y == 0] == 0)


@pytest.mark.parametrize("recipe, max_bpw", [("prune50-int4", 3.0), ("2of4-int4", 3.1)])
def test_pruned_presets_are_cheaper_than_dense(tmp_path, minilm, recipe, max_bpw):
    wpk = tmp_path / "p.wpk"
    weightpack.pack(minilm, wpk, recipe=recipe)
    assert weightpack.inspect(wpk).totals.bits_per_weight < max_bpw
    got, ref = weightpack.load(wpk), load_file(str(minilm))
    w = ref["encoder.layer.0.intermediate.dense.weight"]
    g = got["encoder.layer.0.intermediate.dense.weight"]
    assert abs(float((g == 0).double().mean()) - 0.5) < 0.01
    assert weightpack.verify(wpk, against=minilm).ok and sqnr(w, g) > 5


def test_stage_chains_are_checked():
    with pytest.raises(RecipeError, match="prune, quantize"):
        load_recipe({"rules": [{"stages": [{"name": "quantize"}, {"name": "prune"}]}]})
    with pytest.raises(RecipeError, match="sparsity"):
        load_recipe({"rules": [{"stages": [{"name": "prune", "sparsity": 1.5}, {"name": "quantize"}]}]})
    with pytest.raises(RecipeError, match="'n' and 'm'"):
        load_recipe({"rules": [{"stages": [{"name": "prune", "n": 4, "m": 2}, {"name": "quantize"}]}]})


def test_ecsq_and_min_sqnr_reach_their_quality_with_the_fewest_bits(tmp_path, minilm):
    w = torch.randn(300, 400, generator=torch.Generator().manual_seed(5)) * 0.03
    for db in (10.0, 22.8, 34.4):
        p = QuantParams(mode="ecsq", sqnr=db)
        got = sqnr(w, Q.decode(Q.encode(w, p), p, [300, 400]))
        assert db <= got < db + 0.2  # at least the target, and not wastefully above it
    r = subprocess.run(CLI + ["pack", str(minilm), "-o", str(tmp_path / "e.wpk"), "--min-sqnr", "22.8", "-q"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rep = weightpack.inspect(tmp_path / "e.wpk")
    lossy_rows = [x for x in rep.tensors if x.stages != ["lossless"]]
    assert len(lossy_rows) == 40 and min(x.quality["sqnr_db"] for x in lossy_rows) >= 22.8
    assert {x.stages[0] for x in lossy_rows} == {"tcq22.8dB"}  # --min-sqnr: trellis-coded quantization
    bits = sum(x.bytes_after for x in lossy_rows) * 8 / sum(math.prod(x.shape) for x in lossy_rows)
    assert bits < 3.95  # GGUF Q4_K needs 4.5 at this quality; docs/BENCHMARKS-lossy.md has the measured figures
    report = weightpack.verify(tmp_path / "e.wpk", against=minilm, min_sqnr=22.8)
    assert report.ok


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
