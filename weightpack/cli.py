"""The `weightpack` command: a thin layer over the API. Exit codes: 0 ok, 1 verification failed,
2 bad usage or bad input, 130 interrupted (Ctrl-C), 141 standard output closed (a pipe reader left)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

from . import __version__
from .errors import WeightpackError
from ._interrupt import exit_on_sigint, ignore_interrupts, install_sigint_handler

# The API and everything it imports (numpy, zstandard, ...) are imported by run(), after main() has taken
# over Ctrl-C: an interrupt while importing then ends like any other.

EPILOG = ("Exit codes: 0 ok, 1 verification failed (diff: the inputs differ), 2 bad usage or bad input, 130 interrupted (Ctrl-C), "
          "141 standard output closed early.")
MAX_FAILED_LINES = 20  # verify: the first problems in full, then a count


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2
        self.exit(2, f"weightpack: error: {message} (see --help)\n")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _workers(v: str) -> int:
    n = int(v)
    if n < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return n


def build_parser() -> argparse.ArgumentParser:
    from .ratecontrol import ALLOCATIONS
    from .recipe import DEFAULT_LEVEL, LEVELS

    p = _Parser(prog="weightpack", description="Compress model weights (safetensors) into .wpk containers and back.",
                epilog=EPILOG)
    p.add_argument("--version", action="version", version=f"weightpack {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def common(sp, workers=True):
        sp.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors; no progress bar")
        if workers:
            sp.add_argument("-j", "--workers", type=_workers, default=None, metavar="N",
                            help="workers (default: all cores): processes, or threads when decoding with the "
                                 "C kernels")
            sp.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                            help="run the work on a Ray cluster (pip install 'weightpack[ray]'): ADDRESS as "
                                 "ray.init takes it (auto, HOST:6379, ray://HOST:10001); without one, RAY_ADDRESS "
                                 "or a new local instance. Files must be on storage every node sees; with -j N at most 4N tasks "
                                 "are in flight (default: 4 per cluster CPU)")

    sp = sub.add_parser("pack", help="pack a checkpoint into a .wpk container", epilog=EPILOG,
                        description="Pack a safetensors file, a sharded checkpoint (its *.safetensors.index.json) "
                                    "or a model folder into a .wpk container.")
    sp.add_argument("src", help="model.safetensors, model.safetensors.index.json, or a model folder")
    sp.add_argument("-o", "--output", help="output .wpk (default: beside SRC)")
    sp.add_argument("-r", "--recipe", default="lossless", help="preset name or TOML file (default: lossless)")
    levels = sorted(LEVELS)
    sp.add_argument("-l", "--level", type=int, choices=levels, default=None,
                    help=f"{levels[0]} fastest decode, {DEFAULT_LEVEL} default, {levels[-1]} smallest")
    target = sp.add_mutually_exclusive_group()
    target.add_argument("--min-sqnr", type=float, metavar="DB",
                        help="lossy: trellis-code every matrix with the coarsest step keeping its SQNR >= DB "
                             "(replaces the recipe's rules)")
    target.add_argument("--bits", type=float, metavar="B",
                        help="lossy: at most B bits per weight on average over the lossy tensors; one step for "
                             "every ecsq/tcq matrix (q-tcq's rules when the recipe has none), the least total error")
    target.add_argument("--size", metavar="SIZE",
                        help="lossy: the whole file at most SIZE (bytes, or 9.5MiB, 2G, ...), allocated as --bits")
    sp.add_argument("--allocate", choices=ALLOCATIONS, default=None,
                    help="with --bits/--size: one step for all (least total squared error; default); one step "
                         "in units of each tensor's RMS (least sum over weights of relative errors); or in units "
                         "of RMS x sqrt(size / 2^20) (least sum of the tensors' relative errors, each tensor "
                         "counted once: closest model outputs at equal size)")
    sp.add_argument("--shard-size", metavar="SIZE",
                    help="write a sharded set: SRC-00001-of-0000N.wpk ... of at most SIZE source bytes each "
                         "(5GB, 500MiB; at least 1 MB) and its index SRC.wpk.index.json")
    sp.add_argument("-f", "--force", action="store_true", help="overwrite an existing output")
    sp.add_argument("--json", action="store_true", help="print the summary as JSON")
    common(sp)

    sp = sub.add_parser("unpack", help="restore safetensors from a .wpk container", epilog=EPILOG,
                        description="Restore the original safetensors file(s), index and carried files.")
    sp.add_argument("src", help="the .wpk container, a sharded set's *.wpk.index.json or folder, or a packed "
                                "model folder (weightpack.hf)")
    sp.add_argument("-o", "--output", help="output file or folder (default: beside SRC)")
    sp.add_argument("-f", "--force", action="store_true", help="overwrite an existing output")
    sp.add_argument("--device", metavar="DEV",
                    help="decode on this torch device (cuda, cuda:1; auto: a GPU if there is one) and write "
                         "the tensors from there (default, and for cpu: workers on the CPU)")
    common(sp)

    sp = sub.add_parser("inspect", help="show what a container holds, per tensor", epilog=EPILOG,
                        description="Show what a container holds, per tensor: dtype, shape, stages, bytes before "
                                    "and after, bits per weight, SQNR of lossy tensors, codec; then the totals.")
    sp.add_argument("src", help="the .wpk container, or a sharded set's *.wpk.index.json or folder")
    sp.add_argument("--json", action="store_true", help="print JSON")
    common(sp, workers=False)

    sp = sub.add_parser("verify", help="check checksums, and bit-exactness against the source", epilog=EPILOG,
                        description="Check every checksum and decode every tensor against its recorded hash. "
                                    "With --against, also require equality with the source checkpoint.")
    sp.add_argument("src", help="the .wpk container, or a sharded set's *.wpk.index.json or folder")
    sp.add_argument("--against", metavar="SRC", help="the source checkpoint to compare with")
    sp.add_argument("--min-sqnr", type=float, metavar="DB", help="every lossy tensor at least this SQNR (dB)")
    sp.add_argument("--max-rel-error", type=float, metavar="E", help="every lossy tensor at most this relative error")
    sp.add_argument("--json", action="store_true", help="print the report as JSON")
    common(sp)

    sp = sub.add_parser("diff", help="what changed between two checkpoints or containers, per tensor",
                        epilog="Exit codes (as cmp): 0 identical, 1 differs, 2 bad input.",
                        description="Compare A and B (each a safetensors file, a sharded index, a folder or a "
                                    ".wpk container) tensor by tensor: max abs error, relative error, SQNR, bits "
                                    "per weight where packed; added, removed, renamed, reshaped and retyped tensors.")
    sp.add_argument("a", help="the reference")
    sp.add_argument("b", help="what is compared with it")
    sp.add_argument("--all", action="store_true", help="list identical tensors too")
    sp.add_argument("--json", action="store_true", help="print the report as JSON")
    sp.add_argument("-q", "--quiet", action="store_true", help="print nothing; the exit code tells")

    sp = sub.add_parser("recipes", help="list the recipe presets", epilog=EPILOG,
                        description="List the recipe presets (configs/*.toml) with their descriptions.")
    common(sp, workers=False)
    return p


def _print_diff(rep, show_all: bool) -> None:
    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    rows = [t for t in rep.tensors if show_all or t["status"] != "identical"]
    if rows:
        w = max([len(r["name"]) for r in rows] + [6])
        print(f"{'tensor':<{w}}  {'status':<9} {'max abs err':>11} {'rel err':>9} {'SQNR':>9} {'bpw A':>6} {'bpw B':>6}")
        for r in rows:
            status = r["status"]
            if status == "dtype":
                status = f"{r['dtype_a']}->{r['dtype_b']}"
            elif status == "shape":
                status = "x".join(map(str, r["shape_a"])) + "->" + "x".join(map(str, r["shape_b"]))
            sq = "exact" if r["status"] == "identical" else num(r["sqnr_db"], ".2f")
            print(f"{r['name']:<{w}}  {status:<9} {num(r['max_abs_error'], '.4g'):>11} {num(r['rel_error'], '.3g'):>9} "
                  f"{sq:>9} {num(r['bits_per_weight_a'], '.2f'):>6} {num(r['bits_per_weight_b'], '.2f'):>6}")
    for n in rep.removed:
        print(f"removed: {n}")
    for n in rep.added:
        print(f"added: {n}")
    for r in rep.renamed:
        print(f"renamed: {r['from']} -> {r['to']}")
    print(rep.summary())


def _table(header: list[str], rows: list[list[str]], right: set[int]) -> None:
    """Columns as wide as their widest cell (right-aligned where `right`), two spaces apart."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        print("  ".join(cells).rstrip())


