"""Entropy coding with constriction's AnsCoder, driven by integer frequency tables.

Tables are stored in the container as integers at 15-bit precision (TABLE_BITS) and widened
deterministically to the coder's 24-bit precision (MODEL_BITS), so any decoder (constriction, numpy,
a GPU kernel) works from the same integers. constriction's `Categorical(p, perfect=False)` with
`p_i = f_i - 1` (float64) reproduces an integer table `f` that sums to 2**24 exactly.

A chunk holds symbols from several contexts: the symbols of each context are coded as one group with
that context's table, groups in context order, all in one AnsCoder stream.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import constriction

from ..errors import FormatError
from . import entropy_native
from .lanes import lane_count, lane_words, lanes_runs

TABLE_BITS = 15
MODEL_BITS = 24
_Ans = constriction.stream.stack.AnsCoder
_Categorical = constriction.stream.model.Categorical


def quantize_counts(counts: np.ndarray, bits: int = TABLE_BITS) -> np.ndarray:
    """Integer frequencies summing to 2**bits, every symbol at least 1 (so the coder's table is the
    stored one shifted left, exactly; see widen_table). Deterministic."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    target = 1 << bits
    if total == 0 or len(counts) > target:
        raise ValueError("empty histogram or alphabet too large")
    f = 1 + (counts * (target - len(counts))) // total
    f[int(np.argmax(counts))] += target - int(f.sum())
    return f


def widen_table(f: np.ndarray) -> np.ndarray:
    """The coder's 24-bit table of a stored 15-bit table (all entries >= 1): f << 9."""
    return f.astype(np.int64) << (MODEL_BITS - TABLE_BITS)


MAX_ALPHABET = 1 << 12


def check_table(f: np.ndarray, where: str) -> None:
    """A stored table must be usable: 2..MAX_ALPHABET entries, each >= 1, summing to 2**TABLE_BITS."""
    if f.ndim != 1 or not 2 <= len(f) <= MAX_ALPHABET or int(f.min()) < 1 or int(f.sum()) != (1 << TABLE_BITS):
        raise FormatError(f"{where}: malformed frequency table")


def make_model(f: np.ndarray):
    f24 = widen_table(f)
    return _Categorical((f24 - 1).astype(np.float64), perfect=False)


class Tables:
    """A stream's stored tables (one per context) and, built on first use, what each decoder needs from
    them: constriction models, or the compiled coder's tables (coding/entropy_native.py)."""

    def __init__(self, tables):
        self.tables = [np.asarray(t) for t in tables]
        self._models: Optional[list] = None
        self._slots: Optional[tuple] = None
        self._enc: Optional[tuple] = None
        self._fast: Optional[tuple] = None

    def models(self) -> list:
        if self._models is None:
            self._models = [make_model(t) for t in self.tables]
        return self._models

    def encoder(self) -> tuple:
        if self._enc is None:
            self._enc = entropy_native.enc_tables(np.stack(self.tables))
        return self._enc

    def fast(self) -> tuple:
        if self._fast is None:
            self._fast = entropy_native.fast_slots(self.tables)
        return self._fast

    def slots(self) -> tuple:
        if self._slots is None:
            self._slots = entropy_native.slot_tables(self.tables)
        return self._slots


def ans_encode(groups: list[tuple[np.ndarray, object]]) -> np.ndarray:
    """Encode groups of (symbols, model) into one stream; decode returns them in the same order."""
    coder = _Ans()
    for syms, model in reversed(groups):
        if len(syms):
            coder.encode_reverse(np.ascontiguousarray(syms, dtype=np.int32), model)
    return coder.get_compressed()


def ans_decode(words: np.ndarray, groups: list[tuple[int, object]], where: str) -> list[np.ndarray]:
    """Decode groups of (count, model) from one stream; the stream must be used up exactly."""
    dec = Decoder(words, where)
    out = [dec.decode(model, n) if n else np.empty(0, dtype=np.int32) for n, model in groups]
    dec.finish()
    return out


def bits_with_table(counts: np.ndarray, f16: np.ndarray) -> float:
    """Bits to code a histogram with a given stored table (its 24-bit widening)."""
    f24 = widen_table(f16).astype(np.float64)
    nz = counts > 0
    return float(-(counts[nz] * np.log2(f24[nz] / (1 << MODEL_BITS))).sum())


class Decoder:
    """Decodes groups of symbols from one stream, one call per group; `finish` checks it was used up."""

    def __init__(self, words: np.ndarray, where: str):
        self.where = where
        try:
            self.coder = _Ans(np.ascontiguousarray(words, dtype=np.uint32))
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # e.g. a stream ending in a zero word
            raise FormatError(f"{where}: entropy-coded data is corrupt ({e})") from None

    def decode(self, model, n: int) -> np.ndarray:
        try:
            return self.coder.decode(model, n)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # constriction may raise (or panic) on corrupt data
            raise FormatError(f"{self.where}: entropy-coded data is corrupt ({e})") from None

    def finish(self) -> None:
        if not self.coder.is_empty():
            raise FormatError(f"{self.where}: entropy-coded data is corrupt (stream not used up)")


# -- lanes: one stream of symbols dealt onto independent ANS streams ----------------------------------
#
# Symbols in coding order (runs of contexts, as for ans_encode) are dealt round-robin onto
# nl = ceil(n / lane) lanes: symbol i goes to lane i % nl. Each lane is its own AnsCoder stream, coded
# with the table of each symbol's run. The payload is nl little-endian u32 word counts, then each lane's
# words. A parallel decoder (lockstep.py: a GPU kernel, or vectorized torch) decodes all lanes at once,
# lane j writing symbols j, j + nl, j + 2nl, ... so that neighbouring lanes write neighbouring symbols.

LANE = 1 << 14  # symbols per lane (at most): what a writer uses
MIN_LANE, MAX_LANE = 1 << 6, 1 << 22


def lanes_encode(syms: np.ndarray, runs: list[tuple[int, object]], lane: int) -> bytes:
    """Code symbols (runs of (count, model), counts summing to len(syms)) as lanes; see above."""
    n = len(syms)
    nl = lane_count(n, lane)
    per = lanes_runs([c for c, _ in runs], nl).tolist()
    heads, bodies = [], []
    for j in range(nl):
        mine = syms[j::nl]
        groups, off = [], 0
        for cnt, (_, model) in zip(per[j], runs):
            groups.append((mine[off:off + cnt], model))
            off += cnt
        words = ans_encode(groups)
        heads.append(len(words))
        bodies.append(words.astype("<u4").tobytes())
    return np.asarray(heads, dtype="<u4").tobytes() + b"".join(bodies)


def lanes_decode(payload, counts: list[int], tables: Tables, lane: int, where: str) -> np.ndarray:
    """Inverse of lanes_encode: the symbols in coding order (int32); run c holds counts[c] symbols of
    table c. One constriction call per lane and run (entropy_native.lanes_decode: the compiled one)."""
    n = int(sum(counts))
    nl = lane_count(n, lane)
    words, wc = lane_words(payload, n, lane, where)
    per = lanes_runs(counts, nl)
    out = np.empty(n, dtype=np.int32)
    ends = np.cumsum(wc).tolist()
    models = tables.models()
    begin = 0
    for j, row in enumerate(per.tolist()):
        dec = Decoder(words[begin:ends[j]], where)
        begin = ends[j]
        got = [dec.decode(models[c], k) for c, k in enumerate(row) if k]
        dec.finish()
        out[j::nl] = np.concatenate(got) if len(got) > 1 else got[0]
    return out
