"""get_slice / get_shape / get_dtype against safetensors' safe_open(...).get_slice, and open over shards."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import weightpack
from weightpack.coding.codecs import registry
from weightpack.errors import WeightpackError

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2,
          torch.float8_e8m0fnu, torch.complex64, torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8,
          torch.uint16, torch.uint32, torch.uint64, torch.bool]

KEYS = [
    (slice(None),),
    (slice(2, 9),),
    (slice(-4, None),),
    (slice(None, -3), slice(5, None)),
    (slice(-7, -2), slice(-30, -1)),
    (3,),
    (-1, slice(10, 20)),
    (Ellipsis, slice(0, 4)),
    (slice(1, 11, 3), slice(None, None, 7)),
    (slice(20, 30),),  # past the end: empty, as in safetensors
    (slice(5, 2),),
]


def _tensor(dt, shape, gen):
    x = torch.randn(shape, generator=gen) * 3
    if dt == torch.bool:
        return x > 0
    if dt == torch.complex64:
        return torch.complex(x, x.flip(-1))
    if dt == torch.float8_e8m0fnu:
        return x.abs().clamp_min(1e-3).to(torch.float32).to(dt)
    if not dt.is_floating_point:
        lo = 0 if dt in (torch.uint8, torch.uint16, torch.uint32, torch.uint64) else -100
        return torch.randint(lo, 100, shape, generator=gen).to(dt)
    return x.to(dt)


@pytest.fixture(scope="module")
def every_dtype(tmp_path_factory):
    d = tmp_path_factory.mktemp("slice")
    gen = torch.Generator().manual_seed(1)
    tensors = {f"t_{str(dt).split('.')[-1]}": _tensor(dt, (13, 40), gen) for dt in DTYPES}
    tensors["scalar"] = torch.tensor(2.5)
    tensors["vector"] = torch.arange(50, dtype=torch.int32)
    src = d / "all.safetensors"
    save_file(tensors, str(src))
    weightpack.pack(src, d / "all.wpk", workers=1)
    return src, d / "all.wpk", tensors


def _same(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.view(torch.uint8) if a.dtype.itemsize == 1 and a.dtype != torch.bool else a,
                       b.view(torch.uint8) if b.dtype.itemsize == 1 and b.dtype != torch.bool else b)


def test_get_slice_matches_safe_open_on_every_dtype(every_dtype):
    src, wpk, tensors = every_dtype
    with safe_open(str(src), "pt") as ref, weightpack.open(wpk) as f:
        for name in tensors:
            if name in ("scalar", "vector"):
                continue
            s, r = f.get_slice(name), ref.get_slice(name)
            assert s.get_shape() == r.get_shape() == [13, 40]
            assert s.get_dtype() == r.get_dtype()
            for key in KEYS:
                _same(s[key], r[key])
        assert f.get_slice("vector")[-5:].tolist() == ref.get_slice("vector")[-5:].tolist()
        assert f.get_slice("scalar")[...].item() == 2.5


def test_get_slice_errors(every_dtype):
    _, wpk, _ = every_dtype
    with weightpack.open(wpk) as f:
        s = f.get_slice("t_float32")
        with pytest.raises(IndexError, match="out of range"):
            s[13]
        with pytest.raises(IndexError):
            s[0, -41]
        with pytest.raises(WeightpackError, match="too many indices"):
            s[1, 2, 3]
        with pytest.raises(WeightpackError, match="step"):
            s[::-1]
        with pytest.raises(KeyError):
            f.get_slice("nope")


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """A 4096 x 512 F32 matrix (several chunks) packed losslessly, and 2048 x 515 packed lossy."""
    d = tmp_path_factory.mktemp("bigslice")
    g = torch.Generator().manual_seed(2)
    w = torch.randn(4096, 512, generator=g)
    save_file({"w": w}, str(d / "w.safetensors"))
    weightpack.pack(d / "w.safetensors", d / "w.wpk", workers=1)
    x = torch.randn(2048, 515, generator=g)  # 515: the last group of each row is short
    save_file({"w": x}, str(d / "x.safetensors"))
    for recipe in ("int8", "int4", "ecsq", "q-tcq"):
        weightpack.pack(d / "x.safetensors", d / f"x-{recipe}.wpk", recipe=recipe, workers=1)
    return w, x, d


def _count_chunks(monkeypatch):
    calls = []
    real = registry.decode_chunk

    def counting(plan, i, *args):
        calls.append(i)
        return real(plan, i, *args)

    monkeypatch.setattr(registry, "decode_chunk", counting)
    return calls


def test_get_slice_decodes_only_the_chunks_it_needs(big, monkeypatch):
    w, _, d = big
    with weightpack.open(d / "w.wpk") as f:
        chunks = f._by_name["w"].stream.chunks
        assert len(chunks) >= 4
        calls = _count_chunks(monkeypatch)
        assert torch.equal(f.get_slice("w")[:16], w[:16])
        assert calls == [0]
        calls.clear()
        assert torch.equal(f.get_slice("w")[-3:, 100:200], w[-3:, 100:200])
        assert calls == [len(chunks) - 1]
        calls.clear()
        half = 4096 // len(chunks)  # rows per chunk: a tensor-parallel shard of rank 1 of len(chunks)
        assert torch.equal(f.get_slice("w")[half:2 * half], w[half:2 * half])
        assert calls == [1]
        calls.clear()
        assert torch.equal(f.get_slice("w")[:, 256:], w[:, 256:])  # columns: every chunk, once each
        assert calls == list(range(len(chunks)))


@pytest.mark.parametrize("recipe", ["int8", "int4", "ecsq", "q-tcq"])
def test_get_slice_of_a_lossy_tensor(big, recipe, monkeypatch):
    _, x, d = big
    with weightpack.open(d / f"x-{recipe}.wpk") as f:
        t = f._by_name["w"]
        assert t.stages
        full = f.get_tensor("w")
        s = f.get_slice("w")
        assert s.get_shape() == [2048, 515] and s.get_dtype() == "F32"
        for key in [(slice(5, 70), slice(-9, None)), (-1,), (Ellipsis, 3), (slice(None, None, 5),),
                    (slice(1000, 1100), slice(128, 300))]:
            assert torch.equal(s[key], full[key])  # bit-identical to the whole decode
        assert (full - x).norm() / x.norm() < 0.1  # lossy, but close
        q_chunks = len(t.parts[0].stream.chunks)
        others = sum(len(p.stream.chunks) for p in t.parts[1:])
        calls = _count_chunks(monkeypatch)
        s[:4]
        assert calls[0] == 0 and len(calls) == 1 + others  # one chunk of levels, the small parts whole
        if q_chunks > 1:
            calls.clear()
            s[-4:]
            assert calls[0] == q_chunks - 1 and len(calls) == 1 + others


def test_open_a_folder_of_shards(tmp_path):
    a, b = torch.randn(4, 6), torch.arange(10)
    save_file({"a": a}, str(tmp_path / "one.safetensors"))
    save_file({"b": b}, str(tmp_path / "two.safetensors"))
    shards = tmp_path / "shards"
    shards.mkdir()
    weightpack.pack(tmp_path / "one.safetensors", shards / "one.wpk", workers=1)
    weightpack.pack(tmp_path / "two.safetensors", shards / "two.wpk", workers=1)
    with weightpack.open(shards) as f:
        assert sorted(f.keys()) == ["a", "b"]
        assert torch.equal(f.get_slice("a")[1:3, -2:], a[1:3, -2:])
        assert torch.equal(f.get_tensor("b"), b)
    with weightpack.open([shards / "two.wpk"]) as f:
        assert f.keys() == ["b"]
    weightpack.pack(tmp_path / "two.safetensors", shards / "three.wpk", workers=1)
    with pytest.raises(weightpack.FormatError, match="in both"):
        weightpack.open(shards)
