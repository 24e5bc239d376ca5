"""Every error path: bad input gets one clear line on stderr ("weightpack: error: ..."), exit 2 (1 when verify
finds a difference), never a traceback, never a half-written output (nothing under the target name, no
`*.partial` leftovers), never a write outside the output folder, and nothing decodes to different data
silently.

The CLI is run as a subprocess (`python -m weightpack`). Loops over hundreds of damaged files call
`weightpack.cli.main` in-process instead (same code path: main() is what the console script runs; an
exception escaping it is what would print a traceback), with a sample of the same cases as subprocesses.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch

import weightpack
from weightpack import CheckpointError, FormatError, OutputError, RecipeError, WeightpackError

import craft

WP = [sys.executable, "-m", "weightpack"]
ENV = {**os.environ, "CI": "1"}


# -- helpers -------------------------------------------------------------------------------------

def cli(*args, timeout: float = 120, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(WP + [str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                          env=ENV, cwd=cwd)


class InProc:
    """The result of `weightpack.cli.main(argv)` run in this process."""

    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def main_inproc(*args) -> InProc:
    from weightpack.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in args])
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 2
        except BaseException:  # escaped main(): the real command would print this traceback
            rc = "escaped"
            err.write(traceback.format_exc())
    return InProc(rc, out.getvalue(), err.getvalue())


def describe(res, args=()) -> str:
    return f"weightpack {' '.join(map(str, args))}: rc={res.returncode!r}\nstdout={res.stdout[-1500:]!r}\nstderr={res.stderr[-3000:]!r}"


def assert_error(res, code: int = 2, args=(), contains: str | None = None) -> None:
    """Exit `code`, exactly one line on stderr starting `weightpack: error:`, no traceback."""
    what = describe(res, args)
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout, "traceback printed\n" + what
    assert res.returncode == code, f"expected exit {code}\n" + what
    lines = res.stderr.rstrip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("weightpack: error: "), "expected one error line\n" + what
    if contains is not None:
        assert contains in res.stderr, f"expected {contains!r} in the message\n" + what


def assert_no_traceback(res, args=()) -> None:
    what = describe(res, args)
    assert res.returncode != "escaped", "exception escaped main()\n" + what
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout, "traceback printed\n" + what


def assert_verify_fails(res, codes=(1, 2), args=()) -> None:
    """verify found damage: exit 1 (or 2 for structural damage), never 'ok', no traceback."""
    assert_no_traceback(res, args)
    what = describe(res, args)
    assert res.returncode in codes, f"expected exit in {codes}\n" + what
    assert "ok:" not in res.stdout and not res.stdout.startswith("ok"), "verify printed ok\n" + what
    if res.returncode == 2:
        assert_error(res, 2, args)


def partials(folder: Path) -> list[str]:
    return [str(p) for p in Path(folder).rglob("*") if ".partial" in p.name or p.name.endswith(".old")]


def assert_unchanged(folder: Path, before: dict, what: str = "") -> None:
    after = craft.tree(folder)
    assert not partials(folder), f"leftover temporary files {partials(folder)} {what}"
    assert after == before, (f"output folder changed {what}: added {sorted(set(after) - set(before))}, "
                             f"removed {sorted(set(before) - set(after))}, "
                             f"changed {sorted(k for k in set(after) & set(before) if after[k] != before[k])}")


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tensor(idx: dict, name: str) -> dict:
    return next(t for t in idx["tensors"] if t["name"] == name)


# -- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict:
    """A small single-file checkpoint, a model folder and a sharded set, each packed."""
    d = tmp_path_factory.mktemp("base")
    single = craft.save_checkpoint(d / "single" / "model.safetensors")
    folder = craft.make_folder(d / "folder" / "model")
    shard_idx = craft.make_sharded(d / "sharded" / "model")
    out = {
        "dir": d, "single": single, "folder": folder, "sharded": shard_idx,
        "single_wpk": d / "single.wpk", "folder_wpk": d / "folder.wpk", "sharded_wpk": d / "sharded.wpk",
    }
    weightpack.pack(single, out["single_wpk"], workers=1)
    weightpack.pack(folder, out["folder_wpk"], workers=1)
    weightpack.pack(shard_idx, out["sharded_wpk"], workers=1)
    for k in ("single_wpk", "folder_wpk", "sharded_wpk"):
        os.chmod(out[k], 0o444)  # read-only: a test that damages one by mistake fails loudly
    return out


@pytest.fixture
def outdir(tmp_path) -> Path:
    d = tmp_path / "out"
    d.mkdir()
    return d


# == usage ========================================================================================

def test_no_arguments_is_a_one_line_usage_error():
    res = cli()
    assert_error(res, 2, ())


@pytest.mark.parametrize("args", [
    ["--bogus"],
    ["frobnicate"],
    ["pack"],
    ["unpack"],
    ["inspect"],
    ["verify"],
    ["pack", "x.safetensors", "--bogus"],
    ["pack", "x.safetensors", "--level", "9"],
    ["pack", "x.safetensors", "--level", "high"],
    ["pack", "x.safetensors", "--level"],
    ["pack", "x.safetensors", "-j", "0"],
    ["pack", "x.safetensors", "-j", "many"],
    ["pack", "x.safetensors", "-j", "-3"],
    ["unpack", "x.wpk", "extra", "args"],
    ["verify", "x.wpk", "--against"],
    ["inspect", "x.wpk", "--quiet-please"],
], ids=lambda a: " ".join(a) or "none")
def test_bad_flags_are_one_line_usage_errors(args):
    assert_error(cli(*args), 2, args)


# == missing / wrong input =========================================================================

@pytest.mark.parametrize("cmd", ["pack", "unpack", "inspect", "verify"])
def test_missing_input(tmp_path, outdir, cmd):
    before = craft.tree(outdir)
    missing = tmp_path / ("nope.safetensors" if cmd == "pack" else "nope.wpk")
    args = [cmd, missing] + (["-o", outdir / "x"] if cmd in ("pack", "unpack") else [])
    res = cli(*args)
    assert_error(res, 2, args)
    assert str(missing.name) in res.stderr
    assert_unchanged(outdir, before)


def test_missing_input_api(tmp_path):
    missing = tmp_path / "nope.wpk"
    for call in (lambda: weightpack.pack(tmp_path / "nope.safetensors", tmp_path / "x.wpk"),
                 lambda: weightpack.unpack(missing, tmp_path / "x"),
                 lambda: weightpack.inspect(missing),
                 lambda: weightpack.verify(missing),
                 lambda: weightpack.load(missing),
                 lambda: weightpack.open(missing)):
        with pytest.raises(WeightpackError):
            call()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_verify_against_missing_source(base):
    res = cli("verify", base["single_wpk"], "--against", base["dir"] / "nope.safetensors")
    assert_error(res, 2)


def test_verify_against_different_source_is_exit_1(base, tmp_path):
    other = craft.save_checkpoint(tmp_path / "other.safetensors", craft.small_tensors(seed=1))
    res = cli("verify", base["single_wpk"], "--against", other)
    assert_no_traceback(res)
    assert res.returncode == 1, describe(res)
    assert "ok" not in res.stdout
    rep = weightpack.verify(base["single_wpk"], against=other, workers=1)
    assert not rep.ok and rep.problems


def test_unpack_a_folder_and_pack_an_empty_folder(tmp_path, outdir):
    empty = tmp_path / "empty"
    empty.mkdir()
    before = craft.tree(outdir)
    assert_error(cli("unpack", empty, "-o", outdir / "x"), 2)
    assert_error(cli("inspect", empty), 2)
    assert_error(cli("pack", empty, "-o", outdir / "x.wpk"), 2)
    assert_unchanged(outdir, before)
    with pytest.raises(CheckpointError):
        weightpack.pack(empty, outdir / "x.wpk")


def _not_safetensors_cases():
    big = struct.pack("<Q", 2**63)
    return {
        "empty": b"",
        "three-bytes": b"abc",
        "eight-zero-bytes": b"\0" * 8,
        "text": b"This is not a model, just some text that happens to be long enough.\n" * 20,
        "random": random.Random(7).randbytes(4096),
        "header-length-huge": big + b"{}" + b"\0" * 100,
        "header-length-beyond-file": struct.pack("<Q", 5000) + b"{}" + b"\0" * 100,
        "header-not-utf8": struct.pack("<Q", 8) + b"\xff\xfe\xfd\xfc{}  ",
        "header-not-json": struct.pack("<Q", 8) + b"{{{{}}}}",
        "header-json-list": struct.pack("<Q", 8) + b"[1,2,3] ",
        "header-json-number": struct.pack("<Q", 8) + b"12345678",
        "header-nested-deep": struct.pack("<Q", 200000) + b"[" * 200000,
        "zip-file": b"PK\x03\x04" + b"\0" * 200,
    }


@pytest.mark.parametrize("case", list(_not_safetensors_cases()))
def test_not_a_safetensors_file(tmp_path, outdir, case):
    src = tmp_path / "model.safetensors"
    src.write_bytes(_not_safetensors_cases()[case])
    before = craft.tree(outdir)
    args = ["pack", src, "-o", outdir / "m.wpk"]
    assert_error(cli(*args), 2, args)
    assert_unchanged(outdir, before)
    with pytest.raises(CheckpointError):
        weightpack.pack(src, outdir / "m.wpk", workers=1)
    assert_unchanged(outdir, before)


def test_pack_a_wpk_and_unpack_a_safetensors(base, outdir):
    before = craft.tree(outdir)
    assert_error(cli("pack", base["single_wpk"], "-o", outdir / "m.wpk"), 2)
    for cmd in ("unpack", "inspect", "verify"):
        args = [cmd, base["single"]] + (["-o", outdir / "x"] if cmd == "unpack" else [])
        assert_error(cli(*args), 2, args)
    assert_unchanged(outdir, before)
    with pytest.raises(FormatError):
        weightpack.load(base["single"])


def test_truncated_safetensors(base, tmp_path, outdir):
    raw = base["single"].read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    cuts = sorted({0, 4, 7, 8, 9, 8 + n // 2, 8 + n - 1, 8 + n, 8 + n + 1, 8 + n + 100,
                   (8 + n + len(raw)) // 2, len(raw) - 64, len(raw) - 1})
    before = craft.tree(outdir)
    for cut in cuts:
        src = tmp_path / "model.safetensors"
        src.write_bytes(raw[:cut])
        args = ["pack", src, "-o", outdir / "m.wpk"]
        res = cli(*args)
        assert_error(res, 2, args + [f"(cut at {cut} of {len(raw)})"])
        assert_unchanged(outdir, before, f"(cut at {cut})")
        with pytest.raises(CheckpointError):
            weightpack.pack(src, outdir / "m.wpk", workers=1)
        # verify --against a truncated source: the source is bad input
        args = ["verify", base["single_wpk"], "--against", src, "-j", "1"]
        assert_error(cli(*args), 2, args + [f"(cut at {cut})"])


def _lying_headers():
    f32 = lambda shape, a, b: {"dtype": "F32", "shape": shape, "data_offsets": [a, b]}  # noqa: E731
    data16 = bytes(range(16))
    return {
        "offsets-beyond-file": ({"a": f32([4], 0, 16), "b": f32([4], 16, 32)}, data16),
        "offsets-far-beyond-file": ({"a": f32([4], 2**40, 2**40 + 16)}, data16),
        "offsets-beyond-u64": ({"a": f32([4], 2**64, 2**64 + 16)}, data16),
        "end-before-begin": ({"a": f32([0], 16, 0)}, data16),
        "negative-offset": ({"a": f32([4], -16, 0)}, data16),
        "shape-too-small": ({"a": f32([2], 0, 16)}, data16),
        "shape-too-big": ({"a": f32([8], 0, 16)}, data16),
        "dtype-width-wrong": ({"a": {"dtype": "F16", "shape": [4], "data_offsets": [0, 16]}}, data16),
        "shape-product-huge": ({"a": f32([2**40, 2**40], 0, 16)}, data16),
        "shape-negative": ({"a": f32([-4], 0, 16)}, data16),
        "shape-float": ({"a": f32([4.0], 0, 16)}, data16),
        "shape-not-list": ({"a": f32("4", 0, 16)}, data16),
        "offsets-strings": ({"a": f32([4], "0", "16")}, data16),
        "offsets-three": ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8, 16]}}, data16),
        "overlap": ({"a": f32([4], 0, 16), "b": f32([2], 8, 16)}, data16),
        "gap": ({"a": f32([2], 0, 8), "b": f32([1], 12, 16)}, data16),
        "trailing-bytes": ({"a": f32([2], 0, 8)}, data16),
        "unknown-dtype": ({"a": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, data16),
        "missing-dtype": ({"a": {"shape": [4], "data_offsets": [0, 16]}}, data16),
        "extra-key": ({"a": {**f32([4], 0, 16), "zzz": 1}}, data16),
        "entry-not-object": ({"a": [1, 2, 3]}, data16),
        "metadata-not-strings": ({"__metadata__": {"k": 5}, "a": f32([4], 0, 16)}, data16),
        "metadata-not-object": ({"__metadata__": "x", "a": f32([4], 0, 16)}, data16),
    }


@pytest.mark.parametrize("case", list(_lying_headers()))
def test_safetensors_header_lies(tmp_path, outdir, case):
    header, data = _lying_headers()[case]
    src = craft.raw_safetensors(tmp_path / "model.safetensors", header, data)
    before = craft.tree(outdir)
    args = ["pack", src, "-o", outdir / "m.wpk"]
    assert_error(cli(*args), 2, args)
    assert_unchanged(outdir, before)
    with pytest.raises(CheckpointError):
        weightpack.pack(src, outdir / "m.wpk", workers=1)


def test_bad_safetensors_inside_a_folder(tmp_path, outdir):
    folder = craft.make_folder(tmp_path / "model")
    craft.raw_safetensors(folder / "extra.safetensors", {"a": {"dtype": "F32", "shape": [4],
                                                               "data_offsets": [0, 64]}}, b"\0" * 16)
    before = craft.tree(outdir)
    res = cli("pack", folder, "-o", outdir / "m.wpk")
    assert_error(res, 2)
    assert "extra.safetensors" in res.stderr
    assert_unchanged(outdir, before)


# -- sharded sets --------------------------------------------------------------------------------

def _shard_cases(folder: Path, outside: Path) -> dict:
    idx = json.loads((folder / "model.safetensors.index.json").read_text())
    wm = idx["weight_map"]
    first = next(iter(wm))
    return {
        "index-not-json": "{not json",
        "index-not-utf8": b"\xff\xfe{}",
        "index-list": "[1, 2]",
        "no-weight-map": json.dumps({"metadata": {}}),
        "weight-map-list": json.dumps({"weight_map": [1, 2]}),
        "weight-map-values-not-strings": json.dumps({"weight_map": {first: 5}}),
        "missing-shard": json.dumps({"weight_map": {**wm, first: "model-00009-of-00009.safetensors"}}),
        "tensor-in-wrong-shard": json.dumps({"weight_map": {k: sorted(set(wm.values()))[0] for k in wm}}),
        "tensor-not-in-any-shard": json.dumps({"weight_map": {**wm, "ghost.weight": wm[first]}}),
        "shard-dotdot": json.dumps({"weight_map": {**wm, first: "../outside/evil.safetensors"}}),
        "shard-absolute": json.dumps({"weight_map": {**wm, first: str(outside / "evil.safetensors")}}),
        "shard-backslash": json.dumps({"weight_map": {**wm, first: "..\\outside\\evil.safetensors"}}),
        "shard-empty-component": json.dumps({"weight_map": {**wm, first: "sub//evil.safetensors"}}),
        "shard-dot-component": json.dumps({"weight_map": {**wm, first: "./" + wm[first]}}),
        "shard-empty-name": json.dumps({"weight_map": {**wm, first: ""}}),
    }


@pytest.mark.parametrize("case", [
    "index-not-json", "index-not-utf8", "index-list", "no-weight-map", "weight-map-list",
    "weight-map-values-not-strings", "missing-shard", "tensor-in-wrong-shard", "tensor-not-in-any-shard",
    "shard-dotdot", "shard-absolute", "shard-backslash", "shard-empty-component", "shard-dot-component",
    "shard-empty-name"])
def test_bad_sharded_index(tmp_path, outdir, case):
    folder = tmp_path / "model"
    idx = craft.make_sharded(folder)
    outside = tmp_path / "outside"
    # A valid shard outside the checkpoint folder: a hostile index must not pull it in.
    craft.save_checkpoint(outside / "evil.safetensors", {"position_ids": torch.zeros(1, 128, dtype=torch.int64)})
    (folder / "sub").mkdir()
    shutil.copy(outside / "evil.safetensors", folder / "sub" / "evil.safetensors")
    content = _shard_cases(folder, outside)[case]
    if isinstance(content, str):
        content = content.encode()
    idx.write_bytes(content)
    before = craft.tree(outdir)
    args = ["pack", idx, "-o", outdir / "m.wpk"]
    assert_error(cli(*args), 2, args)
    assert_unchanged(outdir, before)
    with pytest.raises(CheckpointError):
        weightpack.pack(idx, outdir / "m.wpk", workers=1)
    # The same index inside a model folder
    args = ["pack", folder, "-o", outdir / "m.wpk"]
    assert_error(cli(*args), 2, args)
    assert_unchanged(outdir, before)


# == truncated containers ==========================================================================

def _truncation_positions(path: Path, data_samples: int, seed: int) -> list[int]:
    c = craft.read_container(path)
    size = c.size
    rng = random.Random(seed)
    pos = set(range(0, 17)) | set(range(max(0, c.index_offset - 64), size))
    pos |= set(rng.sample(range(17, c.index_offset), min(data_samples, c.index_offset - 17)))
    return sorted(pos)


def test_truncated_wpk_every_structural_position(base, tmp_path, outdir):
    """Cut the single-file container at every byte of the header, index and trailer region and at a sample
    across the data: unpack, inspect and verify all fail with exit 2 and one line, writing nothing."""
    src = base["single_wpk"]
    raw = src.read_bytes()
    bad = tmp_path / "cut.wpk"
    before = craft.tree(outdir)
    failures = []
    for n in _truncation_positions(src, 80, seed=1):
        bad.write_bytes(raw[:n])
        for args in (["unpack", bad, "-o", outdir / "restored.safetensors", "-j", "1"],
                     ["inspect", bad], ["verify", bad, "-j", "1"]):
            res = main_inproc(*args)
            try:
                assert_error(res, 2, args)
            except AssertionError as e:
                failures.append(f"cut at {n}/{len(raw)}: {e}")
        if craft.tree(outdir) != before or partials(outdir):
            failures.append(f"cut at {n}: output folder changed: {craft.tree(outdir)}")
            shutil.rmtree(outdir)
            outdir.mkdir()
    assert not failures, f"{len(failures)} failures, first ones:\n" + "\n".join(failures[:5])


def test_truncated_wpk_folder_container(base, tmp_path, outdir):
    src = base["folder_wpk"]
    raw = src.read_bytes()
    bad = tmp_path / "cut.wpk"
    before = craft.tree(outdir)
    rng = random.Random(2)
    failures = []
    positions = sorted(set(rng.sample(range(len(raw)), 150)) | {0, 15, 16, len(raw) - 32, len(raw) - 1})
    for n in positions:
        bad.write_bytes(raw[:n])
        for args in (["unpack", bad, "-o", outdir / "restored", "-j", "1"], ["verify", bad, "-j", "1"]):
            res = main_inproc(*args)
            try:
                assert_error(res, 2, args)
            except AssertionError as e:
                failures.append(f"cut at {n}/{len(raw)}: {e}")
        if craft.tree(outdir) != before or partials(outdir):
            failures.append(f"cut at {n}: output folder changed")
            shutil.rmtree(outdir)
            outdir.mkdir()
        if n % 7 == 0:
            with pytest.raises(FormatError):
                weightpack.load(bad, workers=1)
    assert not failures, f"{len(failures)} failures, first ones:\n" + "\n".join(failures[:5])


def test_truncated_wpk_subprocess_sample(base, tmp_path, outdir):
    raw = base["folder_wpk"].read_bytes()
    c = craft.read_container(base["folder_wpk"])
    bad = tmp_path / "cut.wpk"
    before = craft.tree(outdir)
    for n in (0, 10, 16, 1000, c.index_offset, c.index_offset + 5, len(raw) - 32, len(raw) - 1):
        bad.write_bytes(raw[:n])
        for args in (["unpack", bad, "-o", outdir / "restored"], ["inspect", bad], ["verify", bad]):
            assert_error(cli(*args), 2, args + [f"(cut at {n})"])
        assert_unchanged(outdir, before, f"(cut at {n})")


def test_wpk_with_bytes_appended(base, tmp_path, outdir):
    bad = tmp_path / "long.wpk"
    for extra in (b"\0", b"\0" * 64, base["single_wpk"].read_bytes()[-32:] + b"x"):
        bad.write_bytes(base["single_wpk"].read_bytes() + extra)
        for args in (["unpack", bad, "-o", outdir / "r.safetensors"], ["inspect", bad], ["verify", bad]):
            assert_error(cli(*args), 2, args)
        assert list(outdir.iterdir()) == []


# == flipped bits ==================================================================================

def _restored_equal(restored: Path, original_folder: Path) -> bool:
    return craft.tree(restored) == craft.tree(original_folder)


def _check_flip(src_wpk: Path, original_folder: Path, bad: Path, outdir: Path, kind: str, label: str,
                failures: list) -> None:
    """One damaged container: unpack must fail (exit 2, nothing written) or restore bit-exactly, and the
    latter only where the damage is in zero padding; verify must never say ok unless it is padding."""
    target = outdir / "restored"
    res = main_inproc("unpack", bad, "-o", target, "-j", "1")
    try:
        assert_no_traceback(res)
        if res.returncode == 0:
            if not _restored_equal(target, original_folder):
                failures.append(f"{label} ({kind}): unpack SILENTLY restored different data")
            elif kind != "padding":
                failures.append(f"{label} ({kind}): unpack accepted damage outside padding (data still exact)")
            shutil.rmtree(target)
        else:
            assert_error(res, 2)
            if craft.tree(outdir) != {} or partials(outdir):
                failures.append(f"{label} ({kind}): unpack failed but left {craft.tree(outdir)}")
                shutil.rmtree(outdir)
                outdir.mkdir()
    except AssertionError as e:
        failures.append(f"{label} ({kind}): unpack: {e}")
    res = main_inproc("verify", bad, "-j", "1")
    try:
        assert_no_traceback(res)
        if res.returncode == 0:
            if kind != "padding":
                failures.append(f"{label} ({kind}): verify said ok: {res.stdout.strip()!r}")
        elif kind == "blob":
            assert_verify_fails(res, codes=(1,))
        else:
            assert_verify_fails(res, codes=(1, 2))
    except AssertionError as e:
        failures.append(f"{label} ({kind}): verify: {e}")


def test_random_bit_flips_never_decode_silently(base, tmp_path, outdir):
    """200 random bit positions across a small folder container (blobs, padding, index, header, trailer)."""
    src = base["folder_wpk"]
    regs = craft.regions(src)
    size = src.stat().st_size
    rng = random.Random(12345)
    bits = rng.sample(range(size * 8), 200)
    bad = tmp_path / "flip.wpk"
    failures: list[str] = []
    kinds = {}
    for bit in bits:
        kind = craft.region_of(regs, bit // 8)
        kinds[kind] = kinds.get(kind, 0) + 1
        craft.flip_bit(src, bad, bit)
        _check_flip(src, base["folder"], bad, outdir, kind, f"bit {bit} (byte {bit // 8})", failures)
    assert kinds.get("blob", 0) > 50, kinds
    assert not failures, f"{len(failures)} of {len(bits)} flips mishandled, e.g.:\n" + "\n".join(failures[:8])


def test_bit_flip_in_every_blob(base, tmp_path, outdir):
    """One flipped bit in the middle, start and end of every blob (chunks, side information, carried
    files): unpack exits 2, verify exits 1, load raises FormatError."""
    src = base["folder_wpk"]
    c = craft.read_container(src)
    bad = tmp_path / "flip.wpk"
    failures: list[str] = []
    for label, ref in craft.blob_refs(c.index):
        for byte in sorted({0, ref["length"] // 2, ref["length"] - 1}):
            if ref["length"] == 0:
                continue
            bit = (ref["offset"] + byte) * 8 + (byte % 8)
            craft.flip_bit(src, bad, bit)
            _check_flip(src, base["folder"], bad, outdir, "blob", f"{label} byte {byte}", failures)
            if not label.startswith("carried"):
                try:
                    weightpack.load(bad, workers=1)
                    failures.append(f"{label} byte {byte}: load succeeded on damaged data")
                except FormatError:
                    pass
                except Exception as e:  # noqa: BLE001
                    failures.append(f"{label} byte {byte}: load raised {type(e).__name__}: {e}")
    assert not failures, "\n".join(failures[:10])


def test_bit_flips_in_data_subprocess(base, tmp_path, outdir):
    src = base["single_wpk"]
    c = craft.read_container(src)
    bad = tmp_path / "flip.wpk"
    refs = list(craft.blob_refs(c.index))
    for label, ref in refs[:4]:
        craft.flip_bit(src, bad, (ref["offset"] + ref["length"] // 3) * 8 + 5)
        args = ["unpack", bad, "-o", outdir / "r.safetensors"]
        assert_error(cli(*args), 2, args + [label])
        assert list(outdir.iterdir()) == []
        res = cli("verify", bad)
        assert_verify_fails(res, codes=(1,), args=["verify", label])
        assert "FAILED" in res.stderr


@pytest.mark.parametrize("region", ["header", "trailer"])
def test_bit_flip_in_every_bit_of_header_and_trailer(base, tmp_path, outdir, region):
    src = base["single_wpk"]
    size = src.stat().st_size
    start = 0 if region == "header" else size - 32
    length = 16 if region == "header" else 32
    bad = tmp_path / "flip.wpk"
    failures = []
    for bit in range(start * 8, (start + length) * 8):
        craft.flip_bit(src, bad, bit)
        for args in (["inspect", bad], ["unpack", bad, "-o", outdir / "r.safetensors", "-j", "1"],
                     ["verify", bad, "-j", "1"]):
            res = main_inproc(*args)
            try:
                assert_error(res, 2, args)
            except AssertionError as e:
                failures.append(f"{region} byte {bit // 8 - start} bit {bit % 8}: {str(e).splitlines()[0]} "
                                f"({args[0]} exit {res.returncode})")
        if list(outdir.iterdir()):
            shutil.rmtree(outdir)
            outdir.mkdir()
            failures.append(f"{region} bit {bit}: output written")
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures[:12])


def test_bit_flips_in_index(base, tmp_path, outdir):
    src = base["single_wpk"]
    c = craft.read_container(src)
    rng = random.Random(3)
    bad = tmp_path / "flip.wpk"
    failures = []
    ibits = range(c.index_offset * 8, (c.index_offset + c.trailer[1]) * 8)
    for bit in rng.sample(ibits, min(150, len(ibits))):
        craft.flip_bit(src, bad, bit)
        for args in (["inspect", bad], ["unpack", bad, "-o", outdir / "r.safetensors", "-j", "1"]):
            res = main_inproc(*args)
            try:
                assert_error(res, 2, args)
            except AssertionError as e:
                failures.append(f"index bit {bit}: {e}")
    assert list(outdir.iterdir()) == []
    assert not failures, "\n".join(failures[:5])


def test_corrupt_payload_with_valid_crc(base, tmp_path, outdir):
    """Damage inside blobs whose crc32 is fixed up (a hostile or unlucky file): the decoders must reject
    it cleanly (exit 2, FormatError) or restore the same bytes; never a crash, never different data."""
    src = base["folder_wpk"]
    c = craft.read_container(src)
    refs = list(craft.blob_refs(c.index))
    bad = tmp_path / "bad.wpk"
    rng = random.Random(99)
    failures = []
    want = weightpack.load(src, workers=1)
    for k, (label, ref) in enumerate(refs):
        if not ref["length"]:
            continue
        for _ in range(8):
            byte = rng.randrange(ref["length"])
            mask = 1 << rng.randrange(8)

            def pick(idx, k=k):
                return list(craft.blob_refs(idx))[k][1]

            craft.patch_blob(src, bad, pick, byte, mask)
            _check_flip(src, base["folder"], bad, outdir, "blob*", f"{label} byte {byte} mask {mask:#x}", failures)
            try:
                got = weightpack.load(bad, workers=1)
                if set(got) != set(want) or any(
                        not torch.equal(got[n].view(torch.uint8), want[n].view(torch.uint8)) for n in want):
                    failures.append(f"{label} byte {byte}: load SILENTLY returned different data")
            except WeightpackError:
                pass
            except Exception as e:  # noqa: BLE001
                failures.append(f"{label} byte {byte}: load raised {type(e).__name__}: {e}")
    # "blob*" damage is never padding: _check_flip flags a successful restore as accepted damage; here a
    # bit-exact restore is acceptable (e.g. an unused bit), so keep only the real problems.
    failures = [f for f in failures if "accepted damage outside padding" not in f and "verify said ok" not in f]
    assert not failures, f"{len(failures)} problems:\n" + "\n".join(failures[:10])


# == crafted indexes (valid crc) ===================================================================

def _shift_header(idx: dict, name: str, dtype: str, shape: list, nbytes: int) -> None:
    """Give tensor `name` a new dtype/shape/nbytes in its record and in a consistent file header."""
    t = tensor(idx, name)
    t.update(dtype=dtype, shape=shape, nbytes=nbytes)
    f = idx["files"][t["file"]]
    h = json.loads(f["header"])
    pos = 0
    for key, info in sorted(((k, v) for k, v in h.items() if k != "__metadata__"),
                            key=lambda kv: kv[1]["data_offsets"][0]):
        n = nbytes if key == name else info["data_offsets"][1] - info["data_offsets"][0]
        if key == name:
            info.update(dtype=dtype, shape=shape)
        info["data_offsets"] = [pos, pos + n]
        pos += n
    f["header"] = json.dumps(h)


def _header_edit(fn):
    def edit(idx):
        h = json.loads(idx["files"][0]["header"])
        fn(h)
        idx["files"][0]["header"] = json.dumps(h)
    return edit


E = "embed.weight"
P = "position_ids"


def _set(path_fn, value):
    def edit(idx):
        obj, key = path_fn(idx)
        obj[key] = value
    return edit


def _del(path_fn):
    def edit(idx):
        obj, key = path_fn(idx)
        del obj[key]
    return edit


def chunk0(name):
    return lambda idx: tensor(idx, name)["stream"]["chunks"][0]


def ref_of(name, key):
    return lambda idx: (chunk0(name)(idx), key)


def _crafted_cases() -> dict:
    c = {}
    # offsets / lengths outside the file
    c["chunk-offset-beyond-file"] = _set(ref_of(E, "offset"), 10**9)
    c["chunk-length-beyond-file"] = _set(ref_of(E, "length"), 10**9)
    c["chunk-offset-negative"] = _set(ref_of(E, "offset"), -64)
    c["chunk-length-negative"] = _set(ref_of(E, "length"), -1)
    c["chunk-offset-in-header"] = _set(ref_of(E, "offset"), 0)
    c["chunk-offset-overflow"] = lambda idx: chunk0(E)(idx).update(offset=2**63, length=2**63)
    c["chunk-offset-2**64"] = _set(ref_of(E, "offset"), 2**64 + 64)
    c["chunk-points-at-index"] = lambda idx: chunk0(E)(idx).update(offset=idx["_index_offset"], length=16)
    c["side-offset-beyond-file"] = lambda idx: tensor(idx, E)["stream"]["side"].update(offset=10**9)
    c["side-not-object"] = lambda idx: tensor(idx, E)["stream"].update(side=5)
    c["side-empty-object"] = lambda idx: tensor(idx, E)["stream"].update(side={})
    c["carried-offset-beyond-file"] = lambda idx: idx["carried"][0]["blob"].update(offset=10**9)
    c["carried-length-beyond-file"] = lambda idx: idx["carried"][0]["blob"].update(length=10**9)
    # sizes that do not add up, and huge ones
    c["shape-numel-not-nbytes"] = lambda idx: tensor(idx, E).update(shape=[64, 95])
    c["nbytes-not-shape"] = lambda idx: tensor(idx, E).update(nbytes=tensor(idx, E)["nbytes"] + 4)
    c["shape-and-nbytes-huge"] = lambda idx: tensor(idx, P).update(shape=[2**49], dtype="U8", nbytes=2**49)
    c["shape-dims-huge"] = lambda idx: tensor(idx, P).update(shape=[2**62, 2**62], nbytes=2**127)
    c["shape-65-dims"] = lambda idx: tensor(idx, P).update(shape=[1] * 65)
    c["huge-tensor-consistent-header"] = lambda idx: _shift_header(idx, P, "U8", [1, 2**40], 2**40)
    c["huge-tensor-one-huge-chunk"] = lambda idx: (_shift_header(idx, P, "U8", [1, 2**40], 2**40),
                                                   tensor(idx, P)["stream"]["params"].update(chunk=2**40))
    c["huge-fields-tensor"] = lambda idx: (_shift_header(idx, E, "F32", [2**20, 2**20], 2**42),
                                           tensor(idx, E)["stream"]["params"].update(chunk=2**40, block=2**20))
    c["carried-size-huge"] = lambda idx: idx["carried"][0].update(size=2**41)
    c["carried-size-negative"] = lambda idx: idx["carried"][0].update(size=-1)
    c["carried-size-wrong"] = lambda idx: idx["carried"][0].update(size=idx["carried"][0]["size"] + 1)
    c["chunk-param-huge"] = lambda idx: tensor(idx, E)["stream"]["params"].update(chunk=2**62)
    c["part-length-huge"] = lambda idx: chunk0(P)(idx).update(parts=[["data", "zstd", 10**12]])
    # wrong JSON types
    c["index-top-list"] = "REPLACE:[1,2,3]"
    c["index-top-null"] = "REPLACE:null"
    c["index-not-json"] = "TEXT:this is not json"
    c["index-not-utf8"] = "BYTES:\xff\xfe\xfd"
    c["index-deeply-nested"] = "TEXT:" + "[" * 100000
    c["index-empty"] = "TEXT:"
    c["format-wrong"] = lambda idx: idx.update(format="zip")
    c["format-missing"] = lambda idx: idx.pop("format")
    c["files-object"] = lambda idx: idx.update(files={})
    c["files-missing"] = lambda idx: idx.pop("files")
    c["file-entry-string"] = lambda idx: idx.update(files=["model.safetensors"])
    c["file-name-int"] = lambda idx: idx["files"][0].update(name=5)
    c["file-header-object"] = lambda idx: idx["files"][0].update(header={})
    c["tensors-object"] = lambda idx: idx.update(tensors={})
    c["tensors-missing"] = lambda idx: idx.pop("tensors")
    c["tensor-entry-list"] = lambda idx: idx["tensors"].__setitem__(0, [1, 2])
    c["carried-missing"] = lambda idx: idx.pop("carried")
    c["carried-null"] = lambda idx: idx.update(carried=None)
    c["carried-entry-string"] = lambda idx: idx["carried"].__setitem__(0, "config.json")
    c["carried-size-string"] = lambda idx: idx["carried"][0].update(size="351")
    c["source-int"] = lambda idx: idx.update(source=5)
    c["source-list"] = lambda idx: idx.update(source=["file"])
    c["source-missing"] = lambda idx: idx.pop("source")
    c["recipe-list"] = lambda idx: idx.update(recipe=[1])
    c["version-string"] = lambda idx: idx.update(version="one")
    c["tensor-name-int"] = lambda idx: tensor(idx, E).update(name=7)
    c["tensor-file-string"] = lambda idx: tensor(idx, E).update(file="0")
    c["tensor-file-bool"] = lambda idx: tensor(idx, E).update(file=False)
    c["tensor-file-out-of-range"] = lambda idx: tensor(idx, E).update(file=5)
    c["tensor-file-negative"] = lambda idx: tensor(idx, E).update(file=-1)
    c["tensor-dtype-int"] = lambda idx: tensor(idx, E).update(dtype=32)
    c["tensor-dtype-unknown"] = lambda idx: tensor(idx, E).update(dtype="F128")
    c["tensor-shape-string"] = lambda idx: tensor(idx, E).update(shape="64x96")
    c["tensor-shape-float"] = lambda idx: tensor(idx, E).update(shape=[64.0, 96])
    c["tensor-shape-negative"] = lambda idx: tensor(idx, E).update(shape=[-64, -96])
    c["tensor-nbytes-bool"] = lambda idx: tensor(idx, P).update(nbytes=True)
    c["tensor-nbytes-float"] = lambda idx: tensor(idx, E).update(nbytes=24576.0)
    c["tensor-sha-int"] = lambda idx: tensor(idx, E).update(sha256=5)
    c["tensor-stages-unknown"] = lambda idx: tensor(idx, E).update(stages=["quantize"])
    c["tensor-stages-object"] = lambda idx: tensor(idx, E).update(stages={})
    c["stream-list"] = lambda idx: tensor(idx, E).update(stream=[])
    c["stream-missing"] = lambda idx: tensor(idx, E).pop("stream")
    c["params-list"] = lambda idx: tensor(idx, E)["stream"].update(params=[])
    c["params-empty"] = lambda idx: tensor(idx, E)["stream"].update(params={})
    c["chunks-object"] = lambda idx: tensor(idx, E)["stream"].update(chunks={})
    c["chunk-entry-int"] = lambda idx: tensor(idx, E)["stream"]["chunks"].__setitem__(0, 5)
    c["chunk-crc-string"] = lambda idx: chunk0(E)(idx).update(crc32="abc")
    c["chunk-raw-crc-missing"] = lambda idx: chunk0(E)(idx).pop("raw_crc")
    c["chunk-parts-ints"] = lambda idx: chunk0(P)(idx).update(parts=[5])
    c["chunk-parts-strings"] = lambda idx: chunk0(E)(idx).update(parts=["head", "tail"])
    c["chunk-parts-object"] = lambda idx: chunk0(E)(idx).update(parts={"head": 1})
    c["chunk-parts-negative"] = lambda idx: chunk0(E)(idx).update(parts=[["head", "ans", -8], ["tail", "raw", 20352]])
    c["params-chunk-string"] = lambda idx: tensor(idx, E)["stream"]["params"].update(chunk="262080")
    c["params-chunk-zero"] = lambda idx: tensor(idx, E)["stream"]["params"].update(chunk=0)
    c["params-block-zero"] = lambda idx: tensor(idx, E)["stream"]["params"].update(block=0)
    c["params-block-string"] = lambda idx: tensor(idx, E)["stream"]["params"].update(block="96")
    c["params-contexts-huge"] = lambda idx: tensor(idx, E)["stream"]["params"].update(contexts=99)
    c["params-contexts-string"] = lambda idx: tensor(idx, E)["stream"]["params"].update(contexts="1")
    c["params-alphabet-zero"] = lambda idx: tensor(idx, E)["stream"]["params"].update(alphabet=0)
    c["params-alphabet-huge"] = lambda idx: tensor(idx, E)["stream"]["params"].update(alphabet=2**40)
    c["params-layout-string"] = lambda idx: tensor(idx, E)["stream"]["params"].update(layout="32,1,10,21")
    c["params-layout-object"] = lambda idx: tensor(idx, E)["stream"]["params"].update(layout={"bits": 32})
    c["params-layout-short"] = lambda idx: tensor(idx, E)["stream"]["params"].update(layout=[32, 1, 10])
    c["params-layout-infinity"] = lambda idx: tensor(idx, E)["stream"]["params"].update(
        layout=[float("inf"), 1, 10, 21])
    c["params-layout-nan"] = lambda idx: tensor(idx, E)["stream"]["params"].update(layout=[float("nan"), 1, 10, 21])
    c["params-layout-wrong-width"] = lambda idx: tensor(idx, E)["stream"]["params"].update(layout=[16, 1, 10, 5])
    c["params-layout-nulls"] = lambda idx: tensor(idx, E)["stream"]["params"].update(layout=[None] * 4)
    # unknown codec names
    c["stream-codec-unknown"] = lambda idx: tensor(idx, E)["stream"]["params"].update(codec="lzma")
    c["stream-codec-int"] = lambda idx: tensor(idx, E)["stream"]["params"].update(codec=1)
    c["chunk-codec-unknown"] = lambda idx: chunk0(E)(idx).update(codec="brotli")
    c["chunk-codec-bytes-codec-unknown"] = lambda idx: chunk0(P)(idx).update(codec="brotli")
    c["chunk-codec-int"] = lambda idx: chunk0(E)(idx).update(codec=3)
    c["part-codec-unknown"] = lambda idx: chunk0(P)(idx).update(parts=[["data", "xz", chunk0(P)(idx)["parts"][0][2]]])
    c["head-codec-unknown"] = lambda idx: chunk0(E)(idx)["parts"][0].__setitem__(1, "huffman")
    c["tail-codec-unknown"] = lambda idx: chunk0(E)(idx)["parts"][1].__setitem__(1, "lz4")
    c["part-name-unknown"] = lambda idx: chunk0(E)(idx)["parts"][1].__setitem__(0, "extra")
    c["carried-codec-unknown"] = lambda idx: idx["carried"][0].update(codec="brotli")
    c["carried-codec-raw-but-zstd"] = lambda idx: idx["carried"][0].update(codec="raw")
    # chunk counts
    c["chunks-empty"] = lambda idx: tensor(idx, E)["stream"].update(chunks=[])
    c["chunks-duplicated"] = lambda idx: tensor(idx, E)["stream"]["chunks"].append(chunk0(E)(idx))
    c["chunks-bytes-codec-extra"] = lambda idx: tensor(idx, P)["stream"]["chunks"].append(chunk0(P)(idx))
    c["chunk-swapped-between-tensors"] = lambda idx: tensor(idx, E)["stream"].update(
        chunks=tensor(idx, "layer.0.attn.weight")["stream"]["chunks"])
    # the safetensors header in the index disagrees with the tensor records
    c["header-dtype-differs"] = _header_edit(lambda h: h[E].update(dtype="I32"))
    c["header-shape-differs"] = _header_edit(lambda h: h[E].update(shape=[96, 64]))
    c["header-extra-tensor"] = _header_edit(lambda h: h.update(extra={"dtype": "F32", "shape": [0],
                                                                      "data_offsets": [0, 0]}))
    c["header-missing-tensor"] = _header_edit(lambda h: h.pop("layer.0.attn.bias"))
    c["header-renamed-tensor"] = _header_edit(lambda h: h.update(renamed=h.pop(E)))
    c["header-offsets-gap"] = _header_edit(lambda h: h[P].update(data_offsets=[8, 1032]))
    c["header-offsets-beyond"] = _header_edit(lambda h: h["layer.0.attn.bias"].update(
        data_offsets=[h["layer.0.attn.bias"]["data_offsets"][0], 10**6]))
    c["header-not-json"] = lambda idx: idx["files"][0].update(header="{not json")
    c["header-json-list"] = lambda idx: idx["files"][0].update(header="[]")
    c["header-metadata-int"] = _header_edit(lambda h: h.update(__metadata__={"format": 5}))
    c["header-dtype-unknown"] = _header_edit(lambda h: h[E].update(dtype="F128"))
    c["record-dtype-differs"] = lambda idx: tensor(idx, "layer.0.attn.bias").update(dtype="BF16")
    # duplicates
    c["tensor-listed-twice"] = lambda idx: idx["tensors"].append(tensor(idx, E))
    c["file-listed-twice"] = lambda idx: idx["files"].append(idx["files"][0])
    c["carried-same-name-as-file"] = lambda idx: idx["carried"][0].update(name=idx["files"][0]["name"])
    c["carried-listed-twice"] = lambda idx: idx["carried"].append(idx["carried"][0])
    return c


CRAFTED = _crafted_cases()


def _make_crafted(src: Path, dst: Path, case: str) -> None:
    edit = CRAFTED[case]
    c = craft.read_container(src)
    if isinstance(edit, str):
        kind, _, text = edit.partition(":")
        body = text.encode("latin-1") if kind == "BYTES" else text.encode("utf-8")
        craft.write_container(dst, c.data, index_text=body, compress=c.compressed)
        return
    idx = c.copy_index()
    idx["_index_offset"] = c.index_offset
    edit(idx)
    idx.pop("_index_offset", None)
    craft.write_container(dst, c.data, idx, compress=c.compressed)


@pytest.mark.parametrize("case", list(CRAFTED))
def test_crafted_index(base, tmp_path, outdir, case):
    """A hand-edited index with a valid crc32: unpack exits 2 with one line and writes nothing; verify
    never says ok; inspect never crashes; load raises a WeightpackError."""
    bad = tmp_path / "crafted.wpk"
    _make_crafted(base["folder_wpk"], bad, case)
    before = craft.tree(outdir)
    args = ["unpack", bad, "-o", outdir / "restored", "-j", "1"]
    assert_error(cli(*args), 2, args)
    assert_unchanged(outdir, before)
    assert_verify_fails(main_inproc("verify", bad, "-j", "1"), codes=(1, 2), args=["verify", case])
    res = main_inproc("inspect", bad)
    assert_no_traceback(res, ["inspect", case])
    if res.returncode != 0:
        assert_error(res, 2, ["inspect", case])
    try:
        weightpack.load(bad, workers=1)
    except WeightpackError:
        pass
    else:
        # load reads tensors only: a damaged carried file may go unnoticed
        if not case.startswith("carried"):
            pytest.fail(f"load accepted crafted index {case}")


def test_crafted_index_on_single_file_container(base, tmp_path, outdir):
    """A sample of the crafted cases on a single-file container (unpack writes one file, not a folder)."""
    bad = tmp_path / "crafted.wpk"
    failures = []
    for case in CRAFTED:
        if case.startswith("carried"):
            continue
        _make_crafted(base["single_wpk"], bad, case)
        res = main_inproc("unpack", bad, "-o", outdir / "restored.safetensors", "-j", "1")
        try:
            assert_error(res, 2, ["unpack", case])
        except AssertionError as e:
            failures.append(f"{case}: {str(e).splitlines()[0]}: {res.stderr.strip().splitlines()[-1:]}")
        if list(outdir.iterdir()):
            failures.append(f"{case}: left {[p.name for p in outdir.iterdir()]}")
            shutil.rmtree(outdir)
            outdir.mkdir()
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures)


def test_crafted_sharded_record_in_wrong_file(base, tmp_path, outdir):
    """A tensor record moved to the other shard: both shards' headers disagree with the records."""
    bad = tmp_path / "crafted.wpk"

    def edit(idx):
        t = idx["tensors"][0]
        t["file"] = 1 - t["file"]

    craft.rewrite_index(base["sharded_wpk"], bad, edit)
    assert_error(cli("unpack", bad, "-o", outdir / "restored"), 2)
    assert list(outdir.iterdir()) == []
    with pytest.raises(FormatError):
        weightpack.load(bad, workers=1)


