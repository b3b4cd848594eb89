"""Server cost of one turn that continues a conversation, by history length, against
the same turn continued by `previous_response_id` (the baseline, in the same run).

A create with `conversation` reads the conversation's items as its context; the
previous create of that conversation left them as its chain's items, so prefix
diffing binds that chain and only the new input is new work, as with
`previous_response_id`. Both arms run a tool loop on a WebSocket: each turn sends the
pending call's 2 KB output and a user message asking for the next call, and gets
that call (so each stays a loop with a pending call, three items longer per turn),
on a history of 10 or 1,000 items.

"Server cost" is the server process's CPU time per turn (all threads, from
/proc/<pid>/task/*/schedstat), arms and sizes alternating turn by turn, medians
compared. Targets: a conversation turn on 1,000 items at most 1.5x a conversation
turn on 10 items (flat in history), and at most 1.5x a `previous_response_id` turn
on 1,000 items. Without `--benchmark-enable` it is a smoke run (one turn per arm).
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from benches.servers import require_release_build, timing_enabled
from benches.test_bench_diffing import ROUNDS, WS, Arm, file_text, measure
from warmsocket.bench.procs import Process, warmsocket_server


def create_conversation(server: Process) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        conn.request("POST", "/v1/conversations", body=b"{}")
        reply = conn.getresponse()
        body = json.loads(reply.read())
        assert reply.status == 200, body
        return str(body["id"])
    finally:
        conn.close()


def prometheus(server: Process, name: str) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        conn.request("GET", "/metrics")
        lines = conn.getresponse().read().decode().splitlines()
    finally:
        conn.close()
    return "\n".join(line for line in lines if line.startswith(name))


class Loop:
    """A tool loop on one WebSocket, continued by `conversation` or by
    `previous_response_id`: each turn answers the pending call and asks for another."""

    def __init__(self, ws: WS, name: str, *, conversation: str | None) -> None:
        self.ws = ws
        self.name = name
        self.conversation = conversation
        self.head: str | None = None
        self.call_id: str | None = None
        self.items = 0
        self.turns = 0

    def turn(self, tag: str) -> dict[str, Any]:
        new: list[dict[str, Any]] = []
        if self.call_id is not None:
            output = file_text(tag)
            new.append({"type": "function_call_output", "call_id": self.call_id, "output": output})
        path = f"{self.name}/f{self.items}.py"  # no loop's history starts as another's
        new.append({"role": "user", "content": f'/call read_file {{"path": "{path}"}}'})
        fields: dict[str, Any] = {"store": True}
        if self.conversation is not None:
            fields["conversation"] = self.conversation
        elif self.head is not None:
            fields["previous_response_id"] = self.head
        response = self.ws.turn(input=new, **fields)
        (call,) = response["output"]
        assert call["type"] == "function_call" and call["name"] == "read_file", call
        self.head, self.call_id = response["id"], call["call_id"]
        self.items += len(new) + 1
        self.turns += 1
        return response

    def grow_to(self, size: int) -> None:
        while self.items < size:
            self.turn(f"grow{self.items}")

    def arm(self, name: str, pid: int) -> Arm:
        return Arm(name, pid, lambda n: self.turn(f"{name}{n}"))


@pytest.fixture(scope="module")
def server() -> Iterator[Process]:
    with warmsocket_server("--model", "gpt-4o") as running:
        yield running


@pytest.mark.benchmark(group="conversation-turn-server-cpu")
def test_conversation_turn_server_cpu_by_history(benchmark: Any, server: Process) -> None:
    require_release_build(benchmark)
    timed = timing_enabled(benchmark)
    pid = server.process.pid
    sizes = (10, 1000) if timed else (10, 40)
    ws = WS(server)
    try:
        loops: dict[str, Loop] = {}
        for size in sizes:
            for kind in ("conversation", "chained"):
                conv = create_conversation(server) if kind == "conversation" else None
                loop = Loop(ws, f"{kind}-{size}", conversation=conv)
                loop.grow_to(size)
                loops[loop.name] = loop
        arms = [loop.arm(name, pid) for name, loop in loops.items()]
        rounds = ROUNDS if timed else 1
        medians = measure(arms, rounds)
        largest = sizes[-1]
        probe: Callable[[int], dict[str, Any]] = arms[-2].turn  # conversation, largest
        benchmark.pedantic(probe, args=(10_000,), rounds=1)
        # Every conversation turn after its first found its history cached.
        hits = prometheus(server, 'warmsocket_prefix_matches_total{result="hit"}')
        matched = sum(loop.turns - 1 for name, loop in loops.items() if name.startswith("conv"))
        assert hits.endswith(f" {matched}"), (hits, matched)
    finally:
        ws.close()

    info = {f"{name}_us": round(seconds * 1e6, 1) for name, seconds in medians.items()}
    flat = medians[f"conversation-{largest}"] / medians["conversation-10"]
    versus = medians[f"conversation-{largest}"] / medians[f"chained-{largest}"]
    info["conversation_largest_vs_10"] = flat
    info["conversation_vs_chained_largest"] = versus
    benchmark.extra_info.update(info)
    print("\nserver CPU per turn (median, us):")
    for name, seconds in medians.items():
        print(f"  {name:>18}: {seconds * 1e6:9.1f}")
    print(
        f"  conversation {largest}/10: {flat:.2f}x; "
        f"conversation/chained at {largest}: {versus:.2f}x"
    )
    if timed:
        assert flat <= 1.5, info
        assert versus <= 1.5, info
