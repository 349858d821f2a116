"""ops/summaries.py against numpy on the whole column at once."""

import numpy as np

from ops.summaries import Extremes, Histogram, metric_direction


def batches(values, sizes):
    out, start = [], 0
    for n in sizes:
        out.append(values[start:start + n])
        start += n
    return out


def test_histogram_in_batches_equals_numpy_on_the_whole_column():
    rng = np.random.default_rng(0)
    values = rng.normal(30, 4, 1000)
    values[[3, 500, 999]] = [np.nan, np.inf, -np.inf]
    parts = batches(values, [1, 400, 0, 599])
    h = Histogram(bins=17)
    for p in parts:
        h.extend(p)
    for p in parts:
        h.add(p)
    finite = values[np.isfinite(values)]
    counts, edges = np.histogram(finite, bins=17)
    np.testing.assert_array_equal(h.counts, counts)
    np.testing.assert_allclose(h.edges(), edges)
    assert h.n == finite.size == h.counts.sum() and h.non_finite == 3
    assert np.isclose(h.mean(), finite.mean()) and (h.lo, h.hi) == (finite.min(), finite.max())


def test_histogram_of_one_value_and_of_nothing():
    h = Histogram(bins=5)
    h.extend(np.array([2.0, 2.0]))
    h.add(np.array([2.0, 2.0]))
    assert h.counts.sum() == 2 and h.edges()[0] <= 2.0 <= h.edges()[-1]
    empty = Histogram(bins=5)
    empty.extend(np.array([np.nan]))
    empty.add(np.array([np.nan]))
    assert empty.n == 0 and empty.non_finite == 1 and empty.counts.sum() == 0


def test_extremes_in_batches_equal_a_full_sort():
    rng = np.random.default_rng(1)
    values = rng.integers(0, 50, 700).astype(float)  # many ties: broken by key
    values[10] = np.nan
    keys = np.array([f"k{i:04d}" for i in range(700)], dtype=object)
    e = Extremes(n=9)
    for v, k in zip(batches(values, [100, 1, 299, 300]), batches(keys, [100, 1, 299, 300])):
        e.add(v, k)
    finite = np.isfinite(values)
    rows = sorted(zip(values[finite].tolist(), keys[finite].tolist()))
    largest = sorted(zip(values[finite].tolist(), keys[finite].tolist()), key=lambda r: (-r[0], r[1]))
    assert e.worst(higher_is_better=True) == rows[:9] == e.best(higher_is_better=False)
    assert e.best(higher_is_better=True) == largest[:9] == e.worst(higher_is_better=False)


def test_metric_directions_by_suffix():
    assert metric_direction("wplus_psnr") is True and metric_direction("id_sim") is True
    assert metric_direction("fwplus_lpips") is False and metric_direction("s_mse") is False
    assert metric_direction("wplus_seconds") is None and metric_direction("psnr_note") is None
