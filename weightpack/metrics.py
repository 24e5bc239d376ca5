"""Size accounting: bytes before and after, bits per weight, codec choices, per tensor and in total."""

from __future__ import annotations

import math
from collections import Counter

from .container import ContainerReader


def stored_bytes(t: dict) -> int:
    st = t["stream"]
    return (st["side"]["length"] if st.get("side") else 0) + sum(c["length"] for c in st["chunks"])


def codec_label(t: dict) -> str:
    """What won for this tensor: 'ctx'/'order0' entropy coding of fields, zstd or raw bytes, per chunk."""
    p = t["stream"]["params"]
    kinds = Counter()
    for c in t["stream"]["chunks"]:
        if c["codec"] == "fields":
            heads = [x[1] for x in c["parts"] if x[0] == "head"]
            if heads and heads[0] == "const":
                kinds["const"] += 1
            else:
                kinds["ctx" if p.get("contexts", 1) > 1 else "order0"] += 1
        else:
            kinds[c["parts"][0][1] if c["parts"] else "raw"] += 1
    if not kinds:
        return "empty"
    return "+".join(k for k, _ in kinds.most_common())


def inspect_report(r: ContainerReader) -> dict:
    rows = []
    for t in r.index["tensors"]:
        numel = math.prod(t["shape"])
        after = stored_bytes(t)
        rows.append({
            "name": t["name"], "dtype": t["dtype"], "shape": t["shape"],
            "stages": [s if isinstance(s, str) else s.get("name") for s in t["stages"]] or ["lossless"],
            "bytes_before": t["nbytes"], "bytes_after": after,
            "bits_per_weight": 8 * after / numel if numel else 0.0,
            "codec": codec_label(t),
            "contexts": t["stream"]["params"].get("contexts"),
        })
    before = sum(x["bytes_before"] for x in rows)
    after = sum(x["bytes_after"] for x in rows)
    numel = sum(math.prod(t["shape"]) for t in r.index["tensors"])
    return {
        "path": str(r.path), "format_version": r.index.get("version"), "source_kind": r.index["source"].get("kind"),
        "recipe": r.index.get("recipe", {}).get("name"), "files": [f["name"] for f in r.index["files"]],
        "carried": [c["name"] for c in r.index["carried"]],
        "tensors": rows,
        "totals": {"tensors": len(rows), "weights": numel, "bytes_before": before, "bytes_after": after,
                   "container_bytes": r.size, "ratio": r.size / before if before else 0.0,
                   "bits_per_weight": 8 * after / numel if numel else 0.0},
    }
