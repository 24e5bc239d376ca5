"""The chain of lossy stages for one tensor: raw bytes in, coded parts out, and back.

A tensor with stages is stored as parts (quantized levels, scales, ...), each coded as its own stream;
its record carries the stages' parameters, the SHA-256 of the reconstruction (checked on every decode)
and the quality measured at pack time.
"""

from __future__ import annotations

import hashlib
import math
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

from ..dtypes import torch_dtype, torch_view
from ..errors import FormatError, RecipeError
from .params import LOSSY_DTYPES, LowRankParams, chain_parts, params_of


@dataclass
class Encoded:
    stages: list[dict]
    parts: dict[str, tuple[str, list[int], bytes]]  # name -> (safetensors dtype, shape, raw bytes)
    decoded_sha256: str
    quality: dict
    params: list  # the stages' parameters (QuantParams last)
    lowrank: Optional[dict] = None  # what a low-rank stage decided, and its estimates


def can_apply(dtype: str, numel: int) -> bool:
    return dtype in LOSSY_DTYPES and numel > 0


_threads_lock = threading.Lock()
_threads_users = 0
_threads_saved = 0


@contextmanager
def _one_torch_thread():
    """Torch's own thread pool busy-waits and slows 15-40x when any other process wants the cores (the
    pack's coder workers do): the stages run in one thread, the parallelism is the worker pool's. Several
    threads of a decode may be inside at once: the first sets one thread, the last restores the count."""
    import torch

    global _threads_users, _threads_saved
    with _threads_lock:
        if _threads_users == 0:
            _threads_saved = torch.get_num_threads()
            torch.set_num_threads(1)
        _threads_users += 1
    try:
        yield
    finally:
        with _threads_lock:
            _threads_users -= 1
            if _threads_users == 0:
                torch.set_num_threads(_threads_saved)


def _writable(raw) -> bytearray:
    return raw if isinstance(raw, bytearray) else bytearray(raw)


def _raw(x) -> bytes:
    import torch

    return x.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def encode(dtype: str, shape: list[int], raw: bytearray, stages: list) -> Encoded | None:
    """Apply the stages; None when the tensor holds NaN or infinity (it is then packed losslessly)."""
    with _one_torch_thread():
        return _encode(dtype, shape, raw, stages)


def _encode(dtype: str, shape: list[int], raw: bytearray, stages: list) -> Encoded | None:
    import torch

    from . import lowrank, prune, quantize

    *before, p = stages
    w = torch_view(raw, dtype, shape).to(torch.float32)
    if not bool(torch.isfinite(w).all()):
        return None
    x, base, chain, lr_parts, note, parts = w, None, [p], {}, None, None
    try:
        if before and isinstance(before[0], LowRankParams):
            rank, note, parts = (lowrank.decide(before[0], w, p, quantize.encode) if len(shape) >= 2
                                 else (0, None, None))
            if rank:
                parts = None
                lr_parts = lowrank.factorize(w, rank)
                base = lowrank.product(lr_parts, shape)
                x = w - base
                p = lowrank.residual_params(p, w, x)
                chain = [LowRankParams(rank), p]
        elif before:
            x = prune.apply(w, before[0])
            chain = [before[0], p]
        if parts is None:
            parts = quantize.encode(x, p)
    except ValueError as e:
        raise RecipeError(str(e)) from None
    recon = quantize.decode(parts, p, shape)
    if base is not None:
        recon = base + recon
    recon = recon.to(torch_dtype(dtype))
    decoded = _raw(recon)
    specs = chain_parts(chain, shape)
    parts = {**lr_parts, **parts}
    return Encoded(
        stages=[s.to_json() for s in chain],
        parts={name: (specs[name][0], specs[name][1], _raw(t.to(torch_dtype(specs[name][0]))))
               for name, t in parts.items()},
        decoded_sha256=hashlib.sha256(decoded).hexdigest(),
        quality=quality(w.numpy(), recon.to(w.dtype).numpy()),
        params=chain,
        lowrank=note,
    )


def decode(t: dict, parts: dict[str, bytes | bytearray]) -> "np.ndarray":
    """The reconstructed raw bytes of a tensor (a uint8 array) from its decoded parts; checks the recorded
    SHA-256."""
    where = f"tensor {t['name']!r}"
    tensors = {part["name"]: torch_view(_writable(parts[part["name"]]), part["dtype"], part["shape"])
               for part in t["parts"]}
    with _one_torch_thread():
        raw = reconstruct(t, tensors).contiguous().reshape(-1).view(torch_dtype("U8")).numpy()
    if hashlib.sha256(raw).hexdigest() != t["decoded_sha256"]:
        raise FormatError(f"{where}: reconstruction does not match its recorded hash")
    return raw


def reconstruct(t: dict, tensors: dict) -> "torch.Tensor":
    """The tensor (in its dtype and shape, on its parts' device) from its parts as torch tensors."""
    from . import lowrank, quantize

    where = f"tensor {t['name']!r}"
    chain = params_of(t, where)
    try:
        x = quantize.decode(tensors, chain[-1], t["shape"])
        if isinstance(chain[0], LowRankParams):
            x = lowrank.product(tensors, t["shape"]) + x
    except ValueError as e:
        raise FormatError(f"{where}: {e}") from None
    return x.to(torch_dtype(t["dtype"]))


def quality_against(t: dict, decoded: bytes, source: bytes) -> dict:
    """SQNR and relative error of a decoded tensor against the source's bytes."""
    import torch

    a = torch_view(bytearray(source), t["dtype"], t["shape"]).to(torch.float64).numpy()
    b = torch_view(bytearray(decoded), t["dtype"], t["shape"]).to(torch.float64).numpy()
    return quality(a, b)


def quality(original, decoded) -> dict:
    """SQNR in dB and relative error (||d - o|| / ||o||) of a decoded tensor (numpy arrays)."""
    import numpy as np

    o = np.asarray(original, dtype=np.float64).ravel()
    err = float(np.square(np.asarray(decoded, dtype=np.float64).ravel() - o).sum())
    sig = float(np.square(o).sum())
    if err == 0:
        return {"sqnr_db": None, "rel_error": 0.0}  # exact: SQNR is infinite (JSON has no inf)
    rel = math.sqrt(err / sig) if sig else float("inf")
    return {"sqnr_db": 10 * math.log10(sig / err) if sig else None, "rel_error": rel if sig else None}
