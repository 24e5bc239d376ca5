"""Issue 12 (trust): interrupts and kills, outputs like any other file, pipes, the CI gate telling the truth,
options that conflict, messages in the interface's own words. Each test failed before its fix."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

import weightpack
from weightpack import OutputError, UsageError, WeightpackError

import craft

WP = [sys.executable, "-m", "weightpack"]
ENV = {**os.environ, "CI": "1"}


def cli(*args, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(WP + [str(a) for a in args], capture_output=True, text=True, timeout=timeout, env=ENV, **kw)


def one_error_line(res, code=2, contains=None):
    assert "Traceback" not in res.stderr, res.stderr
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("weightpack: error: "), res.stderr
    if contains:
        assert contains in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    d = tmp_path_factory.mktemp("trust")
    g = torch.Generator().manual_seed(3)
    src = craft.save_checkpoint(d / "m.safetensors", {
        "a.weight": torch.randn(64, 128, generator=g), "b.weight": torch.randn(32, 128, generator=g),
        "c.bias": torch.randn(128, generator=g)})
    lossy = d / "q.wpk"
    weightpack.pack(src, lossy, recipe="q-tcq", workers=1)
    plain = d / "m.wpk"
    weightpack.pack(src, plain, workers=1)
    folder = craft.make_folder(d / "folder")
    folder_wpk = d / "folder.wpk"
    weightpack.pack(folder, folder_wpk, workers=1)
    return {"dir": d, "src": src, "lossy": lossy, "plain": plain, "folder_wpk": folder_wpk}


# == the gate ======================================================================================

def test_verify_against_a_changed_source_fails_for_lossy(ck, tmp_path):
    from safetensors.torch import load_file, save_file

    t = load_file(str(ck["src"]))
    t["a.weight"] = t["a.weight"] * 1.03
    other = tmp_path / "other.safetensors"
    save_file(t, str(other), metadata={"format": "pt"})
    res = cli("verify", ck["lossy"], "--against", other)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "a.weight" in res.stderr and "differs from the packed source" in res.stderr
    assert "ok" not in res.stdout
    rep = weightpack.verify(ck["lossy"], against=other, workers=1)
    assert not rep.ok and any("differs from the packed source" in p for p in rep.problems)


def test_verify_lossy_says_within_sqnr_not_equal(ck):
    res = cli("verify", ck["lossy"], "--against", ck["src"])
    assert res.returncode == 0, res.stderr
    assert "within" in res.stdout and "SQNR" in res.stdout
    assert "equal to" not in res.stdout


def test_pack_lossy_reports_worst_sqnr_and_bits(ck, tmp_path):
    res = cli("pack", ck["src"], "-r", "q-tcq", "-o", tmp_path / "q.wpk", "-j", "1")
    assert res.returncode == 0, res.stderr
    assert re.search(r"lossy: 2 tensors at [0-9.]+ bits per weight, worst SQNR [0-9.]+ dB \(\w\.weight\)",
                     res.stdout), res.stdout
    res = cli("pack", ck["src"], "-r", "q-tcq", "-o", tmp_path / "q2.wpk", "-j", "1", "--json")
    lo = json.loads(res.stdout)["lossy"]
    assert lo["tensors"] == 2 and 0 < lo["bits_per_weight"] < 16 and lo["worst_sqnr_db"] > 10
    assert weightpack.pack(ck["src"], tmp_path / "l.wpk", workers=1).lossy is None


def test_conflicting_options_are_errors(ck, tmp_path):
    one_error_line(cli("pack", ck["src"], "--allocate", "tensor", "-o", tmp_path / "x.wpk"), contains="--bits")
    one_error_line(cli("pack", ck["src"], "-r", "int4", "--bits", "3", "-o", tmp_path / "x.wpk"),
                   contains="int4")
    one_error_line(cli("pack", ck["src"], "-r", "int4", "--min-sqnr", "30", "-o", tmp_path / "x.wpk"),
                   contains="int4")
    with pytest.raises(UsageError, match="allocate"):
        weightpack.pack(ck["src"], tmp_path / "x.wpk", allocate="tensor")
    with pytest.raises(UsageError, match="int4"):
        weightpack.pack(ck["src"], tmp_path / "x.wpk", recipe="int4", bits=3)
    assert not list(tmp_path.iterdir())


def test_messages_in_the_interface_words(ck, tmp_path):
    line = one_error_line(cli("pack", ck["src"], "--min-sqnr", "500", "-o", tmp_path / "x.wpk"))
    assert "--min-sqnr" in line and "<dict>" not in line and "rules[" not in line
    with pytest.raises(UsageError, match="min_sqnr"):
        weightpack.pack(ck["src"], tmp_path / "x.wpk", min_sqnr=500)
    with pytest.raises(OutputError) as e:
        weightpack.pack(ck["src"], ck["plain"])
    assert "force=True" in str(e.value) and "--force" not in str(e.value)
    line = one_error_line(cli("pack", ck["src"], "-o", ck["plain"]))
    assert "--force" in line
    line = one_error_line(cli("pack", ck["src"], "--bits", "0", "-o", tmp_path / "x.wpk"))
    assert "--bits" in line
    with pytest.raises(UsageError) as e:
        weightpack.pack(ck["src"], tmp_path / "x.wpk", bits=0)
    assert "bits must" in str(e.value) and "--bits" not in str(e.value)
    line = one_error_line(cli("pack", ck["src"], "-o", "/proc/x.wpk"))
    assert ".partial" not in line and "/proc/x.wpk" in line


def test_quiet_everywhere_and_inspect_help(ck):
    for args in (["inspect", ck["plain"], "--quiet"], ["recipes", "-q"], ["verify", ck["plain"], "-q"]):
        res = cli(*args)
        assert res.returncode == 0 and res.stdout == "" and res.stderr == "", (args, res.stdout, res.stderr)
    res = cli("inspect", "--help")
    assert "per tensor" in res.stdout.split("positional")[0].split("usage:")[1] or "Show what" in res.stdout


def test_inspect_columns_aligned(ck):
    res = cli("inspect", ck["lossy"])
    lines = res.stdout.splitlines()
    table = lines[:-1]
    head = table[0]
    for col in ("bpw", "SQNR"):
        end = head.index(col) + len(col)
        for row in table[1:]:
            assert row[end - 1] != " " and (len(row) == end or row[end] == " "), f"{col} misaligned:\n{res.stdout}"


def test_verify_failures_counted(ck, tmp_path):
    idx_edit = {}

    def edit(idx):
        for t in idx["tensors"]:
            t["sha256"] = "0" * 64
        idx_edit["n"] = len(idx["tensors"])

    bad = craft.rewrite_index(ck["plain"], tmp_path / "bad.wpk", edit)
    res = cli("verify", bad)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines()[-1] == f"verify failed: {idx_edit['n']} problems", res.stderr


def test_verify_many_failures_are_summarised(tmp_path):
    from weightpack import cli as wcli

    class Rep:
        ok, checked, quality = False, 103, {}
        problems = [f"tensor 't{i}': decoded data differs from the packed source" for i in range(103)]

    import contextlib
    import io

    err = io.StringIO()
    orig = weightpack.api.verify
    weightpack.api.verify = lambda *a, **k: Rep()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = wcli.main(["verify", "x.wpk"])
    finally:
        weightpack.api.verify = orig
    lines = err.getvalue().strip().splitlines()
    assert rc == 1 and len(lines) <= 22 and lines[-1] == "verify failed: 103 problems"
    assert "83 more" in lines[-2]


# == outputs =======================================================================================

@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_outputs_follow_the_umask(ck, tmp_path, mask):
    code = (f"import os, weightpack; os.umask({mask}); "
            f"weightpack.pack({str(ck['src'])!r}, {str(tmp_path / 'm.wpk')!r}, workers=1); "
            f"weightpack.unpack({str(ck['folder_wpk'])!r}, {str(tmp_path / 'f')!r}, workers=1); "
            f"weightpack.unpack({str(ck['plain'])!r}, {str(tmp_path / 'one.safetensors')!r}, workers=1)")
    subprocess.run([sys.executable, "-c", code], check=True, env=ENV)
    assert (tmp_path / "m.wpk").stat().st_mode & 0o777 == 0o666 & ~mask
    assert (tmp_path / "one.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o777 & ~mask
    for p in (tmp_path / "f").rglob("*"):
        assert p.stat().st_mode & 0o777 == (0o777 if p.is_dir() else 0o666) & ~mask, p


def test_unpack_into_a_new_folder_as_the_readme_says(ck, tmp_path):
    res = cli("unpack", ck["plain"], "-o", str(tmp_path / "restored") + "/", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "restored" / "m.safetensors").read_bytes() == ck["src"].read_bytes()


def test_output_kind_follows_the_container(ck, tmp_path):
    one_error_line(cli("unpack", ck["folder_wpk"], "-o", tmp_path / "x.safetensors"), contains="folder")
    assert not (tmp_path / "x.safetensors").exists()


def test_writing_over_the_input_is_refused(ck, tmp_path):
    src = tmp_path / "m.safetensors"
    src.write_bytes(ck["src"].read_bytes())
    before = src.read_bytes()
    one_error_line(cli("pack", src, "-o", src, "--force"), contains="input")
    assert src.read_bytes() == before
    wpk = tmp_path / "m.wpk"
    wpk.write_bytes(ck["plain"].read_bytes())
    one_error_line(cli("unpack", wpk, "-o", wpk, "--force"), contains="input")
    assert wpk.read_bytes() == ck["plain"].read_bytes()
    with pytest.raises(OutputError):
        weightpack.pack(src, src, force=True)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_closed_stdout_ends_quietly(ck):
    r, w = os.pipe()
    os.close(r)
    p = subprocess.run(WP + ["inspect", str(ck["lossy"])], stdout=w, stderr=subprocess.PIPE, text=True, env=ENV)
    os.close(w)
    assert p.stderr == "", p.stderr
    assert p.returncode == 141


def test_stale_temporaries_of_killed_runs_are_removed(ck, tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".m.wpk.{dead.pid}.abcd1234.partial"
    stale.write_bytes(b"x")
    stale_dir = tmp_path / f".r.{dead.pid}.abcd1234.partial"
    stale_dir.mkdir()
    alive = tmp_path / f".m.wpk.{os.getpid()}.abcd1234.partial"  # a run still going: left alone
    alive.write_bytes(b"x")
    weightpack.pack(ck["src"], tmp_path / "m.wpk", workers=1)
    weightpack.unpack(ck["folder_wpk"], tmp_path / "r", workers=1)
    assert not stale.exists() and not stale_dir.exists() and alive.exists()


# == interrupts and kills ==========================================================================

@pytest.fixture(scope="module")
def medium(tmp_path_factory):
    """~32 MiB: packing and unpacking with two workers take a second or two here."""
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("medium")
    g = torch.Generator().manual_seed(0)
    p = d / "m.safetensors"
    save_file({"a": torch.randn(64, generator=g),
               **{f"w{i}": torch.randn(1024, 4096, generator=g).to(torch.bfloat16) for i in range(4)}}, str(p))
    wpk = d / "m.wpk"
    weightpack.pack(p, wpk, workers=2)
    return p, wpk


def _group_alive(pgid: int) -> bool:
    try:
        out = subprocess.run(["ps", "-o", "stat=", "-g", str(pgid)], capture_output=True, text=True).stdout
    except OSError:
        return False
    return any(s and not s.startswith("Z") for s in out.split())


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


# == the README, as written ========================================================================

def _readme_commands() -> list[str]:
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    use = text.split("## Use", 1)[1].split("```", 1)[0]
    return [line.strip().split("  #")[0].strip() for line in use.splitlines() if line.strip().startswith("weightpack ")]


def test_readme_examples_run_as_written(tmp_path):
    """Every command of the README's "Use" block, each in a fresh copy of a folder holding the files it
    names (model.safetensors, its sharded form, a model folder, model.wpk, q.wpk)."""
    import shutil

    g = torch.Generator().manual_seed(5)
    tensors = {f"layer.{i}.weight": torch.randn(96, 128, generator=g) for i in range(3)}
    tensors["layer.0.bias"] = torch.randn(128, generator=g)
    world = tmp_path / "world"
    craft.save_checkpoint(world / "model.safetensors", tensors)
    shards = craft.make_sharded(tmp_path / "shards", 2, tensors)
    for p in shards.parent.iterdir():
        shutil.copy(p, world / p.name)
    craft.make_folder(world / "path" / "to" / "model-folder")
    weightpack.pack(world / "model.safetensors", world / "model.wpk", workers=1)
    weightpack.pack(world / "model.safetensors", world / "q.wpk", recipe="q-tcq", workers=1)
    weightpack.pack(world / "model.safetensors", world / "model-int4.wpk", recipe="int4", workers=1)
    (world / "packed-folder").mkdir()  # as weightpack.hf.save_pretrained writes one: small files beside model.wpk
    shutil.copy(world / "model.wpk", world / "packed-folder" / "model.wpk")
    (world / "packed-folder" / "config.json").write_text('{"model_type": "bert"}')
    cmds = _readme_commands()
    assert len(cmds) >= 15, cmds
    failures = []
    for i, cmd in enumerate(cmds):
        argv = cmd.split()[1:]
        if "--device" in argv and not torch.cuda.is_available():
            argv[argv.index("--device") + 1] = "auto"  # the same command on a machine without a GPU
        if argv[-1] == "[--json]":
            argv = argv[:-1]
        argv = [a.replace("[", "").replace("]", "") for a in argv]
        if "--ray" in argv and argv[argv.index("--ray") + 1:argv.index("--ray") + 2] == ["HEAD:6379"]:
            del argv[argv.index("--ray") + 1]  # the cluster's address is a placeholder: a local Ray instead
        cwd = tmp_path / f"run{i}"
        shutil.copytree(world, cwd)
        # what the command writes by default is not there yet (each line is run as in a fresh session)
        for stale in {"pack": ["model.wpk"], "unpack": ["model.safetensors"]}.get(argv[0], []):
            (cwd / stale).unlink()
        res = cli(*argv, cwd=cwd)
        if argv[0] == "diff" and res.returncode == 1 and not res.stderr.strip():
            continue  # as cmp: 1 says the inputs differ (a lossy pack does)
        if res.returncode != 0:
            failures.append(f"{cmd}: exit {res.returncode}: {res.stderr.strip()[-300:]}")
    assert not failures, "\n".join(failures)


def test_pack_a_folder_with_a_file_name_that_is_not_utf8(tmp_path):
    folder = craft.make_folder(tmp_path / "model")
    with open(os.path.join(os.fsencode(folder), b"bad\xff.txt"), "wb") as f:
        f.write(b"x")
    res = cli("pack", folder, "-o", tmp_path / "m.wpk")
    one_error_line(res, contains="UTF-8")
    assert not (tmp_path / "m.wpk").exists()
