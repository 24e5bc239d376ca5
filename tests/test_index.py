"""weightpack/index.py: the typed index. from_json validates and to_json gives back the writer's JSON, key for
key; keys a type does not know round-trip; consumers read attributes of frozen records."""
import dataclasses
import json
import math

import pytest

import craft
import weightpack
from weightpack.coding.chunks import ChunkCode, ChunkPart
from weightpack.container import ContainerReader
from weightpack.errors import FormatError
from weightpack.index import BlobRef, Chunk, Index, Quality, Stream, TensorRecord


@pytest.fixture(scope="module")
def packs(tmp_path_factory):
    """A folder (carried files) packed losslessly, and the same model with lossy stages (int8, tcq)."""
    d = tmp_path_factory.mktemp("index")
    folder = craft.make_folder(d / "model")
    out = {"lossless": d / "lossless.wpk"}
    weightpack.pack(folder, out["lossless"], workers=1)
    for recipe in ("int8", "q-tcq"):
        out[recipe] = d / f"{recipe}.wpk"
        weightpack.pack(folder / "model.safetensors", out[recipe], recipe=recipe, workers=1)
    return out


def _text(index: dict) -> bytes:
    return json.dumps(index, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


@pytest.mark.parametrize("kind", ["lossless", "int8", "q-tcq"])
def test_to_json_gives_back_the_stored_index_byte_for_byte(packs, kind):
    c = craft.read_container(packs[kind])
    typed = Index.from_json(c.copy_index(), c.size)
    assert typed.to_json() == c.index
    assert _text(typed.to_json()) == craft._unzstd(c.index_raw)  # the same key order as written
    with ContainerReader(packs[kind]) as r:
        assert r.index == typed


def test_records_are_typed_and_frozen(packs):
    with ContainerReader(packs["lossless"]) as r:
        idx = r.index
        assert idx.version == (1, 3) and idx.source_kind == "folder"
        assert [c.name for c in idx.carried] == ["config.json", "tokenizer/vocab.txt"]
        t = idx.tensors[0]
        assert isinstance(t, TensorRecord) and isinstance(t.stream, Stream) and t.stages == []
        assert isinstance(t.shape, tuple) and t.numel == math.prod(t.shape)
        ch = t.stream.chunks[0]
        assert isinstance(ch, Chunk) and all(isinstance(p, ChunkPart) for p in ch.parts)
        assert sum(p.length for p in ch.parts) == ch.length == ch.blob.length
        assert t.blob_refs()[-1] == ("chunk %d" % (len(t.stream.chunks) - 1), t.stream.chunks[-1].blob)
        with pytest.raises(dataclasses.FrozenInstanceError):
            t.name = "other"
        with pytest.raises(dataclasses.FrozenInstanceError):
            ch.offset = 0
    with ContainerReader(packs["int8"]) as r:
        t = next(t for t in r.index.tensors if t.stages)
        assert t.stream is None and [p.name for p in t.parts] == ["q", "scale"]  # symmetric: no zero points
        assert isinstance(t.quality, Quality) and t.quality.rel_error > 0
        assert [label for label, _ in t.streams()] == ["part 'q'", "part 'scale'"]
        assert t.chain()[-1].bits == 8


def test_a_placed_chunk_keeps_its_code_and_its_blob():
    code = ChunkCode("bytes", 7, (ChunkPart("data", "zstd", 10),))
    ch = Chunk.placed(code, BlobRef(64, 10, 99))
    assert ch.to_json() == {"codec": "bytes", "raw_crc": 7, "parts": [["data", "zstd", 10]],
                            "offset": 64, "length": 10, "crc32": 99}
    assert Chunk.from_json(ch.to_json(), 1000, "c") == ch


def test_unknown_keys_round_trip(packs):
    """Minor versions only add optional fields: whatever this reader does not know is kept and written back."""
    c = craft.read_container(packs["q-tcq"])
    idx = c.copy_index()
    idx["tied"] = {"alias.weight": idx["tensors"][0]["name"]}
    idx["source"]["revision"] = "abc"
    idx["files"][0]["note"] = 1
    t = next(t for t in idx["tensors"] if t["stages"])
    t["future"] = [1, 2]
    t["parts"][0]["hint"] = "x"
    t["parts"][0]["stream"]["extra"] = None
    t["parts"][0]["stream"]["chunks"][0]["more"] = {"a": 1}
    typed = Index.from_json(json.loads(json.dumps(idx)), c.size)
    assert typed.to_json() == idx
    assert typed.extra == {"tied": idx["tied"]}
    rec = next(r for r in typed.tensors if r.stages)
    assert rec.extra == {"future": [1, 2]} and rec.parts[0].extra == {"hint": "x"}
    assert rec.parts[0].stream.chunks[0].extra == {"more": {"a": 1}}


def _first_stream(idx):
    t = idx["tensors"][0]
    return t["parts"][0]["stream"] if t["stages"] else t["stream"]


@pytest.mark.parametrize("edit, message", [
    (lambda idx: idx.update(format="other"), "index: top: not a weightpack index"),
    (lambda idx: idx.update(version=[2, 0]), "index: top: malformed version"),
    (lambda idx: idx["source"].update(kind="cloud"), "index: source: unknown kind"),
    (lambda idx: idx["tensors"][0].pop("sha256"), "missing 'sha256'"),
    (lambda idx: idx["tensors"][0].update(nbytes=1), "nbytes does not match dtype and shape"),
    (lambda idx: idx["tensors"].append(dict(idx["tensors"][0])), "listed twice"),
    (lambda idx: _first_stream(idx)["chunks"][0].update(offset=3), "chunk 0: offset or length outside the file"),
    (lambda idx: _first_stream(idx)["chunks"][0].update(codec="lz4"), "chunk 0: unknown codec"),
    (lambda idx: _first_stream(idx)["chunks"][0]["parts"].append(["x", "raw", 1]), "chunk 0: malformed parts"),
    (lambda idx: _first_stream(idx)["chunks"][0].update(parts=[["x", "raw"]]), "chunk 0: malformed parts"),
    (lambda idx: _first_stream(idx)["chunks"].pop(), "chunks recorded"),
    (lambda idx: _first_stream(idx).update(side={"offset": 64, "length": 0, "crc32": 0}),  # a bytes stream's
     "side information missing or unexpected"),
    (lambda idx: idx["carried"][0].update(codec="gzip"), "index: config.json: unknown codec"),
    (lambda idx: idx["carried"][0]["blob"].update(crc32="0"), "'crc32' has the wrong type"),
])
def test_from_json_refuses_in_one_line(packs, edit, message):
    c = craft.read_container(packs["lossless"])
    idx = c.copy_index()
    edit(idx)
    with pytest.raises(FormatError) as e:
        Index.from_json(idx, c.size)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_lossy_records_are_checked_against_their_stages(packs):
    c = craft.read_container(packs["int8"])
    for edit, message in [
        (lambda t: t.update(quality={"sqnr_db": 1.0}), "malformed quality"),
        (lambda t: t["parts"].pop(), "parts do not match the stages"),
        (lambda t: t["parts"][0].update(dtype="U8"), "part 'q': dtype or shape does not match the stages"),
        (lambda t: t["stages"][0].update(bits=1), "malformed stages"),
    ]:
        idx = c.copy_index()
        edit(next(t for t in idx["tensors"] if t["stages"]))
        with pytest.raises(FormatError, match=message):
            Index.from_json(idx, c.size)
