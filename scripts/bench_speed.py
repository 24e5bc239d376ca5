#!/usr/bin/env python3
"""Speed: weightpack's pack, load and unpack beside ZipNN and safetensors, with 1 and 2 threads, in one run.

For each input file and thread count T (1, 2):
  * ZipNN 0.5 per tensor, as its safetensors script uses it (floating tensors with method="HUFFMAN", kept
    raw where that is not smaller; other tensors and the header raw), threads=T:
      compress  source file (page cache) -> one file of blobs;
      load      that file -> CPU torch tensors (decompress each blob, torch.frombuffer);
      unpack    that file -> a restored .safetensors file;
  * weightpack (workers=T) at levels 1 and 2 (and 3 for pack): pack file -> .wpk, load .wpk -> CPU tensors
    (weightpack.load), unpack .wpk -> .safetensors (weightpack.unpack), every result checked by SHA-256;
  * safetensors.torch.load_file of the original (the file itself, read into tensors), for scale;
  * a pure CPU-bound loop (SHA-256 of a buffer per thread) with 1 and 2 threads: what a second thread
    can gain on this machine at best, measured in the same run (goal: pack and load reach 90% of it).
Speeds are MB (10^6 bytes) of the original file per second, best of --runs.

Inputs: the real all-MiniLM-L6-v2 weights (F32 as shipped, BF16 and F16 casts), and with --llm-gb N a
generated LLM-shaped BF16 checkpoint of about N GB (Llama-7B layer shapes, rows of random scale).

    python scripts/bench_speed.py [--out bench-out] [--runs 3] [--llm-gb 4] [--dtypes BF16,F16,F32] [--quick]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import struct
import sys
import threading
from pathlib import Path

from benchlib import (FLOATS, MB, BenchFailure, Contention, best_of, git_state, load_zipnn, machine,  # noqa: E402
                      make_cast, minilm_path, parse, sha256, wait_idle)


def cpu_baseline(runs: int) -> dict:
    """SHA-256 of 32 MiB per thread (hashlib releases the GIL): 1 thread, then 2 threads doing the same each."""
    data = os.urandom(32 << 20)

    def work():
        hashlib.sha256(data).digest()

    def two():
        ts = [threading.Thread(target=work) for _ in range(2)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()

    t1, _ = best_of(runs, work)
    t2, _ = best_of(runs, two)
    return {"one_thread_s": t1, "two_threads_s": t2, "gain": 2 * t1 / t2}


# -- ZipNN per tensor, file to file, file to tensors ---------------------------------------------------

_ZIPNN: dict = {}


def _zipnn(ZipNN, dt: str, threads: int):
    """One ZipNN object per dtype and thread count, made once, outside the timed calls (as a script that
    compresses many tensors would keep it)."""
    key = (dt, threads)
    if key not in _ZIPNN:
        _ZIPNN[key] = ZipNN(input_format="byte", bytearray_dtype=FLOATS[dt], method="HUFFMAN", threads=threads)
    return _ZIPNN[key]


def zipnn_compress(ZipNN, src: Path, dst: Path, threads: int) -> list[tuple]:
    """Compress src per tensor into dst; returns the blob table [(name, dtype, shape, offset, length,
    compressed?)] (kept in memory: ZipNN's own script keeps a header the same way)."""
    data = src.read_bytes()
    base, tensors = parse(data)
    header = json.loads(data[8:base])
    table, off = [], base
    with open(dst, "wb") as f:
        f.write(data[:base])
        for name, dt, a, b in tensors:
            seg = bytearray(data[a:b])  # ZipNN transforms its input in place
            comp = None
            if dt in FLOATS and b > a:
                comp = bytes(_zipnn(ZipNN, dt, threads).compress(seg))
                if len(comp) >= b - a:
                    comp = None
            blob = comp if comp is not None else data[a:b]
            f.write(blob)
            table.append((name, dt, header[name]["shape"], off, len(blob), comp is not None))
            off += len(blob)
    return table


def zipnn_load(ZipNN, path: Path, table: list[tuple], threads: int) -> dict:
    import torch
    from weightpack.dtypes import torch_dtype

    out = {}
    with open(path, "rb") as f:
        data = f.read()
    for name, dt, shape, off, length, comp in table:
        blob = memoryview(data)[off:off + length]
        if comp:
            blob = _zipnn(ZipNN, dt, threads).decompress(blob)
        buf = torch.frombuffer(bytearray(blob), dtype=torch.uint8) if len(blob) else torch.empty(0, dtype=torch.uint8)
        out[name] = buf.view(torch_dtype(dt)).reshape(shape)
    return out


def zipnn_unpack(ZipNN, path: Path, table: list[tuple], base: int, dst: Path, threads: int) -> None:
    with open(path, "rb") as f:
        data = f.read()
    with open(dst, "wb") as g:
        g.write(data[:base])
        for name, dt, shape, off, length, comp in table:
            blob = data[off:off + length]
            if comp:
                blob = _zipnn(ZipNN, dt, threads).decompress(blob)
            g.write(blob)


# -- the LLM-shaped checkpoint ---------------------------------------------------------------------------

def llm_shapes(gb: float) -> list[tuple[str, list[int]]]:
    """Llama-7B-like tensors (hidden 4096, intermediate 11008, vocabulary 32000): layers up to at least `gb` GB."""
    h, ff, vocab = 4096, 11008, 32000
    shapes = [("model.embed_tokens.weight", [vocab, h])]
    total, layer = vocab * h * 2, 0
    per_layer = (4 * h * h + 3 * h * ff + 2 * h) * 2
    while total + vocab * h * 2 < gb * 1e9 or layer == 0:  # at least `gb`
        p = f"model.layers.{layer}."
        shapes += [(p + "self_attn.q_proj.weight", [h, h]), (p + "self_attn.k_proj.weight", [h, h]),
                   (p + "self_attn.v_proj.weight", [h, h]), (p + "self_attn.o_proj.weight", [h, h]),
                   (p + "mlp.gate_proj.weight", [ff, h]), (p + "mlp.up_proj.weight", [ff, h]),
                   (p + "mlp.down_proj.weight", [h, ff]), (p + "input_layernorm.weight", [h]),
                   (p + "post_attention_layernorm.weight", [h])]
        total += per_layer
        layer += 1
    shapes += [("model.norm.weight", [h]), ("lm_head.weight", [vocab, h])]
    return shapes


def make_llm(path: Path, gb: float) -> Path:
    """A BF16 checkpoint of trained-weight-like values: N(0, 1) times a per-row scale (log-normal) times
    0.02; norms near 1. Deterministic (seed 0). Written tensor by tensor (header first)."""
    import torch
    from safetensors.torch import save_file

    if path.exists():
        return path
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, shape in llm_shapes(gb):
        if len(shape) == 1:
            t = 1 + 0.05 * torch.randn(shape, generator=g)
        else:
            scale = torch.exp(0.3 * torch.randn(shape[0], 1, generator=g)) * 0.02
            t = torch.randn(shape, generator=g) * scale
        tensors[name] = t.to(torch.bfloat16)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


# -- one file --------------------------------------------------------------------------------------------

def bench_file(path: Path, out: Path, runs: int, levels: list[int], zipnn, wait: float) -> list[dict]:
    import torch
    import weightpack
    from safetensors.torch import load_file

    nbytes = path.stat().st_size
    ref = sha256(path.read_bytes())
    want = {k: v for k, v in load_file(str(path)).items()}
    rows = []

    def timed(fn):
        if wait:
            wait_idle(wait)
        with Contention() as c:
            t, res = best_of(runs, fn)
        return t, res, round(c.others_pct, 1)

    def same(got: dict) -> bool:
        return got.keys() == want.keys() and all(
            got[k].dtype == want[k].dtype and torch.equal(got[k].view(torch.uint8), want[k].view(torch.uint8))
            for k in want)

    def safetensors_load():
        # load_file maps the file: touch a byte of every page, so that the time is that of reading it
        d = load_file(str(path))
        return sum(int(v.reshape(-1).view(torch.uint8)[::4096].sum()) for v in d.values() if v.numel())

    t, _, busy = timed(safetensors_load)
    rows.append({"method": "safetensors.torch.load_file + a byte of every page (original)", "threads": 1, "load_MBps": nbytes / MB / t,
                 "others_pct": busy})
    ZipNN = zipnn[0]
    for threads in (1, 2):
        if ZipNN is not None:
            zfile = out / (path.stem + ".zipnn")
            for dt in FLOATS:
                _zipnn(ZipNN, dt, threads)
            tc, table, b1 = timed(lambda: zipnn_compress(ZipNN, path, zfile, threads))
            tl, got, b2 = timed(lambda: zipnn_load(ZipNN, zfile, table, threads))
            if not same(got):
                raise BenchFailure(f"ZipNN load of {path.name} differs")
            del got
            restored = out / (path.stem + ".zipnn.safetensors")
            base = 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]
            tu, _, b3 = timed(lambda: zipnn_unpack(ZipNN, zfile, table, base, restored, threads))
            if sha256(restored.read_bytes()) != ref:
                raise BenchFailure(f"ZipNN unpack of {path.name} differs")
            rows.append({"method": "ZipNN per tensor", "threads": threads, "size_pct": 100 * zfile.stat().st_size / nbytes,
                         "pack_MBps": nbytes / MB / tc, "load_MBps": nbytes / MB / tl, "unpack_MBps": nbytes / MB / tu,
                         "others_pct": max(b1, b2, b3)})
            zfile.unlink()
            restored.unlink()
        for level in levels:
            wpk = out / f"{path.stem}-L{level}.wpk"
            tp, _, b1 = timed(lambda: weightpack.pack(path, wpk, level=level, workers=threads, force=True))
            row = {"method": f"weightpack L{level}", "threads": threads, "size_pct": 100 * wpk.stat().st_size / nbytes,
                   "bytes": wpk.stat().st_size, "pack_MBps": nbytes / MB / tp, "others_pct": b1}
            if level < 3:
                tl, got, b2 = timed(lambda: weightpack.load(wpk, workers=threads))
                if not same(got):
                    raise BenchFailure(f"weightpack load of {wpk.name} differs")
                del got
                restored = out / f"{path.stem}-L{level}-restored"
                restored.mkdir(exist_ok=True)
                tu, _, b3 = timed(lambda: weightpack.unpack(wpk, restored / path.name, workers=threads, force=True))
                if sha256((restored / path.name).read_bytes()) != ref:
                    raise BenchFailure(f"weightpack unpack of {wpk.name} differs")
                (restored / path.name).unlink()
                row.update(load_MBps=nbytes / MB / tl, unpack_MBps=nbytes / MB / tu, others_pct=max(b1, b2, b3))
            rows.append(row)
            wpk.unlink()
    return rows


