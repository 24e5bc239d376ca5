#!/usr/bin/env python3
"""Ray benchmark: `weightpack pack` of a generated LLM-shaped BF16 checkpoint, locally and on Ray with one
and two nodes on this machine, with peak memory of the driver, the workers and Ray's object store, and
the per-task figures a projection to a bigger cluster needs.

The checkpoint is bench_memory.py's: --gb GB of BF16 tensors of 256 MiB (8192x16384 and the like), values
standard-normal x 0.02, written piece by piece. Then, each pack a subprocess (`weightpack pack SRC -o OUT
--json -q`, plus `--shard-size` when given):

- local: the default pool (worker processes, all cores);
- ray-1: `ray start --head --num-cpus=C` on 127.0.0.1 and `--ray 127.0.0.1:PORT`;
- ray-2: that head with --num-cpus=C/2 plus a second node (`ray start --address=... --num-cpus=C/2`),
  both on this machine (two raylets, two object stores; transfers between them go through Ray's
  object manager as between machines, only over loopback).

While a pack runs, every --interval s: the RSS of the driver (the weightpack process; for local, with its
forked workers counted apart), the summed RSS of the Ray worker processes (`ray::...`), and the object
stores' pages in use (the growth of the machine's Shmem, /proc/meminfo, since before the cluster
started). After each Ray pack, Ray's task events (GCS) give each task's running time. The outputs must be byte-identical (SHA-256).

    python scripts/bench_ray.py --gb 8 [--out bench-ray] [--shard-size 2GB] [--cpus 2] [--keep]

Writes <out>/bench_ray.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_memory import _status, _tree, file_sha256, generate  # noqa: E402

PORT = 6399
# A throwaway cluster on loopback, for this benchmark only: no token authentication (Ray >= 2.5x turns it on
# for `ray start` clusters and a driver in another process would need the token).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
MIB = 1 << 20


def ray_cli(*args):
    exe = Path(sys.executable).with_name("ray")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, check=True)


def start_cluster(nodes: int, cpus: int, store: int) -> str:
    per = max(1, cpus // nodes)
    ray_cli("start", "--head", "--node-ip-address=127.0.0.1", f"--port={PORT}", f"--num-cpus={per}",
            "--include-dashboard=false", f"--object-store-memory={store}", "--disable-usage-stats")
    addr = f"127.0.0.1:{PORT}"
    for _ in range(nodes - 1):
        ray_cli("start", f"--address={addr}", "--node-ip-address=127.0.0.1", f"--num-cpus={per}",
                f"--object-store-memory={store}", "--disable-usage-stats")
    return addr


def stop_cluster():
    ray_cli("stop", "--force")


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return ""


def _ray_workers() -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit() and _cmdline(int(d)).startswith("ray::"):
            out.append(int(d))
    return out


def shmem() -> int:
    """The machine's shared memory in use (/proc/meminfo Shmem): Ray's object stores are shared-memory
    mappings, so its growth over the value before the cluster started is the stores' pages in use (a
    high-water mark: the store keeps pages it has touched)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Shmem:"):
                return int(line.split()[1]) * 1024
    return 0


def run(cmd: list[str], addr: str | None, interval: float, shm0: int) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = {"driver": 0, "local_workers": 0, "ray_workers": 0, "object_store": 0}
    while proc.poll() is None:
        tree = _tree(proc.pid)
        st = _status(proc.pid)
        if st:
            peak["driver"] = max(peak["driver"], st["VmRSS"], st.get("VmHWM", 0))
        kids = sum((_status(p) or {}).get("VmRSS", 0) for p in tree if p != proc.pid)
        peak["local_workers"] = max(peak["local_workers"], kids)
        if addr:
            peak["ray_workers"] = max(peak["ray_workers"], sum((_status(p) or {}).get("VmRSS", 0) for p in _ray_workers()))
            peak["object_store"] = max(peak["object_store"], shmem() - shm0)
        time.sleep(interval)
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {err.strip()}")
    return {"wall_s": wall, "summary": json.loads(out), "peak_bytes": peak}


