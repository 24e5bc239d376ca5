"""Size accounting: bytes before and after, bits per weight, codec choices, per tensor and in total."""

from __future__ import annotations

import math
from collections import Counter

from .container import ContainerReader, tensor_blob_refs, tensor_streams
from .stages.params import parse_chain


def stored_bytes(t: dict) -> int:
    return sum(ref["length"] for _, ref in tensor_blob_refs(t))


def codec_label(t: dict) -> str:
    """What won for this tensor: 'ctx'/'order0' entropy coding of fields, zstd or raw bytes, per chunk."""
    kinds = Counter()
    for _, st in tensor_streams(t):
        _count_codecs(st, kinds)
    if not kinds:
        return "empty"
    return "+".join(k for k, _ in kinds.most_common())


def _count_codecs(st: dict, kinds: Counter) -> None:
    p = st["params"]
    for c in st["chunks"]:
        if c["codec"] == "trellis":
            kinds["trellis"] += 1
        elif c["codec"] == "fields":
            heads = [x[1] for x in c["parts"] if x[0] == "head"]
            if heads and heads[0] == "const":
                kinds["const"] += 1
            else:
                kinds["ctx" if p.get("contexts", 1) > 1 else "order0"] += 1
        else:
            kinds[c["parts"][0][1] if c["parts"] else "raw"] += 1


def inspect_report(r: ContainerReader) -> dict:
    rows = []
    for t in r.index["tensors"]:
        numel = math.prod(t["shape"])
        after = stored_bytes(t)
        rows.append({
            "name": t["name"], "dtype": t["dtype"], "shape": t["shape"],
            "stages": ["+".join(s.label() for s in parse_chain(t["stages"], "index"))] if t["stages"] else ["lossless"],
            "bytes_before": t["nbytes"], "bytes_after": after,
            "bits_per_weight": 8 * after / numel if numel else 0.0,
            "codec": codec_label(t),
            "quality": t.get("quality"),
        })
    before = sum(x["bytes_before"] for x in rows)
    # The safetensors files as they were (length, header, data): what pack's ratio is measured against.
    source = sum(8 + len(f["header"].encode("utf-8")) for f in r.index["files"]) + before
    after = sum(x["bytes_after"] for x in rows)
    numel = sum(math.prod(t["shape"]) for t in r.index["tensors"])
    return {
        "path": str(r.path), "format_version": r.index.get("version"), "source_kind": r.index["source"].get("kind"),
        "recipe": r.index.get("recipe", {}).get("name"), "files": [f["name"] for f in r.index["files"]],
        "carried": [c["name"] for c in r.index["carried"]],
        "tensors": rows,
        "totals": {"tensors": len(rows), "weights": numel, "bytes_before": before, "bytes_after": after,
                   "source_bytes": source, "container_bytes": r.size, "ratio": r.size / source if source else 0.0,
                   "bits_per_weight": 8 * after / numel if numel else 0.0},
    }
