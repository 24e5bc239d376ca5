"""The container fuzzer's fast sample (tests/fuzz.py; the long run is scripts/fuzz.py, counts in docs/FUZZ.md),
and the hostile-container cases it found, as regression tests."""

from __future__ import annotations

import collections
import json
import os

import pytest

import weightpack
from weightpack import FormatError, WeightpackError

import craft
import fuzz

SAMPLE = int(os.environ.get("WEIGHTPACK_FUZZ_CASES", "1500"))
SEED = int(os.environ.get("WEIGHTPACK_FUZZ_SEED", "12"))


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    return fuzz.build_bases(tmp_path_factory.mktemp("fuzz"))


def test_fuzz_sample(bases, tmp_path):
    """Every mutated container is rejected with a WeightpackError or restores identically."""
    outcomes = [fuzz.run_case(bases, SEED, i, tmp_path) for i in range(SAMPLE)]
    counts = collections.Counter(o.result for o in outcomes)
    fails = [o for o in outcomes if o.result == "fail"]
    assert not fails, f"{len(fails)} of {SAMPLE} cases failed ({dict(counts)}):\n" + "\n".join(
        f"case {o.case} ({o.base}) {o.label}: {o.detail[:800]}" for o in fails[:5])
    assert counts["rejected"] > SAMPLE // 2  # the mutations do reach the checks


def test_chunk_references_swapped_between_streams_are_rejected(bases, tmp_path):
    import random

    rng = random.Random(12)
    outs = [fuzz.run_mutation(b, fuzz._chunk_transplant(rng, b), tmp_path) for b in bases for _ in range(10)]
    assert all(o.result == "rejected" for o in outs), [(o.label, o.result, o.detail[:300]) for o in outs]


def test_chunks_swapped_within_a_stream_are_rejected(tmp_path):
    """Two equal chunks of one stream swapped, every crc32 intact: from format 1.3 each chunk's decoded-data
    checksum is seeded with its stream's record and its index (coding/binding.py), so unpack refuses."""
    import torch

    src = craft.save_checkpoint(tmp_path / "m.safetensors",
                                {"x": torch.randn(2**20, generator=torch.Generator().manual_seed(0))})
    wpk = tmp_path / "m.wpk"
    weightpack.pack(src, wpk, workers=1)

    def swap(idx):
        ch = idx["tensors"][0]["stream"]["chunks"]
        assert len(ch) == 2
        ch[0], ch[1] = ch[1], ch[0]

    bad = craft.rewrite_index(wpk, tmp_path / "bad.wpk", swap)
    with pytest.raises(WeightpackError):
        weightpack.unpack(bad, tmp_path / "out.safetensors", workers=1)


# -- the cases, by hand -----------------------------------------------------------------

def _edit_header(idx, fn):
    h = json.loads(idx["files"][0]["header"])
    fn(h)
    idx["files"][0]["header"] = fuzz.dumps(h)


def _write(base: fuzz.Base, idx, dst):
    craft.write_container(dst, base.data, index_text=fuzz.dumps(idx).encode("utf-8", "surrogatepass"),
                          compress=base.compressed)
    return dst


def _base(bases, name):
    return next(b for b in bases if b.name == name)


def _assert_rejected(path, tmp_path, contains=None):
    for fn in (lambda: weightpack.inspect(path), lambda: weightpack.load(path, workers=1),
               lambda: weightpack.unpack(path, tmp_path / "out", workers=1)):
        with pytest.raises(FormatError) as e:
            fn()
        if contains:
            assert contains in str(e.value)
    assert not (tmp_path / "out").exists()


def test_stored_header_dtype_is_an_object(bases, tmp_path):
    b = _base(bases, "folder")
    idx = json.loads(json.dumps(b.index))
    _edit_header(idx, lambda h: h["embed.weight"].update(dtype={"a": 1}))
    _assert_rejected(_write(b, idx, tmp_path / "x.wpk"), tmp_path, "embed.weight")


def test_part_shape_of_floats(bases, tmp_path):
    b = _base(bases, "lossy")
    idx = json.loads(json.dumps(b.index))
    t = next(t for t in idx["tensors"] if t["stages"])
    t["parts"][1]["shape"] = [float(d) for d in t["parts"][1]["shape"]]
    _assert_rejected(_write(b, idx, tmp_path / "x.wpk"), tmp_path, t["name"])


@pytest.mark.parametrize("where", ["carried", "file", "tensor", "header-tensor", "metadata"])
def test_lone_surrogate_names(bases, tmp_path, where):
    b = _base(bases, "folder")
    idx = json.loads(json.dumps(b.index))
    bad = "\ud800x"
    if where == "carried":
        idx["carried"][0]["name"] = bad
    elif where == "file":
        idx["files"][0]["name"] = bad + ".safetensors"
    elif where == "tensor":
        idx["tensors"][0]["name"] = bad
    elif where == "header-tensor":
        name = idx["tensors"][0]["name"]
        idx["tensors"][0]["name"] = bad
        _edit_header(idx, lambda h: h.update({bad: h.pop(name)}))
    else:
        _edit_header(idx, lambda h: h["__metadata__"].update(format=bad))
    path = _write(b, idx, tmp_path / "x.wpk")
    with pytest.raises(WeightpackError) as e:
        weightpack.unpack(path, tmp_path / "out", workers=1)
    assert isinstance(e.value, FormatError)
    assert "text" in str(e.value)
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == [path]


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


@pytest.mark.parametrize("name", ["x" * 5000, "a/" + "b" * 256, "/".join(["d"] * 2100)])
def test_file_names_too_long_for_a_file_system(bases, tmp_path, name):
    """Found by the long run (case 46125 of seed 1): a 5000-character file name was an OSError."""
    b = _base(bases, "sharded")
    idx = json.loads(json.dumps(b.index))
    idx["files"][1]["name"] = name
    path = _write(b, idx, tmp_path / "x.wpk")
    with pytest.raises(FormatError, match="too long"):
        weightpack.unpack(path, tmp_path / "out", workers=1)
    assert not (tmp_path / "out").exists()
