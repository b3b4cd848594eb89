"""HTTP mode beyond the SDK: health, models, metrics, auth, errors, keep-alive."""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
import time
from typing import Any

import httpx2 as httpx
import openai
import pytest
from openai import OpenAI

from tests.support import RunningServer, WSClient, running_server
from tests.upstream_support import running_sim
from warmsocket import _core
from warmsocket.upstream import UpstreamConfig
from warmsocket.upstream_cli import build_backend


def test_health_models_and_request_ids(server: RunningServer) -> None:
    health = httpx.get(f"http://127.0.0.1:{server.port}/healthz")
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    models = httpx.get(f"{server.base_url}/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "warmsocket-mock"
    assert httpx.get(f"{server.base_url}/models/warmsocket-mock").json()["object"] == "model"
    for response in [
        health,
        httpx.get(f"{server.base_url}/models/nope"),
        httpx.get(f"{server.base_url}/nowhere"),
        httpx.put(f"{server.base_url}/responses"),
        httpx.get(f"{server.base_url}/responses"),
        httpx.post(f"{server.base_url}/responses/resp_x/cancel"),
    ]:
        assert response.headers["x-request-id"].startswith("req_")
    assert httpx.get(f"{server.base_url}/models/nope").status_code == 404
    assert httpx.put(f"{server.base_url}/responses").status_code == 405
    upgrade = httpx.get(f"{server.base_url}/responses")
    assert upgrade.status_code == 400
    assert upgrade.json()["error"]["code"] == "websocket_upgrade_required"
    assert httpx.post(f"{server.base_url}/responses/resp_x/cancel").status_code == 404


def test_cancel_is_404_for_an_unknown_id_and_400_for_a_stored_one(server: RunningServer) -> None:
    unknown = httpx.post(f"{server.base_url}/responses/resp_unknown/cancel")
    assert unknown.status_code == 404
    assert unknown.json()["error"]["message"] == "Response with id 'resp_unknown' not found."
    assert unknown.json()["error"]["param"] == "response_id"
    rid = httpx.post(f"{server.base_url}/responses", json={"model": "m", "input": "x"}).json()["id"]
    stored = httpx.post(f"{server.base_url}/responses/{rid}/cancel")
    assert stored.status_code == 400
    assert "background" in stored.json()["error"]["message"]
    # Another API key's response is unknown to this one.
    with running_server(api_keys=frozenset({"sk-a", "sk-b"})) as srv:
        rid = httpx.post(
            f"{srv.base_url}/responses",
            json={"model": "m", "input": "x"},
            headers={"Authorization": "Bearer sk-a"},
        ).json()["id"]
        for key, status in [("sk-a", 400), ("sk-b", 404)]:
            cancel = httpx.post(
                f"{srv.base_url}/responses/{rid}/cancel", headers={"Authorization": f"Bearer {key}"}
            )
            assert cancel.status_code == status


def test_metrics_count_turns_errors_and_latency(server: RunningServer) -> None:
    httpx.post(f"{server.base_url}/responses", json={"model": "m", "input": "hi"})
    httpx.post(f"{server.base_url}/responses", json={"model": "m"})
    text = httpx.get(f"http://127.0.0.1:{server.port}/metrics").text
    assert 'warmsocket_turns_total{status="completed"} 1' in text
    assert 'warmsocket_errors_total{code="invalid_value"} 1' in text
    assert "warmsocket_turn_seconds_count 1" in text
    assert "warmsocket_turn_context_rebuild_seconds_bucket" in text
    assert "warmsocket_turn_first_token_seconds_count 1" in text
    assert "warmsocket_cache_entries 1" in text
    assert 'warmsocket_http_requests_total{route="responses",status="200"} 1' in text
    # What the Rust core holds: its tokenizer's tables at least (megabytes).
    rust_bytes = next(
        line for line in text.splitlines() if line.startswith("warmsocket_rust_heap_bytes ")
    )
    assert int(rust_bytes.split()[1]) > 1_000_000
    assert "warmsocket_rust_heap_blocks " in text
    for line in text.splitlines():
        assert line.startswith("#") or len(line.split()) == 2, line


def test_a_model_id_with_slashes_can_be_retrieved() -> None:
    """vLLM and Hugging Face name models `org/name`: the SDK asks for
    /v1/models/Qwen/Qwen2.5-7B-Instruct, slashes and all."""
    slashed = "Qwen/Qwen2.5-7B-Instruct"
    with running_server(models=(slashed, "a/b/c")) as srv:
        sdk = OpenAI(base_url=srv.base_url, api_key="k", max_retries=0)
        assert [m.id for m in sdk.models.list()] == [slashed, "a/b/c"]
        assert sdk.models.retrieve(slashed).id == slashed
        assert sdk.models.retrieve("a/b/c").id == "a/b/c"
        with pytest.raises(openai.NotFoundError):
            sdk.models.retrieve("Qwen")


def test_a_request_its_client_left_is_counted(server: RunningServer) -> None:
    """An SSE stream its client closed is in warmsocket_http_requests_total, as 499
    (the status the access line gives it), not left out."""
    sdk = OpenAI(base_url=server.base_url, api_key="k", max_retries=0)
    with sdk.responses.create(model="m", input="/sleep 2000\nleft", stream=True) as events:
        assert next(iter(events)).type == "response.created"
    line = 'warmsocket_http_requests_total{route="responses",status="499"} 1'
    deadline = time.monotonic() + 5
    while line not in httpx.get(f"http://127.0.0.1:{server.port}/metrics").text:
        assert time.monotonic() < deadline, "the abandoned request was not counted"
        time.sleep(0.02)


def test_input_items_with_null_or_empty_ids_can_be_paged_through(server: RunningServer) -> None:
    """An input item sent with `"id": null` (or "") is listed with the id warmsocket
    gives it, the one a client can page from (`after`), not with null."""
    sent = [
        {"role": "user", "content": "a"},
        {"type": "message", "role": "user", "content": "b", "id": None},
        {"type": "message", "role": "user", "content": "c", "id": ""},
        {"role": "user", "content": "d"},
    ]
    created = httpx.post(f"{server.base_url}/responses", json={"model": "m", "input": sent})
    rid = created.json()["id"]
    texts, after = [], None
    for _ in range(len(sent) + 1):
        query = {"limit": 1, "order": "asc", **({"after": after} if after else {})}
        page = httpx.get(f"{server.base_url}/responses/{rid}/input_items", params=query).json()
        (item,) = page["data"]
        assert isinstance(item["id"], str) and item["id"] == page["last_id"]
        texts.append(item["content"][0]["text"])
        after = page["last_id"]
        if not page["has_more"]:
            break
    assert texts == ["a", "b", "c", "d"]


def test_an_input_message_with_a_null_type_is_refused(server: RunningServer) -> None:
    """`"type": null` on an easy message is refused: it was kept with type null, its
    content not made parts, and the model answered as if there were no message."""
    sent = [{"role": "user", "content": "hello", "type": None}]
    reply = httpx.post(f"{server.base_url}/responses", json={"model": "m", "input": sent})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert (error["code"], error["param"]) == ("invalid_type", "input[0].type")


def test_an_item_id_given_twice_is_refused(server: RunningServer, sdk: OpenAI) -> None:
    """Input items with ids x, y, x are refused as OpenAI refuses them: stored, their
    `input_items` were paged x, y, x, y, ... forever (the SDK's auto-pagination never
    ended). Two `item_reference`s to one item are the item twice too."""
    sent = [
        {"type": "message", "role": "user", "content": "one", "id": "x"},
        {"type": "message", "role": "user", "content": "two", "id": "y"},
        {"type": "message", "role": "user", "content": "three", "id": "x"},
        {"role": "user", "content": "four"},
    ]
    with pytest.raises(openai.BadRequestError) as twice:
        sdk.responses.create(model="m", input=sent)  # type: ignore[arg-type]
    assert twice.value.body == {  # type: ignore[comparison-overlap]
        "message": "Duplicate item found with id x. Remove duplicate items from your input "
        "and try again.",
        "type": "invalid_request_error",
        "param": "input",
        "code": None,
    }
    unique = [*sent[:2], {**sent[2], "id": "z"}, sent[3]]
    response = sdk.responses.create(model="m", input=unique)  # type: ignore[arg-type]
    listed = sdk.responses.input_items.list(response.id, limit=1, order="asc")
    assert [item.content[0].text for item in listed] == ["one", "two", "three", "four"]  # type: ignore[union-attr]
    first = response.output[0].id
    with pytest.raises(openai.BadRequestError) as referenced:
        sdk.responses.create(
            model="m",
            input=[
                {"type": "item_reference", "id": first},
                {"type": "item_reference", "id": first},
            ],
        )
    assert referenced.value.body["param"] == "input"  # type: ignore[index]


def test_error_code_labels_stay_bounded() -> None:
    """Upstream error codes pass through to clients: any number of distinct ones must
    not grow the metrics' label set without bound."""
    from warmsocket.metrics import MAX_ERROR_CODES, Metrics

    metrics = Metrics()
    for i in range(10 * MAX_ERROR_CODES):
        metrics.count_error(f"upstream_code_{i}")
    metrics.count_error("x" * 65)
    metrics.count_error("upstream_code_0")  # a code already counted keeps its label
    assert len(metrics.errors) == MAX_ERROR_CODES + 1
    assert metrics.errors["other"] == 9 * MAX_ERROR_CODES + 1
    assert metrics.errors["upstream_code_0"] == 2


def test_api_keys_are_required_over_http() -> None:
    with running_server(api_keys=frozenset({"sk-1"})) as srv:
        missing = httpx.post(f"{srv.base_url}/responses", json={"model": "m", "input": "x"})
        assert missing.status_code == 401
        assert missing.json()["error"]["code"] == "invalid_api_key"
        ok = httpx.post(
            f"{srv.base_url}/responses",
            json={"model": "m", "input": "x"},
            headers={"Authorization": "Bearer sk-1"},
        )
        assert ok.status_code == 200
        # Health and metrics stay open for probes.
        assert httpx.get(f"http://127.0.0.1:{srv.port}/healthz").status_code == 200


def test_body_limit_and_malformed_http() -> None:
    from warmsocket.engine import Limits

    with running_server(limits=Limits(max_message_bytes=1000)) as srv:
        big = httpx.post(f"{srv.base_url}/responses", content=b"x" * 5000)
        assert big.status_code == 413
        assert "--max-message-bytes" in big.json()["error"]["message"]
        # The code WebSocket mode uses for the same limit (spec §4.2 leaves it open).
        assert big.json()["error"]["code"] == "message_too_large"
        chunked = httpx.post(f"{srv.base_url}/responses", content=iter([b"x" * 5000]))
        assert chunked.request.headers["transfer-encoding"] == "chunked"
        assert chunked.status_code == 413
        assert chunked.json()["error"]["code"] == "message_too_large"
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as raw:
            raw.sendall(b"GARBAGE\r\n\r\n")
            reply = raw.recv(4096)
        assert reply.startswith(b"HTTP/1.1 400 ")


@pytest.mark.parametrize(
    "bad",
    [
        b"GET //[x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",  # urlsplit refuses the target
        b"POST /v1/responses HTTP/1.1\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n",
    ],
)
def test_a_bad_request_after_a_good_one_is_answered_and_closed(bad: bytes) -> None:
    good = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    with running_server() as srv:
        for data in (bad, good + bad):  # first on its connection, and pipelined
            with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as raw:
                raw.sendall(data)
                replies = b""
                while chunk := raw.recv(65536):  # until the server closes
                    replies += chunk
            statuses = [int(status) for status in re.findall(rb"HTTP/1\.1 (\d{3}) ", replies)]
            assert statuses == ([200] if data.startswith(good) else []) + [
                413 if b"Content-Length" in bad else 400
            ]


def test_an_unexpected_parser_failure_is_answered_400_and_closed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from warmsocket.http11 import RequestParser

    def broken(self: RequestParser) -> None:
        raise RuntimeError("a parser bug")

    monkeypatch.setattr(RequestParser, "next_request", broken)
    with running_server() as srv, socket.create_connection(("127.0.0.1", srv.port), 5) as raw:
        raw.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        reply = b""
        while chunk := raw.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 400 ")


def test_keep_alive_serves_several_requests_on_one_connection(server: RunningServer) -> None:
    with httpx.Client(base_url=server.base_url) as client:
        for i in range(3):
            response = client.post("/responses", json={"model": "m", "input": f"n{i}"})
            assert response.json()["output"][0]["content"][0]["text"] == f"You said: n{i}"
    assert server.server.metrics.connections_opened["http"] == 1


def test_a_response_larger_than_the_whole_budget_is_reported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The cache refuses it (no eviction can make room): the turn fails (server_error,
    # the Response object's code; counted as server_is_overloaded), the error and
    # the log say why (never with content).
    with running_server(memory_budget=4096) as srv, caplog.at_level(logging.WARNING):
        # The input fits in the budget (else it is refused before the model runs);
        # the input and its echo together do not.
        reply = httpx.post(
            f"{srv.base_url}/responses", json={"model": "m", "input": "secret " * 500}
        ).json()
        assert reply["status"] == "failed"
        assert reply["error"]["code"] == "server_error"
        assert "--memory-budget" in reply["error"]["message"]
        assert httpx.get(f"{srv.base_url}/responses/{reply['id']}").status_code == 404
        text = httpx.get(f"http://127.0.0.1:{srv.port}/metrics").text
        assert 'warmsocket_errors_total{code="server_is_overloaded"} 1' in text
    (record,) = [r for r in caplog.records if "--memory-budget" in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert record.__dict__["response_id"] == reply["id"]
    assert record.__dict__["memory_budget"] == 4096
    assert "secret" not in caplog.text


def test_a_warm_up_too_large_to_keep_fails_in_its_own_stream() -> None:
    """A streamed warm-up (`prompt_cache_options: {"prewarm": true}`) that cannot be
    stored ends its SSE stream with `response.failed`, as a generated response does:
    the 200 head and `response.created` have gone out, and an HTTP 503 written after
    them was garbage in the stream. Unstreamed, it is the failed Response object, as
    a create's."""
    with running_server(memory_budget=4096) as srv:
        url = f"{srv.base_url}/responses"
        # Under the budget as bytes, over it with what the cache keeps beside them.
        body = {"model": "m", "input": "secret " * 560, "prompt_cache_options": {"prewarm": True}}
        streamed = httpx.post(url, json={**body, "stream": True})
        assert streamed.status_code == 200
        assert b"HTTP/1.1" not in streamed.content
        events = [
            json.loads(line.removeprefix("data: "))
            for line in streamed.text.splitlines()
            if line.startswith("data: ")
        ]
        assert [event["type"] for event in events] == [
            "response.created",
            "response.in_progress",
            "response.failed",
        ]
        assert "--memory-budget" in events[-1]["response"]["error"]["message"]
        reply = httpx.post(url, json=body).json()
        assert reply["status"] == "failed"
        assert "--memory-budget" in reply["error"]["message"]


def test_an_input_larger_than_the_whole_budget_is_refused_before_the_model_runs() -> None:
    """The response could never be kept: the model ran (spending an upstream's
    tokens, streaming the whole answer over a WebSocket) and the turn failed at its
    end. Now a 413 on `input` first; over WebSocket an error event, the connection
    and its chains going on."""
    with (
        running_sim() as sim,
        running_server(
            backend=build_backend(UpstreamConfig(urls=(sim.base_url,))), memory_budget=8192
        ) as srv,
    ):
        with OpenAI(base_url=srv.base_url, api_key="x", max_retries=0) as sdk:
            with pytest.raises(openai.APIStatusError) as refused:
                sdk.responses.create(model="m", input="secret " * 2000)
            assert (refused.value.status_code, refused.value.param) == (413, "input")
            assert refused.value.code == "input_too_large"
            assert "--memory-budget" in refused.value.message
            assert "secret" not in refused.value.message
            # What keeps nothing is not held to it: a token count, a compaction.
            counted = sdk.responses.input_tokens.count(model="m", input="secret " * 2000)
            assert counted.input_tokens > 2000
            compacted = sdk.responses.compact(model="m", input="secret " * 2000)
            assert compacted.output
        with WSClient(srv.ws_url) as ws:
            first = ws.turn(input="hello", store=False)[-1]
            assert first["type"] == "response.completed"
            error = ws.turn(input="secret " * 2000, store=False)[-1]  # a new chain
            assert (error["type"], error["status"], error["error"]["param"]) == (
                "error",
                413,
                "input",
            )
            after = ws.turn(
                input="again", store=False, previous_response_id=first["response"]["id"]
            )
            assert after[-1]["type"] == "response.completed"
        # The refused ones never went upstream (the compaction did, once).
        assert len(sim.stats()["requests"]) == 3


def assert_a_small_request_is_not_held_up(server: RunningServer, path: str, body: Any) -> Any:
    """POST a large request to `path` (about a second of tokenising) and, while it is
    tokenised, a small create: the small one takes a small part of the large one's
    time, not most of it. The large request's answer."""
    url = f"http://127.0.0.1:{server.port}/v1/responses"
    large: list[tuple[float, Any]] = []

    def send_large() -> None:
        started = time.perf_counter()
        response = httpx.post(url + path, json=body, timeout=60)
        assert response.status_code == 200
        large.append((time.perf_counter() - started, response.json()))

    worker = threading.Thread(target=send_large)
    worker.start()
    time.sleep(0.3)  # the large request is being tokenised
    started = time.perf_counter()
    small = httpx.post(url, json={"model": "m", "input": "hi", "store": False}, timeout=60)
    small_seconds = time.perf_counter() - started
    assert small.json()["output"][0]["content"][0]["text"] == "You said: hi"
    worker.join(60)
    assert large
    assert small_seconds < large[0][0] / 3, (small_seconds, large)
    return large[0][1]


def test_a_large_input_over_http_does_not_hold_up_other_requests(server: RunningServer) -> None:
    """As over WebSocket: a 3 MiB piece without a break (about a second of
    tokenising) is tokenised in a worker thread, so a small request sent meanwhile
    is answered meanwhile."""
    body = {"model": "m", "input": "x" * (3 << 20), "store": False}
    assert_a_small_request_is_not_held_up(server, "", body)


def test_large_tools_over_http_do_not_hold_up_other_requests(server: RunningServer) -> None:
    """Tools are counted as the input is: a large set not seen before, in a worker
    thread (here a description of 3 MiB without a break, counted by the token count
    endpoint)."""
    tools = [{"type": "function", "name": "f", "description": "x" * (3 << 20)}]
    counted = assert_a_small_request_is_not_held_up(
        server, "/input_tokens", {"model": "m", "tools": tools}
    )
    canonical = json.dumps(tools, separators=(",", ":"), sort_keys=True)
    expected = _core.Tokenizer.builtin("o200k_base").count_tools(canonical)
    assert counted["input_tokens"] == expected


def test_a_bug_ending_a_stream_fails_its_response_in_the_stream(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An unexpected error as a streamed response ends (a bug, or an upstream's value
    warmsocket did not expect) wrote a second HTTP head (a 500) inside the SSE body:
    the SDK read garbage. The stream ends with `response.failed` now."""
    from warmsocket.engine import Turn

    def broken(self: Turn) -> bytes:
        raise RuntimeError("a bug")

    monkeypatch.setattr(Turn, "complete", broken)
    with running_server() as srv:
        sdk = OpenAI(base_url=srv.base_url, api_key="sk-test", max_retries=0)
        events = list(sdk.responses.create(model="m", input="hello", stream=True))
        again = httpx.get(f"http://127.0.0.1:{srv.port}/healthz")
    assert events[-1].type == "response.failed"
    assert events[-1].response.error is not None
    assert events[-1].response.error.code == "server_error"
    assert again.status_code == 200


def test_a_bug_after_a_stream_began_closes_it_without_a_second_head(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """When not even `response.failed` can be written, the connection closes: an error
    answer's head inside a body under way is garbage to every client."""
    from warmsocket.engine import Turn

    def broken(self: Turn, *args: Any) -> bytes:
        raise RuntimeError("a bug")

    monkeypatch.setattr(Turn, "complete", broken)
    monkeypatch.setattr(Turn, "fail", broken)
    body = json.dumps({"model": "m", "input": "hello", "stream": True}).encode()
    with running_server() as srv, socket.create_connection(("127.0.0.1", srv.port)) as sock:
        sock.sendall(
            b"POST /v1/responses HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
        )
        sock.settimeout(5)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    assert received.startswith(b"HTTP/1.1 200")
    assert received.count(b"HTTP/1.1") == 1