def table(rows: list[dict]) -> str:
    zipnn = {r["threads"]: r for r in rows if r["method"] == "ZipNN per tensor"}
    lines = ["| method | threads | size | pack MB/s | load MB/s | unpack MB/s | pack / ZipNN | load / ZipNN | other load |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def f(v, spec=".0f"):
        return "–" if v is None else format(v, spec)

    for r in rows:
        z = zipnn.get(r["threads"], {})
        pr = r.get("pack_MBps") / z["pack_MBps"] if r.get("pack_MBps") and z.get("pack_MBps") else None
        lr = r.get("load_MBps") / z["load_MBps"] if r.get("load_MBps") and z.get("load_MBps") else None
        size = f"{r['size_pct']:.2f}%" if "size_pct" in r else "–"
        lines.append(f"| {r['method']} | {r['threads']} | {size} | {f(r.get('pack_MBps'))} | {f(r.get('load_MBps'))} | "
                     f"{f(r.get('unpack_MBps'))} | {f(pr, '.2f')} | {f(lr, '.2f')} | {r.get('others_pct', 0):.0f}% |")
    return "\n".join(lines)


def scaling(rows: list[dict], baseline: float) -> str:
    out = []
    for m in sorted({r["method"] for r in rows if r["method"].startswith("weightpack")}):
        one = next(r for r in rows if r["method"] == m and r["threads"] == 1)
        two = next(r for r in rows if r["method"] == m and r["threads"] == 2)
        for k in ("pack_MBps", "load_MBps", "unpack_MBps"):
            if one.get(k) and two.get(k):
                g = two[k] / one[k]
                out.append(f"{m} {k.split('_')[0]}: x{g:.2f} from 1 to 2 threads "
                           f"({100 * (g - 1) / max(baseline - 1, 1e-9):.0f}% of the CPU-bound loop's gain)")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dtypes", default="BF16,F16,F32")
    ap.add_argument("--llm-gb", type=float, default=0, help="also a generated LLM-shaped BF16 file of about N GB")
    ap.add_argument("--quick", action="store_true", help="BF16 only, levels 1-2, one run (a smoke run for CI)")
    ap.add_argument("--wait-idle", type=float, default=0, metavar="S")
    args = ap.parse_args(argv)
    if args.quick:
        args.runs, args.dtypes, args.llm_gb = 1, "BF16", 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    zipnn = load_zipnn()
    if zipnn[0] is None:
        print(f"NOTE: ZipNN not available ({zipnn[2]}); `pip install zipnn` to compare.", file=sys.stderr)
    levels = [1, 2] if args.quick else [1, 2, 3]
    results = {"machine": machine(), "git": git_state(), "runs": args.runs, "zipnn_version": zipnn[1],
               "cpu_baseline": cpu_baseline(args.runs), "files": {}}
    print(f"CPU-bound loop, 1 -> 2 threads: x{results['cpu_baseline']['gain']:.2f}")
    src = minilm_path()
    files = {}
    for dt in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
        files[f"MiniLM {dt}"] = src if dt == "F32" else make_cast(src, out / f"minilm-{dt.lower()}.safetensors", dt)
    if args.llm_gb:
        files[f"LLM-shaped BF16 ~{args.llm_gb:g} GB"] = make_llm(out / f"llm-{args.llm_gb:g}gb.safetensors", args.llm_gb)
    failures = []
    for label, path in files.items():
        print(f"\n## {label}: {path.name} ({path.stat().st_size:,} bytes)\n", flush=True)
        try:
            rows = bench_file(path, out, args.runs, levels, zipnn, args.wait_idle)
        except BenchFailure as e:
            failures.append(str(e))
            print(f"FAILED: {e}", file=sys.stderr)
            continue
        print(table(rows))
        print()
        print(scaling(rows, results["cpu_baseline"]["gain"]), flush=True)
        l2 = {r["threads"]: r for r in rows if r["method"] == "weightpack L2"}
        l3 = {r["threads"]: r for r in rows if r["method"] == "weightpack L3"}
        for th in l3:
            print(f"level 3 pack time / level 2 pack time, {th} thread(s): "
                  f"{l2[th]['pack_MBps'] / l3[th]['pack_MBps']:.2f}")
        results["files"][label] = {"path": str(path), "bytes": path.stat().st_size, "rows": rows}
    results["failures"] = failures
    (out / "bench_speed.json").write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out / 'bench_speed.json'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
