"""Packing, unpacking and verifying on a real local Ray instance (2 CPUs, started and stopped here): output
byte-identical to the local pack, lossless and lossy with rate control, one and several shards; a worker
killed with SIGKILL mid-task; a driver killed mid-pack; an unreachable cluster; Ray not installed."""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import save_file

import weightpack
from conftest import sha256

ray = pytest.importorskip("ray")

TASK_EVENTS_MS = 100


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             _node_ip_address="127.0.0.1", _system_config={"task_events_report_interval_ms": TASK_EVENTS_MS})
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _llm(path, layers=2, hidden=512, seed=0):
    """A small LLM-shaped BF16 checkpoint: embeddings, attention and MLP matrices, norms."""
    g = torch.Generator().manual_seed(seed)
    t = {"model.embed_tokens.weight": torch.randn(2048, hidden, generator=g) * 0.02}
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            t[p + f"self_attn.{n}.weight"] = torch.randn(hidden, hidden, generator=g) * 0.02
        t[p + "mlp.up_proj.weight"] = torch.randn(4 * hidden, hidden, generator=g) * 0.02
        t[p + "mlp.down_proj.weight"] = torch.randn(hidden, 4 * hidden, generator=g) * 0.02
        t[p + "input_layernorm.weight"] = 1 + 0.1 * torch.randn(hidden, generator=g)
    save_file({k: v.to(torch.bfloat16) for k, v in t.items()}, str(path), metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return _llm(tmp_path_factory.mktemp("src") / "model.safetensors")  # 8.4 MB


def _same_set(a_index, b_index):
    a, b = a_index.parent, b_index.parent
    names = sorted(p.name for p in a.iterdir() if p.name.startswith(a_index.name.split(".")[0]))
    assert names == sorted(p.name for p in b.iterdir() if p.name.startswith(b_index.name.split(".")[0]))
    for n in names:
        assert sha256(a / n) == sha256(b / n), n


@pytest.mark.parametrize("shard_size", [None, "2MB"])
def test_lossless_on_ray_is_byte_identical(cluster, ckpt, tmp_path, shard_size):
    (tmp_path / "local").mkdir()
    (tmp_path / "ray").mkdir()
    loc = weightpack.pack(ckpt, tmp_path / "local" / "m.wpk", workers=2, shard_size=shard_size)
    rem = weightpack.pack(ckpt, tmp_path / "ray" / "m.wpk", executor="ray", shard_size=shard_size)
    if shard_size is None:
        assert sha256(loc.path) == sha256(rem.path)
    else:
        assert len(rem.shards) >= 3 and rem.shards == loc.shards
        _same_set(tmp_path / "local" / "m.wpk.index.json", tmp_path / "ray" / "m.wpk.index.json")
    rep = weightpack.verify(rem.path, against=ckpt, executor="ray")
    assert rep.ok, rep.problems
    out = weightpack.unpack(rem.path, tmp_path / "back.safetensors", executor="ray")
    assert sha256(out) == sha256(ckpt)


def test_lossy_rate_control_on_ray_is_byte_identical(cluster, ckpt, tmp_path):
    (tmp_path / "local").mkdir()
    (tmp_path / "ray").mkdir()
    kw = dict(recipe="q-tcq", bits=3.0, shard_size="3MB")
    loc = weightpack.pack(ckpt, tmp_path / "local" / "q.wpk", workers=2, **kw)
    rem = weightpack.pack(ckpt, tmp_path / "ray" / "q.wpk", executor="ray", **kw)
    assert loc.allocation == rem.allocation and len(rem.shards) >= 2
    _same_set(tmp_path / "local" / "q.wpk.index.json", tmp_path / "ray" / "q.wpk.index.json")
    rep = weightpack.verify(rem.path, against=ckpt, executor="ray", min_sqnr=5)
    assert rep.ok and rep.quality, rep.problems
    a = weightpack.unpack(loc.path, tmp_path / "a.safetensors")
    b = weightpack.unpack(rem.path, tmp_path / "b.safetensors", executor="ray")
    assert sha256(a) == sha256(b)


def _running_task_pids():
    """Worker pids of pack tasks running now, from Ray's task events (GCS; no dashboard needed)."""
    from ray._private.state import state
    from ray.core.generated import common_pb2

    running, done = {}, set()
    for ev in state._get_all_task_events():
        if ev.task_info.func_or_class_name.split(".")[-1] != "_run":
            continue
        key = (ev.task_id, ev.attempt_number)
        states = set(ev.state_updates.state_ts_ns.keys())
        if states & {common_pb2.TaskStatus.FINISHED, common_pb2.TaskStatus.FAILED}:
            done.add(key)
        elif common_pb2.TaskStatus.RUNNING in states and ev.state_updates.worker_pid:
            running[key] = ev.state_updates.worker_pid
    return [pid for key, pid in running.items() if key not in done]


def _retried_tasks():
    from ray._private.state import state

    return [ev for ev in state._get_all_task_events() if ev.attempt_number > 0]


def test_a_worker_killed_mid_task_is_retried(cluster, tmp_path):
    import psutil

    src = _llm(tmp_path / "big.safetensors", layers=6, hidden=1024, seed=1)  # ~105 MB: several seconds
    weightpack.pack(src, tmp_path / "local.wpk", workers=2)
    killed = []
    stop = threading.Event()

    def killer():
        while not stop.is_set() and not killed:
            for pid in _running_task_pids():
                try:
                    if psutil.Process(pid).cmdline()[0].startswith("ray::_run"):  # busy with a task right now
                        os.kill(pid, signal.SIGKILL)
                        killed.append(pid)
                        break
                except (psutil.Error, IndexError, ProcessLookupError):
                    pass
            time.sleep(0.02)

    th = threading.Thread(target=killer)
    th.start()
    try:
        weightpack.pack(src, tmp_path / "ray.wpk", executor="ray")
    finally:
        stop.set()
        th.join()
    assert killed, "no running task found to kill"
    assert sha256(tmp_path / "ray.wpk") == sha256(tmp_path / "local.wpk")
    time.sleep(3 * TASK_EVENTS_MS / 1000)
    assert _retried_tasks(), "Ray reports no retried task"


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "weightpack", *map(str, args)], capture_output=True, text=True, **kw)


