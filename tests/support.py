"""Helpers for tests: a real server on a background thread, SDK-type validation, a raw client."""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Annotated, Any, get_args, get_origin

import uvloop
from openai.types.responses.response_stream_event import ResponseStreamEvent
from openai.types.responses.responses_server_event import ResponsesServerEvent
from pydantic import TypeAdapter
from websockets.sync.client import ClientConnection, connect

from warmsocket.backends.base import Backend
from warmsocket.backends.mock import MockBackend
from warmsocket.engine import Limits, SharedResponses
from warmsocket.metrics import Metrics
from warmsocket.server import Server, ServerConfig


def _adapters_by_type(union: Any) -> dict[str, TypeAdapter[Any]]:
    """One adapter per event class, keyed by its `type` literal (readable failures)."""
    members = get_args(get_args(union)[0]) if get_origin(union) is Annotated else get_args(union)
    adapters: dict[str, TypeAdapter[Any]] = {}
    for member in members:
        (literal,) = get_args(member.model_fields["type"].annotation)
        adapters[literal] = TypeAdapter(member)
    return adapters


WS_EVENTS = _adapters_by_type(ResponsesServerEvent)
SSE_EVENTS = _adapters_by_type(ResponseStreamEvent)
TERMINAL = {"response.completed", "response.failed", "response.incomplete"}
FUNCTION_TOOLS = [
    {
        "type": "function",
        "name": "get_weather",
        "description": "Weather for a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
    {
        "type": "function",
        "name": "read_file",
        "description": "Read a file.",
        "parameters": {"type": "object", "properties": {"path": {"type": "string"}}},
    },
]


def check_ws_event(payload: dict[str, Any]) -> Any:
    """Validate one WebSocket server event against the openai SDK's types (strictly)."""
    assert "stream_id" not in payload or isinstance(payload["stream_id"], str), payload
    assert payload.get("type") in WS_EVENTS, f"not a server event type: {payload.get('type')}"
    return WS_EVENTS[payload["type"]].validate_python(payload)


def check_sse_event(payload: dict[str, Any]) -> Any:
    assert "stream_id" not in payload
    if payload.get("type") == "error":
        assert "error" not in payload, "SSE error events are flat"
    assert payload.get("type") in SSE_EVENTS, f"not a stream event type: {payload.get('type')}"
    return SSE_EVENTS[payload["type"]].validate_python(payload)


def call_on_loop(loop: asyncio.AbstractEventLoop, fn: Any, *args: Any) -> Any:
    """Run fn(*args) on `loop`, running in another thread, and return its result."""
    result: list[Any] = []
    done = threading.Event()

    def run() -> None:
        try:
            result.append(fn(*args))
        finally:
            done.set()

    loop.call_soon_threadsafe(run)
    assert done.wait(10)
    return result[0] if result else None


@dataclass
class RunningServer:
    server: Server
    loop: asyncio.AbstractEventLoop
    port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/responses"

    def call(self, fn: Any, *args: Any) -> Any:
        """Run fn(*args) on the server's loop thread and return its result."""
        return call_on_loop(self.loop, fn, *args)


@contextmanager
def running_server(
    *,
    backend: Backend | None = None,
    limits: Limits | None = None,
    metrics: Metrics | None = None,
    shared: SharedResponses | None = None,
    **overrides: Any,
) -> Iterator[RunningServer]:
    config = ServerConfig(port=0, ws_ping_interval=None)
    config = replace(config, limits=limits or Limits(), **overrides)
    loop = uvloop.new_event_loop()
    server = Server(config, backend or MockBackend(), metrics=metrics, shared=shared)
    started = threading.Event()
    stopped = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(server.start())
        started.set()
        loop.run_forever()
        loop.run_until_complete(server.close())
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
        stopped.set()

    thread = threading.Thread(target=run, name="warmsocket-test-server", daemon=True)
    thread.start()
    assert started.wait(10), "server did not start"
    try:
        yield RunningServer(server, loop, server.port)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        assert stopped.wait(10), "server did not stop"
        thread.join(5)


class WSClient:
    """A raw WebSocket client that validates every event it receives."""

    def __init__(self, url: str, **kwargs: Any) -> None:
        kwargs.setdefault("max_size", None)
        self.conn: ClientConnection = connect(url, open_timeout=5, **kwargs)
        self.events: list[dict[str, Any]] = []

    def send(self, payload: dict[str, Any] | str | bytes) -> None:
        if isinstance(payload, dict):
            payload = json.dumps(payload)
        self.conn.send(payload)

    def create(self, **fields: Any) -> None:
        self.send({"type": "response.create", "model": "warmsocket-mock", **fields})

    def recv(self, timeout: float = 10) -> dict[str, Any]:
        raw = self.conn.recv(timeout=timeout)
        payload: dict[str, Any] = json.loads(raw)
        check_ws_event(payload)
        self.events.append(payload)
        return payload

    def until_terminal(
        self, stream_id: str | None = None, timeout: float = 10
    ) -> list[dict[str, Any]]:
        """Events of one lane up to its terminal event (or a request error)."""
        out: list[dict[str, Any]] = []
        while True:
            event = self.recv(timeout)
            if event.get("stream_id") != stream_id:
                continue
            out.append(event)
            if event["type"] in TERMINAL or event["type"] == "error":
                return out

    def turn(self, **fields: Any) -> list[dict[str, Any]]:
        self.create(**fields)
        return self.until_terminal(fields.get("stream_id"))

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> WSClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def output_text(events: list[dict[str, Any]]) -> str:
    terminal = events[-1]
    assert terminal["type"] == "response.completed", terminal
    texts = [
        part["text"]
        for item in terminal["response"]["output"]
        if item["type"] == "message"
        for part in item["content"]
    ]
    return "".join(texts)


def check_sequence(events: list[dict[str, Any]]) -> None:
    """Per-response sequence numbers start at 0 and have no gaps; one terminal at the end."""
    numbers = [e["sequence_number"] for e in events if "sequence_number" in e]
    assert numbers == list(range(len(numbers))), numbers
    assert [e["type"] for e in events].count("response.created") == 1
    assert events[-1]["type"] in TERMINAL
    ids = {e["response"]["id"] for e in events if "response" in e}
    assert len(ids) == 1, ids


def gil_stall_fraction(work: Callable[[], object], rounds: int = 5) -> float:
    """The longest time another Python thread could not run during `work()`, as a
    fraction of the call's duration (the best of a few rounds).

    Close to 1 when `work` holds the GIL throughout; small when it releases it.
    """
    stamps: list[float] = []
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            stamps.append(time.perf_counter())

    windows: list[tuple[float, float]] = []
    old = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)
    thread = threading.Thread(target=spin)
    thread.start()
    try:
        for _ in range(rounds):
            time.sleep(0.005)
            start = time.perf_counter()
            work()
            windows.append((start, time.perf_counter()))
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(old)
    fractions = []
    for lo, hi in windows:
        points = [lo, *(t for t in stamps if lo < t < hi), hi]
        longest = max(b - a for a, b in itertools.pairwise(points))
        fractions.append(longest / (hi - lo))
    return min(fractions)
