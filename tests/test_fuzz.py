"""The container fuzzer's fast sample (tests/fuzz.py; the long run is scripts/fuzz.py, counts in docs/FUZZ.md).
The hostile-container cases it found are regression tests beside the module that refuses them
(tests/test_container.py, test_checkpoint.py, test_coding_binding.py)."""

from __future__ import annotations

import collections
import os

import fuzz


SAMPLE = int(os.environ.get("WEIGHTPACK_FUZZ_CASES", "1500"))


SEED = int(os.environ.get("WEIGHTPACK_FUZZ_SEED", "12"))


def test_fuzz_sample(bases, tmp_path):
    """Every mutated container is rejected with a WeightpackError or restores identically."""
    outcomes = [fuzz.run_case(bases, SEED, i, tmp_path) for i in range(SAMPLE)]
    counts = collections.Counter(o.result for o in outcomes)
    fails = [o for o in outcomes if o.result == "fail"]
    assert not fails, f"{len(fails)} of {SAMPLE} cases failed ({dict(counts)}):\n" + "\n".join(
        f"case {o.case} ({o.base}) {o.label}: {o.detail[:800]}" for o in fails[:5])
    assert counts["rejected"] > SAMPLE // 2  # the mutations do reach the checks