@pytest.mark.parametrize("versions", [((2, 0), (2, 0)), ((1, 0), (2, 0)), ((1, 0), (1, 1)), ((0, 9), (0, 9)),
                                      ((65535, 0), (65535, 0))])
def test_container_version(base, tmp_path, outdir, versions):
    head, trail = versions
    c = craft.read_container(base["single_wpk"])
    bad = tmp_path / "v.wpk"
    craft.write_container(bad, c.data, c.index, compress=c.compressed, version=head, trailer_version=trail)
    for args in (["unpack", bad, "-o", outdir / "r.safetensors"], ["inspect", bad], ["verify", bad]):
        res = cli(*args)
        assert_error(res, 2, args)
    if head == trail:
        assert "version" in res.stderr
    assert list(outdir.iterdir()) == []


def test_compressed_index_declaring_a_huge_size(base, tmp_path):
    c = craft.read_container(base["single_wpk"])
    if not c.compressed:
        pytest.skip("this build stores the index as plain JSON")
    bad = tmp_path / "bomb.wpk"
    for size in (2**40, 2**62, 2**30 + 1):
        craft.write_container(bad, c.data, index_raw=craft.zstd_frame_declaring(size))
        for args in (["inspect", bad], ["verify", bad]):
            assert_error(cli(*args), 2, args)
        with pytest.raises(FormatError):
            weightpack.inspect(bad)


