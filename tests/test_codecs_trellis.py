"""The `trellis` stream codec of TCQ levels (coding/codecs/trellis/): step-major and ANS lanes layouts,
chosen by cost, decoded by every CPU decoder; damaged or crafted level streams refused; TCQ packs
deterministic whatever the number of workers."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import weightpack
from weightpack.coding import entropy
from weightpack.coding.codecs.trellis import codec as TC
from weightpack.coding.codecs.trellis import plan as TP
from weightpack.errors import FormatError
from weightpack.stages import tcq as T

import craft
from conftest import under_every_cpu_decoder


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
