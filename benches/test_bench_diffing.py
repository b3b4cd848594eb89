"""Server cost of one turn by history length: WebSocket incremental, HTTP full replay
with prefix diffing, and HTTP full replay with diffing and token caching off.

The conversation is an agent loop with 2 KB tool outputs: cycles of a user message
asking for a tool call, the call, its 2 KB output and the model's 2 KB answer; the
history ends with a pending call. One turn sends that call's 2 KB output (fresh
content every round) and gets the 2 KB answer, on a history of 10, 100 or 1,000 items:

* `ws`: WebSocket mode, `previous_response_id` and only the new item;
* `http-diffing`: `POST /v1/responses` with the whole history, no
  `previous_response_id` (an HTTP client, `openai-agents` by default): the server
  matches the history against its cached chain and stores and tokenises only the
  new item;
* `http-naive`: the same requests to a server started with `--no-prefix-diffing`:
  every turn validates, stores and tokenises (for usage) its whole history.

"Server cost" is the server process's CPU time per turn (all threads, from
/proc/<pid>/task/*/schedstat, read before and after each turn while the server is
idle), so the client's own work (encoding a 2 MB body) counts for no arm. The arms
alternate turn by turn and medians are compared. Targets: `ws` within 1.2x from 10
to 1,000 items; `http-diffing` at least 10x cheaper than `http-naive` at 1,000.

The `ws` target is measured on its own, after the per-size table: `ws` turns on the
10- and the 1,000-item history alternating, nothing else between them. In the table
each size is measured in its own phase, and a `ws` turn there follows the other
arms' turns on a 1 MB history; that costs the `ws` turn up to 30 % more CPU (cold
caches, an allocator just freed of 1 MB bodies) whatever its own history, which is
the noise of the neighbours, not a cost of history. Measured alone, alternating, the
two sizes are within 1 %.
Without `--benchmark-enable` it is a smoke run (10 and 100 items, one turn per arm),
which still checks every answer.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from websockets.sync.client import ClientConnection, connect

from benches.servers import require_release_build, timing_enabled
from warmsocket.bench.procs import Process, warmsocket_server

TOOLS = [
    {
        "type": "function",
        "name": "read_file",
        "description": "Read a file.",
        "parameters": {"type": "object", "properties": {"path": {"type": "string"}}},
    }
]
ROUNDS = int(os.environ.get("WARMSOCKET_BENCH_ROUNDS", "30"))


def idle_cpu_seconds(pid: int) -> float:
    """`cpu_seconds` once no thread of the process is running (at most 0.2 s later).

    The kernel adds a running thread's current slice to its schedstat only when the
    thread stops or at a scheduler tick: read while the server still finishes a turn,
    the count misses that slice, and a turn measured between two such reads can even
    read 0."""
    deadline = time.monotonic() + 0.2
    while any_thread_running(pid) and time.monotonic() < deadline:
        time.sleep(0.0002)
    return cpu_seconds(pid)


def any_thread_running(pid: int) -> bool:
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as stat:
                # "tid (comm) S ...": the state follows the last ')'.
                if stat.read().rpartition(")")[2].split()[0] == "R":
                    return True
        except (OSError, IndexError):  # a thread that just ended
            continue
    return False


def cpu_seconds(pid: int) -> float:
    """CPU time of a process, all threads (nanosecond resolution)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as stat:
                total += int(stat.read().split()[0])
        except OSError:  # a thread that just ended
            continue
    return total / 1e9


def file_text(tag: str) -> str:
    """About 2 KB of file content: 32 lines of 63 characters (one delta per line)."""
    line = (tag + "-" + "x" * 64)[:63]
    return "\n".join(f"{i:02d}{line[2:]}" for i in range(32)) + "\n"


def call_message(i: int) -> dict[str, Any]:
    return {"role": "user", "content": f'/call read_file {{"path": "src/f{i}.py"}}'}


@dataclass
class History:
    """A conversation on the diffing server, ending with a pending call."""

    items: list[dict[str, Any]]
    head: str
    call_id: str


@dataclass
class Arm:
    name: str
    pid: int
    turn: Callable[[int], dict[str, Any]]
    cpu: list[float] = field(default_factory=list)


