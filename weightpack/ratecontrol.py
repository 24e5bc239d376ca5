"""Rate control: one step for every matrix quantized with ecsq or tcq, chosen to meet a budget.

The same step everywhere is the equal-slope allocation: a uniform (or trellis) quantizer's squared error per
weight is about step^2 times a constant and its rate falls by about one bit per doubling of the step,
whatever the tensor, so one step gives every tensor the same distortion-rate slope, which minimizes the
total squared error for the total size ("absolute"). The step can be measured in another unit per tensor,
which makes the same argument minimize another sum:
* "relative": units of each tensor's RMS: the least sum over weights of relative squared error (each
  tensor's error over its energy, weighted by its size), which keeps small tensors from being starved.
* "tensor": units of RMS x sqrt(size / 2**20): the least sum of the tensors' relative errors, each tensor
  counted once whatever its size. A tensor is one operator of the network: at equal relative error, a big
  one perturbs the output about as much as a small one (measured on MiniLM: noise at 20 dB SQNR on the
  11.7 M-weight word embeddings moves the sentence embeddings about as much as on one 147 k-weight value
  matrix, docs/BENCHMARKS-lossy.md), so bits are better spent on the many small ones. Equal slope for
  that sum puts each tensor's relative squared error in proportion to its size.

The step is found by bisection on estimated sizes: each adjustable tensor is read once (one at a time) and
a sample of its trellis paths kept; a tensor's size at a step is its sample's entropy (per trellis quantizer) times
its size. Everything else is a fixed cost: the rate-controlled pack then measures what it wrote, and packs
again with a budget scaled by what the estimate missed when the result is over (pack_to_budget).
"""

from __future__ import annotations

import glob
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .checkpoint import Checkpoint
from .dtypes import torch_view
from .errors import BudgetError, UsageError
from .metrics import stored_bytes
from .recipe import Recipe, Rule, load_recipe
from .results import Allocation, BudgetTarget, TensorAllocation
from .stages import lossy, tcq
from .stages.estimate import entropy_bits
from .stages.params import QuantParams

SAMPLE_PATHS = 64  # trellis paths (of tcq.PATH elements) sampled per tensor
ADJUSTABLE = ("ecsq", "tcq")
INDEX_BYTES_PER_TENSOR = 160  # the index's record of a tensor, compressed (an estimate)


@dataclass
class _Sample:
    name: str
    n: int
    x: np.ndarray  # whole trellis paths, evenly spread over the tensor
    quant: QuantParams
    rms: float  # of the whole tensor (the unit of a relative step)
    stages: list = field(default_factory=list)  # the tensor's whole chain (quant last)
    unit: float = 1.0  # what the step is measured in for this tensor (set by the allocation)


def adjustable(recipe: Recipe) -> bool:
    return any(isinstance(s, QuantParams) and s.mode in ADJUSTABLE for r in recipe.rules for s in r.stages)


ALLOCATIONS = ("absolute", "relative", "tensor")
TENSOR_UNIT_WEIGHTS = 1 << 20  # "tensor": a tensor of this many weights has its step in units of its RMS


def unit_of(s: _Sample, allocate: str) -> float:
    """What a step is measured in for this tensor under an allocation (see the module's docstring)."""
    if allocate == "absolute" or s.rms <= 0:
        return 1.0
    if allocate == "relative":
        return s.rms
    return s.rms * math.sqrt(s.n / TENSOR_UNIT_WEIGHTS)


def with_step(recipe: Recipe, step: float, allocate: str, samples: list[_Sample]) -> Recipe:
    """The recipe with every ecsq/tcq stage at this step: as it is ("absolute"), in units of each tensor's
    RMS ("relative", which the stage applies), or at each tensor's own step ("tensor": one rule per
    tensor, ahead of the recipe's rules)."""
    relative = allocate == "relative"
    rules = [Rule(r.match, [replace(s, step=step, relative=relative)
                            if isinstance(s, QuantParams) and s.mode in ADJUSTABLE else s
                            for s in r.stages], r.min_dims) for r in recipe.rules]
    if allocate == "tensor":
        own = [Rule(glob.escape(s.name), [*s.stages[:-1], replace(s.quant, step=step * unit_of(s, allocate),
                                                                   relative=False)]) for s in samples]
        rules = own + rules
    return Recipe(recipe.name, recipe.description, recipe.level, rules)


