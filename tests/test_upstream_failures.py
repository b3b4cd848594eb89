"""Upstream failures as the client sees them: state loss replayed, 4xx mapped, 5xx and
timeouts retried only before the first event, cancellation, pooling, rotation."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx2 as httpx
import openai
import pytest
from openai import OpenAI

from tests.support import RunningServer, WSClient, output_text
from tests.upstream_support import RunningSim, running_sim, warmsocket_upstream
from warmsocket.logs import written_here
from warmsocket.metrics import Metrics

APIS = ["chat", "responses", "responses-ws"]


@pytest.fixture(params=APIS)
def api(request: pytest.FixtureRequest) -> str:
    value: str = request.param
    return value


@pytest.fixture
def stack(api: str) -> Iterator[tuple[RunningSim, RunningServer, Metrics]]:
    with (
        running_sim() as sim,
        warmsocket_upstream(sim.base_url, api, timeout=2.0) as (server, metrics),
    ):
        yield sim, server, metrics


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


class Chain:
    """One store=false chain on a raw WebSocket client."""

    def __init__(self, client: WSClient) -> None:
        self.client = client
        self.previous: str | None = None

    def turn(self, text: str, **fields: Any) -> dict[str, Any]:
        if self.previous is not None:
            fields["previous_response_id"] = self.previous
        events = self.client.turn(input=text, store=False, **fields)
        terminal = events[-1]
        if terminal["type"] == "response.completed":
            self.previous = terminal["response"]["id"]
        return terminal


def records(sim: RunningSim) -> list[dict[str, Any]]:
    requests: list[dict[str, Any]] = sim.stats()["requests"]
    return requests


# -- state loss ----------------------------------------------------------------------------


def test_responses_ws_state_loss_is_replayed_transparently() -> None:
    with (
        running_sim() as sim,
        warmsocket_upstream(sim.base_url, "responses-ws") as (server, metrics),
        WSClient(server.ws_url) as client,
    ):
        chain = Chain(client)
        assert output_text([chain.turn("one")]) == "You said: one"
        chain.turn("two")
        sim.control(forget=True)  # the upstream loses every connection's state
        assert output_text([chain.turn("/transcript")]).splitlines() == [
            "user: one",
            "assistant: You said: one",
            "user: two",
            "assistant: You said: two",
            "user: /transcript",
        ]
        seen = records(sim)
        assert [(r["chained"], r["status"], r["items"]) for r in seen] == [
            (False, 200, 1),
            (True, 200, 3),
            (False, 400, 0),  # previous_response_not_found...
            (False, 200, 5),  # ...and the full context, on the same connection
        ]
        assert metrics.upstream.replays["previous_response_not_found"] == 1
        sim.control(close_websockets=True)  # the connection goes away between turns
        time.sleep(0.2)
        assert chain.turn("four")["type"] == "response.completed"
        last = records(sim)[-1]
        assert (last["chained"], last["items"]) == (False, 7)
        assert metrics.upstream.replays["connection_lost"] == 1
        assert chain.turn("five")["type"] == "response.completed"
        assert records(sim)[-1]["chained"]


@pytest.mark.parametrize("api_name", APIS)
def test_upstream_restart_is_invisible_to_the_client(api_name: str) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    with (
        warmsocket_upstream(url, api_name) as (server, _metrics),
        WSClient(server.ws_url) as client,
    ):
        chain = Chain(client)
        with running_sim(port=port):
            chain.turn("one")
            chain.turn("two")
        with running_sim(port=port) as sim:
            text = output_text([chain.turn("/transcript")])
            assert text.splitlines()[:4] == [
                "user: one",
                "assistant: You said: one",
                "user: two",
                "assistant: You said: two",
            ]
            assert records(sim)[-1]["items"] == 5


# -- errors ----------------------------------------------------------------------------------


CONTEXT_TOO_LONG = {
    "status": 400,
    "code": "context_length_exceeded",
    "message": "This model's maximum context length is 16 tokens.",
    "param": "input",
}


def test_4xx_becomes_the_matching_error(
    api: str, stack: tuple[RunningSim, RunningServer, Metrics]
) -> None:
    sim, server, metrics = stack
    sim.control(faults=[CONTEXT_TOO_LONG])
    with WSClient(server.ws_url) as client:
        terminal = Chain(client).turn("hello")
    assert terminal["type"] == "response.failed"
    assert terminal["response"]["error"] == {
        "code": "invalid_prompt",
        "message": "This model's maximum context length is 16 tokens.",
        "type": "invalid_request_error",
        "param": "input",
    }
    assert len(records(sim)) == 1 and metrics.upstream.retries == 0  # a 4xx is not retried
    counted = server.server.metrics.errors["context_length_exceeded"]
    with OpenAI(base_url=server.base_url, api_key="x", max_retries=0) as sdk:
        sim.control(faults=[CONTEXT_TOO_LONG])
        with pytest.raises(openai.BadRequestError) as info:
            sdk.responses.create(model="m", input="hello")
        assert info.value.status_code == 400
        assert info.value.code == "context_length_exceeded" and info.value.param == "input"
        # Counted once, though the response failed with it and the request got it.
        assert server.server.metrics.errors["context_length_exceeded"] == counted + 1
        sim.control(faults=[{"status": 429, "message": "Slow down."}])
        with pytest.raises(openai.RateLimitError):
            sdk.responses.create(model="m", input="hello")
        assert sdk.responses.create(model="m", input="fine").output_text == "You said: fine"


def test_an_upstream_error_s_free_text_fields_stay_out_of_logs_and_metrics(
    api: str, stack: tuple[RunningSim, RunningServer, Metrics], caplog: pytest.LogCaptureFixture
) -> None:
    """An upstream that puts request text into its error's code, type or param: the
    client that sent it gets them back, but the log and the /metrics labels show only
    values that look like identifiers ("other" for the rest)."""
    caplog.set_level(logging.DEBUG)
    sim, server, _metrics = stack
    quoted = {
        "status": 400,
        "code": "bad value: my secret plan",
        "type": "bad: my secret plan",
        "message": "Rejected.",
        "param": "my secret plan",
    }
    with OpenAI(base_url=server.base_url, api_key="x", max_retries=0) as sdk:
        sim.control(faults=[quoted])
        with pytest.raises(openai.BadRequestError) as info:
            sdk.responses.create(model="m", input="hello")
        assert info.value.code == "bad value: my secret plan"  # (to the client who sent it)
        assert info.value.param == "my secret plan"
    with WSClient(server.ws_url) as client:
        sim.control(faults=[quoted])
        assert Chain(client).turn("hello")["type"] == "response.failed"
    errors = server.server.metrics.errors
    assert errors["other"] >= 2 and not any("secret" in code for code in errors)
    with httpx.Client() as http:
        scraped = http.get(server.base_url.removesuffix("/v1") + "/metrics").text
    assert "secret" not in scraped
    access = [r for r in caplog.records if r.getMessage() == "http request"]
    assert any(r.code == "other" for r in access)  # type: ignore[attr-defined]
    # (The websockets library's frame traces are not warmsocket's: the server's log
    # configuration drops them, logs.ForeignRecords.)
    ours = [r for r in caplog.records if written_here(r.name)]
    assert ours and all("secret" not in str(r.__dict__) for r in ours)


def test_an_upstream_url_without_v1_is_a_configuration_error(
    api: str, caplog: pytest.LogCaptureFixture
) -> None:
    """As in front of vLLM, the simulated upstream answers 404 {"detail": "Not Found"}
    outside /v1: the client gets a server error that does not blame its request, the
    log names the path asked for and what to check; nothing is retried."""
    caplog.set_level(logging.WARNING, logger="warmsocket.upstream")
    with running_sim() as sim:
        root = f"http://127.0.0.1:{sim.port}"
        with (
            warmsocket_upstream(root, api) as (server, metrics),
            WSClient(server.ws_url) as client,
        ):
            terminal = Chain(client).turn("hello")
            assert terminal["type"] == "response.failed"
            error = terminal["response"]["error"]
            assert (error["code"], error["type"]) == ("server_error", "server_error")
            assert "no such endpoint" in error["message"]
            assert dict(metrics.upstream.requests) == {(api, "404"): 1}
            assert metrics.upstream.retries == 0
            with OpenAI(base_url=server.base_url, api_key="x", max_retries=0) as sdk:
                # Without `stream`: the 502 itself, which the SDK raises (a 200 with a
                # failed Response reads as an empty answer).
                with pytest.raises(openai.InternalServerError) as info:
                    sdk.responses.create(model="m", input="hello")
                assert info.value.status_code == 502 and info.value.type == "server_error"
                assert info.value.code == "upstream_endpoint_not_found"
                assert "no such endpoint" in info.value.message
    failed = [r for r in caplog.records if r.getMessage() == "upstream request failed"]
    path = "/chat/completions" if api == "chat" else "/responses"
    detail: str = failed[0].detail  # type: ignore[attr-defined]
    assert f" {path} " in detail and "does --upstream end in /v1?" in detail
    assert "hello" not in caplog.text


def test_an_upstream_404_for_an_unknown_model_passes_through(
    api: str, stack: tuple[RunningSim, RunningServer, Metrics]
) -> None:
    sim, server, _metrics = stack
    not_found = {
        "status": 404,
        "code": "model_not_found",
        "message": "The model 'nope' does not exist.",
        "param": "model",
    }
    sim.control(faults=[not_found])
    with WSClient(server.ws_url) as client:
        terminal = Chain(client).turn("hello")
    assert terminal["response"]["error"] == {
        "code": "invalid_prompt",
        "message": "The model 'nope' does not exist.",
        "type": "invalid_request_error",
        "param": "model",
    }
    if api != "responses-ws":  # WebSocket mode's errors are events, with no HTTP status
        sim.control(faults=[not_found])
        with OpenAI(base_url=server.base_url, api_key="x", max_retries=0) as sdk:
            with pytest.raises(openai.NotFoundError) as info:
                sdk.responses.create(model="nope", input="hello")
            assert info.value.code == "model_not_found"


def test_the_simulated_upstream_serves_its_api_under_v1_only() -> None:
    with running_sim() as sim:
        root = f"http://127.0.0.1:{sim.port}"
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        with httpx.Client(base_url=root) as http:
            assert http.post("/v1/chat/completions", json=body).status_code == 200
            for method, path in [
                ("POST", "/chat/completions"),
                ("POST", "/responses"),
                ("GET", "/models"),
                ("POST", "/v1/nothing"),
            ]:
                answer = http.request(method, path, json=body)
                assert (answer.status_code, answer.json()) == (404, {"detail": "Not Found"})
            assert http.get("/health").status_code == 200
            assert http.get("/stats").status_code == 200


def test_5xx_is_retried_before_the_first_event_then_fails(
    api: str, stack: tuple[RunningSim, RunningServer, Metrics]
) -> None:
    sim, server, metrics = stack
    with WSClient(server.ws_url) as client:
        chain = Chain(client)
        sim.control(faults=[{"status": 503}])
        assert output_text([chain.turn("hello")]) == "You said: hello"
        assert [r["status"] for r in records(sim)] == [503, 200]
        assert metrics.upstream.retries == 1
        if api != "responses-ws":  # its upstream failures come as events, not statuses
            assert metrics.upstream.requests[(api, "503")] == 1  # the upstream's status
        sim.control(faults=[{"status": 500}] * 3)
        terminal = chain.turn("again")
        assert terminal["type"] == "response.failed"
        assert terminal["response"]["error"]["code"] == "server_error"
        assert [r["status"] for r in records(sim)][2:] == [500, 500, 500]  # 1 + 2 retries
        assert metrics.upstream.retries == 3
        # The failed continuation evicted its parent (store=false): the chain restarts.
        events = client.turn(input="x", store=False, previous_response_id=chain.previous)
        assert events[-1]["type"] == "error"
        assert events[-1]["error"]["code"] == "previous_response_not_found"


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_an_upstream_s_short_retry_after_is_waited_out(api: str) -> None:
    """A 503 asking for a second: the one replica is tried again after it, not at once
    (which an overloaded server would only refuse again)."""
    with running_sim() as sim, warmsocket_upstream(sim.base_url, api) as (server, metrics):
        sim.control(faults=[{"status": 503, "retry_after": "1"}])
        with OpenAI(base_url=server.base_url, api_key="x", max_retries=0) as sdk:
            start = time.monotonic()
            response = sdk.responses.create(model="m", input="hello")
            waited = time.monotonic() - start
        assert response.output_text == "You said: hello"
        assert [r["status"] for r in records(sim)] == [503, 200]
        assert 1.0 <= waited < 5
        assert metrics.upstream.retries == 1


def refused_at_once(sdk: OpenAI) -> openai.InternalServerError:
    """The 5xx a create gets, asserted to come without waiting (no retry waited for)."""
    start = time.monotonic()
    with pytest.raises(openai.InternalServerError) as info:
        sdk.responses.create(model="m", input="hello")
    assert time.monotonic() - start < 2
    return info.value


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_an_upstream_s_long_retry_after_reaches_the_client(api: str) -> None:
    """A 503 asking for 30 s is not waited out in the request (nor retried at once):
    the client gets the 503 and its Retry-After, which the SDK honours."""
    with running_sim() as sim, warmsocket_upstream(sim.base_url, api) as (server, _metrics):
        sim.control(faults=[{"status": 503, "retry_after": "30"}])
        with OpenAI(base_url=server.base_url, api_key="x", max_retries=0) as sdk:
            refused = refused_at_once(sdk)
        assert refused.status_code == 503
        assert refused.response.headers["retry-after"] == "30"
        assert refused.response.headers["retry-after-ms"] == "30000"
        assert refused.code == "server_is_overloaded"
        assert [r["status"] for r in records(sim)] == [503]
        # Over a WebSocket the create's response fails, saying the upstream is busy.
        sim.control(faults=[{"status": 503, "retry_after": "30"}])
        with WSClient(server.ws_url) as client:
            terminal = Chain(client).turn("hi")
        assert terminal["type"] == "response.failed"
        assert terminal["response"]["error"]["code"] == "server_error"
        assert "overloaded" in terminal["response"]["error"]["message"]


def test_a_long_retry_after_sends_the_retry_to_another_replica_at_once() -> None:
    with (
        running_sim() as first,
        running_sim() as second,
        warmsocket_upstream([first.base_url, second.base_url]) as (server, metrics),
    ):
        for sim in (first, second):
            sim.control(faults=[{"status": 503, "retry_after": "30"}])
        with OpenAI(base_url=server.base_url, api_key="x", max_retries=0) as sdk:
            assert refused_at_once(sdk).status_code == 503
            assert [len(records(sim)) for sim in (first, second)] == [1, 1]
            assert metrics.upstream.retries == 1
            # One replica busy, the other not: answered by the other, without waiting.
            first.control(reset_stats=True, faults=[{"status": 503, "retry_after": "30"}])
            second.control(reset_stats=True)
            for n in range(40):  # new chains spread over both replicas by their prompt
                if records(first):
                    break
                text = f"prompt {n} " + "word " * 200
                start = time.monotonic()
                answer = sdk.responses.create(model="m", input=text)
                assert time.monotonic() - start < 2
                assert answer.output_text == f"You said: {text}"
        assert [r["status"] for r in records(first)] == [503]
        assert records(second)[-1]["status"] == 200


def test_5xx_retries_on_the_same_replica_back_off() -> None:
    with running_sim() as sim, warmsocket_upstream(sim.base_url) as (server, metrics):
        sim.control(faults=[{"status": 500}] * 3)
        with OpenAI(base_url=server.base_url, api_key="x", max_retries=0) as sdk:
            start = time.monotonic()
            with pytest.raises(openai.InternalServerError) as info:
                sdk.responses.create(model="m", input="hello")
            waited = time.monotonic() - start
        assert info.value.status_code == 500
        assert [r["status"] for r in records(sim)] == [500, 500, 500]
        assert 0.75 <= waited < 5  # 0.25 s, then 0.5 s
        assert metrics.upstream.retries == 2


def test_timeouts_are_retried_then_fail(api: str) -> None:
    with (
        running_sim() as sim,
        warmsocket_upstream(sim.base_url, api, timeout=0.4) as (server, metrics),
        WSClient(server.ws_url) as client,
    ):
        chain = Chain(client)
        sim.control(faults=[{"hang": True}])
        assert output_text([chain.turn("slow")]) == "You said: slow"
        assert metrics.upstream.requests[(api, "timeout")] == 1
        sim.control(faults=[{"hang": True}] * 3)
        start = time.monotonic()
        terminal = chain.turn("slower")
        assert terminal["type"] == "response.failed"
        assert "did not answer in time" in terminal["response"]["error"]["message"]
        assert 1.1 < time.monotonic() - start < 5  # three attempts of 0.4 s


# Events of a function-call answer before the break: the call has started (chat: role
# chunk, call chunk, first arguments; Responses: created, in_progress, item added, delta).
BREAK_AFTER_FIRST_EVENT = {"chat": 3, "responses": 4, "responses-ws": 4}


def test_no_retry_once_an_event_reached_the_client(
    api: str, stack: tuple[RunningSim, RunningServer, Metrics]
) -> None:
    sim, server, metrics = stack
    tools = [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}]
    with WSClient(server.ws_url) as client:
        chain = Chain(client)
        sim.control(faults=[{"break_after": 1}])  # broken before any model event: retried
        assert chain.turn('/call get_weather {"a": 1}', tools=tools)["type"] == (
            "response.completed"
        )
        assert len(records(sim)) == 2 and metrics.upstream.retries == 1
        sim.control(faults=[{"break_after": BREAK_AFTER_FIRST_EVENT[api]}])
        client.create(
            input='/call get_weather {"a": 2}',
            tools=tools,
            store=False,
            previous_response_id=chain.previous,
        )
        events = client.until_terminal()
        assert "response.output_item.added" in [e["type"] for e in events]
        assert events[-1]["type"] == "response.failed"
        assert len(records(sim)) == 3 and metrics.upstream.retries == 1


# -- cancellation -----------------------------------------------------------------------------


def _wait_in_flight(sim: RunningSim) -> Any:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        requests = sim.server.stats.requests
        if requests and requests[-1].finished is None and requests[-1].aborted is None:
            return requests[-1]
        time.sleep(0.005)
    raise AssertionError("no request in flight upstream")


def _wait_aborted(record: Any) -> float:
    deadline = time.monotonic() + 2
    while record.aborted is None and time.monotonic() < deadline:
        time.sleep(0.001)
    assert record.aborted is not None, "the upstream request was not aborted"
    aborted: float = record.aborted
    return aborted


def test_client_disconnect_aborts_the_upstream_request(
    api: str, stack: tuple[RunningSim, RunningServer, Metrics]
) -> None:
    sim, server, _metrics = stack
    client = WSClient(server.ws_url)
    client.create(input="/sleep 5000\nhello", store=False)
    assert client.recv()["type"] == "response.created"
    record = _wait_in_flight(sim)
    start = time.monotonic()
    client.conn.socket.shutdown(socket.SHUT_RDWR)  # abrupt: no close frame
    assert _wait_aborted(record) - start < 0.1
    client.conn.close()


def test_http_client_disconnect_aborts_the_upstream_request(
    stack: tuple[RunningSim, RunningServer, Metrics],
) -> None:
    sim, server, _metrics = stack
    body = b'{"model": "m", "input": "/sleep 5000\\nhi", "stream": true}'
    with socket.create_connection(("127.0.0.1", server.port)) as raw:
        raw.sendall(
            b"POST /v1/responses HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        assert raw.recv(65536).startswith(b"HTTP/1.1 200")
        record = _wait_in_flight(sim)
        start = time.monotonic()
    assert _wait_aborted(record) - start < 0.1


# -- pooling and rotation -----------------------------------------------------------------------


def test_upstream_connections_are_pooled(
    api: str, stack: tuple[RunningSim, RunningServer, Metrics]
) -> None:
    sim, server, metrics = stack
    for _ in range(3):
        with WSClient(server.ws_url) as client:
            chain = Chain(client)
            for i in range(4):
                chain.turn(f"turn {i}")
    stats = sim.server.stats
    if api == "responses-ws":
        assert stats.websockets_opened == 2  # the one in use and one kept warm
    else:
        assert stats.connections_opened == 1

    # Concurrent turns need more connections, which then stay in the pool.
    def concurrent_turn() -> None:
        with WSClient(server.ws_url) as client:
            Chain(client).turn("/sleep 300")

    threads = [threading.Thread(target=concurrent_turn) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    opened = stats.websockets_opened if api == "responses-ws" else stats.connections_opened
    assert opened <= 4
    with WSClient(server.ws_url) as client:
        for i in range(3):
            Chain(client).turn(f"after {i}")
    assert (
        stats.websockets_opened if api == "responses-ws" else stats.connections_opened
    ) == opened
    assert sum(metrics.upstream.connections_opened.values()) == opened


def test_responses_ws_connections_rotate_before_their_lifetime() -> None:
    with (
        running_sim(ws_lifetime=1.0) as sim,
        warmsocket_upstream(sim.base_url, "responses-ws", ws_lifetime=0.4) as (server, metrics),
        WSClient(server.ws_url) as client,
    ):
        chain = Chain(client)
        for i in range(8):
            assert chain.turn(f"turn {i}")["type"] == "response.completed"
            time.sleep(0.2)
        assert "You said: turn 0" in output_text([chain.turn("/transcript")])
        assert metrics.upstream.replays["rotated"] >= 1
        assert sim.server.stats.websockets_opened >= 3
        assert all(r["status"] == 200 for r in records(sim))


def test_upstream_auth_failure_is_not_blamed_on_the_client(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="warmsocket.upstream")
    with running_sim(api_key="upstream-key") as sim:
        for api in APIS:
            caplog.clear()
            with (
                warmsocket_upstream(sim.base_url, api) as (server, metrics),
                WSClient(server.ws_url) as client,
            ):
                terminal = Chain(client).turn("hi")
                assert terminal["type"] == "response.failed"
                assert terminal["response"]["error"]["type"] == "server_error"
                assert "--upstream-api-key" in terminal["response"]["error"]["message"]
                with OpenAI(base_url=server.base_url, api_key="x", max_retries=0) as sdk:
                    with pytest.raises(openai.InternalServerError) as info:
                        sdk.responses.create(model="m", input="hi")  # without `stream`
                    assert info.value.status_code == 502
                    assert "--upstream-api-key" in info.value.message
                    stream = sdk.responses.create(model="m", input="hi", stream=True)
                    assert [e.type for e in stream][-1] == "response.failed"
                # The SDK's own retries (two by default) are waived: x-should-retry.
                with OpenAI(base_url=server.base_url, api_key="x") as sdk:
                    with pytest.raises(openai.InternalServerError) as info:
                        sdk.responses.create(model="m", input="hi")
                    assert info.value.response.headers["x-should-retry"] == "false"
                # The log and the metric carry the upstream's own status, not the 502
                # the client gets (docs/upstreams.md: outcome is the upstream's status).
                assert dict(metrics.upstream.requests) == {(api, "401"): 4}
                failed = [r for r in caplog.records if r.getMessage() == "upstream request failed"]
                assert [(r.outcome, r.retry) for r in failed] == [("401", False)] * 4  # type: ignore[attr-defined]
                assert "--upstream-api-key" in failed[0].detail  # type: ignore[attr-defined]
        with (
            warmsocket_upstream(sim.base_url, "responses-ws", api_key="upstream-key") as (
                server,
                _metrics,
            ),
            WSClient(server.ws_url) as client,
        ):
            assert output_text([Chain(client).turn("hi")]) == "You said: hi"


def test_an_oversized_upstream_message_fails_the_turn_not_the_server(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A WebSocket upstream's message over MAX_UPSTREAM_EVENT_BYTES (here made small:
    the terminal event, which repeats the output) closes that upstream connection
    (1009): the turn, whose deltas went out already, fails; the next turn is answered."""
    from warmsocket.backends import responses_ws

    monkeypatch.setattr(responses_ws, "MAX_UPSTREAM_EVENT_BYTES", 4096)
    with (
        running_sim() as sim,
        warmsocket_upstream(sim.base_url, "responses-ws", timeout=2.0) as (server, metrics),
        WSClient(server.ws_url) as client,
    ):
        terminal = client.turn(input="word " * 2000, store=False)[-1]
        assert terminal["type"] == "response.failed", terminal
        assert terminal["response"]["error"]["code"] == "server_error"
        assert metrics.upstream.requests[("responses-ws", "closed")] == 1
        assert output_text(client.turn(input="short", store=False)) == "You said: short"


