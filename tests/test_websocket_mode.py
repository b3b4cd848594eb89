"""WebSocket mode over a real socket: event sequences, state, lanes, limits, errors."""

from __future__ import annotations

import contextlib
import gc
import json
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx2 as httpx
import pytest
from openai.types.responses import Response
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.support import (
    FUNCTION_TOOLS,
    TERMINAL,
    RunningServer,
    WSClient,
    check_sequence,
    output_text,
    running_server,
)
from tests.test_framing_server import _masked
from tests.test_http_connection import (
    UPGRADE,
    read_head,
    small_send_buffers,
    small_window_connection,
)
from warmsocket import _core, mockmodel
from warmsocket import server as server_module
from warmsocket.backends.base import StreamItem, TextDelta, TurnContext
from warmsocket.engine import Limits
from warmsocket.logs import JSONFormatter, TextFormatter

TEXT_SEQUENCE = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    *["response.output_text.delta"] * 3,
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]


def test_plain_text_turn_exact_sequence(server: RunningServer) -> None:
    with WSClient(server.ws_url) as ws:
        events = ws.turn(input="hello")
    assert [e["type"] for e in events] == TEXT_SEQUENCE
    check_sequence(events)
    assert all("stream_id" not in e for e in events)
    assert output_text(events) == "You said: hello"
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert deltas == "You said: hello"
    created, completed = events[0]["response"], events[-1]["response"]
    assert created["status"] == "in_progress" and created["output"] == []
    assert completed["status"] == "completed" and completed["completed_at"] is not None
    item = completed["output"][0]
    added = events[2]["item"]
    assert item["id"] == added["id"] == events[-2]["item"]["id"]
    assert all(e["output_index"] == 0 for e in events[2:-1])
    usage = completed["usage"]
    assert usage["input_tokens"] > 0 and usage["output_tokens"] > 0
    assert usage["input_tokens_details"]["cached_tokens"] == 0
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]


def test_continuation_rebuilds_the_full_context(server: RunningServer) -> None:
    with WSClient(server.ws_url) as ws:
        first = ws.turn(input="one", instructions="be brief")
        rid = first[-1]["response"]["id"]
        second = ws.turn(input="/transcript", previous_response_id=rid, instructions="be brief")
    assert output_text(second).splitlines() == [
        "instructions: be brief",
        "user: one",
        "assistant: You said: one",
        "user: /transcript",
    ]
    usage = second[-1]["response"]["usage"]
    assert 0 < usage["input_tokens_details"]["cached_tokens"] < usage["input_tokens"]
    assert second[-1]["response"]["previous_response_id"] == rid


def test_full_history_without_previous_response_id(server: RunningServer) -> None:
    with WSClient(server.ws_url) as ws:
        first = ws.turn(input=[{"role": "user", "content": "one"}])
        history = [
            {"role": "user", "content": "one"},
            *first[-1]["response"]["output"],
            {"role": "user", "content": "/transcript"},
        ]
        second = ws.turn(input=history)
    assert output_text(second).splitlines() == [
        "user: one",
        "assistant: You said: one",
        "user: /transcript",
    ]


def test_tool_loop_over_one_socket(server: RunningServer) -> None:
    with WSClient(server.ws_url) as ws:
        events = ws.turn(input='/call get_weather {"city": "Paris"}', tools=FUNCTION_TOOLS)
        types = [e["type"] for e in events]
        assert types == [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            *["response.function_call_arguments.delta"] * 3,
            "response.function_call_arguments.done",
            "response.output_item.done",
            "response.completed",
        ]
        check_sequence(events)
        call = events[-1]["response"]["output"][0]
        assert (call["type"], call["name"], json.loads(call["arguments"])) == (
            "function_call",
            "get_weather",
            {"city": "Paris"},
        )
        reply = ws.turn(
            previous_response_id=events[-1]["response"]["id"],
            tools=FUNCTION_TOOLS,
            input=[{"type": "function_call_output", "call_id": call["call_id"], "output": "sunny"}],
        )
    assert output_text(reply) == "get_weather returned: sunny"


def test_warmup_returns_a_chainable_id(server: RunningServer) -> None:
    with WSClient(server.ws_url) as ws:
        warm = ws.turn(generate=False, instructions="sys", tools=FUNCTION_TOOLS)
        assert [e["type"] for e in warm] == [
            "response.created",
            "response.in_progress",
            "response.completed",
        ]
        assert warm[-1]["response"]["output"] == []
        assert warm[-1]["response"]["usage"]["output_tokens"] == 0
        rid = warm[-1]["response"]["id"]
        reply = ws.turn(previous_response_id=rid, input="/transcript", instructions="sys")
    assert output_text(reply).splitlines() == ["instructions: sys", "user: /transcript"]


