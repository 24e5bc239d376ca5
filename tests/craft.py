"""Helpers for the error-path tests: build small checkpoints, hand-made (possibly lying) safetensors files,
and rewrite a .wpk container's index with a correct trailer and crc32, so that tests reach the index
validation rather than stopping at the checksum.

Container layout (weightpack/container.py):
    header   16 bytes  <8sHHI   MAGIC, major, minor, reserved
    blobs    aligned, zero padding between
    index    UTF-8 JSON (or, in newer builds, that JSON as one zstd frame: detected by its magic)
    trailer  32 bytes  <QQIHH8s index offset, index length, crc32(index), major, minor, MAGIC
"""

from __future__ import annotations

import copy
import json
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

HEADER = struct.Struct("<8sHHI")
TRAILER = struct.Struct("<QQIHH8s")
MAGIC = b"\x89WPK\r\n\x1a\n"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


# -- checkpoints ---------------------------------------------------------------------------------

def small_tensors(seed: int = 0) -> dict:
    """A few small tensors covering the codecs: fields (F32/BF16/F16), bytes (I64), a constant tensor."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(64, 96, generator=g),
        "layer.0.attn.weight": torch.randn(96, 96, generator=g).to(torch.bfloat16),
        "layer.0.attn.bias": torch.randn(96, generator=g).to(torch.float16),
        "layer.0.norm.weight": torch.ones(96),
        "position_ids": torch.arange(128, dtype=torch.int64).reshape(1, 128),
    }


def save_checkpoint(path: Path, tensors: Optional[dict] = None, metadata: Optional[dict] = None) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors if tensors is not None else small_tensors(), str(path),
              metadata=metadata if metadata is not None else {"format": "pt"})
    return path


def make_folder(root: Path) -> Path:
    """A model folder: one safetensors file plus non-tensor files carried along (one in a subfolder)."""
    root = Path(root)
    save_checkpoint(root / "model.safetensors")
    (root / "config.json").write_text(json.dumps({"hidden_size": 96, "layers": 1, "pad": "x" * 300}, indent=2))
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "vocab.txt").write_text("".join(f"token{i}\n" for i in range(200)))
    return root


def make_sharded(folder: Path, shards: int = 2, tensors: Optional[dict] = None) -> Path:
    """Shards plus model.safetensors.index.json; returns the index path."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = tensors if tensors is not None else small_tensors()
    names = list(tensors)
    weight_map = {}
    for i in range(shards):
        fn = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: tensors[k] for k in names[i::shards]}, str(folder / fn))
        weight_map.update({k: fn for k in names[i::shards]})
    idx = folder / "model.safetensors.index.json"
    idx.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}, indent=2))
    return idx


def write_index_json(path: Path, weight_map: dict) -> Path:
    Path(path).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return Path(path)


def raw_safetensors(path: Path, header: Union[dict, str, bytes], data: bytes = b"",
                    header_len: Optional[int] = None, pad: bool = True) -> Path:
    """A hand-made safetensors file: u64 header length, header bytes, data. Nothing is checked."""
    if isinstance(header, dict):
        header = json.dumps(header, separators=(",", ":"))
    if isinstance(header, str):
        header = header.encode("utf-8")
    if pad:
        header = header + b" " * ((-len(header)) % 8)
    n = len(header) if header_len is None else header_len
    Path(path).write_bytes(struct.pack("<Q", n) + header + data)
    return Path(path)


# -- containers ----------------------------------------------------------------------------------

@dataclass
class Container:
    """A container split into its parts; `index` is the parsed JSON (a deep copy is safe to modify)."""

    data: bytes  # header + blobs + padding (everything before the index)
    index_raw: bytes  # the index as stored
    index: object
    trailer: tuple  # (offset, length, crc, major, minor, magic)
    size: int
    compressed: bool  # the stored index is a zstd frame

    @property
    def index_offset(self) -> int:
        return self.trailer[0]

    def copy_index(self):
        return copy.deepcopy(self.index)


def read_container(path: Path) -> Container:
    raw = Path(path).read_bytes()
    tr = TRAILER.unpack(raw[-TRAILER.size:])
    off, ln = tr[0], tr[1]
    assert tr[5] == MAGIC and off + ln == len(raw) - TRAILER.size, "not an intact container"
    index_raw = raw[off:off + ln]
    compressed = index_raw[:4] == ZSTD_MAGIC
    text = _unzstd(index_raw) if compressed else index_raw
    return Container(raw[:off], index_raw, json.loads(text), tr, len(raw), compressed)