def test_a_response_running_when_the_upstreams_lifetime_ends_is_finished() -> None:
    """A WebSocket-mode upstream (here another warmsocket, 1 s lifetime) says
    websocket_connection_limit_reached while a response streams, finishes it within
    its grace period, then closes (spec 1.7). The response reaches the client whole,
    with no retry; the next turn goes on a fresh connection."""
    from tests.support import running_server
    from warmsocket.backends.mock import MockBackend
    from warmsocket.engine import Limits

    words = " ".join(f"w{i}" for i in range(30))
    with running_server(
        backend=MockBackend(tokens_per_second=20),  # 32 deltas: 1.6 s
        limits=Limits(connection_lifetime=1.0, close_grace=10),
    ) as upstream:
        url = f"http://127.0.0.1:{upstream.port}/v1"
        with (
            warmsocket_upstream(url, "responses-ws", ws_warm_connections=0) as (front, metrics),
            WSClient(front.ws_url) as client,
        ):
            events = client.turn(input=words)
            assert events[-1]["type"] == "response.completed"
            assert output_text(events) == f"You said: {words}"
            assert metrics.upstream.retries == 0
            again = client.turn(input="again", previous_response_id=events[-1]["response"]["id"])
            assert output_text(again) == "You said: again"


@pytest.mark.parametrize("status", [405, 426, 200])
def test_an_upstream_without_websocket_mode_is_a_configuration_error(
    status: int, caplog: pytest.LogCaptureFixture
) -> None:
    """An HTTP server that answers the upgrade with a plain answer (FastAPI: 405 to a
    GET on a POST route) does not speak WebSocket mode: a server error that says so,
    not the client's invalid_prompt, and not retried."""
    body = b'{"detail":"Method Not Allowed"}'
    reason = {405: b"Method Not Allowed", 426: b"Upgrade Required", 200: b"OK"}[status]
    answer = b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
        status, reason, len(body), body,
    )  # fmt: skip
    listener = socket.create_server(("127.0.0.1", 0))
    upgrades: list[bytes] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                upgrades.append(conn.recv(65536))
                conn.sendall(answer)

    threading.Thread(target=serve, daemon=True).start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
    try:
        with (
            caplog.at_level(logging.WARNING, logger="warmsocket.upstream"),
            warmsocket_upstream(url, "responses-ws", ws_warm_connections=0) as (front, _),
            WSClient(front.ws_url) as client,
        ):
            failed = client.turn(input="hi")[-1]
            # Without `stream`: the configuration error's 502 itself, which the SDK raises.
            with OpenAI(base_url=front.base_url, api_key="x", max_retries=0) as sdk:
                with pytest.raises(openai.InternalServerError) as info:
                    sdk.responses.create(model="m", input="hi")
                assert "does not offer WebSocket mode" in info.value.message
    finally:
        listener.close()
    assert failed["type"] == "response.failed"
    assert failed["response"]["error"]["code"] == "server_error"
    assert "does not offer WebSocket mode" in failed["response"]["error"]["message"]
    assert len(upgrades) == 2  # one per request: not retried
    failures = [r for r in caplog.records if r.getMessage() == "upstream request failed"]
    assert f"with HTTP {status}" in failures[-1].detail  # type: ignore[attr-defined]


