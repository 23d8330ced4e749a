import math
import random

import numpy as np
import pytest

from bench.stats import percentile


def test_percentile_interpolates_between_ranks():
    values = [4.0, 1.0, 3.0, 2.0]  # unsorted on purpose
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    assert percentile(values, 50) == 2.5
    assert percentile(values, 25) == pytest.approx(1.75)


def test_p99_of_few_samples_is_not_the_maximum():
    values = [float(i) for i in range(1, 11)]  # 1..10
    assert percentile(values, 99) == pytest.approx(9.91)
    assert percentile(values, 90) == pytest.approx(9.1)


def test_percentile_matches_numpy():
    rng = random.Random(0)
    for size in (1, 2, 7, 99, 100, 1001):
        values = [rng.expovariate(1.0) for _ in range(size)]
        for q in (0, 1, 25, 50, 90, 99, 99.9, 100):
            assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_edges():
    assert math.isnan(percentile([], 50))
    assert percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        percentile([1.0], 101)
