"""ratecontrol.py: the targets checked before any work (one error class for every bad argument), and the
pack-measure-repack loop driven through its pack step."""

import math

import pytest
import torch
from safetensors.torch import save_file

import weightpack
from weightpack import BudgetError, UsageError
from weightpack.checkpoint import open_checkpoint
from weightpack.coding.chunks import ChunkPart
from weightpack.index import Chunk, Part, Quality, Stream, TensorRecord
from weightpack.ratecontrol import Budget, check_targets, pack_to_budget, parse_size
from weightpack.recipe import load_recipe
from weightpack.results import Allocation, BudgetTarget


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
