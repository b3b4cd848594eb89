"""Load generator for the throughput and memory benchmarks, run in its own process.

`python -m warmsocket.bench.loadgen` reads one job as JSON on stdin:

* `{"kind": "turns", "url", "connections", "seconds", "warmup", "max_ops"}`: every
  connection runs WebSocket-mode turns back to back (`store: false`, chained with
  `previous_response_id`, a new chain every 100 turns); a turn is one request and the
  12 events of the answer `You said: alpha beta`; every answer is checked;
* `{"kind": "echo", ...}`: the same against an echo server, one message (the same
  bytes as a turn's request) each way;
* `{"kind": "idle", "url", "connections"}`: opens the connections, prints `ready`,
  holds them until a line arrives on stdin, then closes them;
* `{"kind": "fill", "url", "connections", "turns", "text"}`: stored (`store: true`)
  chains whose turns carry `text`; reports the tokens and item bytes it sent and got.

It prints one JSON result line. Latencies are `time.perf_counter()` per operation,
after the warm-up; every loop is bounded by both a deadline and a count.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

from warmsocket.admission import raise_open_file_limit
from warmsocket.bench.leanws import LeanWebSocket, connect

TURN_TEXT = "alpha beta"
EXPECTED = f"You said: {TURN_TEXT}"
CHAIN_TURNS = 100
_COMPLETED = b'"type":"response.completed"'
_FAILED = (b'"type":"response.failed"', b'"type":"error"', b'"type":"response.incomplete"')


def create_message(previous: str | None, text: str = TURN_TEXT, *, store: bool = False) -> bytes:
    body: dict[str, Any] = {
        "type": "response.create",
        "model": "warmsocket-mock",
        "store": store,
        "input": [{"type": "message", "role": "user", "content": text}],
    }
    if previous is not None:
        body["previous_response_id"] = previous
    return json.dumps(body, separators=(",", ":")).encode()


async def _open(url: str, count: int) -> list[LeanWebSocket]:
    """Open `count` connections, at most 64 handshakes at a time."""
    gate = asyncio.Semaphore(64)

    async def one() -> LeanWebSocket:
        async with gate:
            return await connect(url)

    return list(await asyncio.gather(*(one() for _ in range(count))))


def _terminal(data: bytes) -> bool:
    head = data[:80]
    return _COMPLETED in head or any(marker in head for marker in _FAILED)


def _any(data: bytes) -> bool:
    return True


async def _turn(conn: LeanWebSocket, message: bytes) -> dict[str, Any]:
    """Send a request and wait for its terminal event; return the response.

    The events before it are counted, not parsed: the load generator must cost less
    than the server. The terminal event is parsed and checked."""
    data, events = await conn.exchange(message, _terminal)
    if _COMPLETED not in data[:80]:
        raise RuntimeError(f"turn failed: {data[:300]!r}")
    response: dict[str, Any] = json.loads(data)["response"]
    response["_events"] = events
    return response


async def _close_all(conns: list[LeanWebSocket]) -> None:
    for conn in conns:
        conn.close()
    await asyncio.sleep(0.05)  # let the transports flush their close frames


def _check(response: dict[str, Any]) -> None:
    text = response["output"][0]["content"][0]["text"]
    if text != EXPECTED or response["_events"] != 12:
        raise RuntimeError(f"unexpected answer {text!r} in {response['_events']} events")


async def _loop(
    conn: LeanWebSocket,
    kind: str,
    start_at: float,
    end_at: float,
    budget: list[int],
    latencies: list[float],
) -> None:
    previous: str | None = None
    chain = 0
    echo = create_message(None)
    while budget[0] > 0:
        now = time.perf_counter()
        if now >= end_at:
            return
        budget[0] -= 1
        if kind == "turns":
            response = await _turn(conn, create_message(previous))
            _check(response)
            chain += 1
            previous = None if chain % CHAIN_TURNS == 0 else response["id"]
        else:
            reply, _count = await conn.exchange(echo, _any)
            if reply != echo:
                raise RuntimeError("the echo differs")
        done = time.perf_counter()
        if now >= start_at and done <= end_at:
            latencies.append(done - now)


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


async def run_load(job: dict[str, Any]) -> dict[str, Any]:
    connections = int(job["connections"])
    conns = await _open(job["url"], connections)
    try:
        warmup, seconds = float(job.get("warmup", 1.0)), float(job["seconds"])
        start_at = time.perf_counter() + warmup
        end_at = start_at + seconds
        budget = [int(job.get("max_ops", 5_000_000))]
        per_conn: list[list[float]] = [[] for _ in conns]
        await asyncio.gather(
            *(
                _loop(conn, job["kind"], start_at, end_at, budget, lat)
                for conn, lat in zip(conns, per_conn, strict=True)
            )
        )
        measured = min(time.perf_counter(), end_at) - start_at
    finally:
        await _close_all(conns)
    latencies = sorted(x for lat in per_conn for x in lat)
    return {
        "kind": job["kind"],
        "connections": connections,
        "ops": len(latencies),
        "seconds": measured,
        "ops_per_second": len(latencies) / measured if measured > 0 else 0.0,
        "p50_s": _percentile(latencies, 0.50),
        "p99_s": _percentile(latencies, 0.99),
        "max_s": latencies[-1] if latencies else float("nan"),
        "budget_exhausted": budget[0] <= 0,
    }


async def run_idle(job: dict[str, Any]) -> dict[str, Any]:
    conns = await _open(job["url"], int(job["connections"]))
    try:
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    finally:
        await _close_all(conns)
    return {"kind": "idle", "connections": len(conns)}


async def run_fill(job: dict[str, Any]) -> dict[str, Any]:
    """Stored chains: `connections` chains of `turns` turns, each turn sending `text`."""
    from warmsocket.prefixhash import count_tokens

    text = str(job["text"])
    turns = int(job["turns"])
    conns = await _open(job["url"], int(job["connections"]))
    totals = {"tokens": 0, "item_bytes": 0, "responses": 0}

    def item_size(item: dict[str, Any]) -> tuple[int, int]:
        encoded = json.dumps(item, separators=(",", ":"), ensure_ascii=False).encode()
        content = item.get("content")
        texts: list[str] = []
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts += [p["text"] for p in content if isinstance(p, dict) and "text" in p]
        return sum(count_tokens(t) for t in texts), len(encoded)

    async def chain(conn: LeanWebSocket) -> None:
        previous: str | None = None
        for _ in range(turns):
            message = create_message(previous, text, store=True)
            response = await _turn(conn, message)
            sent = json.loads(message)["input"]
            for item in [*sent, *response["output"]]:
                tokens, size = item_size(item)
                totals["tokens"] += tokens
                totals["item_bytes"] += size
            totals["responses"] += 1
            previous = response["id"]

    try:
        await asyncio.gather(*(chain(c) for c in conns))
    finally:
        await _close_all(conns)
    return {"kind": "fill", **totals}


def main() -> int:
    from warmsocket.cli import run_async

    raise_open_file_limit()
    job = json.loads(sys.stdin.readline())
    kinds = {"turns": run_load, "echo": run_load, "idle": run_idle, "fill": run_fill}
    result = run_async(kinds[job["kind"]](job))
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
