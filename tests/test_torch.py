"""weightpack.torch: safetensors.torch's functions, in the same shapes, over containers."""

import pytest
import safetensors.torch as st
import torch

import weightpack
from conftest import sha256
from weightpack.torch import ModelLoadError, load, load_file, load_model, safe_open, save, save_file, save_model


class Tied(torch.nn.Module):
    def __init__(self, dim=16, tie=True):
        super().__init__()
        self.emb = torch.nn.Embedding(100, dim)
        self.lin = torch.nn.Linear(dim, 8)
        self.head = torch.nn.Linear(dim, 100, bias=False)
        if tie:
            self.head.weight = self.emb.weight


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_save_file_and_load_file(tmp_path):
    tensors = {"w": torch.randn(30, 20), "b": torch.zeros(20, dtype=torch.bfloat16), "i": torch.arange(7)}
    res = save_file(tensors, tmp_path / "t.wpk", metadata={"format": "pt", "note": "x"}, workers=1)
    assert res.tensors == 3
    back = load_file(tmp_path / "t.wpk")
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
    with safe_open(tmp_path / "t.wpk", framework="pt") as f:
        assert f.metadata() == {"format": "pt", "note": "x"}
        assert torch.equal(f.get_slice("w")[3:5, -2:], tensors["w"][3:5, -2:])
    # unpack gives the file safetensors.torch.save_file writes (one metadata key: safetensors writes the
    # keys of __metadata__ in an order that varies from call to call)
    save_file(tensors, tmp_path / "t1.wpk", metadata={"format": "pt"}, workers=1)
    st.save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    out = weightpack.unpack(tmp_path / "t1.wpk", tmp_path / "out.safetensors")
    assert sha256(out) == sha256(tmp_path / "ref.safetensors")
    save_file(tensors, tmp_path / "t.wpk", recipe="int8", workers=1)  # overwrites, as safetensors does
    lossy = load_file(tmp_path / "t.wpk")
    assert not torch.equal(lossy["w"], tensors["w"]) and torch.allclose(lossy["w"], tensors["w"], atol=0.05)


def test_save_and_load_bytes_with_an_alias():
    w = torch.randn(4, 4)
    data = save({"a": w, "b": w, "c": torch.ones(2)}, workers=1)
    assert data[:8] == b"\x89WPK\r\n\x1a\n"
    back = load(data)
    assert sorted(back) == ["a", "b", "c"]
    assert back["a"] is back["b"] and torch.equal(back["a"], w)


def test_save_file_refuses_partial_overlaps(tmp_path):
    w = torch.randn(4, 4)
    with pytest.raises(weightpack.WeightpackError, match="share memory"):
        save_file({"a": w, "b": w[1:]}, tmp_path / "x.wpk")
    assert not (tmp_path / "x.wpk").exists()


def test_save_model_matches_safetensors_and_load_model_restores_ties(tmp_path):
    m = Tied()
    save_model(m, tmp_path / "m.wpk", workers=1)
    st.save_model(m, str(tmp_path / "ref.safetensors"))
    out = weightpack.unpack(tmp_path / "m.wpk", tmp_path / "out.safetensors")
    assert sha256(out) == sha256(tmp_path / "ref.safetensors")  # what safetensors writes, byte for byte

    m2 = Tied()
    assert load_model(m2, tmp_path / "m.wpk") == ([], [])
    assert _same_state(m, m2) and m2.head.weight is m2.emb.weight
    # a model that does not share them itself: the container's tie is restored
    m3 = Tied(tie=False)
    assert load_model(m3, tmp_path / "m.wpk") == ([], [])
    assert m3.head.weight is m3.emb.weight and torch.equal(m3.head.weight, m.emb.weight)
    # load_file gives every name back, the tied ones as one tensor
    d = load_file(tmp_path / "m.wpk")
    assert sorted(d) == ["emb.weight", "head.weight", "lin.bias", "lin.weight"]
    assert d["emb.weight"] is d["head.weight"]


def test_load_model_strict_rules(tmp_path):
    m = Tied()
    save_model(m, tmp_path / "m.wpk", workers=1)

    class Bigger(Tied):
        def __init__(self):
            super().__init__()
            self.extra = torch.nn.Linear(2, 2)

    with pytest.raises(RuntimeError, match='Missing key\\(s\\) in state_dict: "extra.bias", "extra.weight"'):
        load_model(Bigger(), tmp_path / "m.wpk")
    missing, unexpected = load_model(Bigger(), tmp_path / "m.wpk", strict=False)
    assert missing == ["extra.bias", "extra.weight"] and unexpected == []

    class Smaller(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(16, 8)

    with pytest.raises(ModelLoadError, match="Unexpected key"):
        load_model(Smaller(), tmp_path / "m.wpk")
    s = Smaller()
    missing, unexpected = load_model(s, tmp_path / "m.wpk", strict=False)
    assert missing == [] and sorted(unexpected) == ["emb.weight"]
    assert torch.equal(s.lin.weight, m.lin.weight)

    wrong = Tied(dim=17)
    before = {k: v.clone() for k, v in wrong.state_dict().items()}
    with pytest.raises(ModelLoadError, match=r"size mismatch for .*emb\.weight: the file has \[100, 16\], the model \[100, 17\]"):
        load_model(wrong, tmp_path / "m.wpk", strict=False)
    assert all(torch.equal(before[k], v) for k, v in wrong.state_dict().items())  # nothing changed


def test_safe_open_framework_and_missing_file(tmp_path):
    with pytest.raises(weightpack.WeightpackError, match="framework"):
        safe_open(tmp_path / "x.wpk", framework="np")
    with pytest.raises(weightpack.FormatError, match="no such file"):
        safe_open(tmp_path / "x.wpk")


@pytest.mark.parametrize("tied", [{"x": "nope"}, {"emb.weight": "lin.weight"}, {"a": 3}, ["x"]])
def test_malformed_ties_are_refused(tmp_path, tied):
    from craft import rewrite_index

    save_model(Tied(), tmp_path / "m.wpk", workers=1)
    bad = rewrite_index(tmp_path / "m.wpk", tmp_path / "bad.wpk", lambda idx: idx.update(tied=tied))
    with pytest.raises(weightpack.FormatError, match="tie"):
        load_file(bad)
    with pytest.raises(weightpack.FormatError, match="tie"):
        load_model(Tied(), bad)