def task_times(addr: str) -> dict:
    """Running time of every pack task of the last job (Ray's task events), and their count."""
    import ray
    from ray._private.state import state
    from ray.core.generated import common_pb2 as c

    ray.init(address=addr, log_to_driver=False, configure_logging=False, logging_level="ERROR")
    try:
        times = []
        for ev in state._get_all_task_events():
            if ev.task_info.func_or_class_name.split(".")[-1] != "_run":
                continue
            ts = ev.state_updates.state_ts_ns
            if c.TaskStatus.RUNNING in ts and c.TaskStatus.FINISHED in ts:
                times.append((ts[c.TaskStatus.FINISHED] - ts[c.TaskStatus.RUNNING]) / 1e9)
    finally:
        ray.shutdown()
    times.sort()
    n = len(times)
    return {"tasks": n, "mean_s": sum(times) / n if n else None, "median_s": times[n // 2] if n else None,
            "p95_s": times[int(0.95 * (n - 1))] if n else None, "sum_s": sum(times)}


def driver_pass(src: Path) -> dict:
    """Per lossless tensor, timed alone in one process: the SHA-256 of the source bytes and the planning
    pass (tensor_sha256, make_plan: tasks of their own in the pipeline, once run by the driver itself)."""
    from weightpack.checkpoint import open_checkpoint
    from weightpack.coding.codecs.fields import codec as fields
    from weightpack.pipeline import _reader, tensor_sha256

    ck = open_checkpoint(src)
    hash_s = plan_s = 0.0
    for _, f, e in ck.tensors():
        t0 = time.perf_counter()
        tensor_sha256(f.path, e)
        t1 = time.perf_counter()
        fields.make_plan(e.dtype, e.shape, _reader(f.path, e))
        hash_s += t1 - t0
        plan_s += time.perf_counter() - t1
    return {"bytes": ck.total_bytes, "hash_s": hash_s, "plan_s": plan_s,
            "hash_MBps": ck.total_bytes / 1e6 / hash_s, "plan_MBps": ck.total_bytes / 1e6 / plan_s}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gb", type=float, default=8.0, help="checkpoint size in GiB (multiples of 0.25)")
    ap.add_argument("--out", default="bench-ray")
    ap.add_argument("--cpus", type=int, default=os.cpu_count())
    ap.add_argument("--shard-size", default=None)
    ap.add_argument("--store", type=int, default=1 << 30, help="object store bytes per node")
    ap.add_argument("--interval", type=float, default=0.2)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--driver-pass-only", action="store_true",
                    help="only time planning and hashing (per tensor, one process)")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    src = out / "model.safetensors"
    ntensors = max(1, round(a.gb * 4))
    info = generate(src, ntensors, seed=0)
    if a.driver_pass_only:
        print(json.dumps(driver_pass(src), indent=2))
        if not a.keep:
            shutil.rmtree(out)
        return
    wp = str(Path(sys.executable).with_name("weightpack"))
    extra = ["--shard-size", a.shard_size] if a.shard_size else []
    results = {"checkpoint": info, "cpus": a.cpus, "shard_size": a.shard_size, "runs": {}}
    hashes = {}
    for mode, nodes in (("local", 0), ("ray-1", 1), ("ray-2", 2)):
        dst = out / mode
        shutil.rmtree(dst, ignore_errors=True)
        dst.mkdir()
        shm0 = shmem()
        addr = start_cluster(nodes, a.cpus, a.store) if nodes else None
        try:
            cmd = [wp, "pack", str(src), "-o", str(dst / "model.wpk"), "--json", "-q", *extra]
            if addr:
                cmd += ["--ray", addr]
            r = run(cmd, addr, a.interval, shm0)
            if addr:
                r["task_times"] = task_times(addr)
        finally:
            if nodes:
                stop_cluster()
        hashes[mode] = sorted((p.name, file_sha256(p)) for p in dst.iterdir())
        results["runs"][mode] = r
        print(f"{mode}: {r['wall_s']:.1f} s", file=sys.stderr)
    first = next(iter(hashes.values()))
    results["byte_identical"] = all(h == first for h in hashes.values())
    results["driver_pass"] = driver_pass(src)
    (out / "bench_ray.json").write_text(json.dumps(results, indent=2))
    gib = info["bytes"] / 2**30
    print(f"checkpoint: {info['bytes'] / 1e9:.2f} GB BF16, {info['tensors']} tensors; {a.cpus} CPUs; "
          f"byte-identical: {results['byte_identical']}\n")
    print("| run | wall s | pack s | MB/s | ratio | driver RSS MiB | workers RSS MiB | object store MiB | tasks | mean task s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for mode, r in results["runs"].items():
        s, p, tt = r["summary"], r["peak_bytes"], r.get("task_times", {})
        workers = p["ray_workers"] if mode != "local" else p["local_workers"]
        print(f"| {mode} | {r['wall_s']:.1f} | {s['seconds']:.1f} | {info['bytes'] / 1e6 / s['seconds']:.0f} | "
              f"{s['ratio']:.4f} | {p['driver'] / MIB:.0f} | {workers / MIB:.0f} | {p['object_store'] / MIB:.0f} | "
              f"{tt.get('tasks', '')} | {tt['mean_s']:.3f} |" if tt else
              f"| {mode} | {r['wall_s']:.1f} | {s['seconds']:.1f} | {info['bytes'] / 1e6 / s['seconds']:.0f} | "
              f"{s['ratio']:.4f} | {p['driver'] / MIB:.0f} | {workers / MIB:.0f} | - | - | - |")
    print(f"\n({gib:.2f} GiB; container {results['runs']['local']['summary']['bytes_out'] / 1e6:.1f} MB)")
    d = results["driver_pass"]
    print(f"per tensor, one process: SHA-256 {d['hash_MBps']:.0f} MB/s, planning {d['plan_MBps']:.0f} MB/s")
    if not a.keep:
        shutil.rmtree(out)


if __name__ == "__main__":
    main()
