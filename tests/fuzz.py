"""A fuzzer for .wpk containers: mutate a container's index (values, types, deleted and duplicated keys,
deep nesting, huge shapes and offsets, the stored safetensors headers) or its coded payloads, re-seal the
checksums (the index crc32, and a mutated blob's crc32) so that the mutation reaches the parser and the
decoders, and check the outcome:

* rejected: inspect, unpack and load each either raise a WeightpackError, or
* identical: what they return equals what the original container gives (the restored files' tensors,
  metadata and carried files; load's tensors).

Anything else (another exception, a different result accepted silently, a case that runs for more than
CASE_SECONDS) is a failure. Used by tests/test_fuzz.py (a fast sample in every run) and scripts/fuzz.py
(long runs, >= 1e5 cases).

Known failures that belong to code outside this fuzzer's owner's reach are classified, not hidden: see
`KNOWN`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
import shutil
import tempfile
import time
import traceback
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import craft

CASE_SECONDS = 20.0

# Mutations whose silent acceptance is a known limitation owned elsewhere (see the report in docs/FUZZ.md):
# a chunk reference moved to another position of a stream (or another stream) decodes to data whose chunk
# crc32 is right, at the wrong place; binding a stream to its record is the codec owner's item.
KNOWN: dict[str, str] = {}  # none left: chunks swapped within a stream fail their seeded checksums (format 1.3)


# -- the bases ----------------------------------------------------------------------------------

@dataclass
class Base:
    name: str
    path: Path
    data: bytes  # header + blobs
    index: dict
    compressed: bool
    kind: str  # "file" or "folder" output
    content: dict = field(default_factory=dict)  # unpacked content
    tensors: dict = field(default_factory=dict)  # load()'s tensors, as (dtype, shape, sha256)


LOSSY_RECIPE = {
    "name": "fuzz-lossy", "level": 2, "rules": [
        {"match": "a.*", "min_dims": 2, "stages": [{"name": "quantize", "bits": 4, "granularity": "group",
                                                    "group": 32}]},
        {"match": "b.*", "min_dims": 2, "stages": [{"name": "quantize", "mode": "tcq", "sqnr": 20}]},
        {"match": "c.*", "min_dims": 2, "stages": [{"name": "quantize", "mode": "ecsq", "sqnr": 25}]},
        {"match": "d.*", "min_dims": 2, "stages": [{"name": "prune", "sparsity": 0.5},
                                                   {"name": "quantize", "bits": 8, "symmetric": True}]},
    ]}


def _lossy_tensors():
    import torch

    g = torch.Generator().manual_seed(1)
    return {
        "a.weight": torch.randn(16, 64, generator=g),
        "b.weight": torch.randn(24, 64, generator=g).to(torch.bfloat16),
        "c.weight": torch.randn(8, 48, generator=g).to(torch.float16),
        "d.weight": torch.randn(8, 32, generator=g),
        "e.bias": torch.randn(64, generator=g),
        "f.ids": torch.arange(40, dtype=torch.int64),
    }


def build_bases(d: Path) -> list[Base]:
    """Small containers covering the index's shapes: a folder (carried files, plain and zstd), a lossy
    single file (rtn, tcq, ecsq, prune chains and their part streams), a sharded set."""
    import weightpack

    d = Path(d)
    folder = craft.make_folder(d / "src-folder" / "model")
    (folder / "notes.bin").write_bytes(bytes(range(256)) * 4)  # a carried file stored raw
    lossy_src = craft.save_checkpoint(d / "src-lossy" / "m.safetensors", _lossy_tensors())
    shard_idx = craft.make_sharded(d / "src-sharded" / "model")
    bases = []
    for name, src, recipe, kind in (("folder", folder, "lossless", "folder"),
                                    ("lossy", lossy_src, LOSSY_RECIPE, "file"),
                                    ("sharded", shard_idx, "lossless", "folder")):
        wpk = d / f"{name}.wpk"
        weightpack.pack(src, wpk, recipe=recipe, workers=1)
        c = craft.read_container(wpk)
        b = Base(name, wpk, c.data, c.index, c.compressed, kind)
        b.content = unpack_content(wpk, d / f"ref-{name}", kind)
        b.tensors = load_content(wpk)
        bases.append(b)
    return bases


def _sha(b) -> str:
    return hashlib.sha256(b).hexdigest()


def unpack_content(wpk: Path, out: Path, kind: str) -> dict:
    """Unpack and describe what came out: each safetensors file's tensors (dtype, shape, hash) and
    metadata, and every other file's hash."""
    import weightpack
    from weightpack.checkpoint import open_safetensors

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    target = weightpack.unpack(wpk, out / "x.safetensors" if kind == "file" else out / "x", workers=1)
    files = [target] if target.is_file() else sorted(p for p in target.rglob("*") if p.is_file())
    root = target.parent if target.is_file() else target
    desc = {}
    for p in files:
        rel = p.relative_to(root).as_posix()
        if p.name.endswith(".safetensors"):
            f = open_safetensors(p, rel)
            desc[rel] = {"metadata": f.metadata,
                         "tensors": {e.name: (e.dtype, e.shape, _sha(f.read(e))) for e in f.tensors}}
        else:
            desc[rel] = _sha(p.read_bytes())
    return desc


