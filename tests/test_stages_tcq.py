"""Trellis-coded quantization (stages/tcq.py): the 8-state machine, its walk over 256-element paths and
over parities, and the Viterbi search."""

import numpy as np
import pytest

from weightpack.stages import tcq as T


def walk_reference(lv):
    """The machine, one element at a time."""
    q = np.empty(lv.shape, np.int64)
    for i in range(lv.shape[0]):
        s = 0
        for j in range(lv.shape[1]):
            q[i, j] = T.QUANT[s]
            s = T.NEXT[s, lv[i, j] & 1]
    return q


def test_the_machine():
    # 8 states, each entered from exactly two (state, parity) branches; half the states on each quantizer
    assert sorted(T.NEXT.reshape(-1).tolist()) == sorted(list(range(T.STATES)) * 2)
    assert T.QUANT.sum() == T.STATES // 2
    rng = np.random.default_rng(1)
    lv = rng.integers(-9, 9, (37, T.PATH))
    assert np.array_equal(T.walk(lv), walk_reference(lv))
    k = rng.integers(-300, 300, 5 * T.PATH + 17)
    r = T.multiples(k)
    back, q = T.levels_of(r)
    assert np.array_equal(back.reshape(-1)[: len(k)], k)
    assert np.array_equal(T.reconstruct(back, q).reshape(-1)[: len(k)], r)
    # on Q0 only even multiples exist, on Q1 only odd ones and zero: anything else is refused
    bad = r.copy()
    bad[0] = 1  # the first element is on Q0 (state 0)
    with pytest.raises(ValueError):
        T.levels_of(bad)


def _mse(x, lv, delta):
    return float(np.mean((T.reconstruct(lv, T.walk(lv)) * delta - x) ** 2))


def test_viterbi_finds_the_least_distortion_path():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((64, T.PATH)) * 4.0
    rate = np.zeros((2, 1, 64))
    lv = T.viterbi(x, 0.0, rate, -32)
    best = _mse(x, lv, 1.0)
    # a greedy path (nearest level on each state's quantizer) is one of the paths the search weighed
    greedy = np.zeros_like(lv)
    state = np.zeros(len(x), np.int64)
    for j in range(T.PATH):
        q = T.QUANT[state]
        k0 = np.round(x[:, j] / 2)
        k1 = np.sign(x[:, j]) * np.round((np.abs(x[:, j]) + 1) / 2)
        greedy[:, j] = np.where(q == 0, k0, k1)
        state = T.NEXT[state, greedy[:, j] & 1]
    assert best <= _mse(x, greedy, 1.0)
    # the trellis's granular gain: below a scalar quantizer of step 2 (error 4/12) by at least 0.8 dB
    assert best < (4 / 12) / 10 ** 0.08
    # a rate weight trades error for fewer bits: zero made cheap, more zeros chosen
    rate[:, :, 32] = -5.0
    cheap_zero = T.viterbi(x, 1.0, rate, -32)
    assert (cheap_zero == 0).sum() > (lv == 0).sum()


def test_parity_walk_matches_the_machine():
    rng = np.random.default_rng(9)
    for n in (1, 255, 256, 257, 5000):
        k = rng.integers(-9, 10, n)
        assert np.array_equal(T.walk_parities((k & 1).astype(np.uint8)), T.walk(T.paths(k)).reshape(-1)[:n])
