"""Throughput against a bare echo server, and memory per connection and per cached token.

Throughput: `warmsocket serve` (built-in model, no latency) and a `websockets` echo
server, each in its own process, driven by a load generator in a third process at 1,
16, 64 and 256 concurrent connections, alternating which server goes first. Target
at 64 connections: turns/s at least 10% of the echo's round trips/s, p99 turn latency
under 50 ms. Every turn's answer is checked by the load generator.

Memory: a fresh server's resident set (`/proc/<pid>/status`) before and after 1,000
idle connections, and before and after about 1M tokens of stored context. Targets:
under 32 KiB per idle connection; growth under 1.5x the raw item bytes.

Without `--benchmark-enable` both run small, once (smoke); with it, at full size with
the targets asserted. Same as `warmsocket bench --size full --suites throughput,memory`.
"""

from __future__ import annotations

from typing import Any

import pytest

from benches.servers import require_release_build, timing_enabled
from warmsocket.bench import runner, targets
from warmsocket.bench.memory import run_memory
from warmsocket.bench.throughput import run_throughput


def _assert_met(rows: list[targets.Target]) -> None:
    failed = [t.line() for t in rows if t.met is False]
    assert not failed, "targets not met:\n" + "\n".join(failed)


@pytest.mark.timeout(900)
@pytest.mark.benchmark(group="throughput")
def test_throughput_vs_echo_server(benchmark: Any) -> None:
    require_release_build(benchmark)
    timed = timing_enabled(benchmark)
    config = runner.options_for("full" if timed else "smoke").throughput
    result: dict[str, Any] = {}
    benchmark.pedantic(
        lambda: result.update(run_throughput(config, lambda _label: None)), rounds=1, iterations=1
    )
    for point in result["points"]:
        assert point["warmsocket"]["ops"] > 0 and point["echo"]["ops"] > 0, point
    rows = targets.throughput_targets(result)
    benchmark.extra_info["points"] = result["points"]
    benchmark.extra_info["targets"] = [t.as_dict() for t in rows]
    if timed:
        _assert_met(rows)


@pytest.mark.timeout(1800)
@pytest.mark.benchmark(group="memory")
def test_memory_per_connection_and_per_token(benchmark: Any) -> None:
    require_release_build(benchmark)
    timed = timing_enabled(benchmark)
    config = runner.options_for("full" if timed else "smoke").memory
    result: dict[str, Any] = {}
    benchmark.pedantic(
        lambda: result.update(run_memory(config, lambda _label: None)), rounds=1, iterations=1
    )
    assert result["idle"]["server_open_connections"] == config.connections
    assert result["cache"]["tokens"] >= 0.9 * config.tokens
    rows = targets.memory_targets(result)
    benchmark.extra_info.update(result)
    benchmark.extra_info["targets"] = [t.as_dict() for t in rows]
    if timed:
        _assert_met(rows)
