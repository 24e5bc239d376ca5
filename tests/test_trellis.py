"""Trellis-coded quantization: the state machine, the search, the level coder, the stage, rate control."""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from safetensors.torch import save_file

import weightpack
from weightpack.coding import entropy
from weightpack.coding.codecs.trellis import codec as TC
from weightpack.coding.codecs.trellis import plan as TP
from weightpack.stages import tcq as T
from weightpack.errors import FormatError, WeightpackError
from weightpack.stages import quantize as Q
from weightpack.stages.params import QuantParams

import craft
from conftest import under_every_cpu_decoder

CLI = [sys.executable, "-m", "weightpack"]


def walk_reference(lv):
    """The machine, one element at a time."""
    q = np.empty(lv.shape, np.int64)
    for i in range(lv.shape[0]):
        s = 0
        for j in range(lv.shape[1]):
            q[i, j] = T.QUANT[s]
            s = T.NEXT[s, lv[i, j] & 1]
    return q


def test_the_machine():
    # 8 states, each entered from exactly two (state, parity) branches; half the states on each quantizer
    assert sorted(T.NEXT.reshape(-1).tolist()) == sorted(list(range(T.STATES)) * 2)
    assert T.QUANT.sum() == T.STATES // 2
    rng = np.random.default_rng(1)
    lv = rng.integers(-9, 9, (37, T.PATH))
    assert np.array_equal(T.walk(lv), walk_reference(lv))
    k = rng.integers(-300, 300, 5 * T.PATH + 17)
    r = T.multiples(k)
    back, q = T.levels_of(r)
    assert np.array_equal(back.reshape(-1)[: len(k)], k)
    assert np.array_equal(T.reconstruct(back, q).reshape(-1)[: len(k)], r)
    # on Q0 only even multiples exist, on Q1 only odd ones and zero: anything else is refused
    bad = r.copy()
    bad[0] = 1  # the first element is on Q0 (state 0)
    with pytest.raises(ValueError):
        T.levels_of(bad)


def _mse(x, lv, delta):
    return float(np.mean((T.reconstruct(lv, T.walk(lv)) * delta - x) ** 2))


def test_viterbi_finds_the_least_distortion_path():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((64, T.PATH)) * 4.0
    rate = np.zeros((2, 1, 64))
    lv = T.viterbi(x, 0.0, rate, -32)
    best = _mse(x, lv, 1.0)
    # a greedy path (nearest level on each state's quantizer) is one of the paths the search weighed
    greedy = np.zeros_like(lv)
    state = np.zeros(len(x), np.int64)
    for j in range(T.PATH):
        q = T.QUANT[state]
        k0 = np.round(x[:, j] / 2)
        k1 = np.sign(x[:, j]) * np.round((np.abs(x[:, j]) + 1) / 2)
        greedy[:, j] = np.where(q == 0, k0, k1)
        state = T.NEXT[state, greedy[:, j] & 1]
    assert best <= _mse(x, greedy, 1.0)
    # the trellis's granular gain: below a scalar quantizer of step 2 (error 4/12) by at least 0.8 dB
    assert best < (4 / 12) / 10 ** 0.08
    # a rate weight trades error for fewer bits: zero made cheap, more zeros chosen
    rate[:, :, 32] = -5.0
    cheap_zero = T.viterbi(x, 1.0, rate, -32)
    assert (cheap_zero == 0).sum() > (lv == 0).sum()


def _code(r, shape, lane=None):
    plan = TC.make_plan(r, shape, lane)
    u = r.view(np.uint16)
    coded = [TC.encode_chunk(plan, i, u[slice(*plan.chunk_range(i))]) for i in range(plan.nchunks)]
    return plan, coded


def _decode_with(plan, coded, n):
    p2 = TC.plan_from_record("I16", n, plan.params(), plan.side(), "test")
    return b"".join(TC.decode_chunk(p2, i, rec, memoryview(pay), "test") for i, (rec, pay) in enumerate(coded))


def _decode(plan, coded, n):
    """Decoded by every CPU decoder (compiled kernels, constriction + numpy): the same bytes."""
    return under_every_cpu_decoder(lambda: _decode_with(plan, coded, n))


# the ANS lanes of format 1.2 (parity | rest, 64 symbols per lane here: many lanes), and 1.1 (step-major)
LAYOUTS = [16, 0]


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 3 * 1024), spread=st.sampled_from([0, 1, 3, 40, 400]), rows=st.sampled_from([1, 3, 16, 40]),
       seed=st.integers(0, 2**31), lane=st.sampled_from(LAYOUTS))
