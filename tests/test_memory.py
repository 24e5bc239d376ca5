"""Memory stays bounded by the largest tensor, not the model: RSS measured while packing and unpacking
a generated 1 GiB checkpoint of 256 MiB tensors (scripts/bench_memory.py does the same at 4 GB)."""

import json
import struct
import subprocess
import sys
import time

import psutil
import pytest
import torch

TENSOR_SHAPE = (8192, 16384)  # BF16: 256 MiB
TENSORS = 4


def write_big_checkpoint(path, shape=TENSOR_SHAPE, count=TENSORS):
    """A BF16 safetensors file written tensor by tensor, so the test itself stays small."""
    nbytes = shape[0] * shape[1] * 2
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for i in range(count):
        header[f"layers.{i}.weight"] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + nbytes]}
        off += nbytes
    raw = json.dumps(header).encode()
    raw += b" " * ((-len(raw)) % 8)
    g = torch.Generator().manual_seed(0)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for i in range(count):
            t = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
            f.write(t.view(torch.uint8).numpy().tobytes())
            del t


def peak_rss(cmd) -> dict:
    """Run `cmd`, sampling the RSS of it and its children; returns peaks in bytes and the exit code."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc = psutil.Process(p.pid)
    main = workers = total = 0
    while p.poll() is None:
        try:
            m = proc.memory_info().rss
            kids = [c.memory_info().rss for c in proc.children(recursive=True)]
        except psutil.Error:
            continue
        main, workers, total = max(main, m), max([workers] + kids), max(total, m + sum(kids))
        time.sleep(0.02)
    out, err = p.communicate()
    return {"rc": p.returncode, "main": main, "worker": workers, "total": total, "stderr": err.decode()}


@pytest.mark.slow
def test_pack_and_unpack_memory_is_bounded_by_the_largest_tensor(tmp_path):
    src = tmp_path / "big.safetensors"
    write_big_checkpoint(src)
    largest = TENSOR_SHAPE[0] * TENSOR_SHAPE[1] * 2
    r = peak_rss([sys.executable, "-m", "weightpack", "pack", str(src), "-o", str(tmp_path / "big.wpk"), "-q", "-j", "2"])
    assert r["rc"] == 0, r["stderr"]
    print("pack peak RSS MiB:", {k: v >> 20 for k, v in r.items() if k not in ("rc", "stderr")})
    assert r["main"] < 1.5 * largest and r["worker"] < 1.5 * largest and r["total"] < 3 * largest
    src.unlink()  # also proves unpack does not read the source
    r = peak_rss([sys.executable, "-m", "weightpack", "unpack", str(tmp_path / "big.wpk"), "-o", str(src), "-q", "-j", "2"])
    assert r["rc"] == 0, r["stderr"]
    print("unpack peak RSS MiB:", {k: v >> 20 for k, v in r.items() if k not in ("rc", "stderr")})
    assert r["main"] < 1.5 * largest and r["worker"] < 1.5 * largest and r["total"] < 3 * largest
