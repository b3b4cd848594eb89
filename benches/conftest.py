"""Bench helpers: refuse to time a debug build, and a stopwatch for the target checks.

`pytest` runs with `--benchmark-disable` (see pyproject), so every bench runs once as
a smoke test; `--benchmark-enable` times them and turns on the target assertions.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from warmsocket import BUILD_PROFILE


def timing_enabled(config: pytest.Config) -> bool:
    return bool(config.getoption("benchmark_enable")) or not config.getoption("benchmark_disable")


@pytest.fixture
def timing(request: pytest.FixtureRequest) -> Iterator[bool]:
    """Whether this run times benchmarks; skips when asked to time a debug build."""
    enabled = timing_enabled(request.config)
    if enabled and BUILD_PROFILE != "release":
        pytest.skip("refusing to time a debug build: `maturin develop --release` first")
    yield enabled


Stopwatch = Callable[..., float]


def best_seconds(
    work: Callable[[], object],
    *,
    setup: Callable[[], object] = lambda: None,
    repeats: int = 15,
) -> float:
    """The fastest of `repeats` timed calls of `work`, each after an untimed `setup`."""
    best = float("inf")
    for _ in range(repeats):
        setup()
        start = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - start)
    return best


@pytest.fixture
def stopwatch(timing: bool) -> Stopwatch:
    """`best_seconds`, for the target checks; skips unless timing is enabled."""
    if not timing:
        pytest.skip("performance targets are checked with --benchmark-enable")
    return best_seconds