def _print_inspect(rep) -> None:
    rows = []
    for r in rep.tensors:
        shape = "x".join(map(str, r.shape)) or "scalar"
        q = r.quality or {}
        sqnr = "exact" if not q else ("inf" if q.get("sqnr_db") is None else f"{q['sqnr_db']:.1f} dB")
        rows.append([r.name, r.dtype, shape, ",".join(r.stages), _human(r.bytes_before),
                     _human(r.bytes_after), f"{r.bits_per_weight:.2f}", sqnr, str(r.codec)])
    _table(["tensor", "dtype", "shape", "stages", "before", "after", "bpw", "SQNR", "codec"], rows, {4, 5, 6, 7})
    t = rep.totals
    print(f"{t.tensors} tensors, {t.weights:,} weights: {_human(t.source_bytes)} -> "
          f"{_human(t.container_bytes)} ({100 * t.ratio:.2f}%), {t.bits_per_weight:.3f} bits per weight")


def _print_allocation(a) -> None:
    """What rate control gave each lossy tensor."""
    w = max([len(t.name) for t in a.tensors] + [6])
    print(f"{'tensor':<{w}}  {'bpw':>6}  {'SQNR':>8}")
    for t in a.tensors:
        print(f"{t.name:<{w}}  {t.bits_per_weight:>6.3f}  {t.sqnr_db:>6.2f}dB")
    goal = a.target
    want = f"{goal.bits_per_weight:g} bits per weight" if goal.bits_per_weight is not None else _human(goal.bytes)
    unit = {"relative": " x each tensor's RMS", "tensor": " x each tensor's RMS x sqrt(its size / 2^20)"}.get(
        a.allocate, "")
    print(f"rate control: one step {a.step:.4g}{unit} for all; {a.bits_per_weight:.3f} bits per weight over the "
          f"lossy tensors, {_human(a.bytes)} in all (target {want})")


