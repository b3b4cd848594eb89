"""`--metrics-port`: a second port for probes and scrapes only, open while the server
drains, outside the connection limit."""

from __future__ import annotations

import asyncio
import json
import socket

import httpx2 as httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.support import WSClient, running_server
from tests.test_cli import WARMSOCKET, _stop, run, start_serve
from tests.test_shutdown import refused


def test_the_metrics_port_answers_probes_only_and_outside_the_limit() -> None:
    with running_server(metrics_port=0, max_connections=1) as srv, WSClient(srv.ws_url):
        port = srv.server.metrics_port
        assert port is not None and port != srv.port
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as probes:
            for _ in range(3):  # the API's port is full; this one is not limited
                assert probes.get("/healthz").json() == {"status": "ok"}
                assert "warmsocket_connections" in probes.get("/metrics").text
            wrong = probes.post("/v1/responses", json={"model": "m", "input": "no"})
            assert wrong.status_code == 404
            assert "--metrics-port" in wrong.json()["error"]["message"]
        with pytest.raises(InvalidStatus) as upgrade:
            connect(f"ws://127.0.0.1:{port}/v1/responses", open_timeout=5)
        assert upgrade.value.response.status_code == 404
        metrics = srv.server.metrics.render()
    assert 'warmsocket_connections_refused_total{how="answered"} 0' in metrics


def test_the_metrics_port_says_draining_while_the_api_port_is_closed() -> None:
    with running_server(metrics_port=0) as srv:
        port = srv.server.metrics_port
        busy = WSClient(srv.ws_url)
        busy.create(input="/sleep 1000 slow")
        assert busy.recv()["type"] == "response.created"
        drained = asyncio.run_coroutine_threadsafe(srv.server.drain(10), srv.loop)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as probes:
            health = probes.get("/healthz")
            assert (health.status_code, health.json()) == (503, {"status": "draining"})
        assert refused(srv.port)
        drained.result(timeout=10)
        busy.close()


def test_serve_lists_the_metrics_port_and_names_it_when_taken() -> None:
    proc, listening = start_serve("--metrics-port", "0")
    try:
        assert listening["metrics"].startswith("http://127.0.0.1:")
        assert listening["metrics"].endswith("/metrics")
        assert httpx.get(listening["metrics"]).status_code == 200
    finally:
        _stop(proc)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run(WARMSOCKET, "serve", "--port", "0", "--metrics-port", str(port))
    assert result.returncode == 1
    (record,) = [json.loads(line) for line in result.stderr.splitlines()]
    assert record["message"] == "cannot listen; pick another --metrics-port or --host"
    assert record["port"] == port
