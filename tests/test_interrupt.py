"""Ctrl-C (_interrupt.py, cli.py, parallel.py's workers): a SIGINT to the command or to its whole process
group, once or twice, at any moment, ends it within seconds with one line and exit 130 (or, when it lands as
the command finishes, a success): never a traceback, a stray worker or a temporary file."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

import weightpack

from conftest import ENV, WP, _group_alive, assert_no_traceback, describe


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    """~300 MB: a tiny F32 tensor first (its task starts the worker processes), then one 288 MiB BF16 tensor
    that the main process measures for a second or more while the workers wait: packing takes seconds,
    and an interrupt lands while workers are idle as well as while they work."""
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("big")
    g = torch.Generator().manual_seed(0)
    p = d / "big.safetensors"
    save_file({"a_tiny": torch.randn(64, generator=g),
               "b_huge": torch.randn(16384, 9216, generator=g).to(torch.bfloat16)}, str(p))
    return p


def _interrupt(args: list, out_folder: Path, partial_glob: str, whole_group: bool,
               delay: float = 0.4) -> subprocess.CompletedProcess:
    p = subprocess.Popen(WP + [str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=ENV, start_new_session=True)
    t0 = time.monotonic()
    while not list(out_folder.glob(partial_glob)) and p.poll() is None and time.monotonic() - t0 < 60:
        time.sleep(0.01)
    assert p.poll() is None, "finished before it could be interrupted: " + describe(
        subprocess.CompletedProcess(args, p.returncode, *p.communicate()))
    time.sleep(delay)
    assert p.poll() is None, "finished before it could be interrupted"
    if whole_group:  # what a terminal's Ctrl-C does: the whole foreground process group
        os.killpg(p.pid, signal.SIGINT)
    else:
        p.send_signal(signal.SIGINT)
    try:
        out, err = p.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        pytest.fail("did not stop within 30 s of SIGINT (hung); stderr: " + err[-2000:])
    return subprocess.CompletedProcess(args, p.returncode, out, err)


@pytest.mark.parametrize("whole_group", [False, True], ids=["main-process", "process-group"])
def test_sigint_during_pack(big, tmp_path, whole_group):
    out = tmp_path / "out"
    out.mkdir()
    res = _interrupt(["pack", big, "-o", out / "big.wpk", "-j", "2"], out, ".big.wpk*", whole_group)
    assert res.returncode != 0, describe(res)
    assert_no_traceback(res)
    assert len(res.stderr.strip().splitlines()) <= 1, describe(res)
    assert not (out / "big.wpk").exists()
    assert list(out.iterdir()) == [], f"leftovers: {list(out.iterdir())}"


def test_sigint_during_unpack(big, tmp_path):
    wpk = tmp_path / "big.wpk"
    weightpack.pack(big, wpk, workers=2)
    out = tmp_path / "out"
    out.mkdir()
    res = _interrupt(["unpack", wpk, "-o", out / "big.safetensors", "-j", "2"], out, ".big.safetensors*", True,
                     delay=0.3)
    assert res.returncode != 0, describe(res)
    assert_no_traceback(res)
    assert list(out.iterdir()) == [], f"leftovers: {list(out.iterdir())}"


def _interrupt_once(args, out: Path, mode: str, delay: float):
    p = subprocess.Popen(WP + [str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=ENV, start_new_session=True)
    time.sleep(delay)
    t0 = time.monotonic()
    sent = p.poll() is None
    if sent:
        (os.killpg(p.pid, signal.SIGINT) if mode == "group" else p.send_signal(signal.SIGINT))
        if mode == "double":
            time.sleep(random.uniform(0.0, 0.3))
            try:
                os.killpg(p.pid, signal.SIGINT)
            except ProcessLookupError:
                pass
    try:
        o, e = p.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        pytest.fail(f"{args[0]} did not end within 30 s of Ctrl-C ({mode}, {delay:.2f} s)")
    took = time.monotonic() - t0
    deadline = time.monotonic() + 5
    while _group_alive(p.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    what = f"{args[0]} {mode} at {delay:.2f} s: rc={p.returncode} stdout={o[-300:]!r} stderr={e[-1500:]!r}"
    assert not _group_alive(p.pid), "stray worker processes: " + what
    assert "Traceback" not in e and "Exception ignored" not in e, what
    if p.returncode == 130:
        assert e.strip() == "weightpack: interrupted", what
        assert took < 5, f"took {took:.1f} s: " + what
        assert [x.name for x in out.iterdir()] == [], "output or leftovers after an interrupt: " + what
    else:
        assert p.returncode == 0 and e.strip() == "", "neither interrupted nor a success: " + what
        assert o.strip(), "a finished command reports success: " + what
    assert not [x for x in out.iterdir() if x.name.startswith(".")], what
    return p.returncode


@pytest.mark.parametrize("cmd", ["pack", "unpack", "verify"])
def test_ctrl_c_at_random_moments(medium, tmp_path, cmd):
    """Single, double, process and process-group Ctrl-C at random delays: one line and exit 130 within
    seconds, or (when it landed as the command finished) success; never a trace, a stray worker or a
    temporary file."""
    src, wpk = medium
    rng = random.Random(f"{cmd}-12")
    random.seed(f"{cmd}-12")
    codes = []

    def command(out):
        return {"pack": ["pack", src, "-o", out / "m.wpk", "-j", "2"],
                "unpack": ["unpack", wpk, "-o", out / "r.safetensors", "-j", "2"],
                "verify": ["verify", wpk, "-j", "2"]}[cmd]

    # the delays fall inside the command's own run time (measured here: it shrinks as the coders get faster)
    (tmp_path / "timing").mkdir()
    t0 = time.monotonic()
    subprocess.run(WP + [str(a) for a in command(tmp_path / "timing")], env=ENV, capture_output=True, check=True)
    took = time.monotonic() - t0
    for i in range(int(os.environ.get("WEIGHTPACK_INTERRUPT_TRIES", "6"))):
        out = tmp_path / f"out{i}"
        out.mkdir()
        # from 0.1 s: the first tens of milliseconds are the interpreter's own start, before any of our code
        delay = rng.uniform(0.1, max(0.2, 0.9 * took))
        codes.append(_interrupt_once(command(out), out, rng.choice(["process", "group", "double"]), delay))
    assert 130 in codes