def test_a_lost_driver_leaves_no_output(cluster, tmp_path):
    src = _llm(tmp_path / "big.safetensors", layers=6, hidden=1024, seed=2)
    for extra, target in (([], "m.wpk"), (["--shard-size", "20MB"], "m.wpk.index.json")):
        p = subprocess.Popen([sys.executable, "-m", "weightpack", "pack", str(src), "-o", str(tmp_path / "m.wpk"),
                              "--ray", cluster, "-q", *extra], stderr=subprocess.PIPE)
        deadline = time.time() + 60
        while time.time() < deadline and not any(n.name.endswith(".partial") for n in tmp_path.iterdir()):
            time.sleep(0.05)
        assert any(n.name.endswith(".partial") for n in tmp_path.iterdir()), "the pack never started"
        time.sleep(0.5)
        assert p.poll() is None, p.stderr.read()
        p.send_signal(signal.SIGKILL)
        p.wait()
        assert not (tmp_path / target).exists()
        assert not list(tmp_path.glob("m-0*.wpk"))


def test_an_unreachable_cluster_is_one_line(tmp_path, ckpt):
    t0 = time.time()
    for cmd in (["pack", ckpt, "-o", tmp_path / "x.wpk"], ["verify", tmp_path / "x.wpk"]):
        r = _cli(*cmd, "--ray", "127.0.0.1:1")
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "cannot reach the Ray cluster at 127.0.0.1:1" in r.stderr
    assert time.time() - t0 < 60
    assert not (tmp_path / "x.wpk").exists()


def test_without_ray_installed(tmp_path, ckpt):
    code = ("import sys; sys.modules['ray'] = None; from weightpack.cli import main; "
            f"sys.exit(main(['pack', {str(ckpt)!r}, '-o', {str(tmp_path / 'x.wpk')!r}, '--ray']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 2 and "pip install 'weightpack[ray]'" in r.stderr, r.stderr
    code = ("import sys, weightpack; weightpack.pack(sys.argv[1], sys.argv[2], workers=1); "
            "weightpack.load(sys.argv[2]); weightpack.verify(sys.argv[2]); assert 'ray' not in sys.modules")
    r = subprocess.run([sys.executable, "-c", code, str(ckpt), str(tmp_path / "y.wpk")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_cli_pack_unpack_verify_on_ray(cluster, ckpt, tmp_path):
    r = _cli("pack", ckpt, "-o", tmp_path / "m.wpk", "--shard-size", "3MB", "-q", "--ray", cluster)
    assert r.returncode == 0, r.stderr
    index = tmp_path / "m.wpk.index.json"
    r = _cli("verify", index, "--against", ckpt, "--ray", cluster)
    assert r.returncode == 0 and "ok:" in r.stdout, r.stderr
    r = _cli("unpack", index, "-o", tmp_path / "back.safetensors", "-q", "--ray", cluster)
    assert r.returncode == 0, r.stderr
    assert sha256(tmp_path / "back.safetensors") == sha256(ckpt)
