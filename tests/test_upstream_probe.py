"""`upstream_probe`: what `serve --upstream` logs at start about each replica."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import pytest

from tests.test_cli import _start, _stop
from tests.upstream_support import running_sim
from warmsocket.upstream import UpstreamConfig
from warmsocket.upstream_probe import Finding, probe_upstreams


def probed(caplog: pytest.LogCaptureFixture, config: UpstreamConfig) -> list[Finding]:
    caplog.set_level(logging.INFO, logger="warmsocket")
    caplog.clear()
    return asyncio.run(probe_upstreams(config, timeout=2.0))


def logged(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    return [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "warmsocket"]


@pytest.fixture
def closed_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]  # bound, not listening: connections are refused


def test_a_reachable_upstream_and_its_models(caplog: pytest.LogCaptureFixture) -> None:
    with running_sim(models=("qwen", "llama")) as sim:
        (finding,) = probed(caplog, UpstreamConfig(urls=(sim.base_url,)))
        assert (finding.status, finding.models) == (200, ("qwen", "llama"))
        assert logged(caplog) == [("INFO", "upstream reachable")]
        assert caplog.records[0].models == ["qwen", "llama"]  # type: ignore[attr-defined]
        # A model the map sends that the upstream does not list: named, with the list.
        mapped = UpstreamConfig(urls=(sim.base_url,), model_map={"gpt-4o": "qwen", "*": "mistral"})
        probed(caplog, mapped)
        (info, warning) = caplog.records
        assert info.getMessage() == "upstream reachable"
        assert warning.levelname == "WARNING" and warning.model == "mistral"  # type: ignore[attr-defined]
        assert "--upstream-model-map" in warning.getMessage()
    # A context window in the list (vLLM's `max_model_len`) is logged and learned.
    with running_sim(models=("qwen",), max_model_len=32768) as sim:
        learned: list[dict[str, int]] = []
        caplog.clear()
        asyncio.run(
            probe_upstreams(UpstreamConfig(urls=(sim.base_url,)), timeout=2.0, learn=learned.append)
        )
    assert learned == [{"qwen": 32768}]
    assert caplog.records[0].context_windows == {"qwen": 32768}  # type: ignore[attr-defined]


def test_nothing_listening(caplog: pytest.LogCaptureFixture, closed_port: int) -> None:
    url = f"http://127.0.0.1:{closed_port}/v1"
    (finding,) = probed(caplog, UpstreamConfig(urls=(url,)))
    assert finding.status is None and "refused" in (finding.reason or "").lower()
    ((level, message),) = logged(caplog)
    assert level == "WARNING" and "not reachable" in message and "--upstream" in message
    assert caplog.records[0].upstream == url  # type: ignore[attr-defined]


def test_a_url_without_v1_is_told_to_add_it(caplog: pytest.LogCaptureFixture) -> None:
    with running_sim() as sim:
        bare = sim.base_url.removesuffix("/v1")
        (finding,) = probed(caplog, UpstreamConfig(urls=(bare,)))
    assert finding.status == 404
    ((level, message),) = logged(caplog)
    assert level == "WARNING" and message.endswith(f"at its end: {bare}/v1")


def test_a_refused_key_says_which_flag(caplog: pytest.LogCaptureFixture) -> None:
    with running_sim(api_key="sk-right") as sim:
        for key, advice in ((None, "set --upstream-api-key"), ("sk-wrong", "check")):
            (finding,) = probed(caplog, UpstreamConfig(urls=(sim.base_url,), api_key=key))
            assert finding.status == 401
            ((level, message),) = logged(caplog)
            assert level == "WARNING" and advice in message
        (finding,) = probed(caplog, UpstreamConfig(urls=(sim.base_url,), api_key="sk-right"))
        assert finding.status == 200
        # Forwarding the clients' keys, with none of its own: a key wanted is expected.
        forwarding = UpstreamConfig(urls=(sim.base_url,), forward_key=True)
        (finding,) = probed(caplog, forwarding)
        ((level, message),) = logged(caplog)
        assert finding.status == 401 and level == "INFO" and "--upstream-forward-key" in message


@asynccontextmanager
async def silent_server() -> AsyncIterator[int]:
    """Accepts connections and reads, never answers."""

    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        await reader.read(1 << 16)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


def test_an_upstream_that_never_answers_is_given_up_on_in_time(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="warmsocket")

    async def main() -> tuple[list[Finding], float]:
        async with silent_server() as port:
            start = time.monotonic()
            config = UpstreamConfig(urls=(f"http://127.0.0.1:{port}/v1",))
            findings = await probe_upstreams(config, timeout=0.5)
            return findings, time.monotonic() - start

    (finding,), elapsed = asyncio.run(main())
    assert finding.status is None and finding.reason
    assert elapsed < 2.0
    assert "not reachable" in logged(caplog)[0][1]


def test_serve_logs_the_probe_and_still_serves(closed_port: int) -> None:
    """The probe never holds serving back: the server listens and answers with the
    upstream down, and the warning is in its log."""
    proc, url = _start("--upstream", f"http://127.0.0.1:{closed_port}/v1")
    try:
        health = subprocess.run(
            ["curl", "-s", f"{url}/models"], capture_output=True, text=True, timeout=10
        )
        assert health.returncode == 0 and json.loads(health.stdout)["object"] == "list"
    finally:
        rest = _stop(proc)
    records = [json.loads(line) for line in rest.splitlines() if line.startswith("{")]
    (warning,) = [r for r in records if r["message"].startswith("upstream not reachable")]
    assert warning["level"] == "warning" and warning["upstream"].endswith(f":{closed_port}/v1")