def test_carried_zstd_frame_declaring_a_huge_size(base, tmp_path, outdir):
    """A carried file whose recorded size (within the allowed range) and zstd frame both claim 1 TiB, with
    3 bytes of data: must be rejected without trying to allocate 1 TiB."""
    c = craft.read_container(base["folder_wpk"])
    frame = craft.zstd_frame_declaring(2**40)
    data, ref = craft.append_blob(c.data, frame)
    idx = c.copy_index()
    idx["carried"][0].update(size=2**40, codec="zstd", blob=ref)
    bad = tmp_path / "bomb.wpk"
    craft.write_container(bad, data, idx, compress=c.compressed)
    args = ["unpack", bad, "-o", outdir / "restored"]
    res = cli(*args)
    assert_error(res, 2, args)
    assert "memory" not in res.stderr, "a 3-byte blob must not be reported as running out of memory: " + res.stderr
    assert list(outdir.iterdir()) == []
    assert_verify_fails(cli("verify", bad))
    with pytest.raises(FormatError):
        weightpack.unpack(bad, outdir / "restored", workers=1)
    assert list(outdir.iterdir()) == []


# == hostile names =================================================================================

HOSTILE = ["../evil.json", "../../evil.json", "sub/../../evil.json", "..", ".", "", "/ABS/evil.json",
           "a\\..\\..\\evil.json", "..\\evil.json", "C:\\evil.json", "a//b.json", "a/./b.json", "./a.json",
           "sub/", "/", "a/../b.json", "nul\x00.json", "sub/..", "~/../evil.json/.."]