def test_a_reasoning_item_comes_first_in_openai_order(server: RunningServer) -> None:
    # `/think` makes the built-in model answer as a reasoning model does; every event
    # is checked against the SDK's types by WSClient.
    with WSClient(server.ws_url) as ws:
        events = ws.turn(input="/think Keep it short.\nhello")
        rid = events[-1]["response"]["id"]
        after = ws.turn(input="/transcript", previous_response_id=rid)
    check_sequence(events)
    assert [e["type"] for e in events[:8]] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.reasoning_summary_part.added",
        "response.reasoning_summary_text.delta",
        "response.reasoning_summary_text.done",
        "response.reasoning_summary_part.done",
        "response.output_item.done",
    ]
    words = len(mockmodel.text_deltas("You said: /think Keep it short.\nhello"))
    assert [e["type"] for e in events[8:]] == [
        *TEXT_SEQUENCE[2:4],
        *["response.output_text.delta"] * words,
        *TEXT_SEQUENCE[-4:],
    ]
    reasoning, message = events[-1]["response"]["output"]
    assert reasoning == events[7]["item"]
    assert reasoning["summary"] == [{"type": "summary_text", "text": "Keep it short."}]
    assert reasoning["id"].startswith("rs_") and events[4]["item_id"] == reasoning["id"]
    # Its tokens are estimated, as the text's are, and are part of the output's.
    usage = events[-1]["response"]["usage"]
    assert 0 < usage["output_tokens_details"]["reasoning_tokens"] < usage["output_tokens"]
    assert all(e["output_index"] == 0 for e in events[2:8])
    assert all(e["output_index"] == 1 for e in events[8:-1])
    assert message["content"][0]["text"] == "You said: /think Keep it short.\nhello"
    # Kept in the chain, in its place.
    assert output_text(after).splitlines()[1:4] == [
        "hello",
        "reasoning Keep it short.",
        "assistant: You said: /think Keep it short.",
    ]


WEB_SEARCH_TOOLS = [{"type": "web_search"}]


def test_a_web_search_shows_its_progress_and_stays_in_the_chain(server: RunningServer) -> None:
    # `/search` makes the built-in model search as OpenAI's hosted web search does:
    # the call shown at once, its progress events, the call done, then the answer;
    # every event is checked against the SDK's types by WSClient.
    with WSClient(server.ws_url) as ws:
        events = ws.turn(input="/search warm caches\n/reply Found.", tools=WEB_SEARCH_TOOLS)
        rid = events[-1]["response"]["id"]
        after = ws.turn(input="/transcript", previous_response_id=rid, tools=WEB_SEARCH_TOOLS)
        without = ws.turn(input="/search q")
    check_sequence(events)
    assert [e["type"] for e in events[:7]] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.web_search_call.in_progress",
        "response.web_search_call.searching",
        "response.web_search_call.completed",
        "response.output_item.done",
    ]
    started, done = events[2]["item"], events[6]["item"]
    assert started["status"] == "in_progress" and done["status"] == "completed"
    assert started["id"] == done["id"] and done["id"].startswith("ws_")
    assert done["action"] == {"type": "search", "query": "warm caches"}
    assert all(e["item_id"] == done["id"] for e in events[3:6])
    assert all(e["output_index"] == 0 for e in events[2:7])
    assert all(e["output_index"] == 1 for e in events[7:-1])
    searched, message = events[-1]["response"]["output"]
    assert searched == done
    assert message["content"][0]["text"] == "Found."
    # The answer cites the search, as OpenAI's do: the annotation as it comes, then in
    # the message's text part.
    (added,) = [e for e in events if e["type"] == "response.output_text.annotation.added"]
    citation = mockmodel.search_citation("warm caches", "Found.")
    assert added["annotation"] == citation and citation["end_index"] == len("Found.")
    assert (added["output_index"], added["content_index"], added["annotation_index"]) == (1, 0, 0)
    assert added["item_id"] == message["id"]
    assert message["content"][0]["annotations"] == [citation]
    assert output_text(after).splitlines()[1:4] == [
        "/reply Found.",
        "web_search_call warm caches",
        "assistant: Found.",
    ]
    assert output_text(without) == "Cannot search: this request has no web_search tool."


def test_store_false_is_connection_local(server: RunningServer) -> None:
    with WSClient(server.ws_url) as ws:
        rid = ws.turn(input="secret", store=False)[-1]["response"]["id"]
        assert output_text(ws.turn(input="again", previous_response_id=rid, store=False))
    with WSClient(server.ws_url) as other:
        error = other.turn(input="x", previous_response_id=rid)[-1]
    assert error["type"] == "error"
    assert error["error"]["code"] == "previous_response_not_found"
    assert error["status"] == 400 and error["error"]["param"] == "previous_response_id"
    # Nothing of the closed connection is left in the cache.
    deadline = time.monotonic() + 5
    while server.server.cache.stats().local_entries and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.server.cache.stats().local_entries == 0


def test_a_stored_turn_that_resends_unstored_history_is_stored(server: RunningServer) -> None:
    # The client re-sends with store=true the history it first sent with store=false.
    # Matched to the unstored chain, the new response would inherit its scope (the
    # taint rule) and die with the connection; the client sent all of it to be stored.
    secret = {"type": "message", "role": "user", "content": "secret"}
    with WSClient(server.ws_url) as ws:
        first = ws.turn(input=[secret], store=False)[-1]["response"]
        history = [secret, *first["output"], {"role": "user", "content": "keep"}]
        rid = ws.turn(input=history)[-1]["response"]["id"]
    with WSClient(server.ws_url) as ws:
        events = ws.turn(input="/transcript", previous_response_id=rid)
    assert "user: secret" in output_text(events) and "user: keep" in output_text(events)
    # The unstored chain itself is still gone with its connection.
    with WSClient(server.ws_url) as ws:
        error = ws.turn(input="x", previous_response_id=first["id"])[-1]
    assert error["error"]["code"] == "previous_response_not_found"