def load_content(wpk: Path) -> dict:
    import torch

    import weightpack

    out = {}
    for k, v in weightpack.load(wpk, workers=1).items():
        out[k] = (str(v.dtype), list(v.shape), _sha(v.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()))
    return out


# -- mutations ----------------------------------------------------------------------------------

class DupDict(dict):
    """A JSON object written with one key twice (the second value wins in Python's parser)."""

    def __init__(self, items: list):
        super().__init__()
        self.items_list = items


def dumps(obj) -> str:
    """json.dumps that writes DupDict's repeated keys (and lone surrogates as escapes)."""
    if isinstance(obj, DupDict):
        return "{" + ",".join(json.dumps(k) + ":" + dumps(v) for k, v in obj.items_list) + "}"
    if isinstance(obj, dict):
        return "{" + ",".join(json.dumps(k) + ":" + dumps(v) for k, v in obj.items()) + "}"
    if isinstance(obj, list):
        return "[" + ",".join(dumps(v) for v in obj) + "]"
    if isinstance(obj, RawJSON):
        return str(obj)
    return json.dumps(obj)


def _nodes(obj, path=()) -> list[tuple]:
    """Every path into a JSON value (keys and indices), the root excluded."""
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.append(path + (k,))
            out += _nodes(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out.append(path + (i,))
            out += _nodes(v, path + (i,))
    return out


def _at(obj, path):
    for k in path:
        obj = obj[k]
    return obj


class RawJSON(str):
    """JSON text written as is (deep nesting, which Python's own encoder and deepcopy refuse)."""


def _deep(n: int, kind: str) -> RawJSON:
    return RawJSON("[" * n + "0" + "]" * n if kind == "list" else '{"a":' * n + "0" + "}" * n)


def _random_value(rng: random.Random, old: Any) -> Any:
    pool = [0, -1, 1, 2, 3, 7, 64, 255, 256, 2**15, 2**16, 2**22, 2**31 - 1, 2**31, 2**32, 2**48, 2**62,
            2**63 - 1, 2**63, 2**64, 2**64 + 64, -2**63, 10**30, 10**400, 0.5, 1.0, -0.0, 1e308, 3.5,
            True, False, None, "", "x", "F32", "I16", "U8", "fields", "bytes", "trellis", "zstd", "raw", "ans",
            "lanes", "const", "quantize", "tcq", "\ud800x", "a/../../x", "/abs", "a\\b", "nul\x00",
            "x" * 5000, [], {}, [1.0], [1, 2], [-1], [2**40, 2**40], [0], [[0]], {"a": 1},
            _deep(rng.choice([50, 500, 5000]), rng.choice(["list", "dict"]))]
    r = rng.random()
    if type(old) is int and r < 0.5:
        return rng.choice([old + 1, old - 1, old * 2, old // 2, -old, old + 2**32, old ^ (1 << rng.randrange(64)),
                           float(old), 0, 2**48 + old])
    if isinstance(old, str) and r < 0.3:
        return rng.choice([old + "x", old[:-1], old.upper(), old + "\ud800", "\udc00" + old, old * 2])
    if isinstance(old, list) and old and r < 0.3:
        return rng.choice([old[:-1], old + old[-1:], old[::-1], [float(x) if type(x) is int else x for x in old]])
    v = rng.choice(pool)
    return v if isinstance(v, RawJSON) else copy.deepcopy(v)


# Fields that name or describe rather than encode: a mutation there (with the index crc re-sealed) is a valid
# container for other files (a renamed or dropped carried file, other metadata), not damage. Such a case
# passes as a "variant" when every tensor still loads identically.
FREE = ("index['files', ", "index['carried'", "__metadata__", "index['recipe'")


def _free(label: str) -> bool:
    return any(f in label for f in FREE) and ("'name']" in label or "carried" in label or "__metadata__" in label
                                              or "recipe" in label)


@dataclass
class Mutation:
    label: str  # what was done, to reproduce and to classify
    index_text: Optional[bytes] = None
    data: Optional[bytes] = None
    index: Optional[dict] = None
    known: Optional[str] = None  # a key of KNOWN when a silent acceptance is a known limitation


def _mutate_tree(rng: random.Random, tree, where: str) -> tuple[str, Any]:
    """One mutation somewhere in a JSON tree; returns the label and the new tree (possibly a DupDict)."""
    nodes = _nodes(tree)
    if not nodes:
        return f"{where}: replaced whole", _random_value(rng, tree)
    path = rng.choice(nodes)
    parent, key = _at(tree, path[:-1]), path[-1]
    op = rng.choice(["value", "value", "value", "delete", "duplicate", "swap", "type-twin", "unknown-key"])
    label = f"{where}{list(path)}: {op}"
    if op == "value":
        parent[key] = _random_value(rng, parent[key])
    elif op == "delete":
        del parent[key]
    elif op == "duplicate":
        if isinstance(parent, list):
            parent.insert(key, copy.deepcopy(parent[key]))
        else:
            items = list(parent.items())
            items.append((key, _random_value(rng, parent[key]) if rng.random() < 0.5 else parent[key]))
            dup = DupDict(items)
            if len(path) == 1:
                return label, dup
            _at(tree, path[:-2])[path[-2]] = dup
    elif op == "swap":
        if isinstance(parent, list) and len(parent) > 1:
            j = rng.randrange(len(parent))
            parent[key], parent[j] = parent[j], parent[key]
        else:
            other = rng.choice(nodes)
            try:
                parent[key] = copy.deepcopy(_at(tree, other))
            except (KeyError, IndexError, TypeError):
                pass
    elif op == "type-twin":  # the same value, another JSON type
        v = parent[key]
        parent[key] = (float(v) if type(v) is int else str(v) if not isinstance(v, str) else
                       (int(v) if v.isdigit() else [v]))
    elif op == "unknown-key":
        if isinstance(parent[key], dict):
            parent[key]["zz_unknown"] = 1
        else:
            parent[key] = {"value": parent[key]}
    return label, tree


def _blobs(index: dict) -> list[tuple[str, dict]]:
    out = []
    for t in index.get("tensors", []):
        streams = [("", t["stream"])] if not t.get("stages") else [(p["name"], p["stream"]) for p in t["parts"]]
        for pn, st in streams:
            if st.get("side"):
                out.append((f"tensor {t['name']} {pn} side", st["side"]))
            for k, ch in enumerate(st["chunks"]):
                out.append((f"tensor {t['name']} {pn} chunk {k}", ch))
    for c in index.get("carried", []):
        out.append((f"carried {c['name']}", c["blob"]))
    return out


def _mutate_payload(rng: random.Random, base: Base) -> Mutation:
    idx = copy.deepcopy(base.index)
    blobs = [(lbl, ref) for lbl, ref in _blobs(idx) if ref["length"] > 0]
    label, ref = rng.choice(blobs)
    data = bytearray(base.data)
    a, n = ref["offset"], ref["length"]
    op = rng.choice(["flip", "flip", "flip", "bytes", "zero", "ones", "shorter", "longer", "shuffle"])
    if op == "flip":
        for _ in range(rng.choice([1, 1, 2, 3, 8])):
            data[a + rng.randrange(n)] ^= 1 << rng.randrange(8)
    elif op in ("bytes", "zero", "ones"):
        i = rng.randrange(n)
        m = min(n - i, rng.choice([1, 4, 16, 256]))
        fill = {"bytes": lambda: rng.randrange(256), "zero": lambda: 0, "ones": lambda: 255}[op]
        data[a + i:a + i + m] = bytes(fill() for _ in range(m))
    elif op == "shorter":
        cut = rng.randrange(0, n)
        ref["length"] = cut
        if "parts" in ref and ref["parts"]:  # keep the parts adding up so the decoder sees the short data
            ref["parts"][-1][2] = max(0, ref["parts"][-1][2] - (n - cut))
    elif op == "longer":
        ref["length"] = min(n + rng.choice([1, 4, 64]), len(data) - a)
        if "parts" in ref and ref["parts"]:
            ref["parts"][-1][2] += ref["length"] - n
    elif op == "shuffle":
        seg = bytearray(data[a:a + n])
        rng.shuffle(seg)
        data[a:a + n] = seg
    ref["crc32"] = zlib.crc32(bytes(data[ref["offset"]:ref["offset"] + ref["length"]]))
    return Mutation(f"payload {label}: {op}", data=bytes(data), index=idx)


def _mutate_header(rng: random.Random, base: Base) -> Mutation:
    idx = copy.deepcopy(base.index)
    fi = rng.randrange(len(idx["files"]))
    h = json.loads(idx["files"][fi]["header"])
    label, h = _mutate_tree(rng, h, f"files[{fi}].header")
    idx["files"][fi]["header"] = dumps(h)
    return Mutation(label, index=idx)


def _consistent_huge(rng: random.Random, base: Base) -> Mutation:
    """A tensor given a huge shape, with nbytes and its file's header made consistent: only the stream (or
    the sizes' bounds) can refuse it."""
    from weightpack.dtypes import DTYPES

    idx = copy.deepcopy(base.index)
    t = rng.choice(idx["tensors"])
    dims = rng.choice([[2**40], [2**20, 2**20], [2**31, 3], [1, 2**47], [2**24, 2**24], [2**62, 2**62]])
    nbytes = DTYPES[t["dtype"]].nbytes(__import__("math").prod(dims))
    t.update(shape=dims, nbytes=nbytes)
    f = idx["files"][t["file"]]
    h = json.loads(f["header"])
    pos = 0
    for key, info in sorted(((k, v) for k, v in h.items() if k != "__metadata__"),
                            key=lambda kv: kv[1]["data_offsets"][0]):
        n = nbytes if key == t["name"] else info["data_offsets"][1] - info["data_offsets"][0]
        if key == t["name"]:
            info["shape"] = dims
        info["data_offsets"] = [pos, pos + n]
        pos += n
    f["header"] = json.dumps(h)
    if rng.random() < 0.5 and not t.get("stages"):
        t["stream"]["params"]["chunk"] = rng.choice([2**22, 2**40, 1])
    return Mutation(f"consistent huge shape {dims} on {t['name']}", index=idx)


def _chunk_transplant(rng: random.Random, base: Base) -> Mutation:
    idx = copy.deepcopy(base.index)
    blobs = [ref for lbl, ref in _blobs(idx) if "chunk" in lbl]
    a, b = rng.sample(blobs, 2) if len(blobs) > 1 else (blobs[0], blobs[0])
    keep = dict(a)
    a.clear()
    a.update(copy.deepcopy(b))
    b.clear()
    b.update(keep)
    return Mutation("chunk references swapped", index=idx)


def mutate(rng: random.Random, base: Base) -> Mutation:
    r = rng.random()
    if r < 0.45:
        idx = copy.deepcopy(base.index)
        label, tree = _mutate_tree(rng, idx, "index")
        m = Mutation(label, index_text=dumps(tree).encode("utf-8", "surrogatepass"))
    elif r < 0.60:
        m = _mutate_header(rng, base)
    elif r < 0.90:
        m = _mutate_payload(rng, base)
    elif r < 0.97:
        m = _consistent_huge(rng, base)
    else:
        m = _chunk_transplant(rng, base)
    return m


def write_mutation(base: Base, m: Mutation, dst: Path) -> None:
    data = m.data if m.data is not None else base.data
    if m.index_text is None:
        m.index_text = dumps(m.index).encode("utf-8", "surrogatepass")
    craft.write_container(dst, data, index_text=m.index_text, compress=base.compressed)


# -- running a case -----------------------------------------------------------------------------

@dataclass
class Outcome:
    case: int
    base: str
    label: str
    result: str  # "rejected", "identical", "variant" (see FREE), "fail", "known"
    detail: str = ""
    seconds: float = 0.0


def run_case(bases: list[Base], seed: int, case: int, work: Path) -> Outcome:
    from weightpack import WeightpackError
    import weightpack

    rng = random.Random(f"{seed}:{case}")
    base = rng.choice(bases)
    return run_mutation(base, mutate(rng, base), work, case)


def run_mutation(base: Base, m: Mutation, work: Path, case: int = 0) -> Outcome:
    """Write the mutated container, run inspect, unpack and load on it, and judge the outcome."""
    from weightpack import WeightpackError
    import weightpack

    path = work / "case.wpk"
    write_mutation(base, m, path)
    t0 = time.perf_counter()
    results = []
    detail = ""
    for what in ("inspect", "unpack", "load"):
        try:
            if what == "inspect":
                weightpack.inspect(path)
                results.append("identical")
                continue
            got = unpack_content(path, work / "out", base.kind) if what == "unpack" else load_content(path)
            want = base.content if what == "unpack" else base.tensors
            if got == want:
                results.append("identical")
            else:
                results.append("differs")
                detail = f"{what} accepted it and gave a different result"
        except WeightpackError:
            results.append("rejected")
        except BaseException as e:  # noqa: BLE001 - anything else is what the fuzzer is for
            if isinstance(e, KeyboardInterrupt):
                raise
            results.append("crash")
            detail = f"{what}: {type(e).__name__}: {str(e)[:200]}\n" + "".join(traceback.format_exc()[-1500:])
    secs = time.perf_counter() - t0
    shutil.rmtree(work / "out", ignore_errors=True)
    if results == ["identical", "differs", "identical"] and _free(m.label):
        result, detail = "variant", ""
    elif "crash" in results or "differs" in results:
        result = "known" if (m.known and "crash" not in results) else "fail"
    elif secs > CASE_SECONDS:
        result, detail = "fail", f"took {secs:.1f} s"
    else:
        result = "rejected" if "rejected" in results[1:] else "identical"
    return Outcome(case, base.name, m.label, result, detail, secs)


def run(seed: int, cases: int, start: int = 0, progress: Optional[Callable[[Outcome], None]] = None,
        work: Optional[Path] = None) -> list[Outcome]:
    tmp = Path(tempfile.mkdtemp(prefix="wpkfuzz.")) if work is None else Path(work)
    try:
        bases = build_bases(tmp / "bases")
        out = []
        for i in range(start, start + cases):
            o = run_case(bases, seed, i, tmp)
            out.append(o)
            if progress:
                progress(o)
        return out
    finally:
        if work is None:
            shutil.rmtree(tmp, ignore_errors=True)
