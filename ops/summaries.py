"""Summaries of a metric column read batch by batch, in memory that does not grow with the rows: a histogram
(a first pass finds the range, a second counts; NaN and infinities are counted apart) and the N worst and best rows
(a bounded selection merged per batch). Which end is worse is a property of the metric, named by its suffix."""

from __future__ import annotations

import numpy as np

# metric suffix -> True when larger is better (PSNR, identity similarity), False when smaller is (distances)
HIGHER_IS_BETTER = {"psnr": True, "id_sim": True, "ssim": True, "lpips": False, "mse": False}


def metric_direction(column: str) -> bool | None:
    """True/False as HIGHER_IS_BETTER for a column named `<anything>_<metric>` or `<metric>`; None: not a metric."""
    for suffix, higher in HIGHER_IS_BETTER.items():
        if column == suffix or column.endswith("_" + suffix):
            return higher
    return None


class Histogram:
    """Counts of finite values in `bins` equal bins over [lo, hi]; call `extend` on every batch (first pass), then
    `add` on every batch again (second pass)."""

    def __init__(self, bins: int = 30):
        self.bins = bins
        self.lo, self.hi = np.inf, -np.inf
        self.counts = np.zeros(bins, dtype=np.int64)
        self.non_finite = 0
        self.n = 0
        self.total = 0.0

    def extend(self, values: np.ndarray) -> None:
        finite = values[np.isfinite(values)]
        if finite.size:
            self.lo, self.hi = min(self.lo, float(finite.min())), max(self.hi, float(finite.max()))

    def edges(self) -> np.ndarray:
        if not np.isfinite(self.lo):
            return np.zeros(self.bins + 1)
        hi = self.hi if self.hi > self.lo else self.lo + 1.0  # one value: one bin of width 1 holds it
        return np.linspace(self.lo, hi, self.bins + 1)

    def mean(self) -> float:
        return self.total / self.n if self.n else float("nan")

    def add(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float64)
        finite = values[np.isfinite(values)]
        self.non_finite += int(values.size - finite.size)
        self.n += int(finite.size)
        self.total += float(finite.sum())
        if finite.size:
            # np.histogram's rule: bins are half-open but the last includes its right edge
            self.counts += np.histogram(finite, bins=self.edges())[0]


class Extremes:
    """The `n` rows with the smallest values and the `n` with the largest (finite values only), as (value, label)
    pairs, kept across batches by selecting within the union of the kept rows and the new batch."""

    def __init__(self, n: int = 12):
        self.n = n
        self.low = (np.empty(0), np.empty(0, dtype=object))
        self.high = (np.empty(0), np.empty(0, dtype=object))

    @staticmethod
    def _keep(values: np.ndarray, labels: np.ndarray, n: int, largest: bool) -> tuple[np.ndarray, np.ndarray]:
        order = np.lexsort((labels.astype(str), -values if largest else values))[:n]  # ties: by label
        return values[order], labels[order]

    def candidates(self, values: np.ndarray) -> np.ndarray:
        """Indices of the rows of a batch that may enter (ties at the cut included), so that labels need only be
        made for those."""
        values = np.asarray(values, dtype=np.float64)
        finite = np.flatnonzero(np.isfinite(values))
        if finite.size <= 2 * self.n:
            return finite
        v = values[finite]
        low = np.partition(v, self.n - 1)[self.n - 1]
        high = -np.partition(-v, self.n - 1)[self.n - 1]
        return finite[(v <= low) | (v >= high)]

    def add(self, values: np.ndarray, labels) -> None:
        values = np.asarray(values, dtype=np.float64)
        labels = np.asarray(labels, dtype=object)
        finite = np.isfinite(values)
        values, labels = values[finite], labels[finite]
        for name, largest in (("low", False), ("high", True)):
            kept = getattr(self, name)
            both = np.concatenate([kept[0], values]), np.concatenate([kept[1], labels])
            setattr(self, name, self._keep(*both, self.n, largest))

    def worst(self, higher_is_better: bool) -> list[tuple[float, object]]:
        values, labels = self.low if higher_is_better else self.high
        return list(zip(values.tolist(), labels.tolist()))

    def best(self, higher_is_better: bool) -> list[tuple[float, object]]:
        values, labels = self.high if higher_is_better else self.low
        return list(zip(values.tolist(), labels.tolist()))