def test_idle_upstream_websockets_close_when_their_lifetime_ends() -> None:
    """Not only when a later turn looks at the pool: an idle connection past
    --upstream-ws-lifetime is closed on time (the upstream held 41 open ones)."""
    from tests.support import running_server

    with running_server() as upstream:
        url = f"http://127.0.0.1:{upstream.port}/v1"
        active = upstream.server.metrics.connections_active
        with (
            warmsocket_upstream(url, "responses-ws", ws_warm_connections=0, ws_lifetime=0.5) as (
                front,
                _,
            ),
            WSClient(front.ws_url) as client,
        ):
            assert output_text(client.turn(input="hi")) == "You said: hi"
            assert active["websocket"] == 1  # the pooled connection, idle now
            deadline = time.monotonic() + 5
            while active["websocket"] and time.monotonic() < deadline:
                time.sleep(0.02)
            assert active["websocket"] == 0
            assert output_text(client.turn(input="again")) == "You said: again"


@contextmanager
def fake_ws_upstream(handler: Callable[[Any], Awaitable[None]]) -> Iterator[int]:
    """A WebSocket-mode upstream played by `handler` (one call per connection) on its
    own thread and loop. Yields its port."""
    import asyncio

    from websockets.asyncio.server import serve

    async def start() -> Any:
        return await serve(handler, "127.0.0.1", 0)

    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        server.close()
        loop.run_until_complete(server.wait_closed())
        loop.close()