def default_recipe(recipe: Recipe) -> Recipe:
    """The recipe rate control works on: this one, or q-tcq's rules when it has no ecsq or tcq stage."""
    if adjustable(recipe):
        return recipe
    base = load_recipe("q-tcq")
    return Recipe(f"{recipe.name} + q-tcq", base.description, recipe.level, base.rules)


def collect(ckpt: Checkpoint, recipe: Recipe, pool=None) -> tuple[list[_Sample], float, float, int]:
    """Samples of the adjustable tensors; the fixed bits of the other lossy tensors (fixed-width ones at
    their width plus scales) and of everything else (lossless tensors at their raw size, index records);
    and the weights of all lossy tensors. The adjustable tensors are read and sampled one task each: here
    (default), or by `pool`'s workers (a Ray cluster: distributed.py), with the same results in order."""
    from .parallel import Pool, Task

    samples, fixed_lossy, fixed_other, lossy_weights = [], 0.0, 0.0, 0
    for _, path in ckpt.carried:  # a folder's other files ride along (compressed: their size is a bound)
        try:
            fixed_other += 8 * path.stat().st_size
        except OSError:
            pass  # pack itself reports an unreadable file

    def items():
        nonlocal fixed_lossy, fixed_other, lossy_weights
        for _, f, e in ckpt.tensors():
            stages = recipe.stages_for(e.name, len(e.shape)) if lossy.can_apply(e.dtype, e.numel) else []
            fixed_other += 8 * INDEX_BYTES_PER_TENSOR
            if not stages:
                fixed_other += 8 * e.nbytes
                continue
            quant = stages[-1]
            if quant.mode not in ADJUSTABLE:
                lossy_weights += e.numel
                fixed_lossy += quant.bits * e.numel + 32 * math.prod(quant.parts(e.shape)["scale"][1])
                continue
            yield Task(_sample_tensor, (str(f.path), e, list(stages)))

    with (pool(None) if pool is not None else Pool(1)) as p:
        for e, sample in p.ordered_map(items()):
            if sample is None:  # packed losslessly
                fixed_other += 8 * e.nbytes
                continue
            lossy_weights += e.numel
            samples.append(sample)
    return samples, fixed_lossy, fixed_other, lossy_weights


def _sample_tensor(path: str, e, stages: list):
    """(entry, the sample of one adjustable tensor, or None when it holds NaN or infinity)."""
    import torch

    from .checkpoint import read_exact
    from .stages import prune

    *before, quant = stages
    w = torch_view(read_exact(Path(path), e.begin, e.nbytes), e.dtype, e.shape).to(torch.float32)
    if not bool(torch.isfinite(w).all()):
        return e, None
    if before:
        w = prune.apply(w, before[0])
    flat = w.reshape(-1).double().numpy()
    paths = tcq.paths(flat)
    pick = np.unique(np.linspace(0, len(paths) - 1, min(SAMPLE_PATHS, len(paths))).astype(np.int64))
    return e, _Sample(e.name, e.numel, paths[pick].reshape(-1), quant, math.sqrt(float(np.mean(flat * flat))),
                      list(stages))


def _unit(s: _Sample) -> float:
    return s.unit


def _side_bits(alphabet: int) -> float:
    """The tables and stream overhead of a coded tensor, estimated from its alphabet."""
    return 8 * (4 * alphabet + 64)


def estimate_bits(s: _Sample, step: float) -> float:
    """A tensor's coded size at this step (bits) by rounding its sample: exact in kind for ecsq; for tcq a
    quick estimate, rounding to twice the step (each of the trellis's two quantizers has twice its step),
    within ~10%."""
    lv = np.round(s.x / (step * _unit(s) * (2 if s.quant.mode == "tcq" else 1)))
    _, counts = np.unique(lv, return_counts=True)
    return entropy_bits(counts) * s.n / max(1, s.x.size) + _side_bits(int(lv.max() - lv.min()) + 1)


