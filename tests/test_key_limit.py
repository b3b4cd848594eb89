"""`--max-connections-per-key`: what one API key holds at once (its open WebSockets, its
HTTP creates being answered and its background responses running) is bounded; past it,
429 `rate_limit_exceeded` with `Retry-After`, other keys are served as ever, and the key
can still look at and cancel what it runs."""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Callable

import httpx2 as httpx
import openai
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.support import RunningServer, WSClient, output_text, running_server
from tests.test_http_connection import read_until_closed
from warmsocket.admission import KeyLimit
from warmsocket.backends.mock import MockBackend
from warmsocket.cli import build_parser
from warmsocket.serve import config_from_args

A, B = "sk-agent-a", "sk-agent-b"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def wait_until(condition: Callable[[], bool], timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def held(srv: RunningServer) -> dict[str, int]:
    counts: dict[str, int] = srv.call(lambda: dict(srv.server.key_limit.held))
    return counts


def test_a_key_at_its_limit_is_refused_and_others_are_not(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    with running_server(max_connections_per_key=2) as srv:
        first = WSClient(srv.ws_url, additional_headers=bearer(A))
        second = WSClient(srv.ws_url, additional_headers=bearer(A))
        with pytest.raises(InvalidStatus) as refused:
            connect(srv.ws_url, additional_headers=bearer(A), open_timeout=5).close()
        response = refused.value.response
        assert response.status_code == 429
        assert response.headers["retry-after"] == "1"
        error = json.loads(response.body)["error"]
        assert (error["code"], error["type"]) == ("rate_limit_exceeded", "rate_limit_error")
        assert "--max-connections-per-key" in error["message"]
        # Its HTTP requests too; the openai SDK shows the message.
        sdk = openai.OpenAI(base_url=srv.base_url, api_key=A, max_retries=0)
        with pytest.raises(openai.RateLimitError, match="per key"):
            sdk.responses.create(model="m", input="one more")
        # Another key is served, and the first key's WebSockets go on.
        with WSClient(srv.ws_url, additional_headers=bearer(B)) as other:
            assert output_text(other.turn(model="m", input="b")) == "You said: b"
        assert output_text(first.turn(model="m", input="a")) == "You said: a"
        second.close()
        wait_until(lambda: sum(held(srv).values()) == 1)
        assert sdk.responses.create(model="m", input="now").output_text == "You said: now"
        first.close()
        wait_until(lambda: held(srv) == {})
        sdk.close()
        metrics = srv.server.metrics.render()
        assert "warmsocket_key_limit_refused_total 2" in metrics
        assert "warmsocket_connection_limit_per_key 2" in metrics
        assert "warmsocket_keys_at_limit 0" in metrics
    (warned,) = [r for r in caplog.records if "--max-connections-per-key" in r.getMessage()]
    assert warned.__dict__["owner"].startswith("key_")
    assert A not in caplog.text and "one more" not in caplog.text


def test_an_http_stream_holds_its_key_until_it_ends() -> None:
    backend = MockBackend(ttft_ms=1500)
    with (
        running_server(backend=backend, max_connections_per_key=1) as srv,
        httpx.Client(base_url=srv.base_url, timeout=10) as http,
        socket.create_connection(("127.0.0.1", srv.port), timeout=10) as raw,
    ):
        body = json.dumps({"model": "m", "input": "slow", "stream": True}).encode()
        raw.sendall(
            b"POST /v1/responses HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer %b\r\n"
            b"Content-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n%b" % (A.encode(), len(body), body)
        )
        wait_until(lambda: sum(held(srv).values()) == 1)
        create = {"model": "m", "input": "another"}
        refused = http.post("/responses", json=create, headers=bearer(A))
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        compacting = http.post("/responses/compact", json=create, headers=bearer(A))
        assert compacting.status_code == 429  # a compaction runs the model too
        assert http.get("/models", headers=bearer(A)).status_code == 200  # runs nothing
        assert http.post("/responses", json=create, headers=bearer(B)).status_code == 200
        assert http.post("/responses", json=create).status_code == 200  # no key: one of its own
        assert b"response.completed" in read_until_closed(raw)
        wait_until(lambda: held(srv) == {})
        assert http.post("/responses", json=create, headers=bearer(A)).status_code == 200
        assert held(srv) == {}


def test_background_responses_hold_their_key_while_they_run() -> None:
    with (
        running_server(max_connections_per_key=2) as srv,
        httpx.Client(base_url=srv.base_url, timeout=10, headers=bearer(A)) as http,
    ):
        runs = []
        for _ in range(2):
            created = http.post(
                "/responses", json={"model": "m", "input": "/sleep 5000 x", "background": True}
            )
            assert created.json()["status"] in {"queued", "in_progress"}
            runs.append(created.json()["id"])
        assert list(held(srv).values()) == [2]  # both runs, after their creates ended
        refused = http.post("/responses", json={"model": "m", "input": "x", "background": True})
        assert refused.status_code == 429
        assert http.post("/responses", json={"model": "m", "input": "x"}).status_code == 429
        with pytest.raises(InvalidStatus):
            connect(srv.ws_url, additional_headers=bearer(A), open_timeout=5).close()
        other = http.post("/responses", json={"model": "m", "input": "x"}, headers=bearer(B))
        assert other.status_code == 200
        # At its limit, the key still sees and cancels what it runs.
        assert http.get(f"/responses/{runs[0]}").json()["status"] in {"queued", "in_progress"}
        cancelled = http.post(f"/responses/{runs[0]}/cancel")
        assert cancelled.json()["status"] == "cancelled"
        wait_until(lambda: sum(held(srv).values()) == 1)
        again = http.post("/responses", json={"model": "m", "input": "x"})
        assert again.json()["output"][0]["content"][0]["text"] == "You said: x"
        http.post(f"/responses/{runs[1]}/cancel")
        wait_until(lambda: held(srv) == {})


def test_no_limit_by_default() -> None:
    with running_server() as srv:
        clients = [WSClient(srv.ws_url, additional_headers=bearer(A)) for _ in range(5)]
        for client in clients:
            client.close()
        assert held(srv) == {}  # nothing is counted without a limit
        assert "warmsocket_key_limit_refused_total" not in srv.server.metrics.render()


def test_key_limit_accounting() -> None:
    limit = KeyLimit(2)
    a1, a2 = limit.take("a"), limit.take("a")
    assert a1 is not None and a2 is not None and limit.take("a") is None
    b = limit.take("b")
    assert b is not None
    a1.release()
    a1.release()  # once only
    assert limit.held == {"a": 1, "b": 1}
    a3 = limit.take("a")
    assert a3 is not None and limit.take("a") is None
    handed = a3.hand_over()  # the same place, now another holder's
    a3.release()
    assert limit.held["a"] == 2
    for slot in (handed, a2, b):
        slot.release()
    assert limit.held == {} and limit.refused == 2
    unlimited = KeyLimit(None)
    slots = [unlimited.take("a") for _ in range(1000)]
    assert all(slots) and unlimited.held == {}


def test_the_flag_and_its_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    def configured(*args: str) -> int | None:
        # (The parser reads the environment as it is built.)
        return config_from_args(build_parser().parse_args(["serve", *args])).max_connections_per_key

    assert configured() is None
    assert configured("--max-connections-per-key", "8") == 8
    monkeypatch.setenv("WARMSOCKET_MAX_CONNECTIONS_PER_KEY", "3")
    assert configured() == 3