def test_stored_responses_continue_on_a_new_connection(server: RunningServer) -> None:
    with WSClient(server.ws_url) as ws:
        rid = ws.turn(input="keep me")[-1]["response"]["id"]
    with WSClient(server.ws_url) as ws:
        events = ws.turn(input="/transcript", previous_response_id=rid)
    assert "user: keep me" in output_text(events)


def test_owners_are_isolated() -> None:
    with running_server(api_keys=frozenset({"key-a", "key-b"})) as srv:
        with WSClient(srv.ws_url, additional_headers={"Authorization": "Bearer key-a"}) as a:
            rid = a.turn(input="mine")[-1]["response"]["id"]
        with WSClient(srv.ws_url, additional_headers={"Authorization": "Bearer key-b"}) as b:
            error = b.turn(input="x", previous_response_id=rid)[-1]
        assert error["error"]["code"] == "previous_response_not_found"
        with pytest.raises(InvalidStatus) as info:
            WSClient(srv.ws_url, additional_headers={"Authorization": "Bearer wrong"})
        assert info.value.response.status_code == 401
        with pytest.raises(InvalidStatus):
            WSClient(srv.ws_url)


def test_lanes_interleave_and_echo_stream_id(server: RunningServer) -> None:
    with WSClient(server.ws_url) as ws:
        ws.create(stream_id="slow", input="/sleep 300\nslow one")
        ws.create(stream_id="fast", input="fast one")
        ws.create(input="default one")
        seen: dict[str | None, list[dict[str, Any]]] = {"slow": [], "fast": [], None: []}
        order: list[str | None] = []
        while any(not v or v[-1]["type"] != "response.completed" for v in seen.values()):
            event = ws.recv()
            lane = event.get("stream_id")
            seen[lane].append(event)
            if event["type"] == "response.completed":
                order.append(lane)
    assert order[-1] == "slow"
    for lane, events in seen.items():
        check_sequence(events)
        assert all(e.get("stream_id") == lane for e in events)
        if lane is None:
            assert all("stream_id" not in e for e in events)
    assert output_text(seen["fast"]) == "You said: fast one"


def test_lane_fifo_and_fork_from_another_lane(server: RunningServer) -> None:
    with WSClient(server.ws_url) as ws:
        base = ws.turn(stream_id="main", input="base", store=False)[-1]["response"]["id"]
        # Queue two on one lane: the second starts only after the first's terminal.
        ws.create(
            stream_id="main", input="/sleep 100\nfirst", previous_response_id=base, store=False
        )
        ws.create(stream_id="fork", input="/transcript", previous_response_id=base, store=False)
        ws.create(stream_id="main", input="second", store=False)
        main: list[dict[str, Any]] = []
        fork: list[dict[str, Any]] = []
        while (
            len([e for e in main if e["type"] == "response.completed"]) < 2
            or not fork
            or (fork[-1]["type"] != "response.completed")
        ):
            event = ws.recv()
            (main if event["stream_id"] == "main" else fork).append(event)
    types = [e["type"] for e in main]
    first_end = types.index("response.completed")
    assert types[first_end + 1] == "response.created"
    assert output_text(fork).splitlines() == [
        "user: base",
        "assistant: You said: base",
        "user: /transcript",
    ]


def test_sixteen_active_then_queued() -> None:
    with running_server() as srv, WSClient(srv.ws_url) as ws:
        for i in range(17):
            ws.create(stream_id=f"lane{i}", input="/sleep 400\nx")
        order: list[tuple[str, str]] = []  # (event type, lane) as they arrive
        while sum(kind == "response.completed" for kind, _ in order) < 17:
            event = ws.recv()
            if event["type"] in ("response.created", "response.completed"):
                order.append((event["type"], event["stream_id"]))
        created = [lane for kind, lane in order if kind == "response.created"]
        first_done = order.index(next(e for e in order if e[0] == "response.completed"))
        assert len(created) == 17
        # Sixteen start at once; the seventeenth waits for a slot (not rejected):
        # its response.created comes only after one of them completed.
        assert all(kind == "response.created" for kind, _ in order[:16])
        assert order.index(("response.created", "lane16")) > first_done


def test_a_full_queue_of_warm_ups_behind_a_turn_all_complete_in_order(
    server: RunningServer,
) -> None:
    """A thousand warm-ups pipelined behind a running turn (the default queue holds
    1,024) each get their terminal event, in order, and the connection stays usable."""
    count = 1000
    with WSClient(server.ws_url) as ws:
        ws.create(input="/sleep 300\nrunning")
        for i in range(count):
            ws.create(input=f"w{i}", generate=False, metadata={"n": str(i)})
        completed: list[dict[str, Any]] = []
        while len(completed) < count + 1:
            event = ws.recv()
            assert event["type"] != "error", event
            if event["type"] == "response.completed":
                completed.append(event["response"])
        assert [r["metadata"].get("n") for r in completed[1:]] == [str(i) for i in range(count)]
        assert output_text(ws.turn(input="after")) == "You said: after"


def test_lane_limit_and_invalid_names(server: RunningServer) -> None:
    with WSClient(server.ws_url) as ws:
        for i in range(32):
            ws.turn(stream_id=f"agent_{i}", input="x", generate=False)
        error = ws.turn(stream_id="agent_32", input="x")[-1]
        assert error["error"]["code"] == "websocket_stream_limit_reached"
        assert error["stream_id"] == "agent_32"
        # Known lanes and the default lane still work.
        assert ws.turn(stream_id="agent_0", input="ok")[-1]["type"] == "response.completed"
        assert ws.turn(input="ok")[-1]["type"] == "response.completed"
        ws.send({"type": "response.create", "model": "m", "input": "x", "stream_id": "bad name"})
        error = ws.recv()
        assert error["error"]["code"] == "invalid_stream_id" and "stream_id" not in error


