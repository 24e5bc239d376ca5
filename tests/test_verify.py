"""verify.py: the checks of a container and of a sharded set, one comparison with the source for both,
and VerifyError under check=True."""

import pytest
import torch
from safetensors.torch import save_file

import weightpack
from weightpack import VerifyError
from weightpack.container import ContainerReader, tensor_blob_refs
from weightpack.results import VerifyReport
from weightpack.verify import blob_problems, quality_problems, raise_on_problems


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    d = tmp_path_factory.mktemp("verify")
    g = torch.Generator().manual_seed(7)
    p = d / "m.safetensors"
    save_file({"a.weight": torch.randn(64, 96, generator=g), "b.weight": torch.randn(48, 64, generator=g),
               "ids": torch.arange(50)}, str(p), metadata={"k": "v"})
    return p


def _other(src, tmp_path, change):
    from safetensors.torch import load_file

    t = load_file(str(src))
    change(t)
    p = tmp_path / "other.safetensors"
    save_file(t, str(p), metadata={"k": "v"})
    return p


@pytest.mark.parametrize("sharded", [False, True])
def test_a_container_and_a_set_are_compared_with_the_source_alike(src, tmp_path, sharded):
    kw = {"shard_size": "1MB"} if sharded else {}
    res = weightpack.pack(src, tmp_path / "m.wpk", workers=1, **kw)
    rep = weightpack.verify(res.path, against=src, workers=1)
    assert isinstance(rep, VerifyReport) and rep.ok and rep.checked == 3 and rep.problems == []
    holder = "the set" if sharded else "the container"
    renamed = _other(src, tmp_path, lambda t: t.update(extra=t.pop("ids")))
    rep = weightpack.verify(res.path, against=renamed, workers=1)
    assert not rep.ok and f"tensor 'ids' is in {holder} but not in the source" in rep.problems
    assert f"tensor 'extra' is in the source but not in {holder}" in rep.problems
    changed = _other(src, tmp_path, lambda t: t["a.weight"].mul_(2))
    rep = weightpack.verify(res.path, against=changed, workers=1)
    assert rep.problems == ["tensor 'a.weight': differs from the packed source (SHA-256)"]


def test_check_raises_a_verify_error_carrying_the_report(src, tmp_path):
    wpk = weightpack.pack(src, tmp_path / "q.wpk", recipe="int4", workers=1).path
    assert weightpack.verify(wpk, min_sqnr=5, check=True).ok
    with pytest.raises(VerifyError, match="verify failed: 2 problems") as e:
        weightpack.verify(wpk, against=src, min_sqnr=80, check=True)
    assert e.value.exit_code == 1 and not e.value.report.ok and len(e.value.report.problems) == 2
    assert raise_on_problems(VerifyReport(True, 1)).ok


def test_damaged_blobs_are_problems_not_exceptions(src, tmp_path):
    wpk = tmp_path / "m.wpk"
    weightpack.pack(src, wpk, workers=1)
    with ContainerReader(wpk) as r:
        _, ref = tensor_blob_refs(r.index["tensors"][0])[0]
        name = r.index["tensors"][0]["name"]
    data = bytearray(wpk.read_bytes())
    data[ref["offset"]] ^= 0x40
    wpk.write_bytes(bytes(data))
    with ContainerReader(wpk) as r:
        assert blob_problems(r, "x: ") == [f"x: tensor {name!r} chunk 0: checksum mismatch"]
    rep = weightpack.verify(wpk)
    assert not rep.ok and rep.checked == 0  # nothing decoded once a checksum fails
    assert rep.to_json() == {"ok": False, "tensors_checked": 0, "problems": rep.problems, "quality": {}}


def test_quality_bounds():
    q = {"a": {"sqnr_db": 20.0, "rel_error": 0.1}, "b": {"sqnr_db": None, "rel_error": 0.0}}
    assert quality_problems(q, None, None) == []
    assert quality_problems(q, 25, None) == ["tensor 'a': SQNR 20.00 dB is below 25 dB"]
    assert quality_problems(q, None, 0.05) == ["tensor 'a': relative error 0.1 is above 0.05"]
