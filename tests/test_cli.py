"""The `weightpack` command (cli.py): usage errors, each command given the wrong kind of input, exit codes
(0 ok, 1 verify found a difference, 2 bad usage or bad input, 141 stdout closed), what it prints (pack's
report, inspect's table, verify's summaries, --json, --quiet), messages in the interface's own words, and the
README's examples run as written. An error is one line on stderr (conftest.assert_error)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

import weightpack
from weightpack import CheckpointError, FormatError, OutputError, UsageError

import craft
from conftest import ENV, WP, assert_error, assert_no_traceback, assert_unchanged, cli, describe, one_error_line


# == usage =========================================================================================

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


def test_cli_help_and_recipes():
    r = cli("--help")
    for cmd in ("pack", "unpack", "inspect", "verify", "recipes"):
        assert cmd in r.stdout
    for cmd in ("pack", "unpack", "inspect", "verify"):
        assert "usage:" in cli(cmd, "--help").stdout
    r = cli("recipes")
    assert "lossless" in r.stdout and "lossless-max" in r.stdout


def test_quiet_everywhere_and_inspect_help(ck):
    for args in (["inspect", ck["plain"], "--quiet"], ["recipes", "-q"], ["verify", ck["plain"], "-q"]):
        res = cli(*args)
        assert res.returncode == 0 and res.stdout == "" and res.stderr == "", (args, res.stdout, res.stderr)
    res = cli("inspect", "--help")
    assert "per tensor" in res.stdout.split("positional")[0].split("usage:")[1] or "Show what" in res.stdout


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


def test_pack_a_wpk_and_unpack_a_safetensors(base, outdir):
    before = craft.tree(outdir)
    assert_error(cli("pack", base["single_wpk"], "-o", outdir / "m.wpk"), 2)
    for cmd in ("unpack", "inspect", "verify"):
        args = [cmd, base["single"]] + (["-o", outdir / "x"] if cmd == "unpack" else [])
        assert_error(cli(*args), 2, args)
    assert_unchanged(outdir, before)
    with pytest.raises(FormatError):
        weightpack.load(base["single"])


# == verify's exit codes ===========================================================================

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


# == reports and messages ==========================================================================

def test_pack_lossy_reports_worst_sqnr_and_bits(ck, tmp_path):
    res = cli("pack", ck["src"], "-r", "q-tcq", "-o", tmp_path / "q.wpk", "-j", "1")
    assert res.returncode == 0, res.stderr
    assert re.search(r"lossy: 2 tensors at [0-9.]+ bits per weight, worst SQNR [0-9.]+ dB \(\w\.weight\)",
                     res.stdout), res.stdout
    res = cli("pack", ck["src"], "-r", "q-tcq", "-o", tmp_path / "q2.wpk", "-j", "1", "--json")
    lo = json.loads(res.stdout)["lossy"]
    assert lo["tensors"] == 2 and 0 < lo["bits_per_weight"] < 16 and lo["worst_sqnr_db"] > 10
    assert weightpack.pack(ck["src"], tmp_path / "l.wpk", workers=1).lossy is None


def test_inspect_columns_aligned(ck):
    res = cli("inspect", ck["lossy"])
    lines = res.stdout.splitlines()
    table = lines[:-1]
    head = table[0]
    for col in ("bpw", "SQNR"):
        end = head.index(col) + len(col)
        for row in table[1:]:
            assert row[end - 1] != " " and (len(row) == end or row[end] == " "), f"{col} misaligned:\n{res.stdout}"


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


def test_closed_stdout_ends_quietly(ck):
    r, w = os.pipe()
    os.close(r)
    p = subprocess.run(WP + ["inspect", str(ck["lossy"])], stdout=w, stderr=subprocess.PIPE, text=True, env=ENV)
    os.close(w)
    assert p.stderr == "", p.stderr
    assert p.returncode == 141


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
