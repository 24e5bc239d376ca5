"""Size accounting: bytes before and after, bits per weight, codec choices, per tensor and in total."""

from __future__ import annotations

import math
from collections import Counter

from .container import ContainerReader, tensor_blob_refs, tensor_streams
from .results import InspectReport, TensorRow, Totals
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


def inspect_report(r: ContainerReader) -> InspectReport:
    rows = []
    for t in r.index["tensors"]:
        numel = math.prod(t["shape"])
        after = stored_bytes(t)
        rows.append(TensorRow(
            name=t["name"], dtype=t["dtype"], shape=t["shape"],
            stages=["+".join(s.label() for s in parse_chain(t["stages"], "index"))] if t["stages"] else ["lossless"],
            bytes_before=t["nbytes"], bytes_after=after, bits_per_weight=8 * after / numel if numel else 0.0,
            codec=codec_label(t), quality=t.get("quality"),
        ))
    # The safetensors files as they were (length, header, data): what pack's ratio is measured against.
    source = sum(8 + len(f["header"].encode("utf-8")) for f in r.index["files"]) + sum(x.bytes_before for x in rows)
    numel = sum(math.prod(t["shape"]) for t in r.index["tensors"])
    return InspectReport(
        path=str(r.path), format_version=r.index.get("version"), source_kind=r.index["source"].get("kind"),
        recipe=r.index.get("recipe", {}).get("name"), files=[f["name"] for f in r.index["files"]],
        carried=[c["name"] for c in r.index["carried"]], tensors=rows,
        totals=totals(rows, numel, source, r.size),
    )


def totals(rows: list[TensorRow], weights: int, source_bytes: int, container_bytes: int) -> Totals:
    """The totals of an inspect report's rows, against the source's and the container's (or set's) bytes."""
    before = sum(x.bytes_before for x in rows)
    after = sum(x.bytes_after for x in rows)
    return Totals(tensors=len(rows), weights=weights, bytes_before=before, bytes_after=after,
                  source_bytes=source_bytes, container_bytes=container_bytes,
                  ratio=container_bytes / source_bytes if source_bytes else 0.0,
                  bits_per_weight=8 * after / weights if weights else 0.0)

