"""The codec registry and the codec folders (weightpack/coding/codecs/): every codec reached by its
container name, each folder holding its decoders side by side, the CPU backend chosen in one place, the
layout before format 1.2 chosen by a parameter, and the device rebuilders."""

from __future__ import annotations

import ast
import pathlib

import numpy as np
import pytest
import torch

import weightpack
from weightpack.coding import native
from weightpack.coding.codecs import registry
from weightpack.coding.codecs.fields import codec as fields
from weightpack.coding.codecs.fields import plan as fields_plan
from weightpack.coding.codecs.trellis import codec as trellis
from weightpack.errors import FormatError
from weightpack.stages import tcq

import craft

PACKAGE = pathlib.Path(weightpack.__file__).parent


def test_the_registry_maps_container_names_to_codec_folders():
    assert set(registry.CODECS) == {"fields", "bytes", "trellis"}
    for name, codec in registry.CODECS.items():
        assert codec.NAME == name
        folder = pathlib.Path(codec.__file__).parent
        assert folder == PACKAGE / "coding" / "codecs" / name and (folder / "codec.py").exists()
    for name in ("fields", "trellis"):  # their decoders side by side: numpy + constriction, native, device
        assert {"cpu.py", "native.py", "device.py"} <= {p.name for p in (PACKAGE / "coding" / "codecs" / name).iterdir()}
    for codec in ("lz4", {"a": 1}, ["fields"], None):
        with pytest.raises(FormatError, match="unknown stream codec"):
            registry.check_params("F32", 4, {"codec": codec, "chunk": 4}, "t")


def test_each_backend_offers_what_its_codec_calls():
    for codec in (fields_plan, trellis):
        impls = codec.BACKENDS
        assert set(impls) == {"numpy", "native"}
        public = [{n for n in vars(m) if not n.startswith("_") and callable(getattr(m, n))} for m in impls.values()]
        wanted = {"plan_scan", "class_hist", "encode", "decode"} if codec is fields_plan else \
            {"decode_split", "decode_step_major"}
        assert all(wanted <= names for names in public)


@pytest.mark.skipif(not native.available(), reason="the compiled kernels were not built here")
def test_the_backend_is_chosen_in_one_place():
    assert native.backend() == "native" and fields_plan.backend() is fields_plan.BACKENDS["native"]
    with native.enabled(False):
        assert native.backend() == "numpy"
        assert fields_plan.backend() is fields_plan.BACKENDS["numpy"]
        assert trellis.backend() is trellis.BACKENDS["numpy"]
    assert native.backend() == "native"


def test_no_module_outside_the_loader_asks_whether_the_kernels_are_built():
    for path in PACKAGE.rglob("*.py"):
        if path.name == "native.py" and path.parent.name == "coding":
            continue
        tree = ast.parse(path.read_text())
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "available"
                 and isinstance(n.value, ast.Name) and n.value.id == "native"]
        assert not calls, path


def test_stages_import_nothing_of_the_coder():
    for path in (PACKAGE / "stages").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert not (node.module or "").startswith("coding") and "coding" not in (node.module or ""), path


def test_the_layout_before_format_1_2_is_a_parameter():
    """lane=0: fields heads in one ANS stream per chunk and trellis levels step-major (formats 1.0/1.1);
    streams written so still decode."""
    rng = np.random.default_rng(0)
    u = (rng.standard_normal(4096) * 0.1).astype(np.float32).view(np.uint32)
    plan = fields.make_plan("F32", [64, 64], lambda a, c: u[a:a + c], 2, lane=0)
    assert "lane" not in plan.params()
    rec, payload = registry.encode_chunk(plan, 0, u)
    assert rec["parts"][0][:2] == ["head", "ans"]
    back = registry.plan_from_record("F32", u.size, plan.params(), plan.side(), "t")
    assert bytes(registry.decode_chunk(back, 0, rec, memoryview(payload), "t")) == u.tobytes()
    r = tcq.multiples(np.round(rng.laplace(0, 4, 8192)).astype(np.int64))
    assert trellis.make_plan(r, [32, 256], lane=0).ans_lane == 0
    assert fields.make_plan("F32", [64, 64], lambda a, c: u[a:a + c], 2).params()["lane"] == 1 << 14


def test_device_rebuild_of_a_stream_with_byte_plane_chunks(tmp_path, monkeypatch):
    """A laned stream whose second chunk is stored as byte planes, after a stream with a larger alphabet in
    the same batch: the blocks decoded on the host do not index past the stream's alphabet on the device."""
    monkeypatch.setattr(fields_plan, "CHUNK_TARGET", 4096)
    g = torch.Generator().manual_seed(1)
    big = torch.randn(64, 256, generator=g) * torch.exp(torch.randn(64, 1, generator=g) * 3)
    small = (torch.randn(8, 1024, generator=g) * 0.02).to(torch.bfloat16).reshape(-1)
    small[4096:] = small[:512].repeat(8)  # repeats: zstd'd byte planes win for this chunk
    src = craft.save_checkpoint(tmp_path / "m.safetensors", {"a": big, "b": small.reshape(8, 1024)})
    pk = weightpack.pack(src, tmp_path / "m.wpk", recipe="lossless").path
    codecs = {t["name"]: [c["codec"] for c in t["stream"]["chunks"]] for t in craft.read_container(pk).index["tensors"]}
    assert codecs["b"] == ["fields", "bytes"]
    host, dev = weightpack.load(pk), weightpack.load(pk, decoder="device")
    for k in host:
        assert torch.equal(host[k].view(torch.int16 if host[k].dtype == torch.bfloat16 else torch.int32),
                           dev[k].view(torch.int16 if dev[k].dtype == torch.bfloat16 else torch.int32)), k
