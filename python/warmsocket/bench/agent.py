"""The scripted coding agent: one run of N tool calls in one mode, timed on the client.

Run as `python -m warmsocket.bench.agent` (in the client network namespace): it reads
one job as JSON on stdin and writes one result as JSON on stdout. The job carries the
workload's texts (so this process needs no tokenizer) and the mode:

* `websocket`, `agentic-api`: one WebSocket to `/v1/responses`; each turn sends only
  the new items plus `previous_response_id`, with `store: false`;
* `http-replay`: `POST /v1/responses` with `stream: true`, `store: false` and the whole
  conversation so far as `input` (the items it sent and every output item it got
  back, kept as JSON bytes so a request is one join, as an efficient agent would);
* `http-chained`: `POST /v1/responses`, `stream: true`, `store: true`, the new items
  plus `previous_response_id`.

Every turn is checked: the model must call `shell` with the workload's arguments
until the N-th output is back, then answer `done after N calls`. Timestamps are
`time.monotonic()`, comparable with the server-side processes on the same machine.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from websockets.asyncio.client import ClientConnection, connect

from warmsocket.bench import MODES
from warmsocket.httpclient import HTTPPool, Origin, request_head
from warmsocket.sse import SSEDecoder

__all__ = ["MODES", "Job", "RunResult", "TurnTiming", "run"]
TERMINAL = frozenset({"response.completed", "response.failed", "response.incomplete", "error"})
_OUTPUT_EVENTS = frozenset(
    {
        "response.output_item.added",
        "response.output_text.delta",
        "response.function_call_arguments.delta",
    }
)


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(slots=True)
class TurnTiming:
    """One turn as the agent saw it."""

    index: int
    send: float
    """Just before the request was written."""
    first_event: float = 0.0
    first_output: float = 0.0
    """The first event carrying model output (`output_item.added` or a delta)."""
    done: float = 0.0
    """The terminal event was parsed."""
    tool_done: float = 0.0
    """The tool's output was ready (equals `done` after the last turn)."""
    request_bytes: int = 0
    """Bytes of the request payload (HTTP head and body, or the WebSocket message)."""
    events: int = 0
    response_id: str = ""
    output_tokens: int = 0
    """From the response's usage (the upstream's count)."""


@dataclass(slots=True)
class Job:
    mode: str
    url: str
    task: str
    """The first user message (the workload's, with its run nonce)."""
    settings: dict[str, Any]
    arguments: str
    outputs: list[str]
    tool_ms: float
    timeout_s: float = 600.0

    @property
    def tool_calls(self) -> int:
        return len(self.outputs)


@dataclass(slots=True)
class RunResult:
    mode: str
    start: float
    connected: float
    end: float = 0.0
    turns: list[TurnTiming] = field(default_factory=list)
    final_text: str = ""
    error: str | None = None
    netns: str = ""
    """The network namespace the agent ran in (`/proc/self/ns/net`), so the harness can
    check that it ran behind the emulated link."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class TurnFailed(Exception):
    """The server's answer was not what the workload requires."""


class Client(Protocol):
    async def connect(self) -> None: ...

    async def turn(self, items: list[dict[str, Any]], timing: TurnTiming) -> dict[str, Any]: ...

    async def close(self) -> None: ...


class WebSocketClient:
    """WebSocket mode: new items plus previous_response_id, store=false."""

    def __init__(self, url: str, settings: dict[str, Any]) -> None:
        self.url = url
        self.settings = settings
        self.conn: ClientConnection | None = None
        self.previous: str | None = None

    async def connect(self) -> None:
        self.conn = await connect(
            self.url, max_size=None, compression=None, ping_interval=None, open_timeout=30
        )

    async def turn(self, items: list[dict[str, Any]], timing: TurnTiming) -> dict[str, Any]:
        conn = self.conn
        assert conn is not None
        body: dict[str, Any] = {"type": "response.create", **self.settings, "store": False}
        if self.previous is not None:
            body["previous_response_id"] = self.previous
        body["input"] = items
        message = _dumps(body)
        timing.request_bytes = len(message)
        timing.send = time.monotonic()
        await conn.send(message, text=True)
        while True:
            event = json.loads(await conn.recv(decode=False))
            _mark(timing, event["type"])
            if event["type"] in TERMINAL:
                break
        response = _terminal(event)
        self.previous = response["id"]
        return response

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close()


