"""Behaviour unchanged across refactors: MiniLM (F32 as shipped, and cast to BF16 / F16) packed with every
preset at every level gives containers whose SHA-256 were recorded before the refactor
(tests/data/identity.json). Re-record only with a format change, and say so in the commit:
    python tests/test_identity.py --record
"""
import hashlib
import json
import pathlib
import sys

import pytest

HERE = pathlib.Path(__file__).parent
RECORD = HERE / "data" / "identity.json"
PRESETS_DIR = HERE.parent / "configs"
LEVELS = (1, 2, 3)
# lossless presets on every dtype; lossy presets on the shipped F32 model (their stages act on floats alike)
LOSSLESS = ("lossless", "lossless-fast", "lossless-max")


def cases():
    presets = sorted(p.stem for p in PRESETS_DIR.glob("*.toml"))
    for preset in presets:
        for dtype in (("F32", "BF16", "F16") if preset in LOSSLESS else ("F32",)):
            for level in LEVELS:
                yield preset, dtype, level


def pack_hash(src: pathlib.Path, preset: str, level: int, out: pathlib.Path) -> str:
    import weightpack

    dst = out / f"{src.stem}-{preset}-L{level}.wpk"
    weightpack.pack(src, dst, recipe=preset, level=level, workers=2)  # (byte-identical at any worker count)
    h = hashlib.sha256(dst.read_bytes()).hexdigest()
    dst.unlink()
    return h


def _record():
    import tempfile

    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    sys.path.insert(0, str(HERE))
    from conftest import minilm_dir

    minilm = minilm_dir() / "model.safetensors"
    with tempfile.TemporaryDirectory() as d:
        d = pathlib.Path(d)
        with safe_open(str(minilm), "pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        srcs = {"F32": minilm}
        for name, dt in (("BF16", torch.bfloat16), ("F16", torch.float16)):
            p = d / f"minilm-{name}.safetensors"
            save_file({k: (v.to(dt) if v.is_floating_point() else v) for k, v in tensors.items()}, str(p), metadata=meta)
            srcs[name] = p
        record = {}
        for preset, dtype, level in cases():
            record[f"{preset}/{dtype}/L{level}"] = pack_hash(srcs[dtype], preset, level, d)
            print(preset, dtype, level, record[f"{preset}/{dtype}/L{level}"], flush=True)
    RECORD.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")


@pytest.mark.slow
@pytest.mark.parametrize("preset,dtype,level", list(cases()))
def test_minilm_packs_byte_identical(minilm_cast, tmp_path, preset, dtype, level):
    expected = json.loads(RECORD.read_text())[f"{preset}/{dtype}/L{level}"]
    assert pack_hash(minilm_cast[dtype], preset, level, tmp_path) == expected, (
        f"{preset} at level {level} on MiniLM {dtype} packs to other bytes than before")


if __name__ == "__main__":
    if "--record" in sys.argv:
        _record()
