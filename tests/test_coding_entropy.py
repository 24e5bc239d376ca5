"""ANS coding with stored integer tables (coding/entropy.py): the tables are exactly what constriction codes
with (an independent reference decoder reads its streams)."""

import numpy as np

from weightpack.coding import entropy


def test_quantize_counts_sums_and_gives_every_symbol_a_frequency():
    rng = np.random.default_rng(1)
    for _ in range(200):
        A = int(rng.integers(2, 3000))
        counts = rng.geometric(0.01, size=A) * (rng.random(A) < 0.7)
        if counts.sum() == 0:
            continue
        f = entropy.quantize_counts(counts)
        assert f.sum() == 1 << entropy.TABLE_BITS
        assert f.min() >= 1 and np.argmax(f) == np.argmax(counts)
        w = entropy.widen_table(f)
        assert w.sum() == 1 << entropy.MODEL_BITS


def _reference_ans_decode(words: np.ndarray, f24: np.ndarray, n: int) -> list[int]:
    """An independent decoder of constriction's AnsCoder stream (24-bit precision, 32-bit words)."""
    cdf = np.concatenate([[0], np.cumsum(f24)])
    words = [int(w) for w in words]
    # The final state ends the stream as [low, high]; a state below 2**32 (nothing flushed yet) is one word.
    state = words.pop() if len(words) == 1 else words.pop() << 32 | words.pop()
    out = []
    for _ in range(n):
        q = state & 0xFFFFFF
        s = int(np.searchsorted(cdf, q, side="right") - 1)
        out.append(s)
        state = (state >> 24) * int(f24[s]) + q - int(cdf[s])
        if state < 2**32 and words:
            state = state << 32 | words.pop()
    return out


def test_stored_integer_tables_are_exactly_what_constriction_codes_with():
    """The stored 16-bit table, widened, is the coder's exact table: a decoder that is not constriction
    decodes constriction's stream with it (so CPU and GPU decoders can share the integers)."""
    rng = np.random.default_rng(7)
    for trial in range(60):
        A = int(rng.integers(2, 300))
        p = rng.dirichlet(np.full(A, 0.3))
        syms = rng.choice(A, size=int(rng.integers(1, 3000)), p=p).astype(np.int32)
        f16 = entropy.quantize_counts(np.bincount(syms, minlength=A))
        words = entropy.ans_encode([(syms, entropy.make_model(f16))])
        assert _reference_ans_decode(words, entropy.widen_table(f16), len(syms)) == syms.tolist()
