"""The clients of the upstream benchmark.

Its processes (the simulated upstream, `warmsocket serve --upstream ...` and vLLM's
agentic-api gateway, `pip install agentic-api==0.9.0`, a Rust gateway with WebSocket
mode) come from `warmsocket.bench.procs`, which `warmsocket bench` uses too.

* `DirectClient`: the baseline, a lean HTTP client that sends the full context to the
  simulated upstream's `POST /v1/responses` (SSE) itself, keeping each item's JSON
  bytes so building a request is a join, as an efficient agent would;
* `WSClient`: the WebSocket-mode client used for warmsocket and agentic-api alike.

Every client parses every event it receives.
"""

from __future__ import annotations

import json
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from warmsocket.httpclient import HTTPPool, Origin, request_head
from warmsocket.sse import SSEDecoder

TERMINAL = {"response.completed", "response.failed", "response.incomplete", "error"}


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