@contextmanager
def ws_front(
    handler: Callable[[Any], Awaitable[None]], **config: Any
) -> Iterator[tuple[RunningServer, Metrics, WSClient]]:
    """warmsocket (`responses-ws`, no warm connections) in front of `fake_ws_upstream`
    running `handler`, and a client connected to it."""
    with (
        fake_ws_upstream(handler) as port,
        warmsocket_upstream(
            f"http://127.0.0.1:{port}/v1", "responses-ws", ws_warm_connections=0, **config
        ) as (front, metrics),
        WSClient(front.ws_url) as client,
    ):
        yield front, metrics, client


def test_a_pooled_connection_the_upstream_let_go_is_replayed_without_a_retry() -> None:
    """The chain's pooled connection answers the next request with
    websocket_connection_limit_reached (its lifetime ended while it was idle): the
    turn is replayed in full on a fresh connection even with --upstream-retries 0
    (the upstream's state loss is never the client's)."""
    import json as jsonlib

    from websockets.asyncio.server import ServerConnection

    seen: list[tuple[int, dict[str, Any]]] = []

    async def answer(ws: ServerConnection, number: int, response_id: str) -> None:
        for event in (
            {"type": "response.created", "response": {"id": response_id}},
            {"type": "response.output_item.added",
             "item": {"id": f"msg_{number}", "type": "message", "content": []}},
            {"type": "response.output_text.delta", "item_id": f"msg_{number}", "delta": "ok"},
            {"type": "response.completed", "response": {"id": response_id, "usage": {
                "input_tokens": 1, "output_tokens": 1}}},
        ):  # fmt: skip
            await ws.send(jsonlib.dumps(event))

    async def handler(ws: ServerConnection) -> None:
        number = len({n for n, _ in seen}) + 1
        turns = 0
        async for message in ws:
            seen.append((number, jsonlib.loads(message)))
            turns += 1
            if number == 1 and turns == 2:  # the pooled connection, let go
                await ws.send(jsonlib.dumps({"type": "error", "status": 400, "error": {
                    "type": "invalid_request_error", "code": "websocket_connection_limit_reached",
                    "message": "Lifetime reached."}}))  # fmt: skip
                await ws.close()
                return
            await answer(ws, number, f"resp_up{len(seen)}")

    with (
        ws_front(handler, retries=0) as (_front, metrics, client),
    ):
        first = client.turn(input="one")
        assert first[-1]["type"] == "response.completed"
        second = client.turn(input="two", previous_response_id=first[-1]["response"]["id"])
        assert second[-1]["type"] == "response.completed", second[-1]
        assert output_text(second) == "ok"
        assert metrics.upstream.retries == 0
    # Chained on the pooled connection, then the full context on a fresh one.
    assert [n for n, _ in seen] == [1, 1, 2]
    assert seen[1][1]["previous_response_id"] == "resp_up1"
    replay = seen[2][1]
    assert "previous_response_id" not in replay
    assert [item.get("content") for item in replay["input"]][::2] == ["one", "two"]