def _hostile(name: str, tmp_path: Path) -> str:
    return name.replace("/ABS", str(tmp_path / "abs"))


@pytest.mark.parametrize("where", ["carried", "file", "shard"])
def test_hostile_names_are_refused(base, tmp_path, where):
    """Names with '..', absolute paths, backslashes or empty components in the index: unpack refuses
    (exit 2) and writes nothing anywhere: not in the output folder, not beside it, not at an absolute path."""
    src = {"carried": base["folder_wpk"], "file": base["folder_wpk"], "shard": base["sharded_wpk"]}[where]
    work = tmp_path / "w"
    outdir = work / "a" / "b" / "out"
    outdir.mkdir(parents=True)
    (tmp_path / "abs").mkdir()
    bad = tmp_path / "hostile.wpk"
    failures = []
    for raw_name in HOSTILE:
        name = _hostile(raw_name, tmp_path)

        def edit(idx):
            if where == "carried":
                idx["carried"][0]["name"] = name
            elif where == "file":
                idx["files"][0]["name"] = name
            else:
                idx["files"][-1]["name"] = name

        craft.rewrite_index(src, bad, edit)
        before = craft.tree(tmp_path)
        args = ["unpack", bad, "-o", outdir / "restored"]
        res = cli(*args)
        try:
            assert_error(res, 2, args + [repr(name)])
        except AssertionError as e:
            failures.append(f"{name!r}: {str(e).splitlines()[0]} {res.stderr.strip()[-200:]!r}")
        after = craft.tree(tmp_path)
        if after != before:
            failures.append(f"{name!r}: files changed: {sorted(set(after) ^ set(before))}")
            shutil.rmtree(outdir, ignore_errors=True)
            outdir.mkdir(parents=True, exist_ok=True)
        for p in (Path("/evil.json"), tmp_path / "abs" / "evil.json", work / "evil.json", work / "a" / "evil.json"):
            if p.exists():
                failures.append(f"{name!r}: wrote {p}")
                p.unlink()
        try:
            weightpack.unpack(bad, outdir / "restored2", workers=1)
            failures.append(f"{name!r}: API unpack accepted it")
        except FormatError:
            pass
        except Exception as e:  # noqa: BLE001
            failures.append(f"{name!r}: API unpack raised {type(e).__name__}: {e}")
    assert not failures, "\n".join(failures)