def run(argv: Optional[list[str]] = None, in_console: bool = False) -> int:
    from . import api
    from .pipeline import progress_enabled
    from .recipe import load_recipe, presets

    if in_console:  # from here on there may be outputs and workers to clean up: an exception does it
        install_sigint_handler()
    args = build_parser().parse_args(argv)
    if args.command is None:
        print("weightpack: error: a command is required: pack, unpack, inspect, verify, diff or recipes "
              "(see --help)",
              file=sys.stderr)
        return 2
    show = progress_enabled(getattr(args, "quiet", False))
    ray = getattr(args, "ray", None)
    on = {"executor": "ray", "ray_address": ray or None} if ray is not None else {}
    if args.command == "pack":
        res = api.pack(args.src, args.output, recipe=args.recipe, level=args.level, min_sqnr=args.min_sqnr,
                       bits=args.bits, size=args.size, allocate=args.allocate, workers=args.workers,
                       force=args.force, progress=show, shard_size=args.shard_size, **on)
        ignore_interrupts()
        if args.json:
            print(json.dumps(res.to_json(), indent=2))
        elif not args.quiet:
            if res.allocation is not None:
                _print_allocation(res.allocation)
            if res.lowrank is not None:
                taken = [f"{d.name} (rank {d.rank})" for d in res.lowrank if d.rank]
                print(f"low rank: {len(taken)} of {len(res.lowrank)} matrices factorized"
                      + (f": {', '.join(taken)}" if taken else "")
                      + ("; for the others no rank saved bits at equal error" if len(taken) < len(res.lowrank) else ""))
            if res.shards is not None:
                print(f"{len(res.shards)} shards: {', '.join(res.shards)}")
            if res.lossy is not None:
                lo = res.lossy
                worst = ("exact" if lo.worst_sqnr_db is None else
                         f"worst SQNR {lo.worst_sqnr_db:.2f} dB ({lo.worst_tensor})")
                print(f"lossy: {lo.tensors} tensors at {lo.bits_per_weight:.3f} bits per weight, {worst}")
            print(f"{res.path}: {_human(res.bytes_in)} -> {_human(res.bytes_out)} "
                  f"({100 * res.ratio:.2f}%), {res.tensors} tensors in {res.seconds:.1f} s")
    elif args.command == "unpack":
        out = api.unpack(args.src, args.output, force=args.force, workers=args.workers, progress=show,
                         device=args.device, **on)
        ignore_interrupts()
        if not args.quiet:
            print(f"{out}")
    elif args.command == "inspect":
        rep = api.inspect(args.src)
        if args.json:
            print(json.dumps(rep.to_json(), indent=2))
        elif not args.quiet:
            _print_inspect(rep)
    elif args.command == "verify":
        rep = api.verify(args.src, args.against, min_sqnr=args.min_sqnr, max_rel_error=args.max_rel_error,
                         workers=args.workers, progress=show, **on)
        ignore_interrupts()
        if args.json:
            print(json.dumps(rep.to_json(), indent=2))
        else:
            for p in rep.problems[:MAX_FAILED_LINES]:
                print(f"FAILED: {p}", file=sys.stderr)
            if len(rep.problems) > MAX_FAILED_LINES:
                print(f"FAILED: ... and {len(rep.problems) - MAX_FAILED_LINES} more (--json lists them all)",
                      file=sys.stderr)
            if not rep.ok:
                print(f"verify failed: {len(rep.problems)} problem{'s' if len(rep.problems) != 1 else ''}",
                      file=sys.stderr)
            if rep.ok and not args.quiet:
                lossless = rep.checked - len(rep.quality)
                what = f" and equal to {args.against}" if args.against and not rep.quality else ""
                if rep.quality:
                    worst = min((q["sqnr_db"] for q in rep.quality.values() if q["sqnr_db"] is not None), default=None)
                    bounds = ([f"SQNR >= {args.min_sqnr:g} dB"] if args.min_sqnr is not None else []) + (
                        [f"relative error <= {args.max_rel_error:g}"] if args.max_rel_error is not None else [])
                    worst_text = "exact" if worst is None else f"worst SQNR {worst:.2f} dB"
                    if args.against:
                        what = f"; the same source as {args.against}: {lossless} tensors equal"
                    what += (f"; {len(rep.quality)} lossy tensors within "
                             + (" and ".join(bounds) + f" ({worst_text})" if bounds else
                                f"SQNR {worst:.2f} dB (the worst)" if worst is not None else "SQNR inf (exact)")
                             + (", measured against the source" if args.against else ", as measured at pack time"))
                print(f"ok: {rep.checked} tensors, all checksums valid{what}")
        return 0 if rep.ok else 1
    elif args.command == "diff":
        from .diff import diff

        rep = diff(args.a, args.b)
        if args.json:
            print(json.dumps(rep.to_json(), indent=2))
        elif not args.quiet:
            _print_diff(rep, args.all)
        return 0 if rep.identical else 1
    elif args.command == "recipes":
        if not args.quiet:
            for name, path in sorted(presets().items()):
                print(f"{name:<16} {load_recipe(str(path)).description}")
    return 0