def test_messages_an_upstream_sent_between_turns_never_reach_the_next_turn() -> None:
    """An upstream that sends an event after a response ended (a misbehaving or
    multiplexing one): the pooled connection is not used again, so the event cannot
    become the first event of the next turn, maybe another client's."""
    import json as jsonlib

    from websockets.asyncio.server import ServerConnection

    connections: list[int] = []

    async def handler(ws: ServerConnection) -> None:
        connections.append(len(connections) + 1)
        async for message in ws:
            request = jsonlib.loads(message)
            rid = f"resp_{len(request['input'])}_{connections[-1]}"
            for event in (
                {"type": "response.created", "response": {"id": rid}},
                {"type": "response.output_item.added",
                 "item": {"id": "msg_1", "type": "message", "content": []}},
                {"type": "response.output_text.delta", "item_id": "msg_1", "delta": "ok"},
                {"type": "response.completed", "response": {"id": rid}},
                {"type": "response.output_text.delta", "item_id": "msg_1", "delta": "STALE"},
            ):  # fmt: skip
                await ws.send(jsonlib.dumps(event))

    with (
        fake_ws_upstream(handler) as port,
        warmsocket_upstream(
            f"http://127.0.0.1:{port}/v1", "responses-ws", ws_warm_connections=0
        ) as (front, _),
        WSClient(front.ws_url) as client,
    ):
        first = client.turn(input="one")
        assert output_text(first) == "ok"
        time.sleep(0.2)  # the stray event has arrived
        second = client.turn(input="two", previous_response_id=first[-1]["response"]["id"])
        assert output_text(second) == "ok"
        fresh = client.turn(input="three")  # a new chain: the idle pool is checked too
        assert output_text(fresh) == "ok"
    assert len(connections) == 3  # none reused after it spoke out of turn


class ScriptedWSUpstream:
    """A WebSocket-mode upstream for `fake_ws_upstream` that answers each request
    "You said: <its last input>" in OpenAI's event shapes (spec 3.2), as response
    `resp_<connection>_<turn>`, and records what each connection was sent.

    `inject[(connection, turn)] = (index, messages)` sends `messages` before the event
    at `index` of that answer: 0 is before its `response.created` (a message that was
    still in flight from the previous turn when this turn took the connection), 4 is
    after its first text delta ("You said: ") went out. `pause[(connection, turn)]`
    waits that many seconds after the injected messages before the rest of the answer
    (an upstream slow to answer after a message that was not the answer)."""

    def __init__(
        self,
        inject: dict[tuple[int, int], tuple[int, list[dict[str, Any]]]],
        pause: dict[tuple[int, int], float] | None = None,
    ) -> None:
        self.inject = inject
        self.pause = pause or {}
        self.requests: list[tuple[int, dict[str, Any]]] = []
        self.connections = 0

    @staticmethod
    def answer(rid: str, text: str) -> list[dict[str, Any]]:
        snapshot = {"id": rid, "object": "response", "status": "in_progress", "output": []}
        item = {"id": f"msg_{rid}", "type": "message", "role": "assistant", "content": []}
        done = {**item, "content": [{"type": "output_text", "text": f"You said: {text}"}]}
        usage = {"input_tokens": 5, "output_tokens": 3}
        return [
            {"type": "response.created", "sequence_number": 0, "response": snapshot},
            {"type": "response.in_progress", "sequence_number": 1, "response": snapshot},
            {"type": "response.output_item.added", "sequence_number": 2, "output_index": 0,
             "item": item},
            {"type": "response.output_text.delta", "sequence_number": 3, "item_id": item["id"],
             "delta": "You said: "},
            {"type": "response.output_text.delta", "sequence_number": 4, "item_id": item["id"],
             "delta": text},
            {"type": "response.output_item.done", "sequence_number": 5, "output_index": 0,
             "item": done},
            {"type": "response.completed", "sequence_number": 6,
             "response": {**snapshot, "status": "completed", "output": [done], "usage": usage}},
        ]  # fmt: skip

    async def __call__(self, ws: Any) -> None:
        import json as jsonlib

        from websockets.exceptions import ConnectionClosed

        self.connections += 1
        number, turns = self.connections, 0
        try:
            async for message in ws:
                request = jsonlib.loads(message)
                turns += 1
                self.requests.append((number, request))
                events = self.answer(f"resp_{number}_{turns}", request["input"][-1]["content"])
                index, extra = self.inject.get((number, turns), (0, []))
                for event in events[:index] + extra:
                    await ws.send(jsonlib.dumps(event))
                await asyncio.sleep(self.pause.get((number, turns), 0.0))
                for event in events[index:]:
                    await ws.send(jsonlib.dumps(event))
        except ConnectionClosed:
            pass  # warmsocket discarded the connection

    def connection_of_each_request(self) -> list[int]:
        return [number for number, _ in self.requests]


def _stray(kind: str, rid: str, number: int | None = None) -> dict[str, Any]:
    """An event of response `rid` (a delta: of its message), numbered `number`."""
    event: dict[str, Any] = {"type": kind}
    if number is not None:
        event["sequence_number"] = number
    if kind.startswith("response.") and "delta" not in kind:
        return {**event, "response": {"id": rid}}
    return {**event, "item_id": f"msg_{rid}", "delta": "STALE"}