BAD_INPUTS: list[tuple[Any, str | None, str | None]] = [
    ("{oops", "invalid_json", None),
    (b"\x80\x81", "invalid_json", None),
    ("[]", "invalid_type", None),
    ('{"type": "response.cancel"}', "invalid_value", None),
    ({"type": "response.create", "input": "x"}, "missing_required_parameter", None),
    ({"type": "response.create", "model": "m", "input": 3, "stream_id": "s"}, "invalid_type", "s"),
    (
        {
            "type": "response.create",
            "model": "m",
            "input": "x",
            "previous_response_id": "resp_nope",
            "stream_id": "s",
        },
        "previous_response_not_found",
        "s",
    ),
    (
        {"type": "response.create", "model": "m", "input": "x", "background": True},
        "unsupported_parameter",
        None,
    ),
    (  # kept, it was an item of type null that no model reads
        {
            "type": "response.create",
            "model": "m",
            "input": [{"role": "user", "content": "x", "type": None}],
            "stream_id": "s",
        },
        "invalid_type",
        "s",
    ),
    (  # OpenAI's "Duplicate item found" (it has no code)
        {
            "type": "response.create",
            "model": "m",
            "input": [
                {"role": "user", "content": "a", "id": "msg_1"},
                {"role": "user", "content": "b", "id": "msg_1"},
            ],
            "stream_id": "s",
        },
        None,
        "s",
    ),
]


@pytest.mark.parametrize(("message", "code", "stream_id"), BAD_INPUTS)
def test_bad_input_gets_an_error_and_the_connection_stays_usable(
    server: RunningServer, message: Any, code: str | None, stream_id: str | None
) -> None:
    with WSClient(server.ws_url) as ws:
        ws.send(message)
        error = ws.recv()
        assert error["type"] == "error" and error["error"]["code"] == code
        assert error.get("stream_id") == stream_id
        assert error["status"] == 400 and error["error"]["type"] == "invalid_request_error"
        assert output_text(ws.turn(input="still here")) == "You said: still here"


def test_a_bug_handling_a_message_closes_with_1011_and_touches_no_other_connection(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An unexpected error while handling a client's message (a bug: a RecursionError
    from a forged item was one) is logged by type and closes that connection with
    1011 and a reason; the transport used to be aborted (the client saw 1006, no
    reason). Other connections are not touched."""
    from warmsocket.session import ResponsesSession

    receive = ResponsesSession.receive_message

    def buggy(self: ResponsesSession, data: bytes, *, text: bool = False) -> None:
        if b"trigger-the-bug" in data:
            raise RecursionError(bytes(data).decode())  # its text holds the content
        receive(self, data, text=text)

    monkeypatch.setattr(ResponsesSession, "receive_message", buggy)
    with WSClient(server.ws_url) as other, WSClient(server.ws_url) as ws:
        ws.create(stream_id="a", input="/sleep 5000\nslow")
        assert ws.recv()["type"] == "response.created"
        ws.create(input="trigger-the-bug")
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011
        assert "internal error" in closed.value.rcvd.reason
        assert output_text(other.turn(input="still here")) == "You said: still here"
    (record,) = [r for r in caplog.records if r.exc_info and r.name == "warmsocket.server"]
    assert record.getMessage() == "unhandled error on a WebSocket connection"
    for formatter in (JSONFormatter(), TextFormatter()):
        logged = formatter.format(record)
        assert "RecursionError" in logged and "trigger-the-bug" not in logged


def test_a_bug_handling_a_message_sent_with_the_handshake_closes_with_1011(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A message in the same write as the upgrade request is handled as the upgrade
    completes: a bug there closes with 1011 too (it aborted the transport)."""
    from warmsocket.session import ResponsesSession

    receive = ResponsesSession.receive_message

    def buggy(self: ResponsesSession, data: bytes, *, text: bool = False) -> None:
        if b"trigger-the-bug" in data:
            raise RecursionError("maximum recursion depth exceeded")
        receive(self, data, text=text)

    monkeypatch.setattr(ResponsesSession, "receive_message", buggy)
    message = json.dumps({"type": "response.create", "model": "m", "input": "trigger-the-bug"})
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(
            b"GET /v1/responses HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n" + _masked(message.encode())
        )
        received = b""
        while b"internal error" not in received and (chunk := sock.recv(65536)):
            received += chunk
    head, _, frames = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101")
    # One close frame: opcode 8, then the code 1011 and the reason.
    assert frames[0] == 0x88 and frames[2:4] == (1011).to_bytes(2, "big"), frames[:40]
    assert b"internal error" in frames


