"""Processes and clients for the upstream benchmark.

* `simulated_upstream()`: `warmsocket simulate-upstream` on a free port;
* `warmsocket_server(...)` (from `benches.servers`) with `--upstream`;
* `agentic_api(upstream)`: vLLM's agentic-api gateway (`pip install agentic-api==0.9.0`),
  a Rust gateway with WebSocket mode, pointed at the same simulated upstream; it runs
  offline on loopback with its SQLite store in a temporary home directory;
* `DirectClient`: the baseline, a lean HTTP client that sends the full context to the
  simulated upstream's `POST /v1/responses` (SSE) itself, keeping each item's JSON
  bytes so building a request is a join, as an efficient agent would;
* `WSClient`: the WebSocket-mode client used for warmsocket and agentic-api alike.

Every client parses every event it receives.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from benches.servers import ServerProcess, _stop, warmsocket_process
from warmsocket.httpclient import HTTPPool, Origin, request_head
from warmsocket.sse import SSEDecoder

TERMINAL = {"response.completed", "response.failed", "response.incomplete", "error"}


def agentic_server_binary() -> str | None:
    """The agentic-api gateway binary, if the package is installed."""
    local = os.path.join(os.path.dirname(sys.executable), "agentic-server")
    if os.access(local, os.X_OK):
        return local
    return shutil.which("agentic-server")


def simulated_upstream(*args: str) -> AbstractContextManager[ServerProcess]:
    """`warmsocket simulate-upstream` on a free port, in its own process."""
    return warmsocket_process("simulate-upstream", "--record-bodies", "0", *args)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextmanager
def agentic_api(upstream_port: int) -> Iterator[ServerProcess]:
    binary = agentic_server_binary()
    if binary is None:
        raise RuntimeError("agentic-api is not installed")
    home = tempfile.mkdtemp(prefix="agentic-home-")
    port = _free_port()
    env = {**os.environ, "HOME": home, "RUST_LOG": "warn", "NO_COLOR": "1"}
    env.pop("OPENAI_API_KEY", None)
    process = subprocess.Popen(
        [
            binary,
            "--llm-api-base",
            f"http://127.0.0.1:{upstream_port}",
            "--gateway-host",
            "127.0.0.1",
            "--gateway-port",
            str(port),
            "--llm-ready-interval-s",
            "1",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError("agentic-server exited before listening")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("agentic-server did not start within 60 s") from None
                time.sleep(0.2)
        yield ServerProcess(process, port)
    finally:
        _stop(process)
        shutil.rmtree(home, ignore_errors=True)


class DirectClient:
    """Full-context Responses requests straight to the upstream, over keep-alive HTTP."""

    def __init__(self, base_url: str, settings: dict[str, Any]) -> None:
        self.origin = Origin.parse(base_url)
        self.pool = HTTPPool(self.origin)
        fields = {**settings, "stream": True, "store": False}
        self.head = json.dumps(fields, separators=(",", ":")).encode()[:-1] + b',"input":['
        self.items: list[bytes] = []
        self.target = f"{self.origin.base_path}/responses"

    def reset(self) -> None:
        self.items = []

    async def turn(self, new_items: list[dict[str, Any]]) -> dict[str, Any]:
        self.items += [json.dumps(i, separators=(",", ":")).encode() for i in new_items]
        body = self.head + b",".join(self.items) + b"]}"
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
        response = await self.pool.request([head, body], timeout=60)
        decoder = SSEDecoder()
        terminal: dict[str, Any] | None = None
        async for data in response.chunks():
            for _name, payload in decoder.feed(data):
                event = json.loads(payload)
                if event["type"] in TERMINAL:
                    terminal = event
        response.close()
        assert terminal is not None and terminal["type"] == "response.completed", terminal
        output = terminal["response"]["output"]
        self.items += [json.dumps(i, separators=(",", ":")).encode() for i in output]
        return terminal

    async def close(self) -> None:
        self.pool.close()


class WSClient:
    """WebSocket mode: only new items plus previous_response_id each turn."""

    def __init__(self, url: str, settings: dict[str, Any]) -> None:
        self.url = url
        self.settings = settings
        self.conn: ClientConnection | None = None
        self.previous: str | None = None

    async def reset(self) -> None:
        if self.conn is not None:
            await self.conn.close()
        self.conn = await connect(self.url, max_size=None, compression=None)
        self.previous = None

    async def turn(self, new_items: list[dict[str, Any]]) -> dict[str, Any]:
        assert self.conn is not None
        body: dict[str, Any] = {
            "type": "response.create",
            **self.settings,
            "store": False,
            "input": new_items,
        }
        if self.previous is not None:
            body["previous_response_id"] = self.previous
        await self.conn.send(json.dumps(body, separators=(",", ":")), text=True)
        while True:
            event = json.loads(await self.conn.recv(decode=False))
            if event["type"] in TERMINAL:
                break
        assert event["type"] == "response.completed", event
        self.previous = event["response"]["id"]
        return event  # type: ignore[no-any-return]

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close()
