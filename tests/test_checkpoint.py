"""Checkpoints in (checkpoint.py): files that are not safetensors, headers that lie, files cut short, sharded
sets with bad indexes, model folders holding a bad file or a file name that is not UTF-8. Each is a
CheckpointError from the API and one line with exit 2 from the command, and nothing is written."""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
from pathlib import Path

import pytest
import torch

import weightpack
from weightpack import CheckpointError

import craft
from conftest import assert_error, assert_unchanged, cli, one_error_line


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


def test_pack_rejects_a_safetensors_header_with_bad_types(tmp_path):
    from weightpack import CheckpointError

    for entry in ({"dtype": {"a": 1}, "shape": [1], "data_offsets": [0, 4]},
                  {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]},
                  {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]},
                  {"dtype": "F32", "shape": [1], "data_offsets": [0.0, 4]}):
        p = craft.raw_safetensors(tmp_path / "m.safetensors", {"w": entry}, b"\0" * 4)
        with pytest.raises(CheckpointError):
            weightpack.pack(p, tmp_path / "m.wpk", workers=1)
    p = craft.raw_safetensors(tmp_path / "m.safetensors",
                              '{"\\ud800": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', b"\0" * 4)
    with pytest.raises(CheckpointError, match="text"):
        weightpack.pack(p, tmp_path / "m.wpk", workers=1)
    assert not (tmp_path / "m.wpk").exists()


def test_bad_safetensors_inside_a_folder(tmp_path, outdir):
    folder = craft.make_folder(tmp_path / "model")
    craft.raw_safetensors(folder / "extra.safetensors", {"a": {"dtype": "F32", "shape": [4],
                                                               "data_offsets": [0, 64]}}, b"\0" * 16)
    before = craft.tree(outdir)
    res = cli("pack", folder, "-o", outdir / "m.wpk")
    assert_error(res, 2)
    assert "extra.safetensors" in res.stderr
    assert_unchanged(outdir, before)


def test_pack_a_folder_with_a_file_name_that_is_not_utf8(tmp_path):
    folder = craft.make_folder(tmp_path / "model")
    with open(os.path.join(os.fsencode(folder), b"bad\xff.txt"), "wb") as f:
        f.write(b"x")
    res = cli("pack", folder, "-o", tmp_path / "m.wpk")
    one_error_line(res, contains="UTF-8")
    assert not (tmp_path / "m.wpk").exists()


# -- sharded sets ----------------------------------------------------------------------------------

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
