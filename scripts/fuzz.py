#!/usr/bin/env python
"""The long container fuzz run: python scripts/fuzz.py --cases 100000 [--seed S] [--start K].

Mutates small containers (tests/fuzz.py: index values, types, deleted and duplicated keys, deep nesting,
huge shapes and offsets, stored headers, coded payloads; checksums re-sealed) and checks each outcome:
rejected with a WeightpackError, identical to the original, or (a renamed or dropped carried file, other
metadata) a valid variant whose tensors load identically. Prints the counts, and every failure with what
reproduces it (seed and case number); exit 1 when any case failed. The last result goes in docs/FUZZ.md.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import fuzz  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--start", type=int, default=0, help="first case number (to resume or reproduce)")
    ap.add_argument("--json", metavar="FILE", help="write the counts and failures here")
    args = ap.parse_args()
    counts: collections.Counter = collections.Counter()
    fails, known, slowest = [], collections.Counter(), (0.0, None)
    t0 = time.time()

    def progress(o: fuzz.Outcome) -> None:
        nonlocal slowest
        counts[o.result] += 1
        if o.seconds > slowest[0]:
            slowest = (o.seconds, o.case)
        if o.result == "fail":
            fails.append(o)
            print(f"FAIL case {o.case} ({o.base}) {o.label}: {o.detail[:2000]}", flush=True)
        if o.result == "known":
            known[o.label.split(":")[0]] += 1
        done = sum(counts.values())
        if done % 5000 == 0:
            print(f"{done} cases, {time.time() - t0:.0f} s: {dict(counts)}", flush=True)

    fuzz.run(args.seed, args.cases, args.start, progress)
    summary = {"seed": args.seed, "start": args.start, "cases": sum(counts.values()), "counts": dict(counts),
               "seconds": round(time.time() - t0, 1), "slowest_case": {"seconds": round(slowest[0], 2),
                                                                      "case": slowest[1]},
               "failures": [{"case": o.case, "base": o.base, "label": o.label, "detail": o.detail[:2000]}
                            for o in fails],
               "known": dict(known)}
    print(json.dumps({k: v for k, v in summary.items() if k != "failures"}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
