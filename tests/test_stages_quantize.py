"""The quantization stage (stages/quantize.py): round to nearest (rtn) round-trip properties alone, then the
presets through containers; ecsq and tcq at a target SQNR or step, on every float dtype and odd shapes, and
steps too fine for the level coder."""

import math
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings, strategies as st
from safetensors.torch import load_file, save_file

import weightpack
from weightpack.stages import quantize as Q
from weightpack.stages.params import QuantParams

from conftest import sqnr

CLI = [sys.executable, "-m", "weightpack"]


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


# -- trellis-coded quantization (the search: stages/tcq.py) ----------------------------------------

def test_tcq_stage_reaches_its_quality_with_fewer_bits_than_ecsq():
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(7)) * 0.02
    for db in (12.0, 22.8, 34.4):
        p = QuantParams(mode="tcq", sqnr=db)
        parts = Q.encode(w, p)
        assert parts["q"].dtype == torch.int16
        got = sqnr(w, Q.decode(parts, p, [256, 512]))
        assert db <= got < db + 0.3
    # weights that are exactly zero (pruned) stay exactly zero
    pruned = w * (torch.rand(256, 512, generator=torch.Generator().manual_seed(8)) > 0.6)
    p = QuantParams(mode="tcq", sqnr=22.8)
    rec = Q.decode(Q.encode(pruned, p), p, [256, 512])
    assert bool((rec[pruned == 0] == 0).all())
    # a fixed step is used as given, and decoding is the multiples times the step
    p = QuantParams(mode="tcq", step=0.004)
    parts = Q.encode(w, p)
    assert float(parts["step"][0]) == pytest.approx(0.004)
    assert torch.equal(Q.decode(parts, p, [256, 512]), parts["q"].float() * parts["step"][0])


def test_q_tcq_on_the_real_model(tmp_path, minilm):
    """q-tcq and ecsq on the first layer: equal quality, the trellis ~0.15 bit cheaper."""
    sizes = {}
    for mode in ("tcq", "ecsq"):
        rec = {"name": mode, "rules": [{"match": "encoder.layer.0.*", "min_dims": 2,
                                        "stages": [{"name": "quantize", "mode": mode, "sqnr": 22.8}]}]}
        wpk = tmp_path / f"{mode}.wpk"
        weightpack.pack(minilm, wpk, recipe=rec)
        rows = [r for r in weightpack.inspect(wpk).tensors if r.stages != ["lossless"]]
        assert len(rows) == 6 and min(r.quality["sqnr_db"] for r in rows) >= 22.8
        sizes[mode] = 8 * sum(r.bytes_after for r in rows) / sum(math.prod(r.shape) for r in rows)
        assert weightpack.verify(wpk, against=minilm, min_sqnr=22.8).ok
    assert sizes["tcq"] < sizes["ecsq"] - 0.1, sizes


def test_tcq_on_every_float_dtype_and_odd_shapes(tmp_path):
    from conftest import make_sharded

    g = torch.Generator().manual_seed(21)
    base = torch.randn(96, 200, generator=g) * 0.03
    tensors = {
        "f32": base, "f16": base.to(torch.float16), "bf16": base.to(torch.bfloat16), "f64": base.double(),
        "zeros": torch.zeros(40, 64), "conv": torch.randn(16, 3, 5, 5, generator=g) * 0.1,
        "vec": torch.randn(1000, generator=g), "empty": torch.zeros(0, 8), "ints": torch.arange(12).reshape(3, 4),
    }
    idx = make_sharded(tensors, tmp_path / "sharded", 3)
    rec = {"name": "all", "rules": [{"match": "*", "min_dims": 0, "stages": [
        {"name": "quantize", "mode": "tcq", "sqnr": 30.0}]}]}
    weightpack.pack(idx, tmp_path / "s.wpk", recipe=rec)
    rows = {r.name: r for r in weightpack.inspect(tmp_path / "s.wpk").tensors}
    for name in ("f32", "f16", "bf16", "f64", "conv", "vec"):
        assert rows[name].stages == ["tcq30dB"] and rows[name].quality["sqnr_db"] >= 30, name
    assert rows["zeros"].quality["sqnr_db"] is None  # exact: no error
    assert rows["empty"].stages == rows["ints"].stages == ["lossless"]
    assert weightpack.verify(tmp_path / "s.wpk", against=idx, min_sqnr=30).ok
    out = weightpack.unpack(tmp_path / "s.wpk", tmp_path / "out")
    back = weightpack.load(tmp_path / "s.wpk")
    assert back["bf16"].dtype == torch.bfloat16 and back["conv"].shape == (16, 3, 5, 5)
    assert torch.equal(back["zeros"], tensors["zeros"]) and torch.equal(back["ints"], tensors["ints"])
    assert (out / "model.safetensors.index.json").exists()
    # rate control over a sharded checkpoint
    res = weightpack.pack(idx, tmp_path / "b.wpk", bits=3.0)
    assert res.allocation.bits_per_weight <= 3.0


def test_very_fine_steps_fall_back_to_plain_integer_coding(tmp_path):
    g = torch.Generator().manual_seed(22)
    w = torch.randn(64, 256, generator=g) * 0.01
    w[0, 0] = 3.0  # an outlier: at 50 dB the levels span far more values than a table holds
    save_file({"w": w}, str(tmp_path / "o.safetensors"))
    weightpack.pack(tmp_path / "o.safetensors", tmp_path / "o.wpk", min_sqnr=50)
    rows = weightpack.inspect(tmp_path / "o.wpk").tensors
    assert rows[0].quality["sqnr_db"] >= 50 and "trellis" not in rows[0].codec
    assert weightpack.verify(tmp_path / "o.wpk", against=tmp_path / "o.safetensors", min_sqnr=50).ok
    r = subprocess.run(CLI + ["pack", str(tmp_path / "o.safetensors"), "-o", str(tmp_path / "p.wpk"), "--min-sqnr", "70"],
                       capture_output=True, text=True)  # beyond what int16 multiples can hold: a clear error
    assert r.returncode == 2 and "too fine" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "p.wpk").exists()