@pytest.mark.parametrize(
    "stray",
    [
        _stray("response.output_text.delta", "resp_1_1", 7),
        _stray("response.completed", "resp_1_1", 6),
        _stray("response.created", "resp_1_1", 0),  # one it had already
    ],
    ids=["delta", "completed", "created-again"],
)
def test_a_message_in_flight_when_a_turn_takes_a_pooled_connection_is_not_its_own(
    stray: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """The chain's pooled connection delivers a message of its previous response
    before the next turn's response.created (it was still in flight when the turn
    took the connection, too late for the idle check): the turn does not take it as
    its own; the connection is discarded and the turn replayed in full on a fresh one,
    without using a retry, and the client gets the right answer."""
    script = ScriptedWSUpstream({(1, 2): (0, [stray])})
    with (
        caplog.at_level(logging.WARNING, logger="warmsocket.upstream"),
        ws_front(script, retries=0) as (_front, metrics, client),
    ):
        chain = Chain(client)
        assert output_text([chain.turn("one")]) == "You said: one"
        assert output_text([chain.turn("two")]) == "You said: two"
        assert output_text([chain.turn("three")]) == "You said: three"
        assert metrics.upstream.requests[("responses-ws", "out_of_step")] == 1
        assert metrics.upstream.replays["out_of_step"] == 1
        assert metrics.upstream.retries == 0
    # Chained on the pooled connection, replayed in full on a fresh one, which the
    # chain then continues on; the connection out of step is not used again.
    assert script.connection_of_each_request() == [1, 1, 2, 2]
    replay = script.requests[2][1]
    assert "previous_response_id" not in replay
    assert [item.get("content") for item in replay["input"]][::2] == ["one", "two"]
    assert script.requests[3][1]["previous_response_id"] == "resp_2_1"
    [failure] = [r for r in caplog.records if r.getMessage() == "upstream request failed"]
    assert (failure.outcome, failure.retry) == ("out_of_step", True)  # type: ignore[attr-defined]
    detail: str = failure.detail  # type: ignore[attr-defined]
    assert detail.startswith(f"the upstream sent {stray['type']}")
    assert "before response.created" in detail or "resp_1_1, a response" in detail
    assert "STALE" not in detail


def test_a_connection_a_turn_ended_on_with_an_error_is_not_used_again() -> None:
    """An `error` message before the turn's response.created is read as the upstream's
    answer to it, but it may be a stray one (a late error of an earlier request, a
    connection-level error), with the real answer still to come. The connection is
    not pooled again: the next turn, whoever's, would take that answer as its own."""
    stray_error = {
        "type": "error",
        "status": 400,
        "error": {"type": "invalid_request_error", "code": "invalid_value", "message": "no"},
    }
    script = ScriptedWSUpstream({(1, 2): (0, [stray_error])}, pause={(1, 2): 0.5})
    with ws_front(script, retries=0) as (_front, _metrics, client):
        assert output_text(client.turn(input="one", store=False)) == "You said: one"
        assert client.turn(input="two", store=False)[-1]["type"] == "response.failed"
        # The answer to "two" is still on its way on connection 1.
        assert output_text(client.turn(input="three", store=False)) == "You said: three"
        assert output_text(client.turn(input="four", store=False)) == "You said: four"
    assert script.connection_of_each_request() == [1, 1, 2, 2]


def test_a_chain_replayed_after_previous_response_not_found_leaves_the_connection() -> None:
    """previous_response_not_found before response.created: the turn is sent again in
    full on the same connection and answered. Were that error a stray one, the first
    request's answer is read and the replay's is still to come: the connection is not
    pooled again."""
    lost = {
        "type": "error",
        "status": 400,
        "error": {
            "type": "invalid_request_error",
            "code": "previous_response_not_found",
            "message": "Previous response with id 'resp_1_1' not found.",
            "param": "previous_response_id",
        },
    }
    # (The replay's answer comes late: a next turn would have taken the connection.)
    script = ScriptedWSUpstream({(1, 2): (0, [lost])}, pause={(1, 3): 0.5})
    with ws_front(script, retries=0) as (_front, metrics, client):
        chain = Chain(client)
        assert output_text([chain.turn("one")]) == "You said: one"
        assert output_text([chain.turn("two")]) == "You said: two"
        assert metrics.upstream.replays["previous_response_not_found"] == 1
        assert output_text(client.turn(input="three", store=False)) == "You said: three"
    # "two" went on connection 1 twice (chained, then in full); "three" on a new one.
    assert script.connection_of_each_request() == [1, 1, 1, 2]


@pytest.mark.parametrize(
    ("index", "other"),
    [
        (2, _stray("response.in_progress", "resp_9_9")),
        (2, _stray("response.completed", "resp_9_9")),
        (1, _stray("response.created", "resp_9_9")),
        (
            2,
            {
                "type": "response.failed",
                "response": {"id": "resp_9_9", "error": {"code": "server_error"}},
            },
        ),
    ],
    ids=["in_progress", "completed", "created", "failed"],
)
def test_another_responses_event_before_any_reached_the_client_is_replayed(
    index: int, other: dict[str, Any]
) -> None:
    """A lifecycle event of another response inside the turn's response, before any
    event went to the client: replayed transparently on a fresh connection, with no
    retry used."""
    script = ScriptedWSUpstream({(1, 1): (index, [other])})
    with (
        ws_front(script, retries=0) as (_front, metrics, client),
    ):
        chain = Chain(client)
        events = client.turn(input="one", store=False)
        assert output_text(events) == "You said: one"
        assert [e["type"] for e in events].count("response.created") == 1
        chain.previous = events[-1]["response"]["id"]
        assert output_text([chain.turn("two")]) == "You said: two"
        assert metrics.upstream.requests[("responses-ws", "out_of_step")] == 1
        assert metrics.upstream.retries == 0
    assert script.connection_of_each_request() == [1, 2, 2]


@pytest.mark.parametrize(
    "other",
    [
        _stray("response.completed", "resp_9_9"),
        _stray("response.in_progress", "resp_9_9"),
        # An output event carries no response id: its number goes back.
        _stray("response.output_text.delta", "resp_1_1", 3),
    ],
    ids=["completed", "in_progress", "delta-numbered-back"],
)
def test_another_responses_event_after_events_reached_the_client_fails_the_response(
    other: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """Once an event reached the client, an event of another response ends the
    client's response response.failed, saying so; the upstream connection is
    discarded and the client's next turn is answered on a fresh one."""
    script = ScriptedWSUpstream({(1, 2): (4, [other])})
    with (
        caplog.at_level(logging.WARNING, logger="warmsocket.upstream"),
        ws_front(script) as (_front, metrics, client),
    ):
        chain = Chain(client)
        assert output_text([chain.turn("one")]) == "You said: one"
        client.create(input="two", store=False, previous_response_id=chain.previous)
        events = client.until_terminal()
        deltas = [e["delta"] for e in events if e["type"] == "response.output_text.delta"]
        assert deltas == ["You said: "]
        failed = events[-1]
        assert failed["type"] == "response.failed", failed
        error = failed["response"]["error"]
        assert (error["code"], error["message"]) == (
            "server_error",
            "The upstream sent events of another response.",
        )
        assert output_text(client.turn(input="three", store=False)) == "You said: three"
        assert metrics.upstream.requests[("responses-ws", "out_of_step")] == 1
        assert metrics.upstream.retries == 0
    assert script.connection_of_each_request() == [1, 1, 2]
    [failure] = [r for r in caplog.records if r.getMessage() == "upstream request failed"]
    assert (failure.outcome, failure.retry) == ("out_of_step", False)  # type: ignore[attr-defined]
    assert "during resp_1_2" in failure.detail  # type: ignore[attr-defined]
    assert "STALE" not in failure.detail  # type: ignore[attr-defined]


class EvictingWSUpstream(ScriptedWSUpstream):
    """`ScriptedWSUpstream` that keeps each connection's latest response as OpenAI's
    does (spec 5.1, 5.3): a request chained from any other is
    `previous_response_not_found`, and one whose input is "reject" is refused (a 400
    `error` event) and evicts the response it continued."""

    async def __call__(self, ws: Any) -> None:
        from websockets.exceptions import ConnectionClosed

        self.connections += 1
        number, turns, latest = self.connections, 0, None
        try:
            async for message in ws:
                request = json.loads(message)
                self.requests.append((number, request))
                previous = request.get("previous_response_id")
                text = request["input"][-1]["content"]
                if previous is not None and previous != latest:
                    code = "previous_response_not_found"
                elif text == "reject":
                    code, latest = "invalid_prompt", None
                else:
                    turns += 1
                    latest = f"resp_{number}_{turns}"
                    for event in self.answer(latest, text):
                        await ws.send(json.dumps(event))
                    continue
                error = {"type": "invalid_request_error", "code": code, "message": "No."}
                await ws.send(json.dumps({"type": "error", "status": 400, "error": error}))
        except ConnectionClosed:
            pass


def test_a_failed_continuation_is_not_chained_from_again_on_its_connection() -> None:
    """A turn continuing a stored response is refused upstream (4xx), which evicts
    that parent there (spec 5.3): the next turn continuing the same parent goes with
    its full context at once, without a previous_response_not_found round trip."""
    script = EvictingWSUpstream({})
    with ws_front(script, retries=0) as (_front, metrics, client):
        parent = client.turn(input="one")[-1]["response"]["id"]
        refused = client.turn(input="reject", previous_response_id=parent)[-1]
        assert refused["type"] in ("error", "response.failed"), refused
        again = client.turn(input="two", previous_response_id=parent)
        assert output_text(again) == "You said: two"
        assert metrics.upstream.replays["previous_response_not_found"] == 0
    # (The refusal was an `error` message: that connection is not used again.)
    assert script.connection_of_each_request() == [1, 1, 2]
    assert [r.get("previous_response_id") for _n, r in script.requests] == [
        None,
        "resp_1_1",
        None,
    ]
    assert [item.get("content") for item in script.requests[2][1]["input"]][::2] == [
        "one",
        "two",
    ]


def test_responses_in_order_keep_their_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    """The normal path: OpenAI's shapes (the script) and warmsocket's (the simulated
    upstream) chain turn after turn on one connection, and no message is parsed in
    full to check which response it belongs to."""
    from warmsocket.backends import responses_order

    def no_parse(raw: bytes) -> None:
        raise AssertionError("an upstream message was parsed in full")

    monkeypatch.setattr(responses_order, "_parse", no_parse)
    script = ScriptedWSUpstream({})
    with (
        ws_front(script) as (front, metrics, client),
    ):
        chain = Chain(client)
        for text in ["one", "two", "three"]:
            assert output_text([chain.turn(text)]) == f"You said: {text}"
        assert metrics.upstream.chained == 2
        assert set(metrics.upstream.requests) == {("responses-ws", "ok")}
    assert script.connection_of_each_request() == [1, 1, 1]
    with (
        running_sim() as sim,
        warmsocket_upstream(sim.base_url, "responses-ws", ws_warm_connections=0) as (
            front,
            metrics,
        ),
        WSClient(front.ws_url) as client,
    ):
        chain = Chain(client)
        for text in ["one", "two", "three"]:
            assert output_text([chain.turn(text)]) == f"You said: {text}"
        assert metrics.upstream.chained == 2
        assert set(metrics.upstream.requests) == {("responses-ws", "ok")}
        assert len({r["connection"] for r in records(sim)}) == 1


# -- stalls, and what failures do to the chain (issue #5 audit) ---------------------------------

GET_WEATHER = [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}]


def test_a_stream_that_stalls_times_out(api: str) -> None:
    """An upstream that stops sending mid-answer, its connection open: a stall before
    any model event is retried; one after an event reached the client ends the turn
    `response.failed` once --upstream-timeout passes without a piece, the stalled
    request is dropped, and the metric's outcome is `timeout`."""
    timeout = 0.3
    with (
        running_sim() as sim,
        warmsocket_upstream(sim.base_url, api, timeout=timeout) as (server, metrics),
        WSClient(server.ws_url) as client,
    ):
        chain = Chain(client)
        sim.control(faults=[{"stall_after": 1}])  # before any model event: retried
        assert output_text([chain.turn("one")]) == "You said: one"
        assert metrics.upstream.retries == 1
        assert metrics.upstream.requests[(api, "timeout")] == 1
        sim.control(faults=[{"stall_after": BREAK_AFTER_FIRST_EVENT[api]}])
        start = time.monotonic()
        client.create(
            input='/call get_weather {"a": 2}',
            tools=GET_WEATHER,
            store=False,
            previous_response_id=chain.previous,
        )
        events = client.until_terminal()
        elapsed = time.monotonic() - start
        assert "response.output_item.added" in [e["type"] for e in events]
        assert events[-1]["type"] == "response.failed"
        error = events[-1]["response"]["error"]
        assert error["code"] == "server_error"
        assert "did not answer in time" in error["message"]
        assert timeout - 0.01 <= elapsed < timeout + 2
        assert metrics.upstream.requests[(api, "timeout")] == 2
        assert metrics.upstream.retries == 1  # an event had reached the client
        stalled = sim.server.stats.requests[-1]
        assert stalled.fault == "stall_after" and stalled.finished is None
        _wait_aborted(stalled)  # warmsocket let the stalled request go
        assert len(records(sim)) == 3


def _sse(*events: dict[str, Any] | str) -> bytes:
    return b"".join(
        b"data: " + (e.encode() if isinstance(e, str) else json.dumps(e).encode()) + b"\n\n"
        for e in events
    )


ENDED_STREAMS = {
    "chat": _sse(
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hi"}}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}},
        "[DONE]",
    ),
    "responses": _sse(
        {"type": "response.output_text.delta", "item_id": "m", "output_index": 0, "delta": "Hi"},
        {"type": "response.completed", "response": {"id": "resp_up", "status": "completed"}},
    ),
}
"""A whole answer ("Hi") in each HTTP API's stream, its end marker last."""


@contextmanager
def fake_http_upstream(
    body_end_after: float | None, streams: dict[str, bytes] = ENDED_STREAMS
) -> Iterator[tuple[int, list[str]]]:
    """An HTTP upstream that answers every request with its API's stream of `streams`
    in one chunk and ends the chunked body `body_end_after` seconds later, or never
    (None: a proxy that holds the body open). Yields its port and what happened to its
    connections ("opened", "dropped")."""
    log: list[str] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        log.append("opened")
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                stream = streams["chat" if b"/chat/" in head else "responses"]
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%b\r\n" % (len(stream), stream)
                )
                if body_end_after is None:
                    await reader.read()  # until warmsocket lets go
                    log.append("dropped")
                    return
                await asyncio.sleep(body_end_after)
                writer.write(b"0\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            log.append("dropped")
        finally:
            writer.close()

    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(asyncio.start_server(handler, "127.0.0.1", 0))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield server.sockets[0].getsockname()[1], log
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        server.close()
        for task in asyncio.all_tasks(loop):
            task.cancel()
        loop.run_until_complete(asyncio.sleep(0))
        loop.run_until_complete(server.wait_closed())
        loop.close()


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_a_turn_ends_with_its_stream_even_if_the_body_stays_open(api: str) -> None:
    """An upstream (or a proxy before it) that sends the stream's end marker (`[DONE]`,
    `response.completed`) but keeps the HTTP body open: the turn completes at once,
    not failed after --upstream-timeout, and that connection is dropped, not pooled."""
    with (
        fake_http_upstream(None) as (port, log),
        warmsocket_upstream(f"http://127.0.0.1:{port}/v1", api, timeout=5.0) as (server, _m),
        WSClient(server.ws_url) as client,
    ):
        for _ in range(2):
            start = time.monotonic()
            events = client.turn(input="hello", store=False)
            assert events[-1]["type"] == "response.completed", events[-1]
            assert output_text(events) == "Hi"
            assert time.monotonic() - start < 2
        deadline = time.monotonic() + 5
        while log.count("dropped") < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert log == ["opened", "dropped", "opened", "dropped"]


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_a_body_that_ends_just_after_its_stream_keeps_its_connection(api: str) -> None:
    """The end of the chunked body a moment after the end marker (a server writes
    them apart): the connection goes back to the pool, as one ending with it does."""
    with (
        fake_http_upstream(0.05) as (port, log),
        warmsocket_upstream(f"http://127.0.0.1:{port}/v1", api, timeout=5.0) as (server, _m),
        WSClient(server.ws_url) as client,
    ):
        for _ in range(3):
            assert output_text(client.turn(input="hello", store=False)) == "Hi"
        assert log == ["opened"]


FAILURES: dict[str, Callable[[str], dict[str, Any] | None]] = {
    "timeout": lambda api: {"hang": True},
    "stall": lambda api: {"stall_after": BREAK_AFTER_FIRST_EVENT[api]},
    "broken": lambda api: {"break_after": BREAK_AFTER_FIRST_EVENT[api]},
    "status": lambda api: {"status": 503},
    "model": lambda api: None,  # the model fails mid-answer (chat: an `error` chunk)
}


def fail_a_turn(
    client: WSClient, sim: RunningSim, api: str, failure: str, **fields: Any
) -> list[dict[str, Any]]:
    """A turn that fails upstream in the way named (with --upstream-retries 0)."""
    fault = FAILURES[failure](api)
    if fault is not None:
        sim.control(faults=[fault])
    text = '/call get_weather {"a": 2}' if fault is not None else "/fail"
    events = client.turn(input=text, tools=GET_WEATHER, **fields)
    assert events[-1]["type"] == "response.failed", events[-1]
    if failure in {"stall", "broken"}:  # the answer had started
        assert "response.output_item.added" in [e["type"] for e in events]
    return events


@pytest.mark.parametrize("failure", ["timeout", "stall", "broken"])
def test_a_continuation_that_fails_upstream_counts_for_the_eviction_rule(
    api: str, failure: str
) -> None:
    """A same-lane continuation that times out, stalls or breaks upstream ends
    `response.failed` and, as any failure, evicts its store=false parent: continuing
    that parent is `previous_response_not_found`. A stored parent stays loadable."""
    with (
        running_sim() as sim,
        warmsocket_upstream(sim.base_url, api, timeout=0.3, retries=0) as (server, _metrics),
        WSClient(server.ws_url) as client,
    ):
        for store, text in [(False, "one"), (True, "uno")]:
            parent = client.turn(input=text, store=store)[-1]
            assert parent["type"] == "response.completed"
            parent_id = parent["response"]["id"]
            fail_a_turn(client, sim, api, failure, store=store, previous_response_id=parent_id)
            again = client.turn(input="two", store=store, previous_response_id=parent_id)
            if store:
                assert output_text(again) == "You said: two"
            else:
                assert again[-1]["type"] == "error"
                assert again[-1]["error"]["code"] == "previous_response_not_found"


@pytest.fixture
def no_cyclic_gc() -> Iterator[None]:
    """Only reference counting frees memory during the test (as between collections)."""
    import gc

    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.mark.parametrize("failure", list(FAILURES))
def test_a_failed_upstream_turn_keeps_nothing_of_its_chain_alive(
    api: str, failure: str, no_cyclic_gc: None
) -> None:
    """Once a store=false continuation failed (evicting its parent), the session cache
    holds nothing of the chain. An upstream error kept with its traceback (by the HTTP
    connection, or in a backend's stream frame) made a reference cycle that held the
    turn and its whole context until the cyclic collector ran; meanwhile the evicted
    content was still matched by prefix diffing, so a stored response whose input
    repeated it was made connection-local and could be evicted in turn."""
    with (
        running_sim() as sim,
        warmsocket_upstream(sim.base_url, api, timeout=0.3, retries=0) as (server, _metrics),
        WSClient(server.ws_url) as client,
    ):
        cache = server.server.engine.cache
        for chain in range(2):
            parent = client.turn(input=f"chain {chain} " + "word " * 100, store=False)[-1]
            assert cache.stats().bytes > 0
            fail_a_turn(
                client,
                sim,
                api,
                failure,
                store=False,
                previous_response_id=parent["response"]["id"],
            )
            deadline = time.monotonic() + 2
            while cache.stats().bytes and time.monotonic() < deadline:
                time.sleep(0.01)
            assert cache.stats().entries == 0
            assert cache.stats().bytes == 0, "something still holds the failed turn's context"


def test_shutdown_does_not_wait_long_for_an_upstream_that_does_not_answer_a_close() -> None:
    """The pooled upstream connection stops reading after its turn, so it never
    answers the close frame: warmsocket's shutdown waits at most CLOSE_TIMEOUT for it
    (websockets' default 10 s held the shutdown, and a test server's stop, that long)."""
    import asyncio
    import json as jsonlib

    from warmsocket.backends.responses_ws import CLOSE_TIMEOUT

    async def deaf_after_one_turn(ws: Any) -> None:
        async for message in ws:
            request = jsonlib.loads(message)
            text = request["input"][-1]["content"]
            for event in ScriptedWSUpstream.answer("resp_1_1", text):
                await ws.send(jsonlib.dumps(event))
            # Deaf for a while: the close warmsocket sends at shutdown is not answered.
            ws.transport.pause_reading()
            await asyncio.sleep(CLOSE_TIMEOUT + 4)
            ws.transport.resume_reading()

    with fake_ws_upstream(deaf_after_one_turn) as port:
        with warmsocket_upstream(
            f"http://127.0.0.1:{port}/v1", "responses-ws", ws_warm_connections=0
        ) as (front, _metrics):
            with WSClient(front.ws_url) as client:
                assert output_text(client.turn(input="hi")) == "You said: hi"
            started = time.monotonic()
        assert time.monotonic() - started < CLOSE_TIMEOUT + 1.5


LLAMA_CPP_ERROR = (
    b'error: {"code":400,"message":"the request exceeds the available context size, '
    b'try increasing it","type":"exceed_context_size_error"}\n\n'
)
"""How llama.cpp's server reports a failure in a stream: an `error:` line (a field SSE
does not have), then `data: [DONE]`."""


@pytest.mark.parametrize("partial", [False, True])
def test_a_llama_cpp_error_line_fails_the_response(partial: bool) -> None:
    """Taken for the end of an answer, its `[DONE]` made an empty (or cut) response
    `completed`, stored and continued from; it is the upstream's refusal: a 400 the
    SDK raises before anything was sent, `response.failed` after."""
    head = _sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": "par"}}]})
    stream = (head if partial else b"") + LLAMA_CPP_ERROR + _sse("[DONE]")
    with (
        fake_http_upstream(0.0, {"chat": stream}) as (port, _log),
        warmsocket_upstream(f"http://127.0.0.1:{port}/v1", "chat") as (server, _m),
        OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0) as sdk,
    ):
        if not partial:
            with pytest.raises(openai.BadRequestError) as info:
                sdk.responses.create(model="m", input="a long prompt")
            assert "exceeds the available context size" in info.value.message
        events = list(sdk.responses.create(model="m", input="a long prompt", stream=True))
    failed = events[-1]
    assert failed.type == "response.failed"
    assert failed.response.error is not None
    assert "exceeds the available context size" in failed.response.error.message