def _stdout_closed() -> int:
    """The reader of our standard output left (`weightpack inspect x.wpk | head -1`): end quietly."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that the interpreter's last flush has nowhere to fail
    except (OSError, ValueError):
        pass
    return 141


def main(argv: Optional[list[str]] = None) -> int:
    """The command. Run as the program (argv None), it owns the process: Ctrl-C ends it with one line and
    exit 130, and it exits with os._exit once its outputs are flushed (no interpreter shutdown, during which
    a late Ctrl-C would kill it with no message or print a trace from an atexit callback)."""
    if argv is not None:
        return _main(argv, False)
    exit_on_sigint()
    rc = _main(None, True)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BrokenPipeError:
            rc = _stdout_closed() if stream is sys.stdout else rc
        except (OSError, ValueError):
            pass
    os._exit(rc)


def _main(argv: Optional[list[str]], in_console: bool) -> int:
    try:
        rc = run(argv, in_console)
        sys.stdout.flush()
        return rc
    except WeightpackError as e:
        print(f"weightpack: error: {e.cli_message or e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("weightpack: interrupted", file=sys.stderr)
        if in_console:  # no interpreter shutdown (atexit joins of dead workers, late signals): exit now
            sys.stderr.flush()
            os._exit(130)
        return 130
    except BrokenPipeError:
        return _stdout_closed()
    except MemoryError:
        print("weightpack: error: out of memory", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"weightpack: error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
