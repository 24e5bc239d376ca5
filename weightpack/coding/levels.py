"""The pack levels (1 fastest .. 3 smallest) and what each sets for the lossless codecs. Import-free, so that
recipes (recipe.py) and the codecs read the same table without depending on each other."""

from __future__ import annotations

# Per level: mantissa bits in the head (at most), the largest head alphabet for 16-bit floats (decode
# speed falls as the alphabet grows: fewer mantissa bits are taken above it), most contexts, zstd level,
# whether bytes coding is tried per chunk.
LEVELS = {
    1: dict(k=0, alphabet16=4096, contexts=1, zstd=3, try_bytes=False),
    2: dict(k=2, alphabet16=64, contexts=4, zstd=3, try_bytes=True),
    3: dict(k=3, alphabet16=4096, contexts=8, zstd=19, try_bytes=True),
}
DEFAULT_LEVEL = 2
