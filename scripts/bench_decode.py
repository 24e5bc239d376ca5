#!/usr/bin/env python3
"""Decode speed: CPU symbols per second per core and worker scaling, and (on a GPU) device decode throughput
and end-to-end load time beside safetensors.

    python scripts/bench_decode.py                 # CPU part on all-MiniLM-L6-v2, GPU part if CUDA is present
    python scripts/bench_decode.py --gpu-gb 4      # the generated LLM-shaped BF16 checkpoint's size
    python scripts/bench_decode.py --device cpu --gpu-gb 0.05   # the GPU part's code, run on the CPU

CPU part (all-MiniLM-L6-v2 cast to BF16 and kept F32, lossless; and packed with q-tcq):
  * one core: ANS lanes and trellis levels decoded by each CPU decoder, the compiled kernels ("native",
    weightpack/_native.c) and constriction + numpy ("numpy") (symbols/s), and the lock-step torch decoder
    that the device path runs (symbols/s; on the CPU it is only a test vehicle);
  * `load` with 1 and 2 workers under each CPU decoder (native: threads; numpy: processes) (MB/s of
    reconstructed tensors) and the scaling between them.
GPU part (a generated checkpoint shaped like a 7B-class decoder's layers, BF16, `--gpu-gb` GB):
  * `safetensors.torch.load_file(original, device=DEV)`, and `weightpack.load(pack, device=DEV)` of a
    lossless and an int4 pack, from the page cache (each file read once before timing), best of --runs;
  * the lock-step entropy decode alone (GB/s of reconstructed BF16: 2 bytes per decoded head symbol).
Results: JSON (--out) and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import weightpack  # noqa: E402
from weightpack.coding import entropy, entropy_native, lockstep, native  # noqa: E402
from weightpack.coding.chunks import chunk_views  # noqa: E402
from weightpack.coding.codecs.fields.blocks import BlockGroups  # noqa: E402
from weightpack.coding.codecs.trellis import codec as trellis  # noqa: E402
from weightpack.container import ContainerReader  # noqa: E402
from weightpack.pipeline import stream_plan  # noqa: E402


def best(runs: int, fn) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _chunks(pk: Path, kind: str):
    """(plan, chunk record, payload) of every chunk of `kind` ('fields' heads in lanes, or 'trellis')."""
    with ContainerReader(pk) as r:
        for t in r.index.tensors:
            for part in (t.parts if t.stages else [None]):
                plan = stream_plan(r, t, part)
                if plan.codec != ("fields" if kind == "fields" else "trellis"):
                    continue
                for i, rec in enumerate((part or t).stream.chunks):
                    if rec.codec == kind:
                        yield plan, i, rec, r.read_blob(rec.blob, "bench")


def head_lanes(pk: Path, limit: int = 1 << 62):
    """The head parts of the laned fields chunks of a pack (up to `limit` symbols): [(plan, head part,
    class counts)] and a LaneSet of them all, as the device path assembles it."""
    jobs, lanes = [], lockstep.LaneSet()
    for plan, i, rec, payload in _chunks(pk, "fields"):
        if len(plan.alphabet) < 2 or not plan.lane or lanes.nsymbols >= limit:
            continue
        a, b = plan.chunk_range(i)
        g = BlockGroups(plan.chunk_blocks(i, b - a)[0], plan.tables.shape[0], plan.block, b - a)
        head = chunk_views(rec, payload, "bench")["head"][1]
        jobs.append((plan, head, g.counts))
        lanes.add(head, g.counts, lanes.add_tables(plan.tables), plan.lane, "bench")
    return jobs, lanes


def cpu_decoders() -> list[str]:
    return ["native", "numpy"] if native.available() else ["numpy"]


def cpu_lanes(pk: Path, runs: int) -> dict:
    """Heads of every laned fields chunk, decoded on one core by each CPU decoder (the compiled kernels;
    constriction), and by the lock-step torch decoder (one batch, as the device path does)."""
    heads, lanes = head_lanes(pk)
    n = lanes.nsymbols
    res = {"symbols": n}
    decoders = {"native": lambda h, counts, plan: entropy_native.lanes_decode(h, counts, plan.coding_tables().slots(),
                                                                               plan.lane, "bench"),
                "numpy": lambda h, counts, plan: entropy.lanes_decode(h, counts, plan.coding_tables(), plan.lane, "bench")}
    for name in cpu_decoders():
        decode = decoders[name]
        t = best(runs, lambda: [decode(h, counts, plan) for plan, h, counts in heads])
        res[f"{name}_s"], res[f"{name}_msym_s"] = t, n / t / 1e6
    with _one_thread():
        d = lanes.to("cpu")
        tl = best(1, lambda: lockstep.decode_torch(d, "bench"))
    res.update(lockstep_torch_s=tl, lockstep_torch_msym_s=n / tl / 1e6, lanes=d.nlanes)
    return res


class _one_thread:
    def __enter__(self):
        self.n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.n)


def cpu_trellis(pk: Path, runs: int) -> dict:
    """Trellis level chunks (every layout) decoded on one core by each CPU decoder."""
    items = list(_chunks(pk, "trellis"))
    n = sum(plan.chunk_range(i)[1] - plan.chunk_range(i)[0] for plan, i, _, _ in items)
    res = {"symbols": n}
    for name in cpu_decoders():
        with native.enabled(name == "native"):
            t = best(runs, lambda: [trellis.decode_chunk(plan, i, rec, memoryview(p), "bench")
                                    for plan, i, rec, p in items])
        res[f"{name}_s"], res[f"{name}_msym_s"] = t, n / t / 1e6
    return res


def _loads(pk: Path, runs: int, nbytes: int) -> dict:
    """`load` of every tensor with 1 and 2 workers under each CPU decoder (native: threads; numpy:
    processes); MB/s of reconstructed tensors."""
    row = {}
    for name in cpu_decoders():
        with native.enabled(name == "native"):
            weightpack.load(pk, workers=1)  # the first call of a process pays its imports
            for w in (1, 2):
                t = best(runs, lambda: weightpack.load(pk, workers=w))
                row[f"{name}_load_{w}w_s"], row[f"{name}_load_{w}w_MBps"] = t, nbytes / t / 1e6
        row[f"{name}_scaling_1_to_2"] = row[f"{name}_load_1w_s"] / row[f"{name}_load_2w_s"]
    return row


def cpu_part(out: Path, runs: int) -> dict:
    from bench_lossless import make_cast, minilm_path

    src = minilm_path()
    res = {}
    for dt in ("BF16", "F32"):
        f = src if dt == "F32" else make_cast(src, out / f"minilm-{dt}.safetensors", dt)
        pk = out / f"minilm-{dt}.wpk"
        weightpack.pack(f, pk, recipe="lossless", force=True)
        nbytes = os.path.getsize(f)
        res[f"lossless {dt}"] = {"file_bytes": nbytes, "pack_bytes": os.path.getsize(pk), **cpu_lanes(pk, runs),
                                 **_loads(pk, runs, nbytes)}
    pk = out / "minilm-q-tcq.wpk"
    weightpack.pack(src, pk, recipe="q-tcq", force=True)
    res["q-tcq (22.8 dB class)"] = {"pack_bytes": os.path.getsize(pk), "trellis": cpu_trellis(pk, runs),
                                    **_loads(pk, runs, os.path.getsize(src))}
    return res


# -- GPU part ------------------------------------------------------------------------------------------

def llm_checkpoint(path: Path, gb: float, seed: int = 0) -> Path:
    """An LLM-shaped BF16 checkpoint (hidden 4096, MLP 11008, vocab 32000) of about `gb` GB, written one
    tensor at a time: weights ~ N(0, s_row^2) with log-normal row scales, norms near 1."""
    from safetensors.torch import save_file

    if path.exists():
        return path
    g = torch.Generator().manual_seed(seed)
    h, m, vocab = 4096, 11008, 32000
    per_layer = 2 * (4 * h * h + 3 * h * m)
    layers = max(1, round((gb * 1e9 - 2 * 2 * vocab * h) / per_layer)) if gb >= 1 else 0
    tensors = {}

    def w(rows, cols):
        x = torch.randn(rows, cols, generator=g) * (0.02 * torch.exp(0.3 * torch.randn(rows, 1, generator=g)))
        return x.to(torch.bfloat16)

    if layers == 0:  # under 1 GB: one layer of a model 8 times narrower (to try the script on a CPU)
        h, m, vocab, layers = h // 8, m // 8, vocab // 8, 1
    tensors["model.embed_tokens.weight"] = w(vocab, h)
    for i in range(layers):
        p = f"model.layers.{i}."
        for k in ("q", "k", "v", "o"):
            tensors[p + f"self_attn.{k}_proj.weight"] = w(h, h)
        tensors[p + "mlp.gate_proj.weight"] = w(m, h)
        tensors[p + "mlp.up_proj.weight"] = w(m, h)
        tensors[p + "mlp.down_proj.weight"] = w(h, m)
        tensors[p + "input_layernorm.weight"] = (1 + 0.05 * torch.randn(h, generator=g)).to(torch.bfloat16)
    tensors["lm_head.weight"] = w(vocab, h)
    save_file(tensors, str(path))
    return path


def _read(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


def gpu_part(out: Path, device: str, gb: float, runs: int) -> dict:
    from safetensors.torch import load_file

    src = llm_checkpoint(out / f"llm-{gb:g}GB.safetensors", gb)
    nbytes = os.path.getsize(src)
    res = {"checkpoint_bytes": nbytes, "device": device,
           "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
           "decoder": lockstep.decoder_for(device)}
    _read(src)

    def st_load():
        x = load_file(str(src), device=device)
        _sync(device)
        return x

    st_load()
    res["safetensors_load_s"] = best(runs, st_load)
    for recipe in ("lossless", "int4"):
        pk = out / f"llm-{gb:g}GB-{recipe}.wpk"
        if not pk.exists():
            weightpack.pack(src, pk, recipe=recipe)
        _read(pk)

        def wp_load():
            x = weightpack.load(pk, device=device, decoder="device")
            _sync(device)
            return x

        wp_load()
        row = {"pack_bytes": os.path.getsize(pk), "load_s": best(runs, wp_load)}
        row["vs_safetensors"] = row["load_s"] / res["safetensors_load_s"]
        _, lanes = head_lanes(pk, 1 << 29)
        d = lanes.to(device)
        dec = lockstep.decode_triton if lockstep.decoder_for(device) == "triton" else lockstep.decode_torch

        def entropy_only():
            dec(d, "bench")
            _sync(device)

        entropy_only()
        t = best(runs, entropy_only)
        row.update(entropy_symbols=lanes.nsymbols, entropy_lanes=d.nlanes, entropy_s=t,
                   entropy_GBps_bf16=2 * lanes.nsymbols / t / 1e9)
        res[recipe] = row
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench-out", help="folder for checkpoints, packs and the JSON")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else None,
                    help="device for the GPU part (default: cuda when present, else the part is skipped)")
    ap.add_argument("--gpu-gb", type=float, default=4.3, help="size of the generated BF16 checkpoint")
    ap.add_argument("--skip-cpu", action="store_true")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {"cpu_count": os.cpu_count(), "torch": torch.__version__}
    if not args.skip_cpu:
        res["cpu"] = cpu_part(out, args.runs)
    if args.device:
        res["gpu"] = gpu_part(out, args.device, args.gpu_gb, args.runs)
    else:
        res["gpu"] = "not measured: no CUDA GPU on this machine"
    (out / "bench_decode.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
