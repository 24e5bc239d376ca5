"""Streams bound to their records (coding/binding.py, format 1.3): each chunk's decoded-data checksum is
seeded with its stream's record and its index, so chunks moved between records or streams, or reordered
within one, are refused even with every crc32 intact."""

import pytest

import weightpack
from weightpack import WeightpackError

import craft
import fuzz


def _two_of_a_kind(tmp_path):
    import torch
    from craft import save_checkpoint

    g = torch.Generator().manual_seed(3)
    t = {"a.weight": torch.randn(64, 512, generator=g), "b.weight": torch.randn(64, 512, generator=g) * 3,
         "big.weight": torch.randn(1024, 1024, generator=g)}
    return save_checkpoint(tmp_path / "two.safetensors", t)


@pytest.mark.parametrize("recipe", ["lossless", "int8"])
def test_a_stream_moved_to_another_record_fails_its_checksum(tmp_path, recipe):
    """Chunk lists swapped between two records of the same dtype and shape, copied from one to the other, or
    chunks reordered within a stream (index checksum re-sealed): load refuses, naming the damage."""
    import weightpack
    from craft import rewrite_index
    from weightpack.errors import FormatError

    src = _two_of_a_kind(tmp_path)
    wpk = tmp_path / "two.wpk"
    weightpack.pack(src, wpk, recipe=recipe)

    def stream_of(t):
        return t["parts"][0]["stream"] if t["stages"] else t["stream"]

    def swap(idx):
        a, b = (next(t for t in idx["tensors"] if t["name"] == n) for n in ("a.weight", "b.weight"))
        sa, sb = stream_of(a), stream_of(b)
        sa["chunks"], sb["chunks"] = sb["chunks"], sa["chunks"]

    def copy(idx):
        a, b = (next(t for t in idx["tensors"] if t["name"] == n) for n in ("a.weight", "b.weight"))
        stream_of(b)["chunks"] = [dict(c) for c in stream_of(a)["chunks"]]

    def reorder(idx):
        big = next(t for t in idx["tensors"] if t["name"] == "big.weight")
        chunks = stream_of(big)["chunks"]
        assert len(chunks) >= 2
        chunks[0], chunks[1] = chunks[1], chunks[0]

    for edit in (swap, copy, reorder):
        bad = rewrite_index(wpk, tmp_path / f"{edit.__name__}.wpk", edit)
        with pytest.raises(FormatError, match=r"tensor '(a|b|big)\.weight'"):
            weightpack.load(bad)
    assert set(weightpack.load(wpk)) == {"a.weight", "b.weight", "big.weight"}


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
