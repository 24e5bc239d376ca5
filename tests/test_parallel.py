"""Work spread over workers (parallel.py): the same bytes whatever their number, and workers that die with
their parent, also on kill -9 (the next run then removes the killed run's temporary file)."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import psutil

import weightpack

from conftest import ENV, WP, _group_alive, cli, sha256


def test_same_bytes_whatever_the_number_of_workers(tmp_path, minilm_cast):
    src = minilm_cast["BF16"]
    weightpack.pack(src, tmp_path / "a.wpk", workers=1)
    weightpack.pack(src, tmp_path / "b.wpk", workers=2)
    weightpack.pack(src, tmp_path / "c.wpk", workers=2, force=True)
    assert sha256(tmp_path / "a.wpk") == sha256(tmp_path / "b.wpk") == sha256(tmp_path / "c.wpk")
    weightpack.unpack(tmp_path / "a.wpk", tmp_path / "one.safetensors", workers=1)
    weightpack.unpack(tmp_path / "a.wpk", tmp_path / "two.safetensors", workers=2)
    assert sha256(tmp_path / "one.safetensors") == sha256(tmp_path / "two.safetensors") == sha256(src)


def test_kill_9_takes_the_workers_and_the_next_run_cleans_up(medium, tmp_path):
    src, _ = medium
    out = tmp_path / "out"
    out.mkdir()
    # a lossy recipe: its stages run in worker processes (lossless packs run in threads), and it takes longer
    p = subprocess.Popen(WP + ["pack", str(src), "-o", str(out / "m.wpk"), "-j", "2", "-r", "q-tcq"], env=ENV,
                         start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.monotonic()
    while not list(out.glob(".m.wpk.*.partial")) and time.monotonic() - t0 < 30:
        time.sleep(0.01)
    time.sleep(0.3)
    assert p.poll() is None, "finished before it could be killed"
    assert len(psutil.Process(p.pid).children()) == 2, "no worker processes to test"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    deadline = time.monotonic() + 5
    while _group_alive(p.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _group_alive(p.pid), "workers outlived their killed parent"
    assert list(out.glob(".m.wpk.*.partial")), "the killed run left no temporary file (test did not test)"
    res = cli("pack", src, "-o", out / "m.wpk", "-j", "1")
    assert res.returncode == 0, res.stderr
    assert [x.name for x in out.iterdir()] == ["m.wpk"]
