"""Per-turn overhead of WebSocket mode in front of an upstream, vs vLLM's agentic-api.

A 60-turn chained conversation with 2 KB tool outputs (the model calls `read_file`
every turn; each turn sends the tool's output back) against the simulated upstream
with no artificial latency, in three arms interleaved turn by turn in one run:

* direct: the agent sends the full context to the upstream's `POST /v1/responses`
  (SSE) itself, keeping each item's JSON bytes so a request is one join;
* warmsocket: WebSocket mode through `warmsocket serve --upstream-api responses`,
  sending only the new item and `previous_response_id`;
* agentic-api: the same WebSocket conversation through vLLM's agentic-api 0.9.0
  pointed at the same upstream (skipped, with the reason, when it is not installed).

Overhead at turn k = median turn time of a gateway arm - median turn time of the
direct arm at turn k. Targets: warmsocket's mean overhead at most half of
agentic-api's, and flat: the mean overhead of turns 51-60 at most 1.2x that of
turns 1-10. Without `--benchmark-enable` one conversation per arm runs as a smoke
test (every answer checked). `WARMSOCKET_BENCH_REPS` sets the repetitions (20).

The report also cuts each arm's turns at the upstream's own timestamps (`GET /stats`:
when it had read the request and when it finished the answer; all processes read the
same CLOCK_MONOTONIC), so a gateway's overhead splits into its request path (client
send -> upstream has the request) and its answer path (upstream done -> client has
parsed the terminal event), each against the direct arm's, for turns 1-10 and 51-60.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import random
import statistics
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvloop

from benches.servers import require_release_build, timing_enabled
from benches.upstream_servers import DirectClient, WSClient
from warmsocket.bench.procs import (
    agentic_api,
    agentic_server_binary,
    simulated_upstream,
    warmsocket_server,
)
from warmsocket.malloc_tuning import keep_freed_memory

TURNS = 60
OUTPUT_BYTES = 2048
REPS = int(os.environ.get("WARMSOCKET_BENCH_REPS", "20"))
WARMUP_REPS = 2
MODEL = "warmsocket-sim"
INSTRUCTIONS = (
    "You are a careful coding agent. Read files before changing them, keep changes "
    "small, explain what you did in one short paragraph, and never invent file "
    "contents. "
) * 6
TOOLS = [
    {
        "type": "function",
        "name": name,
        "description": f"{name.replace('_', ' ').capitalize()} in the workspace.",
        "parameters": {
            "type": "object",
            "properties": {"path": {"type": "string"}, "content": {"type": "string"}},
            "required": ["path"],
        },
    }
    for name in ("read_file", "write_file", "list_directory", "run_tests")
]
SETTINGS = {"model": MODEL, "instructions": INSTRUCTIONS, "tools": TOOLS}
ARGUMENTS = '{"path": "src/main.py"}'
AGENTIC_MISSING = "agentic-api is not installed (pip install agentic-api==0.9.0)"
PATH_PARTS = ("request_path", "upstream", "answer_path")


def tool_output(turn: int) -> str:
    """2 KB of file-like text, different every turn."""
    lines = []
    seed = hashlib.sha256(f"turn {turn}".encode()).hexdigest()
    while sum(map(len, lines)) < OUTPUT_BYTES:
        lines.append(f"{len(lines):4d}  def f_{seed[len(lines) % 56 :][:8]}(x): return x\n")
    return "".join(lines)[:OUTPUT_BYTES]


def turn_items(turn: int, previous: dict[str, Any] | None) -> list[dict[str, Any]]:
    if previous is None:
        text = f"/repeat {TURNS + 1} read_file {ARGUMENTS}"
        return [{"type": "message", "role": "user", "content": text}]
    calls = [o for o in previous["response"]["output"] if o["type"] == "function_call"]
    assert len(calls) == 1 and calls[0]["arguments"] == ARGUMENTS, previous
    return [
        {
            "type": "function_call_output",
            "call_id": calls[0]["call_id"],
            "output": tool_output(turn),
        }
    ]


def cpu_seconds(pid: int | None) -> float:
    """CPU time of a process, all threads (Linux /proc schedstat, nanosecond resolution)."""
    if pid is None:
        return 0.0
    total = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/schedstat") as stat:
                total += int(stat.read().split()[0])
    except OSError:
        return 0.0
    return total / 1e9


@dataclass
class Arm:
    name: str
    client: DirectClient | WSClient
    pid: int | None = None
    """The gateway process, whose CPU time per turn is recorded."""
    samples: list[list[float]] = field(default_factory=lambda: [[] for _ in range(TURNS)])
    cpu: list[list[float]] = field(default_factory=lambda: [[] for _ in range(TURNS)])
    spans: list[tuple[int, float, float]] = field(default_factory=list)
    """(turn, send, done) of each recorded turn, `time.monotonic()` seconds."""
    last: dict[str, Any] | None = None

    async def reset(self) -> None:
        if isinstance(self.client, WSClient):
            await self.client.reset()
        else:
            self.client.reset()
        self.last = None

    async def turn(self, index: int, record: bool) -> None:
        items = turn_items(index, self.last)
        cpu = cpu_seconds(self.pid)
        sent = time.monotonic()
        start = time.perf_counter()
        self.last = await self.client.turn(items)
        elapsed = time.perf_counter() - start
        done = time.monotonic()
        if record:
            self.samples[index].append(elapsed)
            self.cpu[index].append(cpu_seconds(self.pid) - cpu)
            self.spans.append((index, sent, done))


@dataclass
class Servers:
    upstream_url: str
    warmsocket_url: str
    warmsocket_pid: int
    agentic_url: str | None
    agentic_pid: int | None
    agentic_reason: str | None


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    with (
        simulated_upstream() as upstream,
        warmsocket_server("--upstream", upstream.http_url, "--upstream-api", "responses") as warm,
    ):
        base = (upstream.http_url, warm.ws_url, warm.pid)
        if agentic_server_binary() is None:
            yield Servers(*base, None, None, AGENTIC_MISSING)
            return
        with agentic_api(upstream.port) as agentic:
            yield Servers(*base, agentic.ws_url, agentic.pid, None)


async def _measure(servers: Servers, reps: int, warmup: int) -> dict[str, Arm]:
    arms = [
        Arm("direct", DirectClient(servers.upstream_url, SETTINGS)),
        Arm("warmsocket", WSClient(servers.warmsocket_url, SETTINGS), servers.warmsocket_pid),
    ]
    if servers.agentic_url is not None:
        client = WSClient(servers.agentic_url, SETTINGS)
        arms.append(Arm("agentic-api", client, servers.agentic_pid))
    shuffle = random.Random(7).shuffle
    for rep in range(warmup + reps):
        for arm in arms:
            await arm.reset()
        for index in range(TURNS):
            order = list(arms)
            shuffle(order)  # a fresh order every turn: drift and wake-up order hit all arms
            for arm in order:
                await arm.turn(index, record=rep >= warmup)
    for arm in arms:
        await arm.client.close()
        assert arm.last is not None
        items = turn_items(TURNS, arm.last)  # the last answer was a correct call too
        assert items[0]["type"] == "function_call_output"
    return {arm.name: arm for arm in arms}


def _overheads(arms: dict[str, Arm]) -> dict[str, list[float]]:
    direct = [statistics.median(s) for s in arms["direct"].samples]
    out: dict[str, list[float]] = {"direct": direct}
    for name, arm in arms.items():
        if name != "direct":
            out[name] = [statistics.median(s) - d for s, d in zip(arm.samples, direct, strict=True)]
    return out


def _window(values: list[float], start: int, stop: int) -> float:
    return statistics.mean(values[start:stop])


def upstream_requests(upstream_url: str) -> list[dict[str, Any]]:
    """What the simulated upstream recorded of every request, by time received."""
    root = upstream_url.removesuffix("/").removesuffix("/v1")
    with urllib.request.urlopen(f"{root}/stats", timeout=30) as response:
        requests: list[dict[str, Any]] = json.load(response)["requests"]
    return sorted(
        (r for r in requests if r.get("finished") is not None), key=lambda r: r["received"]
    )


def _paths(arms: dict[str, Arm], requests: list[dict[str, Any]]) -> dict[str, float]:
    """Median request path, upstream time and answer path (ms) of each arm, turns 1-10
    and 51-60, from the one upstream request received within each turn."""
    received = [r["received"] for r in requests]
    report: dict[str, float] = {}
    for name, arm in arms.items():
        windows: dict[str, list[tuple[float, float, float]]] = {"1_10": [], "51_60": []}
        for index, sent, done in arm.spans:
            window = "1_10" if index < 10 else "51_60" if index >= 50 else None
            low = bisect.bisect_left(received, sent)
            high = bisect.bisect_right(received, done)
            if window is None or high - low != 1:
                continue  # a retried request would not say which attempt answered
            request = requests[low]
            windows[window].append(
                (
                    request["received"] - sent,
                    request["finished"] - request["received"],
                    done - request["finished"],
                )
            )
        for window, rows in windows.items():
            if rows:
                for part, values in zip(PATH_PARTS, zip(*rows, strict=True), strict=True):
                    report[f"{name}_{part}_turns_{window}_ms"] = statistics.median(values) * 1e3
    return report


def _print_paths(paths: dict[str, float], names: list[str]) -> None:
    print("\nmedian ms: request path (send -> upstream has it), upstream, answer path")
    print("(upstream done -> terminal parsed); a gateway's two paths also minus direct's:")
    for window in ("1_10", "51_60"):
        keys = {name: [f"{name}_{part}_turns_{window}_ms" for part in PATH_PARTS] for name in names}
        for name in names:
            if not all(key in paths for key in keys[name]):
                continue
            parts = [paths[key] for key in keys[name]]
            cells = [f"{part} {value:.3f}" for part, value in zip(PATH_PARTS, parts, strict=True)]
            line = f"turns {window.replace('_', '-'):5} {name:>12}: " + "  ".join(cells)
            if name != "direct" and all(key in paths for key in keys["direct"]):
                base = [paths[key] for key in keys["direct"]]
                line += f"  | {parts[0] - base[0]:+.3f} / {parts[2] - base[2]:+.3f}"
            print(line)


def _cpu(arms: dict[str, Arm]) -> dict[str, list[float]]:
    """Median CPU time of each gateway process per turn."""
    return {
        name: [statistics.median(s) for s in arm.cpu]
        for name, arm in arms.items()
        if arm.pid is not None
    }


def _report(overheads: dict[str, list[float]], cpu: dict[str, list[float]]) -> dict[str, Any]:
    report: dict[str, Any] = {}
    lines = ["turns     direct_ms " + " ".join(f"{n:>14}_ms" for n in overheads if n != "direct")]
    for start in range(0, TURNS, 10):
        row = [
            f"{start + 1:>2}-{start + 10:<2}",
            f"{_window(overheads['direct'], start, start + 10) * 1e3:13.3f}",
        ]
        row += [
            f"{_window(values, start, start + 10) * 1e3:17.3f}"
            for name, values in overheads.items()
            if name != "direct"
        ]
        lines.append("   ".join(row))
    for name, values in overheads.items():
        report[f"{name}_mean_ms"] = statistics.mean(values) * 1e3
        report[f"{name}_turns_1_10_ms"] = _window(values, 0, 10) * 1e3
        report[f"{name}_turns_51_60_ms"] = _window(values, 50, 60) * 1e3
    for name, values in cpu.items():
        report[f"{name}_cpu_mean_ms"] = statistics.mean(values) * 1e3
        report[f"{name}_cpu_turns_1_10_ms"] = _window(values, 0, 10) * 1e3
        report[f"{name}_cpu_turns_51_60_ms"] = _window(values, 50, 60) * 1e3
    print("\nper-turn time (direct) and overhead (gateways), mean of per-turn medians:")
    print("\n".join(lines))
    for name, values in cpu.items():
        print(
            f"{name} CPU per turn: turns 1-10 {_window(values, 0, 10) * 1e3:.3f} ms, "
            f"51-60 {_window(values, 50, 60) * 1e3:.3f} ms"
        )
    return report


@pytest.mark.benchmark(group="upstream-overhead")
def test_upstream_overhead_flat_and_vs_agentic_api(benchmark: Any, servers: Servers) -> None:
    require_release_build(benchmark)
    timed = timing_enabled(benchmark)
    if timed:
        keep_freed_memory()  # the direct client builds context-sized bodies too
    reps, warmup = (REPS, WARMUP_REPS) if timed else (1, 0)
    loop = uvloop.new_event_loop()
    result: dict[str, Arm] = {}

    def run() -> None:
        result.update(loop.run_until_complete(_measure(servers, reps, warmup)))

    try:
        benchmark.pedantic(run, rounds=1, iterations=1)
    finally:
        loop.close()
    assert set(result) >= {"direct", "warmsocket"}
    paths = _paths(result, upstream_requests(servers.upstream_url))
    for name in ("direct", "warmsocket"):  # every turn matched its one upstream request
        for window in ("1_10", "51_60"):
            assert paths[f"{name}_upstream_turns_{window}_ms"] > 0, (name, window)
    if not timed:
        return
    overheads = _overheads(result)
    report = _report(overheads, _cpu(result))
    _print_paths(paths, list(result))
    report.update(paths)
    benchmark.extra_info.update(report)
    early, late = report["warmsocket_turns_1_10_ms"], report["warmsocket_turns_51_60_ms"]
    benchmark.extra_info["warmsocket_flatness"] = late / early if early > 0 else float("inf")
    if "agentic-api" in overheads:
        ratio = report["warmsocket_mean_ms"] / report["agentic-api_mean_ms"]
        benchmark.extra_info["warmsocket_vs_agentic_api"] = ratio
        assert ratio <= 0.5, f"warmsocket's overhead is {ratio:.2f}x agentic-api's (target <= 0.5x)"
    assert late <= 1.2 * max(early, 0.05), (
        f"warmsocket's overhead grows from {early:.3f} ms (turns 1-10) to {late:.3f} ms "
        "(turns 51-60); target: flat within 1.2x"
    )


def test_agentic_api_arm_available(servers: Servers) -> None:
    """Reports (as a skip) when the agentic-api arm cannot run."""
    if servers.agentic_url is None:
        pytest.skip(servers.agentic_reason or AGENTIC_MISSING)