def test_a_bug_starting_a_queued_create_answers_it_and_its_lane_goes_on(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A queued create starts when the response before it on its lane ends, from the
    model task: an unexpected error preparing it used to go unanswered (logged as
    the finished turn's backend error), and the lane behind it stalled."""
    from warmsocket.engine import Engine

    prepare = Engine.prepare

    def buggy(self: Engine, request: Any, **kwargs: Any) -> Any:
        if b"trigger-the-bug" in request.input.json():
            raise RecursionError("maximum recursion depth exceeded")
        return prepare(self, request, **kwargs)

    monkeypatch.setattr(Engine, "prepare", buggy)
    with WSClient(server.ws_url) as ws:
        ws.create(input="/sleep 300\nslow")
        assert ws.recv()["type"] == "response.created"
        ws.create(input="trigger-the-bug")  # queued behind the slow one
        ws.create(input="after")
        events = []
        while len([e for e in events if e["type"] in TERMINAL or e["type"] == "error"]) < 3:
            events.append(ws.recv(timeout=5))
        ends = [e["type"] for e in events if e["type"] in TERMINAL or e["type"] == "error"]
        assert ends == ["response.completed", "error", "response.completed"]
        error = next(e for e in events if e["type"] == "error")
        assert error["status"] == 500 and error["error"]["code"] == "server_error"
        assert output_text(events[events.index(error) + 1 :]) == "You said: after"


def test_oversize_message_is_rejected_and_connection_survives() -> None:
    with running_server(limits=Limits(max_message_bytes=10_000)) as srv, WSClient(srv.ws_url) as ws:
        ws.create(input="x" * 20_000)
        error = ws.recv()
        assert error["error"]["code"] == "message_too_large" and error["status"] == 413
        assert output_text(ws.turn(input="small")) == "You said: small"


def test_an_oversize_message_on_a_lane_is_refused_on_that_lane_in_order() -> None:
    """The message is not parsed, but its top-level stream_id is read: the error
    carries it and comes after the lane's running response, as a refused create's
    does (the lanes helper routes it to that lane, not to the default one)."""
    with running_server(limits=Limits(max_message_bytes=10_000)) as srv, WSClient(srv.ws_url) as ws:
        ws.create(stream_id="a", input="/sleep 200\nfirst")
        # A stream_id inside the input is not the message's lane.
        ws.create(stream_id="a", input=[{"role": "user", "content": '"stream_id":"b"' * 800}])
        ws.create(input="/sleep 100\nx" + "x" * 20_000)  # default lane, unparsed too
        events = []
        while len([e for e in events if e["type"] in ("response.completed", "error")]) < 3:
            events.append(ws.recv())
        kinds = [(e["type"], e.get("stream_id")) for e in events if e["type"] != "response.created"
                 and not e["type"].startswith(("response.output", "response.content",
                                               "response.in_progress"))]  # fmt: skip
        assert kinds.index(("error", None)) < kinds.index(("response.completed", "a"))
        assert kinds.index(("response.completed", "a")) < kinds.index(("error", "a"))
        lane_error = next(e for e in events if e["type"] == "error" and e.get("stream_id"))
        assert lane_error["error"]["code"] == "message_too_large"
        assert output_text(ws.turn(stream_id="a", input="again")) == "You said: again"


def test_failed_same_lane_continuation_evicts_parent_but_fork_keeps_it(
    server: RunningServer,
) -> None:
    with WSClient(server.ws_url) as ws:
        parent = ws.turn(stream_id="a", input="p", store=False)[-1]["response"]["id"]
        failed_fork = ws.turn(
            stream_id="b", input="/fail", previous_response_id=parent, store=False
        )
        assert failed_fork[-1]["type"] == "response.failed"
        assert failed_fork[-1]["response"]["error"]["code"] == "server_error"
        check_sequence(failed_fork)
        # The fork failed: the parent is still there for its own lane.
        ok = ws.turn(stream_id="a", input="/fail", previous_response_id=parent, store=False)
        assert ok[-1]["type"] == "response.failed"
        # The same-lane continuation failed: the parent is gone.
        gone = ws.turn(stream_id="a", input="x", previous_response_id=parent, store=False)[-1]
        assert gone["error"]["code"] == "previous_response_not_found"
        assert gone["stream_id"] == "a"


def test_same_lane_validation_error_evicts_parent(server: RunningServer) -> None:
    with WSClient(server.ws_url) as ws:
        parent = ws.turn(input="p", store=False)[-1]["response"]["id"]
        bad = ws.turn(
            input=[{"role": "robot", "content": "x"}], previous_response_id=parent, store=False
        )
        assert bad[-1]["error"]["code"] == "invalid_value"
        gone = ws.turn(input="x", previous_response_id=parent, store=False)[-1]
        assert gone["error"]["code"] == "previous_response_not_found"


def test_stored_parent_survives_eviction_rule(server: RunningServer) -> None:
    with WSClient(server.ws_url) as ws:
        parent = ws.turn(input="p")[-1]["response"]["id"]
        assert ws.turn(input="/fail", previous_response_id=parent)[-1]["type"] == "response.failed"
        again = ws.turn(input="/transcript", previous_response_id=parent)
        assert "user: p" in output_text(again)


def test_steer_interrupts_and_starts_a_successor(server: RunningServer) -> None:
    with WSClient(server.ws_url) as ws:
        ws.create(stream_id="main", input="/sleep 2000\nlong task")
        created = ws.recv()
        rid = created["response"]["id"]
        ws.recv()  # in_progress
        ws.send({"type": "response.steer", "previous_response_id": rid, "input": "change plan"})
        events = [ws.recv() for _ in range(2)]
        accepted, incomplete = events
        assert accepted["type"] == "response.steer.accepted"
        assert accepted["steer"]["previous_response_id"] == rid
        assert accepted["stream_id"] == "main" and accepted["sequence_number"] == 2
        assert incomplete["type"] == "response.incomplete"
        assert incomplete["response"]["incomplete_details"] == {"reason": "steered"}
        successor = ws.until_terminal("main")
        check_sequence(successor)
        assert successor[0]["response"]["previous_response_id"] == rid
        assert output_text(successor) == "You said: change plan"
        # The steered response is chainable; the successor became the lane's latest.
        again = ws.turn(
            stream_id="main",
            input="/transcript",
            previous_response_id=successor[-1]["response"]["id"],
        )
    assert output_text(again).splitlines() == [
        "user: /sleep 2000",
        "long task",
        "user: change plan",
        "assistant: You said: change plan",
        "user: /transcript",
    ]


def test_steer_pending_when_target_waits_for_a_tool(server: RunningServer) -> None:
    with WSClient(server.ws_url) as ws:
        ws.create(input='/sleep 300\n/call get_weather {"city": "Oslo"}', tools=FUNCTION_TOOLS)
        rid = ws.recv()["response"]["id"]
        ws.send({"type": "response.steer", "previous_response_id": rid, "input": "in Celsius"})
        rest = ws.until_terminal()
        assert rest[1]["type"] == "response.steer.accepted"
        # The call had not started: the response stops, steered, with no output.
        assert rest[-1]["type"] == "response.incomplete"


def test_steer_failures(server: RunningServer) -> None:
    with WSClient(server.ws_url) as ws:
        ws.send({"type": "response.steer", "previous_response_id": "resp_unknown", "input": "x"})
        failed = ws.recv()
        assert failed["type"] == "response.steer.failed"
        assert failed["error"]["code"] == "response_not_found" and "id" not in failed["steer"]
        rid = ws.turn(stream_id="s", input="done")[-1]["response"]["id"]
        ws.send({"type": "response.steer", "previous_response_id": rid, "input": "late"})
        late = ws.recv()
        assert late["error"]["code"] == "response_already_completed"
        assert late["stream_id"] == "s" and late["steer"]["input"] == "late"
        ws.send(
            {
                "type": "response.steer",
                "previous_response_id": rid,
                "input": [{"role": "assistant", "content": "x"}],
            }
        )
        invalid = ws.recv()
        assert invalid["error"]["code"] == "invalid_input"
        assert invalid["steer"]["input"] == ""  # invalid input is not given back
        # Valid input with another field wrong: the input is given back for reuse.
        for extra in ({"metadata": {}}, {"stream_id": "s"}):
            message = {"type": "response.steer", "previous_response_id": rid, **extra}
            for given in ("again", [{"role": "user", "content": "in Celsius"}]):
                ws.send({**message, "input": given})
                refused = ws.recv()
                assert refused["type"] == "response.steer.failed"
                assert refused["error"]["code"] == "invalid_input"
                given_back = given if isinstance(given, str) else [{"type": "message", **given[0]}]
                assert refused["steer"]["input"] == given_back


def test_connection_lifetime_then_clean_close() -> None:
    """The lifetime runs out while the default lane's response runs: it finishes, with
    no error in its events (the SDK took the connection-scoped notice as that
    response's error and dropped the response), then the connection closes with 1000.
    An idle connection gets the connection-scoped notice, then the close."""
    limits = Limits(connection_lifetime=0.5, close_grace=5)
    with running_server(limits=limits) as srv, WSClient(srv.ws_url) as ws:
        ws.create(input="/sleep 800\nlast words")
        events = ws.until_terminal()
        assert not [e for e in events if e["type"] == "error"]
        assert output_text(events) == "You said: /sleep 800\nlast words"
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=5)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1000
    with running_server(limits=limits) as srv, WSClient(srv.ws_url) as ws:
        assert output_text(ws.turn(input="quick")) == "You said: quick"
        notice = ws.recv(timeout=5)  # idle at the end of its lifetime
        assert notice["error"]["code"] == "websocket_connection_limit_reached"
        assert "stream_id" not in notice
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=5)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1000