def estimate_total(samples: list[_Sample], step: float, fixed_bits: float) -> float:
    """The coded size of everything at this step (bits): the trellis-coded samples searched together, one
    Viterbi run over all their paths (each tensor its own rate tables, as a class of the search), the
    others rounded."""
    total = fixed_bits
    groups: dict[float, list[_Sample]] = {}
    for s in samples:
        if s.quant.mode == "tcq":
            groups.setdefault(s.quant.lam, []).append(s)
        else:
            total += estimate_bits(s, step)
    for lam, group in groups.items():
        x = np.concatenate([(s.x / (step * _unit(s))).astype(np.float32).reshape(-1, tcq.PATH) for s in group])
        owner = np.repeat(np.arange(len(group)), [s.x.size // tcq.PATH for s in group])
        rc = np.repeat(owner[:, None], tcq.PATH, axis=1)
        # rates measured on every sampled path: each tensor is a class here, and a thinned first pass
        # would leave each one a few paths (estimates ~0.5% low on MiniLM under "tensor")
        lv = tcq.search_paths(x, rc, len(group), lam, rate_paths=len(x))
        q = tcq.walk(lv)
        lo = int(lv.min())
        A = int(lv.max()) - lo + 1
        counts = np.bincount(((rc * 2 + q) * A + (lv - lo)).reshape(-1), minlength=len(group) * 2 * A)
        counts = counts.reshape(len(group), 2, A)
        for s, c in zip(group, counts):
            bits = entropy_bits(c[0]) + entropy_bits(c[1])  # per trellis quantizer
            total += bits * s.n / max(1, s.x.size) + _side_bits(int((c.sum(axis=0) > 0).sum()))
    return total


def _bisect(fits, lo: float, hi: float, ratio: float) -> float:
    """The smallest step in [lo, hi] that fits (fits(hi) holds), to within `ratio`."""
    while hi / lo > ratio:
        mid = math.sqrt(lo * hi)
        if fits(mid):
            hi = mid
        else:
            lo = mid
    return hi


def find_step(samples: list[_Sample], fixed_bits: float, budget_bits: float, allocate: str) -> float:
    """The finest step whose estimated total is within the budget: a bisection on the log of the step with
    the quick estimate, then one with the full estimate around it. The step is in each tensor's unit under
    the allocation (unit_of)."""
    if not samples:
        raise BudgetError("rate control: no tensor to quantize (the recipe quantizes nothing here)")
    samples = [replace(s, unit=unit_of(s, allocate)) for s in samples]

    def fits(step: float, quick: bool) -> bool:
        if quick:
            return fixed_bits + sum(estimate_bits(s, step) for s in samples) <= budget_bits
        return estimate_total(samples, step, fixed_bits) <= budget_bits

    top = max(max(float(np.abs(s.x).max()) / _unit(s) for s in samples), 1e-30)
    hi = top * 4  # every level zero: the least a tensor can cost
    lo = top / (2 * tcq.LEVEL_MAX) * 1.01  # the finest step the levels can hold
    if not fits(hi, True) or not fits(hi, False):
        raise BudgetError("rate control: the budget is below what the tensors cost with every weight zero")
    if fits(lo, False):
        return lo
    guess = _bisect(lambda d: fits(d, True), lo, hi, 1.001)
    a, b = max(lo, guess / 1.25), min(hi, guess * 1.25)
    while a > lo and fits(a, False):
        a = max(lo, a / 1.25)
    while not fits(b, False):
        a, b = b, min(hi, b * 1.25)
    return _bisect(lambda d: fits(d, False), a, b, 1.001)


def parse_size(text: str) -> int:
    """Bytes from '900M', '1.5GiB', '2000000' (K/M/G/T are powers of 1000, KiB/MiB/... of 1024)."""
    t = text.strip()
    units = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9,
             "T": 10**12, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    num = t.rstrip("KMGTIBkmgtib")
    unit = t[len(num):].upper()
    try:
        value = float(num)
    except ValueError:
        value = -1.0
    if unit not in units or not math.isfinite(value) or value <= 0:
        raise UsageError(f"size {text!r}: expected a positive number with an optional unit (K, M, G, MiB, ...)")
    return int(value * units[unit])


# -- the rate-controlled pack --------------------------------------------------------------------

@dataclass(frozen=True)
class Budget:
    """A checked target: at most `bits` per weight over the lossy tensors, or a file of at most `size`
    bytes (one of the two), with the step measured under `allocate`."""
    bits: Optional[float]
    size: Optional[int]
    allocate: str

    def target(self) -> BudgetTarget:
        return BudgetTarget(bits_per_weight=self.bits) if self.bits is not None else BudgetTarget(bytes=self.size)


def check_targets(min_sqnr, bits, size, allocate) -> Optional[Budget]:
    """The quality targets of a pack, checked in the caller's words before any work: the budget when
    `bits` or `size` is given, else None."""
    given = [n for n, v in (("min_sqnr", min_sqnr), ("bits", bits), ("size", size)) if v is not None]
    if len(given) > 1:
        raise UsageError(f"--{given[0].replace('_', '-')} and --{given[1].replace('_', '-')} cannot be combined",
                         api=f"give at most one of min_sqnr, bits and size (got {' and '.join(given)})")
    if min_sqnr is not None and not (type(min_sqnr) in (int, float) and 0 < min_sqnr <= 90):
        raise UsageError(f"--min-sqnr must be a number of dB above 0 and at most 90 (got {min_sqnr})",
                         api=f"min_sqnr must be a number of dB above 0 and at most 90 (got {min_sqnr!r})")
    if allocate is not None and bits is None and size is None:
        raise UsageError(f"--allocate {allocate} applies to rate control: give --bits or --size with it",
                         api=f"allocate={allocate!r} applies to rate control: give bits or size with it")
    if bits is None and size is None:
        return None
    allocate = "absolute" if allocate is None else allocate
    if allocate not in ALLOCATIONS:
        raise UsageError(f"--allocate must be one of {', '.join(ALLOCATIONS)}",
                         api=f"allocate must be one of {', '.join(ALLOCATIONS)} (got {allocate!r})")
    if bits is not None and not (isinstance(bits, (int, float)) and 0 < bits <= 32):
        raise UsageError(f"--bits must be a number of bits per weight above 0 and at most 32 (got {bits})",
                         api=f"bits must be a number of bits per weight above 0 and at most 32 (got {bits!r})")
    limit = parse_size(size) if isinstance(size, str) else size
    if limit is not None and (type(limit) is not int or limit <= 0):
        raise UsageError(f"--size must be a positive number of bytes (got {size})",
                         api=f"size must be a positive number of bytes (got {size!r})")
    return Budget(bits, limit, allocate)


TRIES = 3
MARGIN = 0.004  # the estimate is within ~0.5% at high rates: aim a little low rather than pack twice

# pack(recipe, overwrite) -> (the tensor records written, the bytes written)
PackOnce = Callable[[Recipe, bool], tuple[list, int]]


def pack_to_budget(ckpt: Checkpoint, recipe: Recipe, budget: Budget, pack: PackOnce, discard: Callable[[], None],
                   pool=None) -> tuple[list, int, Allocation]:
    """Estimate the step, pack, measure; when the result is over the budget, scale the budget by what the
    estimate missed and pack again (over the first output), at most TRIES times. A result that never fits
    is discarded and a BudgetError raised. Returns the records, the bytes written and the allocation."""
    recipe = default_recipe(recipe)
    samples, fixed_lossy, fixed_other, lossy_weights = collect(ckpt, recipe, pool=pool)
    if not lossy_weights:
        raise BudgetError("rate control: the recipe quantizes no tensor of this checkpoint")
    bits = budget.bits
    goal = bits * lossy_weights if bits is not None else 8.0 * budget.size
    fixed = fixed_lossy if bits is not None else fixed_lossy + fixed_other  # --bits counts lossy tensors only
    aim = goal * (1 - MARGIN)
    fitted = False
    for attempt in range(TRIES):
        try:
            step = find_step(samples, fixed, aim, budget.allocate)
        except BudgetError:
            if attempt == 0:
                raise  # nothing written yet
            break  # the corrected aim is below every step: the budget cannot be met
        tensors, out_size = pack(with_step(recipe, step, budget.allocate, samples), attempt > 0)
        lossy_rows = [t for t in tensors if t["stages"]]
        lossy_bits = 8.0 * sum(stored_bytes(t) for t in lossy_rows)
        reached = lossy_bits if bits is not None else 8.0 * out_size
        if reached <= goal:
            fitted = True
            break
        aim *= goal / reached * 0.998
    if not fitted:
        discard()
        what = f"{bits} bits per weight" if bits is not None else f"{budget.size} bytes"
        raise BudgetError(f"rate control: could not meet {what} (closest: "
                          f"{reached / lossy_weights if bits is not None else reached / 8:.4g})")
    allocation = Allocation(
        step=step, allocate=budget.allocate, target=budget.target(), bits_per_weight=lossy_bits / lossy_weights,
        bytes=out_size,
        tensors=[TensorAllocation(t["name"], 8.0 * stored_bytes(t) / math.prod(t["shape"]), t["quality"]["sqnr_db"])
                 for t in lossy_rows],
    )
    return tensors, out_size, allocation
