"""The stack coder: Gaussians over the grid (one or two levels, escapes), uniforms, bit counts."""

import math

import numpy as np
import pytest

from flowpp.codec.entropy import COARSE_STD, WINDOW, StackCoder


def _seed(words=20000, seed=0):
    return np.random.default_rng(seed).integers(1, 2**32, size=words, dtype=np.uint64).astype(np.uint32)


@pytest.mark.parametrize("std", [0.6, 5.0, COARSE_STD, 3 * COARSE_STD, 1e5, 3e8])
def test_a_pop_undone_by_its_push_restores_the_stack_and_costs_the_gaussians_entropy(std):
    seed = _seed()
    coder = StackCoder(seed)
    n = 4000
    mean = np.random.default_rng(1).normal(size=n) * 1e4
    before = coder.num_bits()
    k = coder.pop_gaussian(mean, np.full(n, std))
    taken = (before - coder.num_bits()) / n
    assert coder.low_water == coder.num_bits()
    coder.push_gaussian(k, mean, np.full(n, std))
    assert np.array_equal(coder.words(), seed)
    z = (k - mean) / std
    assert abs(z.mean()) < 0.1
    if std >= 5:  # wide enough that the quantized Gaussian is close to the continuous one
        assert 0.9 < z.std() < 1.1
        assert taken == pytest.approx(0.5 * math.log2(2 * math.pi * math.e * std**2), abs=0.06)


def test_values_far_in_a_tail_are_escaped_not_refused():
    seed = _seed(64)
    coder = StackCoder(seed)
    values = np.array([10**6, -(10**6), 3, -WINDOW * 40])
    coder.push_gaussian(values, np.zeros(4), np.full(4, 2.0))
    assert np.array_equal(coder.pop_gaussian(np.zeros(4), np.full(4, 2.0)), values)
    assert np.array_equal(coder.words(), seed)


def test_uniforms_of_every_size_round_trip_including_sizes_beyond_constrictions_limit():
    seed = _seed(256)
    coder = StackCoder(seed)
    sizes = np.array([1, 2, 7, 4096, 2**23, 2**23 + 5, 2**30, 2**40], dtype=np.int64)
    values = coder.pop_uniform(sizes)
    assert ((values >= 0) & (values < sizes)).all() and values[0] == 0
    coder.push_uniform(values, sizes)
    assert np.array_equal(coder.words(), seed)
    fresh = StackCoder()
    fresh.push_uniform(np.array([0, 1, 6, 4095]), np.array([1, 2, 7, 4096]))
    assert fresh.num_bits() > 0
    assert list(fresh.pop_uniform(np.array([1, 2, 7, 4096]))) == [0, 1, 6, 4095]


def test_a_non_finite_distribution_is_refused():
    from flowpp.codec import CodecError

    with pytest.raises(CodecError, match="non-finite"):
        StackCoder(_seed(8)).pop_gaussian(np.array([np.nan]), np.array([1.0]))
    with pytest.raises(CodecError, match="non-positive"):
        StackCoder(_seed(8)).push_gaussian(np.array([1]), np.array([0.0]), np.array([0.0]))


def test_a_decode_that_lands_on_an_escape_stays_near_the_window():
    """Escapes have the models' minimum probability, so a long stream will decode some; the
    distance that follows must be small then, not up to 2**23 coarse bins."""
    seed = _seed(4000)
    coder = StackCoder(seed)
    excess = coder._pop_excess(20000)
    assert np.median(excess) <= 1 and excess.max() < 2**10
    coder._push_excess(excess)
    assert np.array_equal(coder.words(), seed)
    for value in [0, 1, 2, 3, 4, 5, 1000, 2**22, 2**23 - 1]:
        fresh = StackCoder(_seed(8))
        fresh._push_excess(np.array([value]))
        assert int(fresh._pop_excess(1)[0]) == value
