"""Helpers for upstream tests: the simulated upstream on a background thread, and
warmsocket in front of it."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import uvloop

from tests.support import RunningServer, call_on_loop, running_server
from warmsocket.metrics import Metrics
from warmsocket.simulate.server import SIM_COMPACTION, SimConfig, SimServer
from warmsocket.upstream import UpstreamConfig
from warmsocket.upstream_cli import build_backend


@dataclass
class RunningSim:
    server: SimServer
    loop: asyncio.AbstractEventLoop
    port: int
    stopped: threading.Event

    def stop(self) -> None:
        """Stop serving (connections are dropped, new ones refused). Idempotent."""
        if not self.stopped.is_set():
            self.loop.call_soon_threadsafe(self.loop.stop)
            assert self.stopped.wait(10), "simulated upstream did not stop"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def stats(self, *, bodies: bool = False, since: int = 0) -> dict[str, Any]:
        query = f"?bodies={int(bodies)}&since={since}"
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/stats{query}", timeout=10) as r:
            data: dict[str, Any] = json.load(r)
        return data

    def control(self, **body: Any) -> dict[str, Any]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/control",
            data=json.dumps(body).encode(),
            method="POST",
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as r:
            data: dict[str, Any] = json.load(r)
        return data

    def call(self, fn: Any, *args: Any) -> Any:
        """Run fn(*args) on the simulator's loop thread and return its result."""
        return call_on_loop(self.loop, fn, *args)


@contextmanager
def running_sim(*, port: int = 0, **overrides: Any) -> Iterator[RunningSim]:
    config = replace(SimConfig(port=port), **overrides)
    loop = uvloop.new_event_loop()
    server = SimServer(config)
    started = threading.Event()
    stopped = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(server.start())
        except BaseException as exc:
            failure.append(exc)
            started.set()
            return
        started.set()
        loop.run_forever()
        loop.run_until_complete(server.close())
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
        stopped.set()

    thread = threading.Thread(target=run, name="warmsocket-sim", daemon=True)
    thread.start()
    assert started.wait(10), "simulated upstream did not start"
    if failure:
        raise failure[0]
    running = RunningSim(server, loop, server.port, stopped)
    try:
        yield running
    finally:
        running.stop()
        thread.join(5)


@contextmanager
def warmsocket_upstream(
    urls: list[str] | str, api: str = "chat", **config: Any
) -> Iterator[tuple[RunningServer, Metrics]]:
    """warmsocket with an upstream backend, sharing its Metrics with the test."""
    metrics = Metrics()
    upstream = UpstreamConfig(
        urls=tuple([urls] if isinstance(urls, str) else urls), api=api, **config
    )  # type: ignore[arg-type]
    with running_server(backend=build_backend(upstream, metrics), metrics=metrics) as server:
        yield server, metrics


CALL_ID = re.compile(r"call_[0-9A-Za-z]+")


def normalize_call_ids(text: str) -> str:
    """Call ids differ between models; number them by first appearance."""
    seen: dict[str, str] = {}
    return CALL_ID.sub(lambda m: seen.setdefault(m.group(0), f"call_{len(seen)}"), text)


RESPONSES_UPSTREAMS = ("upstream-responses", "upstream-responses-ws")
"""The backends whose upstream compacts conversations itself (`POST /responses/compact`)."""


def sim_compaction_summary(item: dict[str, Any]) -> str | None:
    """The summary sealed in a compaction item the simulated upstream made (the
    transcript of what it compacted), None for any other item."""
    sealed = item.get("encrypted_content")
    if item.get("type") != "compaction" or not isinstance(sealed, str):
        return None
    if not sealed.startswith(SIM_COMPACTION):
        return None
    return base64.b64decode(sealed.removeprefix(SIM_COMPACTION)).decode()
