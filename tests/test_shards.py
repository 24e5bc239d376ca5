"""Sharded containers: --shard-size / shard_size= writes a set of valid containers plus an index, and every
reader takes the set (its index or folder) as one model. Bad sizes and bad or incomplete sets are one-line
errors that write nothing."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import weightpack
from conftest import make_sharded, sha256
from weightpack import shards


def cli(*args):
    return subprocess.run([sys.executable, "-m", "weightpack", *map(str, args)], capture_output=True, text=True)


def _model(path, n=6, rows=1024):
    g = torch.Generator().manual_seed(1)
    t = {f"layers.{i}.weight": (torch.randn(rows, 256, generator=g) * 0.02).to(torch.bfloat16) for i in range(n)}
    t["embed"] = torch.randn(4 * rows, 256, generator=g).to(torch.bfloat16)  # 2 MiB: bigger than a shard below
    t["norm"] = torch.ones(256)
    save_file(t, str(path), metadata={"format": "pt"})
    return t


def _files(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def packed(tmp_path):
    src = tmp_path / "model.safetensors"
    tensors = _model(src)
    out = tmp_path / "out"
    out.mkdir()
    res = weightpack.pack(src, out / "model.wpk", shard_size=1_100_000, workers=1)
    return src, tensors, out, res


def test_sharded_pack_round_trips_and_each_shard_stands_alone(packed, tmp_path):
    src, tensors, out, res = packed
    index = out / "model.wpk.index.json"
    assert res.path == str(index)
    n = len(res.shards)
    assert n == 5  # the norm; the 2 MiB embedding alone; the 512 KiB matrices two by two
    assert _files(out) == sorted(res.shards + ["model.wpk.index.json"])
    assert res.shards[0] == f"model-00001-of-{n:05d}.wpk"
    idx = json.loads(index.read_text())
    assert set(idx["weight_map"]) == set(tensors) and len(idx["shards"]) == n
    assert all(s["sha256"] == sha256(out / s["name"]) for s in idx["shards"])
    assert res.bytes_out == sum((out / s).stat().st_size for s in res.shards) + index.stat().st_size

    for where in (index, out):  # the index or the folder
        got = weightpack.load(where)
        assert set(got) == set(tensors) and all(torch.equal(got[k], tensors[k]) for k in tensors)
    with weightpack.open(index) as f:
        assert sorted(f.keys()) == sorted(tensors) and f.metadata() == {"format": "pt"}
        assert torch.equal(f.get_tensor("embed"), tensors["embed"])
    rep = weightpack.inspect(index)
    assert rep.totals.tensors == len(tensors) and len(rep.shards) == n
    assert weightpack.verify(index, against=src).ok
    restored = weightpack.unpack(index, tmp_path / "restored.safetensors")
    assert sha256(restored) == sha256(src)

    seen = {}
    for name in res.shards:  # each shard on its own: a valid container of its tensors
        assert weightpack.verify(out / name).ok
        part = weightpack.load(out / name)
        assert weightpack.inspect(out / name).totals.tensors == len(part)
        seen.update(part)
        one = weightpack.unpack(out / name, tmp_path / f"{name}.safetensors")
        assert set(load_file(str(one))) == set(part)
    assert set(seen) == set(tensors)


def test_one_shard_and_a_sharded_source_folder(tmp_path):
    g = torch.Generator().manual_seed(2)
    tensors = {f"w{i}": torch.randn(64, 64, generator=g).to(torch.float16) for i in range(6)}
    folder = tmp_path / "src"
    make_sharded(tensors, folder, 3, metadata={"k": "v"})
    (folder / "config.json").write_text('{"a": 1}')
    whole = weightpack.pack(folder, tmp_path / "one", shard_size="1GB", workers=1)
    assert whole.shards == ["one-00001-of-00001.wpk"] and whole.path == str(tmp_path / "one.wpk.index.json")
    res = weightpack.pack(folder, tmp_path / "x.wpk", shard_size=10**6, workers=1)
    assert len(res.shards) == 1  # 49 kB of tensors
    back = weightpack.unpack(tmp_path / "x.wpk.index.json", tmp_path / "back")
    for p in folder.iterdir():
        assert sha256(back / p.name) == sha256(p), p.name
    assert weightpack.verify(tmp_path / "x.wpk.index.json", against=folder).ok


def test_several_source_files_split_across_shards(tmp_path):
    g = torch.Generator().manual_seed(3)
    tensors = {f"w{i}": torch.randn(300, 1000, generator=g).to(torch.bfloat16) for i in range(5)}
    idx = make_sharded(tensors, tmp_path / "src", 2)  # files of 3 and 2 tensors, 600 kB each
    res = weightpack.pack(idx, tmp_path / "m.wpk", shard_size="1.3MB", workers=1)
    assert len(res.shards) == 3
    back = weightpack.unpack(tmp_path / "m.wpk.index.json", tmp_path / "back")
    for p in (tmp_path / "src").iterdir():
        assert sha256(back / p.name) == sha256(p), p.name


def test_a_missing_or_damaged_shard_is_named(packed, tmp_path):
    src, tensors, out, res = packed
    index = out / "model.wpk.index.json"
    victim = out / res.shards[2]
    data = bytearray(victim.read_bytes())
    data[200] ^= 0xFF  # inside the first coded chunk
    victim.write_bytes(bytes(data))
    with pytest.raises(weightpack.FormatError, match=res.shards[2]):
        weightpack.load(index)
    rep = weightpack.verify(index)
    assert not rep.ok and any(res.shards[2] in p for p in rep.problems)
    victim.unlink()
    for fn in (weightpack.load, weightpack.inspect, weightpack.verify):
        with pytest.raises(weightpack.FormatError, match=f"shard {res.shards[2]} is missing"):
            fn(index)
    r = cli("unpack", index, "-o", tmp_path / "restored")
    assert r.returncode == 2 and res.shards[2] in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "restored").exists()
    # a shard from another pack under the right name
    other = tmp_path / "other"
    other.mkdir()
    weightpack.pack(src, other / "model.wpk", shard_size=1_100_000, workers=1, level=1)
    os.replace(other / res.shards[2], victim)
    with pytest.raises(weightpack.FormatError, match=res.shards[2]):
        weightpack.load(index)


def _edit_index(index, fn):
    idx = json.loads(index.read_text())
    fn(idx)
    index.write_text(json.dumps(idx))


def test_hostile_indexes_are_one_line_errors(packed, tmp_path):
    src, tensors, out, res = packed
    index = out / "model.wpk.index.json"
    good = index.read_text()
    cases = {
        "climbs out": lambda i: i["shards"][0].update(name="../" + i["shards"][0]["name"]),
        "absolute": lambda i: i["shards"][0].update(name="/etc/passwd"),
        "not there": lambda i: i["shards"].append(dict(i["shards"][0], name="model-00099-of-00099.wpk")),
        "claimed twice": lambda i: i["weight_map"].update(embed=i["shards"][0]["name"]),
        "unlisted shard": lambda i: i["weight_map"].update(embed="nope.wpk"),
    }
    for what, edit in cases.items():
        index.write_text(good)
        _edit_index(index, edit)
        with pytest.raises(weightpack.FormatError):
            weightpack.load(index)
        r = cli("unpack", index, "-o", tmp_path / "restored")
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, (what, r.stderr)
        assert not (tmp_path / "restored").exists()
    # two shards that both hold one tensor (the index lists it once, the shards disagree)
    index.write_text(good)
    one = out / res.shards[1]
    os.replace(one, tmp_path / "keep.wpk")
    import shutil
    shutil.copy(out / res.shards[0], one)
    _edit_index(index, lambda i: i["shards"][1].update({k: i["shards"][0][k] for k in ("size", "sha256", "index_crc32")}))
    with pytest.raises(weightpack.FormatError, match="claimed by shards"):
        weightpack.load(index)
    index.write_text(good.replace('"weight_map": {', '"weight_map": {"embed": "x", ', 1))
    with pytest.raises(weightpack.FormatError, match="given twice"):
        weightpack.load(index)


def test_bad_shard_sizes_write_nothing(tmp_path):
    src = tmp_path / "model.safetensors"
    _model(src, n=1)
    for bad in ("999kB", "100", "0", "-5GB", "lots", "5XB", "nan"):
        r = cli("pack", src, f"--shard-size={bad}", "-o", tmp_path / "m.wpk")
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, (bad, r.stderr)
        assert "shard size" in r.stderr
    assert _files(tmp_path) == ["model.safetensors"]
    with pytest.raises(weightpack.WeightpackError):
        weightpack.pack(src, tmp_path / "m.wpk", shard_size=999_999)
    assert shards.parse_shard_size("5GB") == 5 * 10**9 and shards.parse_shard_size("1MiB") == 1 << 20


def test_cli_sharded_pack_and_lossy_rate_control(tmp_path):
    src = tmp_path / "model.safetensors"
    _model(src)
    r = cli("pack", src, "--shard-size", "1.1MB", "-q")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "model.wpk.index.json").exists() and (tmp_path / "model-00001-of-00005.wpk").exists()
    r = cli("pack", src, "--shard-size", "1.1MB", "-o", tmp_path / "q.wpk", "--bits", "3", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["allocation"]["bits_per_weight"] <= 3 and len(res["shards"]) == 5
    assert cli("verify", tmp_path / "q.wpk.index.json", "--against", src).returncode == 0
    r = cli("inspect", tmp_path / "q.wpk.index.json")
    assert r.returncode == 0 and "tensors" in r.stdout