def test_hostile_single_file_name(base, tmp_path):
    """A single-file container whose file name climbs out or is absolute: default and explicit outputs."""
    work = tmp_path / "w"
    (work / "deep").mkdir(parents=True)
    bad = work / "deep" / "hostile.wpk"
    for raw_name in ["../model.safetensors", "/ABS/model.safetensors", "..\\model.safetensors", "",
                     "deep/../../model.safetensors"]:
        name = _hostile(raw_name, tmp_path)
        craft.rewrite_index(base["single_wpk"], bad, lambda idx: idx["files"][0].update(name=name))
        before = craft.tree(tmp_path)
        assert_error(cli("unpack", bad), 2, ["unpack", repr(name)])
        assert_error(cli("unpack", bad, "-o", str(work) + "/"), 2, ["unpack -o dir/", repr(name)])
        assert craft.tree(tmp_path) == before, name
        assert not (tmp_path / "model.safetensors").exists() and not (work / "model.safetensors").exists()


def test_name_collisions_between_files_and_folders(base, tmp_path, outdir):
    """A carried file whose path runs through a restored file ('model.safetensors/x'), and a carried
    file that is the parent of another: a clean error, nothing written."""
    bad = tmp_path / "c.wpk"
    cases = {
        "through-a-file": lambda idx: idx["carried"][0].update(name="model.safetensors/config.json"),
        "parent-of-another": lambda idx: idx["carried"][0].update(name="tokenizer"),
        "child-of-another": lambda idx: (idx["carried"][0].update(name="tokenizer/vocab.txt/x"),),
    }
    for case, edit in cases.items():
        craft.rewrite_index(base["folder_wpk"], bad, edit)
        args = ["unpack", bad, "-o", outdir / "restored"]
        res = cli(*args)
        assert_error(res, 2, args + [case])
        assert list(outdir.iterdir()) == [], case


