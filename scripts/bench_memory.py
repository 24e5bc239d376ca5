#!/usr/bin/env python3
"""Memory benchmark: peak RSS of `weightpack pack`, `verify --against` and `unpack` on a ~4 GB BF16 checkpoint.

The checkpoint is generated here: 16 BF16 tensors of 256 MiB each (134,217,728 weights, LLM-like shapes
such as 8192x16384), values standard-normal x 0.02 rounded to BF16 (round to nearest even), written tensor
by tensor in 16 MiB pieces after a safetensors header built here (padded to 8 bytes, `__metadata__`
{"format": "pt"}), so the generator itself stays small. The file is then opened with `safetensors` to
check that it is valid.

Each weightpack command runs as a subprocess (the installed `weightpack` entry point, default workers
unless --workers). While it runs, /proc is sampled every --interval seconds (default 0.05) for the whole
process tree (the command and its worker processes): VmRSS and VmHWM of every process, and the sum of
their RSS and of their PSS (smaps_rollup; PSS splits pages shared between the forked workers and the
main process, so the PSS sum is the real total). When the command ends, wait4() gives the kernel's
own maxrss of the largest single process in the tree, a check on the sampling.

    python scripts/bench_memory.py [--out bench-out] [--keep] [--workers N] [--level L]

Writes <out>/bench_memory.json and prints a Markdown table. Deletes the generated files unless --keep.
Needs ~12 GB of free disk (checkpoint, container, restored copy).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

MIB = 1 << 20
MB = 1e6
SHAPES = [(8192, 16384), (16384, 8192), (4096, 32768), (32768, 4096)]
NAMES = ["mlp.up_proj.weight", "mlp.down_proj.weight", "self_attn.qkv_proj.weight", "mlp.gate_proj.weight"]
PIECE = 8 * MIB  # elements generated at a time (16 MiB of BF16)


# -- the checkpoint --------------------------------------------------------------------------------

def to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> BF16 bit patterns (uint16), rounding to nearest even (values here are finite)."""
    u = x.view(np.uint32)
    u = u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))
    return (u >> np.uint32(16)).astype(np.uint16)


def generate(path: Path, ntensors: int, seed: int) -> dict:
    entries, offset = {}, 0
    plan = []
    for i in range(ntensors):
        shape = SHAPES[i % len(SHAPES)]
        name = f"model.layers.{i // len(SHAPES)}.{NAMES[i % len(NAMES)]}"
        nbytes = shape[0] * shape[1] * 2
        entries[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        plan.append((name, shape))
        offset += nbytes
    header = json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    rng = np.random.default_rng(seed)
    t = time.perf_counter()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        for name, shape in plan:
            n = shape[0] * shape[1]
            for a in range(0, n, PIECE):
                x = rng.standard_normal(min(PIECE, n - a), dtype=np.float32)
                x *= np.float32(0.02)
                f.write(to_bf16(x).tobytes())
    seconds = time.perf_counter() - t
    size = path.stat().st_size
    if size != 8 + len(header) + offset:
        raise SystemExit(f"{path}: wrote {size} bytes, expected {8 + len(header) + offset}")
    # valid safetensors? (header parsed by safetensors itself, a slice of each tensor read back)
    from safetensors import safe_open

    with safe_open(str(path), "pt", "cpu") as f:
        if f.metadata() != {"format": "pt"} or sorted(f.keys()) != sorted(entries):
            raise SystemExit(f"{path}: safetensors reads different metadata or names")
        for name, shape in plan:
            sl = f.get_slice(name)
            if list(sl.get_shape()) != list(shape) or sl[-1:].shape[1] != shape[1]:
                raise SystemExit(f"{path}: tensor {name} reads back with a different shape")
    return {"path": str(path), "bytes": size, "tensors": len(plan), "weights": offset // 2,
            "shapes": sorted({f"{a}x{b}" for a, b in (s for _, s in plan)}), "generate_s": seconds}


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 * MIB):
            h.update(chunk)
    return h.hexdigest()


# -- measuring a process tree ------------------------------------------------------------------------