def _unzstd(raw: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdDecompressor().decompress(raw)


def zstd_frame(text: bytes) -> bytes:
    """`text` as one zstd frame with its content size, as the writer stores a compressed index."""
    import zstandard

    return zstandard.ZstdCompressor(level=3).compress(text)


def zstd_frame_declaring(size: int, payload: bytes = b"abc") -> bytes:
    """A zstd frame whose header declares `size` content bytes but holds only `payload` (a raw block)."""
    frame = struct.pack("<IB", 0xFD2FB528, 0xE0) + struct.pack("<Q", size)  # single segment, 8-byte size
    return frame + struct.pack("<I", (len(payload) << 3) | 1)[:3] + payload


def write_container(path: Path, data: bytes, index: object = None, *, index_text: Optional[bytes] = None,
                    index_raw: Optional[bytes] = None, compress: Optional[bool] = None,
                    version: Optional[tuple] = None, trailer_version: Optional[tuple] = None) -> Path:
    """Write `data` (header + blobs) + index + a trailer with the right offset, length and crc32.

    The index is `index` dumped as JSON, or `index_text` (bytes, e.g. not JSON at all); either is stored
    as a zstd frame when `compress` (default: whatever this build's writer does, see `writer_compresses`).
    `index_raw` is stored verbatim instead. `version` rewrites the header's version; `trailer_version`
    the trailer's (default: the header's).
    """
    if index_raw is None:
        if index_text is None:
            index_text = json.dumps(index, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if compress is None:
            compress = writer_compresses()
        index_raw = zstd_frame(index_text) if compress else index_text
    data = bytearray(data)
    magic, major, minor, reserved = HEADER.unpack(data[:HEADER.size])
    if version is not None:
        major, minor = version
        data[:HEADER.size] = HEADER.pack(magic, major, minor, reserved)
    tmaj, tmin = trailer_version if trailer_version is not None else (major, minor)
    trailer = TRAILER.pack(len(data), len(index_raw), zlib.crc32(index_raw), tmaj, tmin, MAGIC)
    Path(path).write_bytes(bytes(data) + index_raw + trailer)
    return Path(path)


_WRITER_COMPRESSES: Optional[bool] = None


def writer_compresses() -> bool:
    """Whether this build of weightpack stores the index as a zstd frame (found by writing a container)."""
    global _WRITER_COMPRESSES
    if _WRITER_COMPRESSES is None:
        import tempfile

        from weightpack.container import ContainerWriter

        with tempfile.TemporaryDirectory() as d:
            target = Path(d) / "probe.wpk"
            w = ContainerWriter(target)
            w.commit({"format": "weightpack"})
            _WRITER_COMPRESSES = read_container(target).compressed
    return _WRITER_COMPRESSES


def rewrite_index(src: Path, dst: Path, edit: Callable[[dict], None]) -> Path:
    """Copy a container to `dst` with its index edited in place by `edit(index)` (its result is ignored).

    The index is stored the way the source stored it (plain JSON or a zstd frame) with a valid crc32."""
    c = read_container(src)
    idx = c.copy_index()
    edit(idx)
    return write_container(dst, c.data, idx, compress=c.compressed)


def append_blob(data: bytes, blob: bytes, align: int = 64) -> tuple[bytes, dict]:
    """`data` (header + blobs) with `blob` appended at the next aligned offset, and its reference."""
    data = data + b"\0" * ((-len(data)) % align)
    return data + blob, {"offset": len(data), "length": len(blob), "crc32": zlib.crc32(blob)}


def patch_blob(src: Path, dst: Path, ref_path: Callable[[dict], dict], byte: int, mask: int = 1,
               fix_crc: bool = True) -> Path:
    """Flip bits `mask` of byte `byte` of the blob that `ref_path(index)` returns, fixing its crc32 in the index."""
    c = read_container(src)
    idx = c.copy_index()
    ref = ref_path(idx)
    data = bytearray(c.data)
    data[ref["offset"] + byte] ^= mask
    if fix_crc:
        ref["crc32"] = zlib.crc32(bytes(data[ref["offset"]:ref["offset"] + ref["length"]]))
    return write_container(dst, bytes(data), idx, compress=c.compressed)


def blob_refs(index: dict) -> Iterator[tuple[str, dict]]:
    """Every blob reference in an index, labelled."""
    for t in index["tensors"]:
        st = t["stream"]
        if st.get("side"):
            yield f"tensor {t['name']} side", st["side"]
        for k, ch in enumerate(st["chunks"]):
            yield f"tensor {t['name']} chunk {k}", ch
    for c in index["carried"]:
        yield f"carried {c['name']}", c["blob"]


def regions(path: Path) -> list[tuple[int, int, str]]:
    """(start, end, kind) byte ranges of a container: header, blob, padding, index, trailer."""
    c = read_container(path)
    out = [(0, HEADER.size, "header")]
    for _, ref in blob_refs(c.index):
        if ref["length"]:
            out.append((ref["offset"], ref["offset"] + ref["length"], "blob"))
    out.sort()
    filled, pos = [], 0
    for a, b, kind in out:
        if a > pos:
            filled.append((pos, a, "padding"))
        filled.append((a, b, kind))
        pos = max(pos, b)
    if c.index_offset > pos:
        filled.append((pos, c.index_offset, "padding"))
    filled.append((c.index_offset, c.index_offset + c.trailer[1], "index"))
    filled.append((c.size - TRAILER.size, c.size, "trailer"))
    return filled


def region_of(regs: list[tuple[int, int, str]], byte: int) -> str:
    for a, b, kind in regs:
        if a <= byte < b:
            return kind
    raise ValueError(byte)


def flip_bit(src: Path, dst: Path, bit: int) -> Path:
    data = bytearray(Path(src).read_bytes())
    data[bit // 8] ^= 1 << (bit % 8)
    Path(dst).write_bytes(bytes(data))
    return Path(dst)


def truncate(src: Path, dst: Path, n: int) -> Path:
    Path(dst).write_bytes(Path(src).read_bytes()[:n])
    return Path(dst)


def tree(root: Path) -> dict:
    """Every path under `root` (not following links) with its kind and content hash: to detect any change."""
    import hashlib
    import os

    out = {}
    root = Path(root)
    if not root.exists() and not root.is_symlink():
        return out
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir",)
            else:
                out[rel] = ("file", hashlib.sha256(p.read_bytes()).hexdigest())
    return out