# == symlinks in the output location ===============================================================

def test_existing_symlink_at_single_file_target(base, tmp_path):
    out = tmp_path / "out"
    outside = tmp_path / "outside"
    out.mkdir()
    outside.mkdir()
    victim = outside / "victim.safetensors"
    victim.write_bytes(b"precious")
    (out / "model.safetensors").symlink_to(victim)
    res = cli("unpack", base["single_wpk"], "-o", str(out) + "/")
    assert_error(res, 2)
    assert victim.read_bytes() == b"precious"
    res = cli("unpack", base["single_wpk"], "-o", str(out) + "/", "--force")
    assert res.returncode == 0, describe(res)
    assert victim.read_bytes() == b"precious", "--force wrote through the link"
    assert not (out / "model.safetensors").is_symlink()
    assert sha(out / "model.safetensors") == sha(base["single"])
    assert not partials(out)


def test_dangling_symlink_at_single_file_target(base, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    target = tmp_path / "outside" / "created.safetensors"
    (tmp_path / "outside").mkdir()
    (out / "model.safetensors").symlink_to(target)
    res = cli("unpack", base["single_wpk"], "-o", str(out) + "/")
    assert_no_traceback(res)
    assert not target.exists(), "unpack followed a dangling link out of the output folder"
    if res.returncode == 0:
        assert not (out / "model.safetensors").is_symlink()
        assert sha(out / "model.safetensors") == sha(base["single"])
    else:
        assert_error(res, 2)
    assert not partials(out)


def test_symlinked_subfolder_inside_output(base, tmp_path):
    """A container whose single file lives in a subfolder, restored into a folder where that subfolder is
    a pre-existing link to somewhere else: nothing may be written through the link."""
    out = tmp_path / "out"
    outside = tmp_path / "outside"
    out.mkdir()
    outside.mkdir()
    (out / "sub").symlink_to(outside, target_is_directory=True)
    bad = tmp_path / "sub.wpk"
    craft.rewrite_index(base["single_wpk"], bad, lambda idx: idx["files"][0].update(name="sub/model.safetensors"))
    res = cli("unpack", bad, "-o", str(out) + "/")
    assert_no_traceback(res)
    assert list(outside.iterdir()) == [], f"unpack wrote through a symlink: {list(outside.iterdir())} ({describe(res)})"
    # Same for a folder container restored with --force over a folder holding a link.
    res = cli("unpack", base["folder_wpk"], "-o", out, "--force")
    assert_no_traceback(res)
    assert list(outside.iterdir()) == [], f"unpack --force wrote through a symlink: {list(outside.iterdir())}"


def test_output_folder_is_a_symlink(base, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    link = tmp_path / "restored"
    link.symlink_to(outside, target_is_directory=True)
    res = cli("unpack", base["folder_wpk"], "-o", link)
    assert_error(res, 2)  # not empty, no --force
    assert craft.tree(outside) == {"keep.txt": craft.tree(outside)["keep.txt"]}
    res = cli("unpack", base["folder_wpk"], "-o", link, "--force")
    assert_no_traceback(res)
    assert sorted(p.name for p in outside.iterdir()) == ["keep.txt"], "--force replaced the link's target contents"
    assert (outside / "keep.txt").read_text() == "keep"


def test_pack_output_is_a_symlink(base, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.wpk"
    victim.write_bytes(b"precious")
    (out / "m.wpk").symlink_to(victim)
    assert_error(cli("pack", base["single"], "-o", out / "m.wpk"), 2)
    assert victim.read_bytes() == b"precious"
    res = cli("pack", base["single"], "-o", out / "m.wpk", "--force")
    assert res.returncode == 0, describe(res)
    assert victim.read_bytes() == b"precious", "pack --force wrote through the link"
    assert not (out / "m.wpk").is_symlink()
    assert weightpack.verify(out / "m.wpk", workers=1).ok


# == existing and unwritable outputs ===============================================================

def test_pack_output_exists(base, tmp_path):
    out = tmp_path / "m.wpk"
    out.write_bytes(b"original")
    res = cli("pack", base["single"], "-o", out)
    assert_error(res, 2, contains="--force")
    assert out.read_bytes() == b"original"
    assert not partials(tmp_path)
    with pytest.raises(OutputError):
        weightpack.pack(base["single"], out, workers=1)
    res = cli("pack", base["single"], "-o", out, "--force")
    assert res.returncode == 0, describe(res)
    assert weightpack.verify(out, against=base["single"], workers=1).ok
    assert not partials(tmp_path)


def test_pack_default_output_exists(base, tmp_path):
    src = tmp_path / "model.safetensors"
    shutil.copy(base["single"], src)
    (tmp_path / "model.wpk").write_bytes(b"original")
    assert_error(cli("pack", src), 2)
    assert (tmp_path / "model.wpk").read_bytes() == b"original"
    assert not partials(tmp_path)


def test_pack_output_is_a_folder(base, tmp_path):
    """`-o DIR` may mean "into DIR" (DIR/model.wpk) or be refused, but a folder is never replaced; and where
    the container's own name is taken by a folder, pack refuses, --force or not."""
    d = tmp_path / "out"
    d.mkdir()
    (d / "keep").write_text("keep")
    res = cli("pack", base["single"], "-o", d)
    if res.returncode == 0:
        assert sorted(p.name for p in d.iterdir()) == ["keep", "model.wpk"], describe(res)
        assert weightpack.verify(d / "model.wpk", against=base["single"], workers=1).ok
        (d / "model.wpk").unlink()
    else:
        assert_error(res, 2)
    assert (d / "keep").read_text() == "keep"
    taken = d / "model.wpk"
    taken.mkdir()
    (taken / "inner").write_text("inner")
    for target in (d, str(d) + "/"):  # both name out/model.wpk, which is a folder
        for extra in ([], ["--force"]):
            args = ["pack", base["single"], "-o", target, *extra]
            assert_error(cli(*args), 2, args)
            assert (taken / "inner").read_text() == "inner" and (d / "keep").read_text() == "keep"
    assert not partials(tmp_path)


def test_unpack_single_output_exists(base, tmp_path):
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"original")
    res = cli("unpack", base["single_wpk"], "-o", out)
    assert_error(res, 2, contains="--force")
    assert out.read_bytes() == b"original"
    res = cli("unpack", base["single_wpk"], "-o", str(tmp_path) + "/")
    assert_error(res, 2)
    assert out.read_bytes() == b"original"
    assert not partials(tmp_path)
    with pytest.raises(OutputError):
        weightpack.unpack(base["single_wpk"], out, workers=1)
    res = cli("unpack", base["single_wpk"], "-o", out, "--force")
    assert res.returncode == 0, describe(res)
    assert sha(out) == sha(base["single"])
    assert not partials(tmp_path)


def test_unpack_folder_output_exists(base, tmp_path):
    out = tmp_path / "restored"
    out.mkdir()
    (out / "mine.txt").write_text("mine")
    res = cli("unpack", base["folder_wpk"], "-o", out)
    assert_error(res, 2, contains="--force")
    assert craft.tree(out) == {"mine.txt": craft.tree(out)["mine.txt"]}
    assert not partials(tmp_path)
    res = cli("unpack", base["folder_wpk"], "-o", out, "--force")
    assert res.returncode == 0, describe(res)
    assert craft.tree(out) == craft.tree(base["folder"])
    assert not partials(tmp_path)
    # a regular file where the folder should go
    f = tmp_path / "file"
    f.write_text("x")
    for extra in ([], ["--force"]):
        assert_error(cli("unpack", base["folder_wpk"], "-o", f, *extra), 2)
        assert f.read_text() == "x"


def test_damaged_input_leaves_existing_output_untouched(base, tmp_path):
    """--force with a damaged container: the existing output must survive the failure."""
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"original")
    bad = tmp_path / "bad.wpk"
    c = craft.read_container(base["single_wpk"])
    ref = next(r for _, r in craft.blob_refs(c.index) if r["length"] > 100)
    craft.flip_bit(base["single_wpk"], bad, (ref["offset"] + 50) * 8)
    assert_error(cli("unpack", bad, "-o", out, "--force"), 2)
    assert out.read_bytes() == b"original"
    folder_out = tmp_path / "restored"
    folder_out.mkdir()
    (folder_out / "mine.txt").write_text("mine")
    c = craft.read_container(base["folder_wpk"])
    ref = next(r for _, r in craft.blob_refs(c.index) if r["length"] > 100)
    craft.flip_bit(base["folder_wpk"], bad, (ref["offset"] + 50) * 8)
    assert_error(cli("unpack", bad, "-o", folder_out, "--force"), 2)
    assert [p.name for p in folder_out.iterdir()] == ["mine.txt"]
    assert not partials(tmp_path)


@pytest.mark.parametrize("cmd", ["pack", "unpack-single", "unpack-folder"])
def test_output_folder_missing_or_not_a_folder(base, tmp_path, cmd):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    src = {"pack": base["single"], "unpack-single": base["single_wpk"], "unpack-folder": base["folder_wpk"]}[cmd]
    verb = cmd.split("-")[0]
    targets = [tmp_path / "missing" / "deeper" / "x.out", plain / "x.out", str(plain) + "/"]
    if cmd == "unpack-single":  # "-o DIR/": restore into DIR under the original name; DIR is created, its parent must exist
        targets.append(str(tmp_path / "missing" / "deeper") + "/")
    for target in targets:
        before = craft.tree(tmp_path)
        args = [verb, src, "-o", target]
        res = cli(*args)
        assert_error(res, 2, args)
        assert craft.tree(tmp_path) == before
    assert plain.read_text() == "x"


def test_pack_output_with_trailing_slash_to_missing_folder(base, tmp_path):
    """`-o missing/` names a folder that does not exist: an error, not a file called 'missing'."""
    res = cli("pack", base["single"], "-o", str(tmp_path / "missing") + "/")
    assert_error(res, 2)
    assert not (tmp_path / "missing").exists()


def test_output_folder_not_writable(base, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("running as root: permission bits do not stop root (the other unwritable cases are covered "
                    "by test_output_folder_missing_or_not_a_folder)")
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    try:
        assert_error(cli("pack", base["single"], "-o", ro / "m.wpk"), 2)
        assert_error(cli("unpack", base["single_wpk"], "-o", ro / "m.safetensors"), 2)
        assert_error(cli("unpack", base["folder_wpk"], "-o", ro / "restored"), 2)
        assert list(ro.iterdir()) == []
    finally:
        os.chmod(ro, 0o700)


def test_output_on_a_filesystem_that_refuses_files(base):
    """As root permission bits do not help; /proc refuses new files even for root."""
    if not Path("/proc/self").is_dir():
        pytest.skip("no /proc")
    for args in (["pack", base["single"], "-o", "/proc/m.wpk"],
                 ["unpack", base["single_wpk"], "-o", "/proc/m.safetensors"],
                 ["unpack", base["folder_wpk"], "-o", "/proc/restored"]):
        assert_error(cli(*args), 2, args)
    assert not Path("/proc/m.wpk").exists() and not Path("/proc/restored").exists()


# == recipes =======================================================================================

RECIPES = {
    "unknown-top-key": ('name = "r"\nlevel = 2\nturbo = true\n', "turbo"),
    "unknown-rule-key": ('name = "r"\n[[rules]]\nmatch = "*"\nbits = 4\n', "bits"),
    "level-wrong-type": ('name = "r"\nlevel = "high"\n', "level"),
    "level-float": ('name = "r"\nlevel = 2.0\n', "level"),
    "level-bool": ('name = "r"\nlevel = true\n', "level"),
    "level-out-of-range": ('name = "r"\nlevel = 9\n', "level"),
    "name-wrong-type": ('name = 5\n', "name"),
    "description-wrong-type": ('description = ["a"]\n', "description"),
    "rules-wrong-type": ('rules = "all"\n', "rules"),
    "rule-not-table": ('rules = [1, 2]\n', "rules"),
    "match-wrong-type": ('[[rules]]\nmatch = 5\n', "match"),
    "stages-wrong-type": ('[[rules]]\nmatch = "*"\nstages = "int4"\n', "stages"),
    "unknown-stage": ('[[rules]]\nmatch = "*"\nstages = ["int4"]\n', "int4"),
    "invalid-toml": ('name = "r\nlevel = \n', None),
    "not-utf8": (b"name = \"\xff\xfe\"\n", None),
}


@pytest.mark.parametrize("case", list(RECIPES))
def test_bad_recipe_file(base, tmp_path, outdir, case):
    text, key = RECIPES[case]
    rec = tmp_path / "r.toml"
    rec.write_bytes(text if isinstance(text, bytes) else text.encode())
    args = ["pack", base["single"], "-o", outdir / "m.wpk", "-r", rec]
    res = cli(*args)
    assert_error(res, 2, args)
    if key is not None:
        assert key in res.stderr, f"the message must name {key!r}: {res.stderr!r}"
    assert list(outdir.iterdir()) == []
    if not isinstance(text, bytes):
        with pytest.raises(RecipeError):
            weightpack.pack(base["single"], outdir / "m.wpk", recipe=str(rec), workers=1)


def test_unknown_recipe_name(base, outdir):
    for name in ("no-such-preset", "lossy9", "../configs/lossless"):
        args = ["pack", base["single"], "-o", outdir / "m.wpk", "-r", name]
        res = cli(*args)
        assert_error(res, 2, args)
        assert name in res.stderr
    assert_error(cli("pack", base["single"], "-o", outdir / "m.wpk", "-r", outdir / "missing.toml"), 2)
    assert list(outdir.iterdir()) == []
    with pytest.raises(RecipeError):
        weightpack.pack(base["single"], outdir / "m.wpk", recipe="no-such-preset")


@pytest.mark.parametrize("recipe", [{"turbo": 1}, {"level": "2"}, {"rules": [{"match": "*", "bits": 4}]},
                                    {"rules": [{"match": "*", "stages": ["int4"]}]}, {"level": 0}])
def test_bad_recipe_dict_api(base, outdir, recipe):
    with pytest.raises(RecipeError):
        weightpack.pack(base["single"], outdir / "m.wpk", recipe=recipe)
    assert list(outdir.iterdir()) == []


def test_bad_level_api(base, outdir):
    for level in (0, 4, "2", 2.5):
        with pytest.raises(WeightpackError):
            weightpack.pack(base["single"], outdir / "m.wpk", level=level)
    assert list(outdir.iterdir()) == []


# == device ========================================================================================

def test_cuda_without_gpu(base):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is available here")
    for call in (lambda: weightpack.load(base["single_wpk"], device="cuda"),
                 lambda: weightpack.load(base["single_wpk"], device="cuda:0"),
                 lambda: weightpack.load(base["single_wpk"], device=torch.device("cuda")),
                 lambda: weightpack.open(base["single_wpk"], device="cuda")):
        with pytest.raises(WeightpackError) as e:
            call()
        assert "cuda" in str(e.value).lower() and "\n" not in str(e.value)


def test_unknown_device(base):
    for dev in ("tpu9", "bogus", "", "cuda:x"):
        with pytest.raises(WeightpackError):
            weightpack.load(base["single_wpk"], device=dev)


def test_open_unknown_tensor(base):
    with weightpack.open(base["single_wpk"]) as f:
        with pytest.raises(KeyError):
            f.get_tensor("no.such.tensor")


# == interruption ==================================================================================

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
