"""Log-spaced histogram buckets of milliseconds, as counted in PostgreSQL by the functions of
migration 0013_stats (runyard_hist_bucket, runyard_hist): keep the two in step.

Bucket 0 holds values below 1 ms; bucket i (1..216) holds [2^((i-1)/8), 2^(i/8)) ms, each 9%
wider than the one before; bucket 217 holds everything from 2^27 ms (37 hours) up. A percentile
read from them is interpolated inside the bucket it falls in, so it lies within one bucket of the
exact value: within 9% of it (durations below 1 ms read as under 1 ms).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

BUCKETS = 218
STEPS_PER_DOUBLING = 8
LAST = BUCKETS - 1


def lower_bound(index: int) -> float:
    """Smallest value (ms) counted in bucket `index`."""
    return 0.0 if index == 0 else 2.0 ** ((index - 1) / STEPS_PER_DOUBLING)


def upper_bound(index: int) -> float:
    """First value (ms) past bucket `index` (infinite for the last)."""
    return float("inf") if index == LAST else 2.0 ** (index / STEPS_PER_DOUBLING)


def add(histograms: Iterable[Sequence[int] | None]) -> list[int]:
    total = [0] * BUCKETS
    for histogram in histograms:
        if histogram:
            for index, count in enumerate(histogram):
                total[index] += count
    return total


def percentile(histogram: Sequence[int], fraction: float) -> float | None:
    """The value (ms) below which `fraction` of the counted values lie, interpolated
    geometrically inside its bucket (linearly in bucket 0); None when nothing was counted."""
    count = sum(histogram)
    if count == 0:
        return None
    rank = fraction * count
    seen = 0
    for index, in_bucket in enumerate(histogram):
        if in_bucket and seen + in_bucket >= rank:
            share = (rank - seen) / in_bucket
            low, high = lower_bound(index), upper_bound(index)
            if index == 0:
                return high * share
            if index == LAST:
                return low
            return low * (high / low) ** share
        seen += in_bucket
    return lower_bound(LAST)


def cumulative_at(histogram: Sequence[int], doublings: Sequence[int]) -> list[int]:
    """Counts of values below 2^k ms for each k in `doublings` (ascending): the `le` buckets of
    a Prometheus histogram, exact since they fall on bucket edges."""
    result = []
    running = 0
    upto = 0
    for k in doublings:
        edge = k * STEPS_PER_DOUBLING  # buckets 0..edge hold the values below 2^k ms
        while upto <= edge and upto < BUCKETS:
            running += histogram[upto]
            upto += 1
        result.append(running)
    return result
