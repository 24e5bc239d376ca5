"""Bit fields of a value (the `fields` codec): the split of each element into head symbol, and tail bits.

A value of W bits is read as  [sign: S bits][head: H bits][tail: T bits]  (S is 0 or 1).
For floats the head is the exponent plus the top k mantissa bits, and the tail is the rest of the
mantissa. The head carries almost all the redundancy and is entropy-coded; the tail and the sign are
near-uniform and are stored as packed bits, minus the trailing zeros a whole block has in common
(rows kept at a lower precision, floats upcast from BF16 or F16).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ....dtypes import DType

UINT = {8: np.uint8, 16: np.uint16, 32: np.uint32, 64: np.uint64}


@dataclass(frozen=True)
class Layout:
    bits: int  # W
    sign: int  # S: 0 or 1
    head: int  # H
    tail: int  # T

    def to_json(self) -> list[int]:
        return [self.bits, self.sign, self.head, self.tail]

    @staticmethod
    def from_json(v) -> "Layout":
        return Layout(*[int(x) for x in v])

    def valid(self) -> bool:
        whole16 = self.head == self.bits == 16 and self.sign == self.tail == 0
        return self.bits in UINT and self.sign in (0, 1) and (1 <= self.head <= 12 or whole16) and (
            self.tail >= 0 and self.sign + self.head + self.tail == self.bits)


def layout_for(dtype: DType, mantissa_head_bits: int) -> Layout | None:
    """The field layout for a dtype, or None where it is coded as plain bytes."""
    if dtype.is_float and dtype.bits in UINT:
        s = 1 if dtype.signed_float else 0
        k = min(dtype.mantissa, mantissa_head_bits, 12 - dtype.exponent)
        if dtype.bits == 8:  # whole byte but the sign: small alphabet, nothing left worth a tail
            k = dtype.mantissa
        return Layout(dtype.bits, s, dtype.exponent + k, dtype.mantissa - k)
    if dtype.bits == 8:  # I8, U8, BOOL: the whole byte is the symbol
        return Layout(8, 0, 8, 0)
    if dtype.bits == 16:  # I16, U16: whole values, when there are few distinct ones (else plain bytes)
        return Layout(16, 0, 16, 0)
    return None


def work_dtype(lay: Layout):
    """The unsigned dtype arithmetic on values of this layout is done in."""
    return UINT[max(lay.bits, 16)]


def split(u: np.ndarray, lay: Layout) -> tuple[np.ndarray, np.ndarray]:
    """Head values and the values themselves, both in the layout's working dtype."""
    wd = work_dtype(lay)
    v = u.astype(wd, copy=False)
    head = (v >> wd(lay.tail)) & wd((1 << lay.head) - 1)
    return head, v


def trailing_zeros(x: np.ndarray, cap: int) -> np.ndarray:
    """Trailing zero bits of each unsigned value, at most `cap`; zero counts as `cap`."""
    x = x.astype(np.uint64, copy=False)
    low = x & (~x + np.uint64(1))  # lowest set bit
    tz = np.full(len(x), cap, dtype=np.int64)
    nz = low != 0
    tz[nz] = np.minimum(np.log2(low[nz].astype(np.float64)).astype(np.int64), cap)
    return tz


def tail_values(v: np.ndarray, lay: Layout, tz: int) -> tuple[np.ndarray, int]:
    """The tail of each value with `tz` common trailing zeros dropped (sign on top), and its width."""
    wd = v.dtype.type
    t = lay.tail - tz
    low = (v & wd((1 << lay.tail) - 1)) >> wd(tz)
    if lay.sign:
        low |= (v >> wd(lay.bits - 1)) << wd(t)
    return low, t + lay.sign


def join(head: np.ndarray, tail: np.ndarray, lay: Layout, tz: int) -> np.ndarray:
    """Inverse of split/tail_values for elements sharing one `tz`, in the working dtype."""
    wd = work_dtype(lay)
    t = lay.tail - tz
    v = head.astype(wd, copy=False) << wd(lay.tail)
    tail = tail.astype(wd, copy=False)
    v |= (tail & wd((1 << t) - 1)) << wd(tz)
    if lay.sign:
        v |= (tail >> wd(t)) << wd(lay.bits - 1)
    return v


def subplanes(width: int) -> list[int]:
    """A width as whole bytes then a 4-, 2- and 1-bit plane: each packs with byte-wide array operations."""
    out = [8] * (width // 8)
    r = width % 8
    for w in (4, 2, 1):
        if r & w:
            out.append(w)
    return out


def packed_size(n: int, width: int) -> int:
    return sum(n if w == 8 else -(-n * w // 8) for w in subplanes(width))


def pack_bits(v: np.ndarray, width: int) -> bytes:
    """Pack unsigned values of `width` bits as planes, lowest bits first (see subplanes)."""
    out, shift = [], 0
    for w in subplanes(width):
        plane = ((v >> v.dtype.type(shift)) & v.dtype.type((1 << w) - 1)).astype(np.uint8)
        shift += w
        if w == 8:
            out.append(plane.tobytes())
            continue
        per = 8 // w
        pad = (-len(plane)) % per
        if pad:
            plane = np.concatenate([plane, np.zeros(pad, np.uint8)])
        g = plane.reshape(-1, per)
        acc = g[:, 0].copy()
        for j in range(1, per):
            acc |= g[:, j] << np.uint8(j * w)
        out.append(acc.tobytes())
    return b"".join(out)


def unpack_bits(buf, n: int, width: int, dtype=np.uint64) -> np.ndarray:
    """Inverse of pack_bits: `n` values of `width` bits from exactly packed_size(n, width) bytes."""
    a = np.frombuffer(buf, dtype=np.uint8)
    v = np.zeros(n, dtype=dtype)
    off, shift = 0, 0
    for w in subplanes(width):
        if w == 8:
            plane = a[off:off + n]
            off += n
        else:
            per = 8 // w
            size = -(-n * w // 8)
            g = a[off:off + size]
            off += size
            mask = np.uint8((1 << w) - 1)
            planes = np.empty((size, per), np.uint8)
            for j in range(per):
                planes[:, j] = (g >> np.uint8(j * w)) & mask
            plane = planes.reshape(-1)[:n]
        v |= plane.astype(dtype) << dtype(shift)
        shift += w
    return v
