"""Shared bench helpers: machine description and timing statistics."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from dreamlab.bench.report import machine  # noqa: F401 - re-exported for the bench scripts


def time_ms(fn: Callable[[], object], repeats: int, warmup: int = 2) -> tuple[float, float]:
    """Median and min wall time of ``fn`` in milliseconds."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(samples), min(samples)