def test_level_coder_round_trip(n, spread, rows, seed, lane):
    rng = np.random.default_rng(seed)
    k = np.round(rng.laplace(0, spread + 1e-9, n)).astype(np.int64).clip(-2000, 2000)
    r = T.multiples(k)
    shape = [rows, n // rows] if n % rows == 0 and rows > 1 else [n]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TP, "CHUNK_TARGET", 4 * T.PATH)  # several chunks, a partial last path
        mp.setattr(TP, "SPLIT_TOLERANCE", float("inf"))  # the lanes layout whenever lane > 0
        plan, coded = _code(r, shape, lane)
    assert plan.ans_lane == (TP.LANES_PER_ANS * lane if plan.alphabet > 1 else 0)  # one level: no stream
    assert _decode(plan, coded, n) == r.tobytes()


def test_layout_is_chosen_by_cost():
    """The lanes layout codes parities without the quantizer as context: taken at moderate rates, not
    at a few levels where that context is worth much."""
    rng = np.random.default_rng(2)
    w = rng.standard_normal(256 * 384)
    coarse = TC.make_plan(T.multiples(T.search(w, 384, 1.2, 0.3)), [256, 384])
    fine = TC.make_plan(T.multiples(T.search(w, 384, 0.1, 0.3)), [256, 384])
    assert coarse.alphabet <= 7 and coarse.ans_lane == 0
    assert fine.alphabet > 20 and fine.ans_lane == TP.LANES_PER_ANS * entropy.LANE


def test_parity_walk_matches_the_machine():
    rng = np.random.default_rng(9)
    for n in (1, 255, 256, 257, 5000):
        k = rng.integers(-9, 10, n)
        assert np.array_equal(T.walk_parities((k & 1).astype(np.uint8)), T.walk(T.paths(k)).reshape(-1)[:n])


def test_level_coder_refuses_what_its_tables_cannot_hold():
    r = T.multiples(np.arange(-3000, 3000))  # 6000 distinct levels: more than a table holds
    with pytest.raises(ValueError):
        TC.make_plan(r, [r.size])


@pytest.mark.parametrize("lane", [entropy.LANE, 0])
def test_level_coder_uses_its_contexts(lane, monkeypatch):
    # rows of two very different scales: the row classes are chosen and pay for themselves
    monkeypatch.setattr(TP, "SPLIT_TOLERANCE", float("inf"))
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.standard_normal((200, 512)) * 0.2, rng.standard_normal((200, 512)) * 6])
    rng.shuffle(x)
    k = T.search(x.reshape(-1), 512, 1.0, 0.3)
    r = T.multiples(k)
    plan, coded = _code(r, [400, 512], lane)
    if lane:  # parities per row class; rests per quantizer, parity and row class
        assert plan.classes > 1 and plan.pcontexts == plan.classes and plan.contexts == 4 * plan.classes
    else:  # levels per quantizer, row class and maybe the previous level's sign
        assert plan.classes > 1 and plan.contexts == 2 * plan.classes * (3 if plan.prev else 1)
    size = sum(len(p) for _, p in coded) + len(plan.side())
    flat = TC.make_plan(r, [r.size], lane)  # one row: no row classes
    _, flat_coded = _code(r, [r.size], lane)
    assert size < sum(len(p) for _, p in flat_coded) + len(flat.side())
    assert _decode(plan, coded, r.size) == r.tobytes()


@pytest.mark.parametrize("lane", [entropy.LANE, 0])
def test_damaged_level_streams_are_refused(lane, monkeypatch, each_cpu_decoder):
    monkeypatch.setattr(TP, "SPLIT_TOLERANCE", float("inf"))
    rng = np.random.default_rng(4)
    r = T.multiples(np.round(rng.laplace(0, 3, 5000)).astype(np.int64))
    plan, coded = _code(r, [50, 100], lane)
    rec, pay = coded[0]
    for bad_pay in (pay[:-4], pay[:8] + bytes(len(pay) - 8), bytes(len(pay)), pay + b"\0\0\0\0"):
        with pytest.raises(FormatError):
            _decode_with(plan, [(rec, bad_pay)], r.size)
    for pos in rng.integers(0, len(pay), size=40):  # single bit flips
        bad = bytearray(pay)
        bad[pos] ^= 1 << int(rng.integers(0, 8))
        with pytest.raises(FormatError):
            _decode_with(plan, [(rec, bytes(bad))], r.size)
    bad = [("lane", 64), ("alphabet", 0), ("classes", 3), ("prev", 2), ("lo", -40000), ("row", 0), ("chunk", 100)]
    if lane:
        bad += [("ans_lane", 100), ("ans_lane", 1 << 30), ("rlo", plan.rlo - 1), ("rest", plan.rest + 1), ("prev", 1)]
    for key, value in bad:
        with pytest.raises(FormatError):
            TC.plan_from_record("I16", r.size, {**plan.params(), key: value}, plan.side(), "test")
    if lane:
        with pytest.raises(FormatError):
            TC.plan_from_record("I16", r.size, {k: v for k, v in plan.params().items() if k != "rest"}, plan.side(), "test")
    with pytest.raises(FormatError):
        TC.plan_from_record("I16", r.size, plan.params(), plan.side()[:-3], "test")


