"""Rate control (ratecontrol.py): the targets checked before any work (one error class for every bad
argument); the pack-measure-repack loop driven through its pack step; --bits and --size met with one step
for every ecsq/tcq matrix, in each tensor's unit under the allocation (absolute, relative, tensor), and a
clear error where a budget cannot be met."""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import weightpack
from weightpack import BudgetError, UsageError
from weightpack.checkpoint import open_checkpoint
from weightpack.coding.chunks import ChunkPart
from weightpack.errors import WeightpackError
from weightpack.index import Chunk, Part, Quality, Stream, TensorRecord
from weightpack.ratecontrol import Budget, check_targets, pack_to_budget, parse_size
from weightpack.recipe import load_recipe
from weightpack.results import Allocation, BudgetTarget

CLI = [sys.executable, "-m", "weightpack"]


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


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    g = torch.Generator().manual_seed(3)
    p = tmp_path_factory.mktemp("rc") / "m.safetensors"
    save_file({"a.weight": torch.randn(128, 256, generator=g) * 0.05, "n": torch.ones(128)}, str(p))
    return p


@pytest.mark.parametrize("kw", [dict(size="abc"), dict(bits=-1), dict(bits=0), dict(size=0), dict(size="5XB"),
                                dict(bits=3, allocate="fair"), dict(allocate="tensor"), dict(bits=3, size=10**6),
                                dict(min_sqnr=500), dict(min_sqnr=20, bits=3)])
def test_bad_targets_are_usage_errors(kw):
    with pytest.raises(UsageError):
        check_targets(kw.get("min_sqnr"), kw.get("bits"), kw.get("size"), kw.get("allocate"))


def test_size_abc_and_bits_minus_one_raise_the_same_class(src, tmp_path):
    for kw in (dict(size="abc"), dict(bits=-1)):
        with pytest.raises(UsageError):
            weightpack.pack(src, tmp_path / "x.wpk", **kw)
    assert not (tmp_path / "x.wpk").exists()


def test_targets_become_a_budget():
    assert check_targets(None, None, None, None) is None
    assert check_targets(None, 3, None, None) == Budget(3, None, "absolute")
    assert check_targets(None, None, "1.5MiB", "tensor") == Budget(None, 3 << 19, "tensor")
    assert Budget(None, 100, "absolute").target() == BudgetTarget(bytes=100)
    assert BudgetTarget(bits_per_weight=2.5).to_json() == {"bits_per_weight": 2.5}
    assert parse_size("2G") == 2 * 10**9 and parse_size("1KiB") == 1024


def _lossy_record(stored: int) -> TensorRecord:
    """What pack returns for a lossy 128 x 256 tensor whose one stream stores `stored` bytes."""
    chunk = Chunk("trellis", 0, (ChunkPart("levels", "ans", stored),), 64, stored, 0)
    stream = Stream({"codec": "trellis"}, None, (chunk,))
    return TensorRecord("a.weight", 0, "F32", (128, 256), 4 * 128 * 256, "", stages=[{}],
                        quality=Quality(20.0, 0.1), parts=(Part("q", "I16", (128, 256), stream),))


def test_the_loop_repacks_until_the_result_fits(src, tmp_path):
    ckpt = open_checkpoint(src)
    calls = []

    def pack(recipe, overwrite):
        calls.append(overwrite)
        steps = {s.step for r in recipe.rules for s in r.stages}
        weights = 128 * 256
        # the first try comes out 10% over the budget; the loop aims lower and fits
        bits = 3.0 * weights * (1.1 if len(calls) == 1 else 0.99)
        rec = _lossy_record(math.ceil(bits / 8))
        assert len(steps) == 1
        return [rec], 1000

    tensors, size, a = pack_to_budget(ckpt, load_recipe("q-tcq"), Budget(3.0, None, "absolute"), pack,
                                      lambda: pytest.fail("nothing to discard"))
    assert calls == [False, True] and size == 1000 and isinstance(a, Allocation)
    assert a.bits_per_weight <= 3.0 and a.target == BudgetTarget(bits_per_weight=3.0) and a.tensors[0].name == "a.weight"


def test_a_budget_never_met_is_discarded(src):
    ckpt = open_checkpoint(src)
    discarded = []

    def pack(recipe, overwrite):
        rec = _lossy_record(10**6)
        return [rec], 10**6

    with pytest.raises(BudgetError, match="could not meet 3.0 bits per weight"):
        pack_to_budget(ckpt, load_recipe("q-tcq"), Budget(3.0, None, "absolute"), pack, lambda: discarded.append(1))
    assert discarded == [1]
    with pytest.raises(BudgetError, match="budget is below"):
        pack_to_budget(ckpt, load_recipe("q-tcq"), Budget(None, 10, "absolute"), pack, lambda: discarded.append(2))
    assert discarded == [1]  # nothing was written: nothing to discard