BAD_USAGE_STREAMS = {
    "chat": _sse(
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hi"}}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {"choices": [], "usage": {"prompt_tokens": -5, "completion_tokens": 2**64}},
        "[DONE]",
    ),
    "responses": _sse(
        {"type": "response.output_text.delta", "item_id": "m", "output_index": 0, "delta": "Hi"},
        {
            "type": "response.completed",
            "response": {
                "id": "resp_up",
                "status": "completed",
                "usage": {"input_tokens": -5, "output_tokens": 2**64},
            },
        },
    ),
}


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_token_counts_out_of_range_from_the_upstream_are_not_believed(api: str) -> None:
    """A negative count (or one past 64 bits) made storing the response raise: the
    lane never got a terminal event and the next create on it never ran; an SSE
    stream got a second HTTP head inside its body. Such counts are warmsocket's own
    now, as when the upstream gives none."""
    with (
        fake_http_upstream(0.0, BAD_USAGE_STREAMS) as (port, _log),
        warmsocket_upstream(f"http://127.0.0.1:{port}/v1", api) as (server, _m),
        WSClient(server.ws_url) as client,
    ):
        for _ in range(2):  # (the second on the same lane)
            events = client.turn(input="hello", store=False)
            assert events[-1]["type"] == "response.completed", events[-1]
            usage = events[-1]["response"]["usage"]
            assert usage["input_tokens"] > 0 and 0 < usage["output_tokens"] < 100
        with OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0) as sdk:
            streamed = list(sdk.responses.create(model="m", input="hello", stream=True))
    assert streamed[-1].type == "response.completed"
    assert streamed[-1].response.output_text == "Hi"