class WS:
    def __init__(self, server: Process) -> None:
        self.conn: ClientConnection = connect(server.ws_url, max_size=None, compression=None)

    def turn(self, **body: Any) -> dict[str, Any]:
        payload = {"type": "response.create", "model": "m", "tools": TOOLS, **body}
        self.conn.send(json.dumps(payload))
        while True:
            event: dict[str, Any] = json.loads(self.conn.recv(timeout=60))
            if event["type"] in {"response.completed", "response.failed", "error"}:
                assert event["type"] == "response.completed", event
                response: dict[str, Any] = event["response"]
                return response

    def close(self) -> None:
        self.conn.close()


class HTTP:
    def __init__(self, server: Process) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)

    def post(self, body: bytes) -> dict[str, Any]:
        self.conn.request(
            "POST", "/v1/responses", body=body, headers={"content-type": "application/json"}
        )
        reply = self.conn.getresponse()
        data = reply.read()
        assert reply.status == 200, data[:500]
        response: dict[str, Any] = json.loads(data)
        return response

    def get(self, path: str) -> str:
        self.conn.request("GET", path)
        reply = self.conn.getresponse()
        return reply.read().decode()

    def close(self) -> None:
        self.conn.close()


def build_history(ws: WS, size: int) -> History:
    """`size` items: plain exchanges to pad, then tool cycles, then a pending call."""
    cycles = (size - 2) // 4
    plain = (size - 2 - 4 * cycles) // 2
    items: list[dict[str, Any]] = []
    head: str | None = None

    def turn(new: list[dict[str, Any]]) -> list[dict[str, Any]]:
        nonlocal head
        fields = {"previous_response_id": head} if head else {}
        response = ws.turn(input=new, store=True, **fields)
        head = response["id"]
        items.extend(new)
        output: list[dict[str, Any]] = response["output"]
        items.extend(output)
        return output

    for i in range(plain):
        turn([{"role": "user", "content": f"note {i}"}])
    for i in range(cycles + 1):
        (call,) = turn([call_message(i)])
        if i == cycles:
            break
        output = {"type": "function_call_output", "call_id": call["call_id"]}
        turn([{**output, "output": file_text(f"f{i}")}])
    assert len(items) == size and head is not None
    return History(items, head, call["call_id"])


def check(response: dict[str, Any], text: str) -> None:
    (message,) = response["output"]
    assert message["content"][0]["text"] == f"read_file returned: {text}"


def arms_for(
    history: History, ws: WS, diffing: HTTP, naive: HTTP, pids: tuple[int, int]
) -> list[Arm]:
    prefix = json.dumps(
        {"model": "m", "tools": TOOLS, "store": False, "input": history.items}
    ).encode()[:-2]  # without the closing `]}`

    def ws_turn(n: int) -> dict[str, Any]:
        text = file_text(f"ws{n}")
        new = {"type": "function_call_output", "call_id": history.call_id, "output": text}
        response = ws.turn(input=[new], previous_response_id=history.head, store=False)
        check(response, text)
        return response

    def http_turn(client: HTTP, tag: str) -> Callable[[int], dict[str, Any]]:
        def run(n: int) -> dict[str, Any]:
            text = file_text(f"{tag}{n}")
            new = {"type": "function_call_output", "call_id": history.call_id, "output": text}
            response = client.post(prefix + b"," + json.dumps(new).encode() + b"]}")
            check(response, text)
            return response

        return run

    return [
        Arm("ws", pids[0], ws_turn),
        Arm("http-diffing", pids[0], http_turn(diffing, "d")),
        Arm("http-naive", pids[1], http_turn(naive, "n")),
    ]


def measure(arms: list[Arm], rounds: int) -> dict[str, float]:
    """Median server CPU seconds per turn of each arm, alternating the arms."""
    for arm in arms:  # warm up
        arm.turn(-1)
    for n in range(rounds):
        for arm in arms:
            before = idle_cpu_seconds(arm.pid)
            arm.turn(n)
            arm.cpu.append(idle_cpu_seconds(arm.pid) - before)
    return {arm.name: statistics.median(arm.cpu) for arm in arms}


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else math.nan