def sqnr(a, b):
    a, b = a.double(), b.double()
    return 10 * math.log10(float(a.square().sum()) / float((a - b).square().sum()))


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


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A small model: matrices of different scales, a norm vector, an integer tensor."""
    g = torch.Generator().manual_seed(11)
    d = tmp_path_factory.mktemp("rc")
    tensors = {"a.weight": torch.randn(256, 384, generator=g) * 0.05, "b.weight": torch.randn(384, 256, generator=g) * 0.01,
               "c.weight": (torch.randn(128, 300, generator=g) * 0.2).to(torch.bfloat16),
               "norm.weight": torch.ones(384), "ids": torch.arange(100)}
    p = d / "m.safetensors"
    save_file(tensors, str(p))
    return p


@pytest.mark.parametrize("bits", [2.5, 4.0])
def test_rate_control_meets_a_bit_budget(tmp_path, model, bits):
    res = weightpack.pack(model, tmp_path / "b.wpk", bits=bits)
    a = res.allocation
    assert bits * 0.96 <= a.bits_per_weight <= bits
    rows = [r for r in weightpack.inspect(tmp_path / "b.wpk").tensors if r.stages != ["lossless"]]
    measured = 8 * sum(r.bytes_after for r in rows) / sum(math.prod(r.shape) for r in rows)
    assert measured == pytest.approx(a.bits_per_weight)
    assert {t.name for t in a.tensors} == {"a.weight", "b.weight", "c.weight"}
    # one step for all: the smaller-scale tensor gets the lower SQNR (equal slope, least total error)
    by = {t.name: t for t in a.tensors}
    assert by["b.weight"].sqnr_db < by["a.weight"].sqnr_db
    back = weightpack.load(tmp_path / "b.wpk")
    assert torch.equal(back["norm.weight"], torch.ones(384)) and torch.equal(back["ids"], torch.arange(100))


def test_relative_allocation_keeps_small_tensors_from_starving(tmp_path, model):
    a = weightpack.pack(model, tmp_path / "a.wpk", bits=3.0).allocation
    r = weightpack.pack(model, tmp_path / "r.wpk", bits=3.0, allocate="relative").allocation
    assert r.allocate == "relative" and 2.85 <= r.bits_per_weight <= 3.0
    spread = {k: max(t.sqnr_db for t in x.tensors) - min(t.sqnr_db for t in x.tensors) for k, x in
              (("absolute", a), ("relative", r))}
    assert spread["relative"] < 2 < spread["absolute"]  # equal relative steps: about equal SQNR
    rows = weightpack.inspect(tmp_path / "r.wpk").tensors
    assert {x.stages[0] for x in rows if x.stages != ["lossless"]} == {f"tcq-step{r.step:.3g}rms"}
    with pytest.raises(WeightpackError, match="allocate"):
        weightpack.pack(model, tmp_path / "x.wpk", bits=3.0, allocate="fair")


def test_tensor_allocation_counts_each_tensor_once(tmp_path):
    """--allocate tensor: steps in units of RMS x sqrt(size / 2^20), so a tensor's relative squared error
    grows with its size (64x the weights: ~18 dB less SQNR); names with pattern characters get their own
    step too; the budget holds."""
    g = torch.Generator().manual_seed(3)
    src = tmp_path / "m.safetensors"
    save_file({"big.weight": torch.randn(1024, 512, generator=g) * 0.02,
               "small[0].weight": torch.randn(64, 128, generator=g) * 0.02,
               "norm.weight": torch.ones(512)}, str(src))
    r = subprocess.run(CLI + ["pack", str(src), "-o", str(tmp_path / "t.wpk"), "--bits", "3", "--allocate", "tensor"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "x each tensor's RMS x sqrt(its size / 2^20)" in r.stdout
    rows = {x.name: x for x in weightpack.inspect(tmp_path / "t.wpk").tensors if x.stages != ["lossless"]}
    assert set(rows) == {"big.weight", "small[0].weight"}
    bpw = 8 * sum(x.bytes_after for x in rows.values()) / sum(math.prod(x.shape) for x in rows.values())
    assert 2.85 <= bpw <= 3.0
    gap = rows["small[0].weight"].quality["sqnr_db"] - rows["big.weight"].quality["sqnr_db"]
    assert 14 < gap < 22, gap
    assert rows["big.weight"].stages[0] != rows["small[0].weight"].stages[0]  # each its own step
    back = weightpack.load(tmp_path / "t.wpk")
    assert torch.equal(back["norm.weight"], torch.ones(512))


def test_rate_control_meets_a_size_and_says_when_it_cannot(tmp_path, model):
    limit = 120_000
    r = subprocess.run(CLI + ["pack", str(model), "-o", str(tmp_path / "s.wpk"), "--size", "120K"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "rate control: one step" in r.stdout and "a.weight" in r.stdout
    assert (tmp_path / "s.wpk").stat().st_size <= limit
    assert (tmp_path / "s.wpk").stat().st_size > 0.9 * limit
    r = subprocess.run(CLI + ["pack", str(model), "-o", str(tmp_path / "t.wpk"), "--size", "2K"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("weightpack: error: rate control") and "Traceback" not in r.stderr
    assert not (tmp_path / "t.wpk").exists()
    for args in (["--size", "lots"], ["--size", "-5M"], ["--bits", "0"], ["--bits", "3", "--size", "1M"],
                 ["--bits", "3", "--min-sqnr", "20"]):
        r = subprocess.run(CLI + ["pack", str(model), "-o", str(tmp_path / "u.wpk")] + args, capture_output=True, text=True)
        assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.strip().count("\n") <= 2, args
        assert not (tmp_path / "u.wpk").exists()
    with pytest.raises(WeightpackError, match="at most one"):
        weightpack.pack(model, tmp_path / "v.wpk", bits=3, size=10**6)


def test_tcq_packs_are_deterministic_and_checked(tmp_path, model):
    weightpack.pack(model, tmp_path / "a.wpk", recipe="q-tcq", workers=1)
    weightpack.pack(model, tmp_path / "b.wpk", recipe="q-tcq", workers=2)
    assert (tmp_path / "a.wpk").read_bytes() == (tmp_path / "b.wpk").read_bytes()

    def first_lossy(idx):
        return next(t for t in idx["tensors"] if t["stages"])

    edits = {
        "codec-on-float": lambda idx: first_lossy(idx)["parts"][0].update(dtype="F16"),
        "lo": lambda idx: first_lossy(idx)["parts"][0]["stream"]["params"].update(lo=-30000),
        "alphabet": lambda idx: first_lossy(idx)["parts"][0]["stream"]["params"].update(alphabet=1),
        "no-side": lambda idx: first_lossy(idx)["parts"][0]["stream"].update(side=None),
        "chunk-codec": lambda idx: first_lossy(idx)["parts"][0]["stream"]["chunks"][0].update(codec="fields"),
    }
    for name, edit in edits.items():
        bad = tmp_path / f"{name}.wpk"
        craft.rewrite_index(tmp_path / "a.wpk", bad, edit)
        with pytest.raises(FormatError):
            weightpack.load(bad)


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


def test_size_budget_counts_a_folders_other_files(tmp_path):
    g = torch.Generator().manual_seed(23)
    folder = tmp_path / "model"
    folder.mkdir()
    save_file({"w": torch.randn(512, 512, generator=g) * 0.02}, str(folder / "model.safetensors"))
    (folder / "tokenizer.json").write_bytes(np.random.default_rng(0).bytes(300_000))  # incompressible
    res = weightpack.pack(folder, tmp_path / "f.wpk", size=450_000)
    assert (tmp_path / "f.wpk").stat().st_size <= 450_000
    assert res.allocation.bits_per_weight > 2  # the rest of the budget went to the matrix
    assert (weightpack.unpack(tmp_path / "f.wpk", tmp_path / "out") / "tokenizer.json").read_bytes() == \
        (folder / "tokenizer.json").read_bytes()