def _children(pid: int) -> list[int]:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    out += [int(x) for x in f.read().split()]
            except OSError:
                pass
    except OSError:
        pass
    return out


def _tree(root: int) -> list[int]:
    seen, todo = [], [root]
    while todo:
        p = todo.pop()
        seen.append(p)
        todo += _children(p)
    return seen


def _status(pid: int) -> dict | None:
    vals = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    k, v = line.split(":", 1)
                    vals[k] = int(v.split()[0]) * 1024
    except OSError:
        return None
    return vals if "VmRSS" in vals else None


def _pss(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _machine_busy() -> float:
    """Busy CPU seconds of the whole machine so far (/proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def run_measured(cmd: list[str], interval: float, pss: bool = True) -> dict:
    """Run cmd; sample its process tree's memory until it exits."""
    busy0 = _machine_busy()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    root = proc.pid
    peak: dict[int, int] = {}
    peak_sum_rss = peak_sum_pss = 0
    samples = 0
    status = ru = None
    while True:
        pids = _tree(root)
        total_rss = total_pss = 0
        for p in pids:
            st = _status(p)
            if st is None:
                continue
            peak[p] = max(peak.get(p, 0), st["VmRSS"], st.get("VmHWM", 0))
            total_rss += st["VmRSS"]
            if pss:
                total_pss += _pss(p) or 0
        peak_sum_rss = max(peak_sum_rss, total_rss)
        peak_sum_pss = max(peak_sum_pss, total_pss)
        samples += 1
        pid, status, ru = os.wait4(root, os.WNOHANG)
        if pid == root:
            break
        time.sleep(interval)
    wall = time.perf_counter() - t0
    others = max(0.0, _machine_busy() - busy0 - (ru.ru_utime + ru.ru_stime))
    proc.returncode = os.waitstatus_to_exitcode(status)
    output = proc.stdout.read().decode(errors="replace")
    workers = {p: v for p, v in peak.items() if p != root}
    return {
        "cmd": cmd, "rc": proc.returncode, "wall_s": wall, "samples": samples, "output": output.strip()[-2000:],
        "main_peak_rss": peak.get(root, 0),
        "worker_processes": len(workers),
        "max_worker_peak_rss": max(workers.values(), default=0),
        "peak_sum_rss": peak_sum_rss,
        "peak_sum_pss": peak_sum_pss if pss else None,
        "kernel_maxrss_largest_process": ru.ru_maxrss * 1024,  # Linux: kB; max over the process and its reaped children
        "cpu_s": ru.ru_utime + ru.ru_stime,
        "others_cpu_pct": round(100.0 * others / wall, 1) if wall > 0 else 0.0,
    }


def weightpack_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "weightpack"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("weightpack")
    return [found] if found else [sys.executable, "-m", "weightpack"]


# -- report ---------------------------------------------------------------------------------------------

def gib(n):
    return "–" if n is None else f"{n / (1 << 30):.2f} GiB"


def table(runs: dict, nbytes: int) -> str:
    lines = ["| command | wall s | MB/s of checkpoint | main peak RSS | max worker peak RSS | peak sum RSS | "
             "peak sum PSS | workers seen | kernel maxrss (largest process) | CPU s | other load |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for what, r in runs.items():
        lines.append(f"| {what} | {r['wall_s']:.1f} | {nbytes / MB / r['wall_s']:.1f} | {gib(r['main_peak_rss'])} | "
                     f"{gib(r['max_worker_peak_rss'])} | {gib(r['peak_sum_rss'])} | {gib(r['peak_sum_pss'])} | "
                     f"{r['worker_processes']} | {gib(r['kernel_maxrss_largest_process'])} | {r['cpu_s']:.0f} | "
                     f"{r['others_cpu_pct']:.0f}% |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoint, container and restored file")
    ap.add_argument("--workers", type=int, default=None, help="pass -j N to weightpack (default: its own default)")
    ap.add_argument("--level", type=int, default=None, choices=[1, 2, 3], help="pack level (default: weightpack's)")
    ap.add_argument("--tensors", type=int, default=16, help="tensors of 256 MiB (default 16: ~4.3 GB)")
    ap.add_argument("--interval", type=float, default=0.05, help="sampling interval, seconds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--generate-only", metavar="PATH", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.generate_only:
        gen = generate(Path(args.generate_only), args.tensors, args.seed)
        Path(args.generate_only + ".gen.json").write_text(json.dumps(gen))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    src = out / "mem-bf16-4g.safetensors"
    wpk = out / "mem-bf16-4g.wpk"
    restored = out / "mem-bf16-4g.restored.safetensors"
    wp = weightpack_cmd()
    extra = (["-j", str(args.workers)] if args.workers else [])
    results: dict = {"interval_s": args.interval, "workers_arg": args.workers, "level_arg": args.level}
    ok = True
    try:
        print(f"generating {src} ...", file=sys.stderr, flush=True)
        # in a child process, so that this process stays small: the kernel's maxrss of a command started
        # from here counts this process's RSS (its memory is what the command is forked/exec'd from)
        subprocess.run([sys.executable, __file__, "--generate-only", str(src), "--tensors", str(args.tensors),
                        "--seed", str(args.seed)], check=True)
        results["checkpoint"] = gen = json.loads(Path(str(src) + ".gen.json").read_text())
        Path(str(src) + ".gen.json").unlink()
        print(f"  {gen['bytes']:,} bytes in {gen['generate_s']:.1f} s", file=sys.stderr, flush=True)
        src_sha = file_sha256(src)
        runs = {}
        level = ["-l", str(args.level)] if args.level else []
        steps = [
            ("pack", wp + ["pack", str(src), "-o", str(wpk), "--force", "--json"] + level + extra),
            ("verify --against", wp + ["verify", str(wpk), "--against", str(src)] + extra),
            ("unpack", wp + ["unpack", str(wpk), "-o", str(restored), "--force"] + extra),
        ]
        for what, cmd in steps:
            print(f"running {' '.join(cmd)}", file=sys.stderr, flush=True)
            r = run_measured(cmd, args.interval)
            runs[what] = r
            print(f"  rc {r['rc']}, {r['wall_s']:.1f} s, main peak {gib(r['main_peak_rss'])}, "
                  f"max worker {gib(r['max_worker_peak_rss'])}, sum {gib(r['peak_sum_rss'])}", file=sys.stderr,
                  flush=True)
            if r["rc"] != 0:
                print(f"FAILED ({what}): exit status {r['rc']}\n{r['output']}", file=sys.stderr)
                ok = False
                break
            if what == "pack":
                try:
                    s = json.loads(r["output"][r["output"].index("{"):])
                    results["pack_summary"] = s
                except ValueError:
                    pass
        results["runs"] = runs
        import resource

        results["bench_process_peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if ok:
            results["container_bytes"] = wpk.stat().st_size
            results["ratio_pct"] = 100.0 * wpk.stat().st_size / gen["bytes"]
            same = file_sha256(restored) == src_sha
            results["unpacked_identical"] = same
            if not same:
                print("FAILED: the unpacked file differs from the generated checkpoint", file=sys.stderr)
                ok = False
        results["ok"] = ok
        (out / "bench_memory.json").write_text(json.dumps(results, indent=2))
        print(f"\nCheckpoint: {gen['tensors']} BF16 tensors ({', '.join(gen['shapes'])}), {gen['bytes']:,} bytes "
              f"({gen['bytes'] / (1 << 30):.2f} GiB)")
        if "ratio_pct" in results:
            print(f"Container: {results['container_bytes']:,} bytes ({results['ratio_pct']:.2f}%); unpacked file "
                  f"byte-identical: {results['unpacked_identical']}")
        print()
        print(table(runs, gen["bytes"]))
        print(f"\n(kernel maxrss: wait4() of the command, the largest single process of its tree; it cannot be less "
              f"than this bench process's own peak, {gib(results['bench_process_peak_rss'])}, the memory the "
              f"command was started from. 'other load': CPU used by other processes during the command, in % "
              f"of one core.)")
        print(f"\nwrote {out / 'bench_memory.json'}")
    finally:
        if not args.keep:
            for p in (src, wpk, restored):
                try:
                    p.unlink()
                except FileNotFoundError:
                    pass
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