class HTTPClient:
    """HTTP mode over one keep-alive connection, SSE streaming.

    `replay`: the whole conversation as input with store=false; otherwise the new
    items plus previous_response_id with store=true.
    """

    def __init__(self, base_url: str, settings: dict[str, Any], *, replay: bool) -> None:
        self.origin = Origin.parse(base_url)
        self.pool = HTTPPool(self.origin, max_idle=1)
        self.replay = replay
        fields = {**settings, "stream": True, "store": not replay}
        self.head = _dumps(fields)[:-1]
        self.items: list[bytes] = []
        self.previous: str | None = None
        self.target = f"{self.origin.base_path}/responses"

    async def connect(self) -> None:
        """Nothing: the connection opens with the first request, as HTTP clients do."""

    async def turn(self, items: list[dict[str, Any]], timing: TurnTiming) -> dict[str, Any]:
        new = [_dumps(item) for item in items]
        if self.replay:
            self.items += new
            body = self.head + b',"input":[' + b",".join(self.items) + b"]}"
        else:
            previous = (
                b""
                if self.previous is None
                else b',"previous_response_id":' + _dumps(self.previous)
            )
            body = self.head + previous + b',"input":[' + b",".join(new) + b"]}"
        head = request_head(
            "POST",
            self.target,
            [
                ("Host", self.origin.host_header),
                ("Content-Type", "application/json"),
                ("Accept", "text/event-stream"),
                ("Content-Length", str(len(body))),
            ],
        )
        timing.request_bytes = len(head) + len(body)
        timing.send = time.monotonic()
        response = await self.pool.request([head, body], timeout=600)
        if response.status != 200:
            raise TurnFailed(f"HTTP {response.status}: {(await response.read())[:300]!r}")
        decoder = SSEDecoder()
        terminal: dict[str, Any] | None = None
        async for data in response.chunks():
            for _name, payload in decoder.feed(data):
                event = json.loads(payload)
                _mark(timing, event["type"])
                if event["type"] in TERMINAL:
                    terminal = event
        response.close()
        if terminal is None:
            raise TurnFailed("the stream ended without a terminal event")
        result = _terminal(terminal)
        if self.replay:
            self.items += [_dumps(item) for item in result["output"]]
        self.previous = result["id"]
        return result

    async def close(self) -> None:
        self.pool.close()


def _mark(timing: TurnTiming, kind: str) -> None:
    now = time.monotonic()
    timing.events += 1
    if not timing.first_event:
        timing.first_event = now
    if not timing.first_output and kind in _OUTPUT_EVENTS:
        timing.first_output = now
    if kind in TERMINAL:
        timing.done = now


def _terminal(event: dict[str, Any]) -> dict[str, Any]:
    if event["type"] != "response.completed":
        raise TurnFailed(f"turn ended with {json.dumps(event)[:500]}")
    response: dict[str, Any] = event["response"]
    return response


def make_client(job: Job) -> Client:
    if job.mode in {"websocket", "agentic-api"}:
        return WebSocketClient(job.url, job.settings)
    if job.mode in {"http-replay", "http-chained"}:
        return HTTPClient(job.url, job.settings, replay=job.mode == "http-replay")
    raise ValueError(f"unknown mode {job.mode!r} (known: {', '.join(MODES)})")


def check_turn(job: Job, index: int, response: dict[str, Any]) -> str | None:
    """The call id to answer, or None after the final answer. Raises TurnFailed."""
    output = response.get("output") or []
    if index < job.tool_calls:
        calls = [o for o in output if o.get("type") == "function_call"]
        if len(calls) != 1 or calls[0].get("name") != "shell":
            raise TurnFailed(f"turn {index}: expected one shell call, got {output!r:.300}")
        if json.loads(calls[0]["arguments"]) != json.loads(job.arguments):
            raise TurnFailed(f"turn {index}: the call's arguments differ")
        call_id: str = calls[0]["call_id"]
        return call_id
    texts = [
        part.get("text", "")
        for item in output
        if item.get("type") == "message"
        for part in item.get("content") or []
    ]
    expected = f"done after {job.tool_calls} calls"
    if "".join(texts) != expected:
        raise TurnFailed(f"final answer {''.join(texts)!r:.200}, expected {expected!r}")
    return None


async def run(job: Job) -> RunResult:
    """One agent run: connect, then N+1 turns with the tool's time between them."""
    start = time.monotonic()
    client = make_client(job)
    result = RunResult(mode=job.mode, start=start, connected=start, netns=network_namespace())
    try:
        async with asyncio.timeout(job.timeout_s):
            await client.connect()
            result.connected = time.monotonic()
            items: list[dict[str, Any]] = [{"type": "message", "role": "user", "content": job.task}]
            for index in range(job.tool_calls + 1):
                timing = TurnTiming(index=index, send=0.0)
                response = await client.turn(items, timing)
                timing.response_id = response["id"]
                timing.output_tokens = int((response.get("usage") or {}).get("output_tokens", 0))
                result.turns.append(timing)
                call_id = check_turn(job, index, response)
                if call_id is None:
                    timing.tool_done = timing.done
                    result.final_text = f"done after {job.tool_calls} calls"
                    break
                if job.tool_ms > 0:
                    await asyncio.sleep(job.tool_ms / 1000)
                items = [
                    {
                        "type": "function_call_output",
                        "call_id": call_id,
                        "output": job.outputs[index],
                    }
                ]
                timing.tool_done = time.monotonic()
    except (TurnFailed, OSError, TimeoutError, ValueError, KeyError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        result.end = time.monotonic()
        await client.close()
    return result


def network_namespace() -> str:
    """This process's network namespace (`net:[inode]`), or "" where there is none."""
    try:
        return os.readlink("/proc/self/ns/net")
    except OSError:
        return ""


def main() -> int:
    from warmsocket.cli import run_async

    raw = json.loads(sys.stdin.buffer.read())
    job = Job(**raw)
    result = run_async(run(job))
    sys.stdout.write(json.dumps(result.as_dict()))
    sys.stdout.flush()
    return 0 if result.error is None else 1


if __name__ == "__main__":
    raise SystemExit(main())