def ws_by_size(ws_arms: dict[int, Arm], rounds: int) -> dict[int, float]:
    """Median server CPU seconds per `ws` turn on each history, alternating the sizes
    turn by turn with no other arm in between."""

    def fresh(turn: Callable[[int], dict[str, Any]]) -> Callable[[int], dict[str, Any]]:
        return lambda n: turn(100_000 + n)  # content no earlier turn sent

    arms = [Arm(f"ws-{size}", arm.pid, fresh(arm.turn)) for size, arm in ws_arms.items()]
    medians = measure(arms, rounds)
    return {size: medians[f"ws-{size}"] for size in ws_arms}


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[Process, Process]]:
    with (
        warmsocket_server("--model", "gpt-4o") as diffing,
        warmsocket_server("--model", "gpt-4o", "--no-prefix-diffing") as naive,
    ):
        yield diffing, naive


@pytest.mark.benchmark(group="turn-server-cpu")
def test_turn_server_cpu_by_history(benchmark: Any, servers: tuple[Process, Process]) -> None:
    require_release_build(benchmark)
    timed = timing_enabled(benchmark)
    diffing_server, naive_server = servers
    pids = (diffing_server.process.pid, naive_server.process.pid)
    sizes = (10, 100, 1000) if timed else (10, 100)
    ws, diffing, naive = WS(diffing_server), HTTP(diffing_server), HTTP(naive_server)
    largest = sizes[-1]
    results: dict[int, dict[str, float]] = {}
    ws_arms: dict[int, Arm] = {}
    try:
        for size in sizes:
            history = build_history(ws, size)
            arms = arms_for(history, ws, diffing, naive, pids)
            results[size] = measure(arms, ROUNDS if timed else 1)
            ws_arms[size] = arms[0]
            if size == largest:
                benchmark.pedantic(arms[1].turn, args=(10_000,), rounds=1)
        ws_alone = ws_by_size(
            {10: ws_arms[10], largest: ws_arms[largest]}, 4 * ROUNDS if timed else 1
        )
        # Every full replay to the diffing server found its history cached; none to
        # the naive server.
        metrics = diffing.get("/metrics")
        turns = len(sizes) * ((ROUNDS if timed else 1) + 2)
        assert f'warmsocket_prefix_matches_total{{result="hit"}} {turns - 1}' in metrics
        assert 'warmsocket_prefix_matches_total{result="hit"} 0' in naive.get("/metrics")
    finally:
        ws.close()
        diffing.close()
        naive.close()

    info: dict[str, float] = {}
    for size, medians in results.items():
        for name, seconds in medians.items():
            info[f"{name}_{size}_us"] = round(seconds * 1e6, 1)
    info["ws_alone_10_us"] = round(ws_alone[10] * 1e6, 1)
    info[f"ws_alone_{largest}_us"] = round(ws_alone[largest] * 1e6, 1)
    if timed:  # (a smoke run's single turn may be too quick to see; timed medians not)
        measured = [*ws_alone.values(), *(v for m in results.values() for v in m.values())]
        assert all(seconds > 0 for seconds in measured), (results, ws_alone)
    info["ws_ratio_largest_vs_10"] = ratio(ws_alone[largest], ws_alone[10])
    info["ws_ratio_largest_vs_10_in_table"] = ratio(results[largest]["ws"], results[10]["ws"])
    info["naive_vs_diffing_largest"] = ratio(
        results[largest]["http-naive"], results[largest]["http-diffing"]
    )
    benchmark.extra_info.update(info)
    print("\nserver CPU per turn (median, us):")
    for size, medians in results.items():
        print(f"  {size:>5} items: " + "  ".join(f"{k} {v * 1e6:9.1f}" for k, v in medians.items()))
    print(
        f"  ws alone, alternating sizes: 10 items {ws_alone[10] * 1e6:.1f}, "
        f"{largest} items {ws_alone[largest] * 1e6:.1f}"
    )
    print(
        f"  ws {largest}/10: {info['ws_ratio_largest_vs_10']:.2f}x alone "
        f"({info['ws_ratio_largest_vs_10_in_table']:.2f}x in the table); "
        f"naive/diffing at {largest}: {info['naive_vs_diffing_largest']:.1f}x"
    )
    if timed:
        assert info["ws_ratio_largest_vs_10"] <= 1.2, info
        assert info["naive_vs_diffing_largest"] >= 10, info