def test_a_client_that_never_answers_the_close_is_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After the server's close frame (here: the lifetime ran out), a client that
    never closes its side is dropped after CLOSE_TIMEOUT: it gives back its key's
    place under --max-connections-per-key instead of holding it until TCP gives up."""
    monkeypatch.setattr(server_module, "CLOSE_TIMEOUT", 0.5)
    limits = Limits(connection_lifetime=0.3, close_grace=1)
    with running_server(limits=limits, max_connections_per_key=1) as srv:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as raw:
            raw.sendall(
                b"GET /v1/responses HTTP/1.1\r\n" + UPGRADE + b"Authorization: Bearer k\r\n\r\n"
            )
            head = b""
            while b"\r\n\r\n" not in head:
                head += raw.recv(65536)
            assert head.startswith(b"HTTP/1.1 101 ")
            opened = time.monotonic()
            # Read (the close frame comes) but never answer it, until the server ends
            # the connection.
            with contextlib.suppress(ConnectionResetError):
                while raw.recv(65536):
                    pass
            dropped_after = time.monotonic() - opened
        assert 0.3 + 0.5 <= dropped_after < 0.3 + 0.5 + 2
        assert srv.call(lambda: dict(srv.server.key_limit.held)) == {}
        with WSClient(srv.ws_url, additional_headers={"Authorization": "Bearer k"}) as ws:
            assert ws.turn(input="again")[-1]["type"] == "response.completed"


def test_a_slow_reader_gets_the_last_events_before_the_close_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The close timeout counts from when the client has received what came before
    the close frame: a client still reading a turn's last events (which repeat the
    whole output) slowly gets all of them, `response.completed` included."""
    monkeypatch.setattr(server_module, "CLOSE_TIMEOUT", 0.5)
    limits = Limits(connection_lifetime=0.3, close_grace=5)
    create = {"type": "response.create", "model": "m", "input": "/sleep 400\n" + "x" * 60_000}
    with running_server(limits=limits) as srv, small_window_connection(srv.port) as raw:
        key = b"Authorization: Bearer k\r\n"
        raw.sendall(b"GET /v1/responses HTTP/1.1\r\n" + UPGRADE + key + b"\r\n")
        assert read_head(raw).startswith(b"HTTP/1.1 101 ")
        small_send_buffers(srv)
        raw.sendall(_masked(json.dumps(create).encode()))
        received = b""
        started = time.monotonic()
        with contextlib.suppress(ConnectionResetError):
            while chunk := raw.recv(4096):
                received += chunk
                time.sleep(0.02)  # about 200 KB/s
        took = time.monotonic() - started
    assert took > 0.3 + 0.5 + 0.5  # (the situation under test: slower than the timeout)
    assert b'"type":"response.completed"' in received