def test_a_create_closed_in_the_same_write_leaves_no_upstream_connection() -> None:
    """A client that sends a create and its close frame in one write: the turn's
    model task (its first step run eagerly, its upstream connection being opened)
    was cancelled before it ever ran as a task, and on Python 3.11 the cancellation
    never reached it: the upstream connection, opened anyway, leaked each time."""
    from tests.test_framing_server import _masked, _raw_upgrade

    def open_files() -> int:
        return len(os.listdir("/proc/self/fd"))

    with running_sim() as sim, warmsocket_upstream(sim.base_url, "chat") as (server, _m):
        before = open_files()
        create = json.dumps({"type": "response.create", "model": "m", "input": "hi"}).encode()
        for _ in range(20):
            sock, _rest = _raw_upgrade(server.port)
            with sock:
                sock.sendall(_masked(create) + _masked(b"\x03\xe8", opcode=0x8))
                while sock.recv(65536):
                    pass
        deadline = time.monotonic() + 5
        while open_files() - before > 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert open_files() - before <= 4


REFUSAL_STREAMS = {
    "chat": _sse(
        {"choices": [{"index": 0, "delta": {"role": "assistant", "refusal": "I can"}}]},
        {"choices": [{"index": 0, "delta": {"refusal": "'t help."}}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        "[DONE]",
    ),
    "responses": _sse(
        {"type": "response.output_item.added", "item": {"id": "m", "type": "message"}},
        {"type": "response.refusal.delta", "item_id": "m", "delta": "I can"},
        {"type": "response.refusal.delta", "item_id": "m", "delta": "'t help."},
        {"type": "response.refusal.done", "item_id": "m", "refusal": "I can't help."},
        {
            "type": "response.output_item.done",
            "item": {
                "id": "m",
                "type": "message",
                "content": [{"type": "refusal", "refusal": "I can't help."}],
            },
        },
        {"type": "response.completed", "response": {"id": "resp_up", "status": "completed"}},
    ),
}


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_an_upstream_s_refusal_reaches_the_client_as_one(api: str) -> None:
    """A refusal (chat's `delta.refusal`, the Responses API's `response.refusal.*`)
    was dropped: `completed` with no output, so `responses.parse` callers got an empty
    answer instead of the refusal that structured outputs rely on."""
    from pydantic import BaseModel

    class Answer(BaseModel):
        city: str

    with (
        fake_http_upstream(0.0, REFUSAL_STREAMS) as (port, _log),
        warmsocket_upstream(f"http://127.0.0.1:{port}/v1", api) as (server, _m),
        OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0) as sdk,
    ):
        parsed = sdk.responses.parse(model="m", input="where?", text_format=Answer)
        events = list(sdk.responses.create(model="m", input="where?", stream=True))
        with WSClient(server.ws_url) as client:
            ws_events = client.turn(input="where?")
    assert parsed.output_parsed is None
    content = parsed.output[0].content  # type: ignore[union-attr]
    assert [(part.type, getattr(part, "refusal", None)) for part in content] == [
        ("refusal", "I can't help.")
    ]
    types = [event.type for event in events]
    assert types.count("response.refusal.delta") == 2 and "response.refusal.done" in types
    done = next(e for e in events if e.type == "response.refusal.done")
    assert done.refusal == "I can't help."  # type: ignore[union-attr]
    assert ws_events[-1]["response"]["output"][0]["content"] == [
        {"type": "refusal", "refusal": "I can't help."}
    ]