def test_disconnect_cancels_work_and_frees_state(server: RunningServer) -> None:
    ws = WSClient(server.ws_url)
    ws.turn(input="local", store=False)
    ws.create(input="/sleep 5000\nnever")
    ws.recv()
    ws.close()
    deadline = time.monotonic() + 3
    stats = server.server.cache.stats()
    while (stats.local_entries or stats.connections) and time.monotonic() < deadline:
        time.sleep(0.01)
        stats = server.server.cache.stats()
    assert stats.local_entries == 0 and stats.connections == 0
    assert server.call(lambda: sum(len(c._tasks) for c in server.server.connections)) == 0


def test_an_answer_the_cache_cannot_keep_fails_with_a_response_error_code() -> None:
    """The answer echoes an input that fits --max-item-bytes into an output item that
    does not: the turn streams, then ends response.failed whose error code is one the
    Response object allows (the SDK's types refuse `server_is_overloaded` there)."""
    with running_server(max_item_bytes=2000) as srv:
        with WSClient(srv.ws_url) as client:
            events = client.turn(input="x" * 1920)  # every event checked against the SDK
            failed = events[-1]
            assert failed["type"] == "response.failed"
            assert failed["response"]["error"]["code"] == "server_error"
            assert "--max-item-bytes" in failed["response"]["error"]["message"]
            assert client.turn(input="small")[-1]["type"] == "response.completed"
        reply = httpx.post(f"{srv.base_url}/responses", json={"model": "m", "input": "x" * 1920})
        Response.model_validate(reply.json())  # the SDK's type of the answer
        assert reply.json()["error"]["code"] == "server_error"


class PlainIteratorBackend:
    """A third-party backend whose `stream` is an async iterator, not a generator
    (no `aclose`): what the Backend protocol promises."""

    name = "plain-iterator"

    def stream(self, turn: TurnContext) -> AsyncIterator[StreamItem]:
        return _PlainIterator([TextDelta("plain "), TextDelta("answer")])

    async def aclose(self) -> None:
        return None


class _PlainIterator:
    def __init__(self, items: list[StreamItem]) -> None:
        self.items = list(items)

    def __aiter__(self) -> _PlainIterator:
        return self

    async def __anext__(self) -> StreamItem:
        if not self.items:
            raise StopAsyncIteration
        return self.items.pop(0)


def test_a_backend_stream_without_aclose_is_served() -> None:
    failures: list[dict[str, Any]] = []
    with running_server(backend=PlainIteratorBackend()) as srv, WSClient(srv.ws_url) as client:
        srv.call(srv.loop.set_exception_handler, lambda _loop, context: failures.append(context))
        for _ in range(2):  # the connection goes on
            events = client.turn(input="hi")
            assert events[-1]["type"] == "response.completed"
            assert output_text(events) == "plain answer"
        srv.call(gc.collect)  # a failed task reports its exception when collected
    assert failures == []


def test_a_tool_output_must_answer_a_call_in_its_context(server: RunningServer) -> None:
    """spec 2.1: a function_call_output whose call_id matches no function_call before
    it in the resolved context is a 400 on `input` (the model would get an answer to
    a question it never asked)."""

    def output(call_id: str) -> dict[str, str]:
        return {"type": "function_call_output", "call_id": call_id, "output": "17 C"}

    call = {"type": "function_call", "call_id": "call_in", "name": "get_weather",
            "arguments": "{}"}  # fmt: skip
    with WSClient(server.ws_url) as ws:
        first = ws.turn(input='/call get_weather {"city": "Oslo"}', tools=FUNCTION_TOOLS)
        call_id = first[-1]["response"]["output"][0]["call_id"]
        parent = first[-1]["response"]["id"]
        for bad in ([output("call_nowhere")], [output("call_in"), call]):  # unknown; before
            error = ws.turn(input=bad, previous_response_id=parent, tools=FUNCTION_TOOLS)[-1]
            assert error["type"] == "error" and error["status"] == 400
            assert (error["error"]["code"], error["error"]["param"]) == ("invalid_value", "input")
            assert (
                "No tool call found for function call output with call_id"
                in (error["error"]["message"])
            )
            # The parent was evicted by the failed same-lane continuation (spec 5.3):
            # start again.
            first = ws.turn(input='/call get_weather {"city": "Oslo"}', tools=FUNCTION_TOOLS)
            call_id = first[-1]["response"]["output"][0]["call_id"]
            parent = first[-1]["response"]["id"]
        # Answering the previous response's call, or a call in the same input: fine.
        done = ws.turn(input=[output(call_id)], previous_response_id=parent, tools=FUNCTION_TOOLS)
        assert done[-1]["type"] == "response.completed"
        again = ws.turn(
            input=[call, output("call_in")],
            previous_response_id=done[-1]["response"]["id"],
            tools=FUNCTION_TOOLS,
        )
        assert again[-1]["type"] == "response.completed"
        # A call far back in the chain still counts (an output arriving late).
        late = ws.turn(
            input=[output(call_id)],
            previous_response_id=again[-1]["response"]["id"],
            tools=FUNCTION_TOOLS,
        )
        assert late[-1]["type"] == "response.completed"
    # Over HTTP, in a whole re-sent history, the same rule.
    reply = httpx.post(
        f"{server.base_url}/responses",
        json={"model": "m", "input": [{"role": "user", "content": "hi"}, output("call_x")]},
    )
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "input"


def answered_first_elsewhere(slow: WSClient, quick: WSClient, **create: Any) -> list[Any]:
    """Send `create` (about a second of tokenising) on `slow` and, once it has started,
    a small turn on `quick`: the small one is answered while the large one is still
    tokenised. The large turn's events."""
    slow.create(**create)
    assert slow.recv(timeout=30)["type"] == "response.created"
    quick.create(input="hello", store=False)
    assert output_text(quick.until_terminal(timeout=30)) == "You said: hello"
    ready = []
    with contextlib.suppress(TimeoutError):
        while True:
            ready.append(slow.recv(timeout=0.01)["type"])
    assert "response.completed" not in ready
    return slow.until_terminal(timeout=60)


def test_a_large_input_is_tokenised_without_holding_up_other_connections(
    server: RunningServer,
) -> None:
    """One long piece without a break (3 MiB of one letter) takes the tokeniser about
    a second (docs/tokens.md): it is tokenised in a worker thread, so another
    connection's turn, sent once the large one has started, is answered first."""
    big = "x" * (3 << 20)
    with WSClient(server.ws_url) as slow, WSClient(server.ws_url) as quick:
        slow_events = answered_first_elsewhere(slow, quick, input=big, store=False)
    # Tokenised, not estimated: the count is the tokeniser's, with a few framing tokens.
    counted = _core.Tokenizer.builtin("o200k_base").count(big)
    assert 0 <= slow_events[-1]["response"]["usage"]["input_tokens"] - counted < 16


def test_large_instructions_are_counted_without_holding_up_other_connections(
    server: RunningServer,
) -> None:
    """The same for instructions (and tools): counted in a worker thread before the
    model starts, the first time they are seen."""
    big = "x" * (3 << 20)
    with WSClient(server.ws_url) as slow, WSClient(server.ws_url) as quick:
        slow_events = answered_first_elsewhere(
            slow, quick, input="hi", instructions=big, store=False
        )
        # Counted once: the chain's next turn has them cached, and does not wait.
        again = slow.turn(
            input="again", instructions=big, previous_response_id=slow_events[-1]["response"]["id"]
        )
    counted = _core.Tokenizer.builtin("o200k_base").count(big)
    first = slow_events[-1]["response"]["usage"]
    assert 0 <= first["input_tokens"] - counted < 32
    cached = again[-1]["response"]["usage"]["input_tokens_details"]["cached_tokens"]
    assert first["input_tokens"] < cached < again[-1]["response"]["usage"]["input_tokens"]


def test_a_huge_answer_of_the_built_in_model_starts_at_once(server: RunningServer) -> None:
    """The built-in model made every event of its answer (one per word) before the
    first went out, on the event loop: 2M words held every connection still for
    seconds (and a client that did not read held them all in memory). They are
    made as they are sent."""
    with WSClient(server.ws_url) as ws:
        assert ws.turn(input="warm")[-1]["type"] == "response.completed"
        started = time.monotonic()
        ws.create(input="word " * 2_000_000)
        while ws.recv(timeout=30)["type"] != "response.output_text.delta":
            pass
        assert time.monotonic() - started < 1.5
        # Gone at once (a close handshake would wait behind the rest of the answer).
        ws.conn.socket.shutdown(socket.SHUT_RDWR)


@pytest.mark.parametrize(
    "extra",
    [
        b"Authorization: Bearer " + b"k" * 9000 + b"\r\n",  # a long token or JWT
        b"Cookie: " + b"c=1; " * 2000 + b"\r\n",
        b"Content-Length: 0\r\n",  # some clients and proxies add it to a GET
    ],
    ids=["long-authorization", "long-cookie", "content-length-0"],
)
def test_an_upgrade_this_server_takes_is_not_refused_by_the_websocket_library(
    server: RunningServer, extra: bytes
) -> None:
    """The raw head went to the websockets library, whose own limits (8 KiB a header
    line, no Content-Length on a GET) refused what warmsocket's parser takes (64 KiB
    heads) with an unexplained 400. It is given the headers it reads; the messages go
    on as on any connection."""
    message = json.dumps({"type": "response.create", "model": "m", "input": "hi"})
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(
            b"GET /v1/responses HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n" + extra + b"\r\n" + _masked(message.encode())
        )
        received = b""
        while b"response.completed" not in received and (chunk := sock.recv(65536)):
            received += chunk
    assert received.startswith(b"HTTP/1.1 101")
    assert b"You said: hi" in received
