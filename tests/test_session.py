"""The Sans-I/O session, driven with no socket and no event loop."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest

from tests.support import check_ws_event
from warmsocket._core import Items, ResponseEncoder, SessionCache, Tokenizer
from warmsocket.backends.base import (
    HostedCallEvent,
    HostedCallStart,
    OutputItem,
    ReasoningDelta,
    ReasoningStart,
    ResponseFields,
    TextDelta,
    ToolArgumentsDelta,
    ToolCallStart,
    TurnFailed,
)
from warmsocket.backends.mock import MockBackend
from warmsocket.engine import (
    Engine,
    Limits,
    Turn,
    prompt_key,
    response_object,
    stored_prompt_key,
)
from warmsocket.errors import model_failed, shared_store_unavailable
from warmsocket.session import (
    CloseConnection,
    ResponsesSession,
    StartModel,
    StopModel,
    required_input,
)


class Harness:
    def __init__(self, limits: Limits | None = None, cache: SessionCache | None = None) -> None:
        self.cache = cache or SessionCache()
        self.engine = Engine(
            self.cache, MockBackend(), limits=limits or Limits(), wall_clock=lambda: 1.0
        )
        self.session = ResponsesSession(self.engine, owner="owner-1", now=0.0)
        self.events: list[dict[str, Any]] = []
        self.started: list[Turn] = []
        self.stopped: list[Turn] = []
        self.closed: list[CloseConnection] = []

    def send(self, **fields: Any) -> None:
        self.raw(json.dumps({"type": "response.create", "model": "m", **fields}))

    def raw(self, data: str | bytes) -> None:
        self.session.receive_message(data.encode() if isinstance(data, str) else data)
        self.drain()

    def drain(self) -> list[dict[str, Any]]:
        new: list[dict[str, Any]] = []
        for action in self.session.take_outbox():
            if isinstance(action, bytes):
                # The session's default framing: JSON lines, one or more events per action.
                for line in action.splitlines():
                    event = json.loads(line)
                    check_ws_event(event)
                    new.append(event)
            elif isinstance(action, StartModel):
                self.started.append(action.turn)
            elif isinstance(action, StopModel):
                self.stopped.append(action.turn)
            else:
                self.closed.append(action)
        self.events += new
        return new

    def reply(self, turn: Turn, text: str = "ok") -> list[dict[str, Any]]:
        self.session.model_event(turn, TextDelta(text))
        self.session.model_done(turn)
        return self.drain()

    def last(self, type_: str) -> dict[str, Any]:
        return [e for e in self.events if e["type"] == type_][-1]


def test_a_turn_is_created_streamed_and_stored() -> None:
    h = Harness()
    h.send(input="hi", store=False)
    assert [e["type"] for e in h.events] == ["response.created", "response.in_progress"]
    (turn,) = h.started
    events = h.reply(turn, "hello")
    assert events[-1]["type"] == "response.completed"
    rid = events[-1]["response"]["id"]
    assert h.session.lane_head(None) == rid
    assert h.cache.stats().local_entries == 1
    h.session.connection_lost()
    assert h.cache.stats().local_entries == 0


def test_lane_fifo_and_active_limit() -> None:
    h = Harness(Limits(max_active_responses=2))
    h.send(input="a1", stream_id="a")
    h.send(input="a2", stream_id="a")
    h.send(input="b1", stream_id="b")
    h.send(input="c1", stream_id="c")
    assert [t.stream_id for t in h.started] == ["a", "b"]
    assert h.session.queued_requests == 2
    h.reply(h.started[0])
    # a's second request is next in a's FIFO, but c was ready first for the free slot.
    assert [t.stream_id for t in h.started] == ["a", "b", "c"]
    h.reply(h.started[1])
    assert [t.stream_id for t in h.started] == ["a", "b", "c", "a"]
    assert h.started[3].request.input.to_objects()[0]["content"] == "a2"


def test_request_errors_are_reported_in_lane_order() -> None:
    h = Harness()
    h.send(input="first", stream_id="x")
    h.send(input=5, stream_id="x")  # invalid, but queued behind the first
    assert not [e for e in h.events if e["type"] == "error"]
    h.reply(h.started[0])
    error = h.last("error")
    assert error["error"]["code"] == "invalid_type" and error["stream_id"] == "x"
    assert h.events.index(error) > h.events.index(h.last("response.completed"))


def test_failed_same_lane_continuation_evicts_parent_fork_keeps_it() -> None:
    h = Harness()
    h.send(input="p", store=False, stream_id="a")
    parent = h.reply(h.started[-1])[-1]["response"]["id"]
    h.send(input="fork", store=False, stream_id="b", previous_response_id=parent)
    h.session.model_event(h.started[-1], TurnFailed(model_failed()))
    h.drain()
    assert h.last("response.failed")["stream_id"] == "b"
    assert h.session.lane_head("a") == parent
    h.send(input="cont", store=False, stream_id="a", previous_response_id=parent)
    h.session.model_error(h.started[-1])
    h.drain()
    assert h.session.lane_head("a") is None
    h.send(input="again", store=False, stream_id="a", previous_response_id=parent)
    assert h.last("error")["error"]["code"] == "previous_response_not_found"


def test_tool_call_events_and_indices() -> None:
    h = Harness()
    h.send(input="go")
    turn = h.started[-1]
    h.session.model_event(turn, ToolCallStart("call_1", "f"))
    h.session.model_event(turn, ToolArgumentsDelta('{"a"'))
    h.session.model_event(turn, ToolArgumentsDelta(": 1}"))
    h.session.model_event(turn, ToolCallStart("call_2", "g"))
    h.session.model_event(turn, TextDelta("and text"))
    h.session.model_done(turn)
    h.drain()
    added = [e for e in h.events if e["type"] == "response.output_item.added"]
    assert [e["output_index"] for e in added] == [0, 1, 2]
    output = h.last("response.completed")["response"]["output"]
    assert [o["type"] for o in output] == ["function_call", "function_call", "message"]
    assert output[0]["arguments"] == '{"a": 1}' and output[1]["arguments"] == ""
    numbers = [e["sequence_number"] for e in h.events]
    assert numbers == list(range(len(numbers)))


def test_steer_waits_for_the_open_item_then_interrupts() -> None:
    h = Harness()
    h.send(input="long", stream_id="s")
    turn = h.started[-1]
    h.session.model_event(turn, TextDelta("part one"))
    h.drain()
    h.raw(
        json.dumps(
            {
                "type": "response.steer",
                "previous_response_id": turn.response_id,
                "input": "new direction",
            }
        )
    )
    assert h.last("response.steer.accepted")["stream_id"] == "s"
    h.session.model_event(turn, TextDelta(" part two"))  # same item: still streams
    h.drain()
    h.session.model_event(turn, ToolCallStart("c", "f"))  # a new item: steer point
    events = h.drain()
    assert [e["type"] for e in events][-2:] == ["response.created", "response.in_progress"]
    assert turn in h.stopped
    incomplete = h.last("response.incomplete")["response"]
    assert incomplete["incomplete_details"] == {"reason": "steered"}
    assert incomplete["output"][0]["content"][0]["text"] == "part one part two"
    successor = h.started[-1]
    assert successor.request.previous_response_id == turn.response_id
    assert successor.items.to_objects() == [
        {"content": "new direction", "role": "user", "type": "message"}
    ]


def test_a_steer_that_interrupts_after_a_tool_call_waits_for_its_output() -> None:
    """The steer lands while the model writes its first call; the second call is the
    steer point, so the target ends `incomplete` with the first call in its output. A
    client-owned call needs its output first: no automatic successor (its context
    would hold a call without an output, which an upstream refuses), the steer is
    pending, and goes in front of the client's continuation with the output."""
    h = Harness()
    h.send(input="go", stream_id="s")
    turn = h.started[-1]
    h.session.model_event(turn, ToolCallStart("call_1", "f"))
    h.session.model_event(turn, ToolArgumentsDelta("{}"))
    h.raw(
        json.dumps(
            {"type": "response.steer", "previous_response_id": turn.response_id, "input": "hm"}
        )
    )
    h.session.model_event(turn, ToolCallStart("call_2", "g"))  # a new item: steer point
    h.drain()
    incomplete = h.last("response.incomplete")["response"]
    assert [item["call_id"] for item in incomplete["output"]] == ["call_1"]
    assert h.started == [turn]  # no successor
    pending = h.last("response.steer.pending")
    assert pending["required_input"] == [
        {"type": "function_call_output", "call_id": "call_1", "name": "f"}
    ]
    h.send(
        stream_id="s",
        input=[{"type": "function_call_output", "call_id": "call_1", "output": "x"}],
        previous_response_id=turn.response_id,
    )
    continued = h.started[-1].items.to_objects()
    assert [i["type"] for i in continued] == ["message", "function_call_output"]


def test_steer_lets_a_streamed_reasoning_item_finish_whole() -> None:
    # The whole reasoning item that finishes the streamed one (with its
    # encrypted_content, which the upstream needs back) is not a new item: the
    # steer point is the item after it.
    h = Harness()
    h.send(input="think", stream_id="s")
    turn = h.started[-1]
    h.session.model_event(turn, ReasoningStart("rs_up"))
    h.session.model_event(turn, ReasoningDelta("Hmm", summary=True))
    h.drain()
    steer = {"type": "response.steer", "previous_response_id": turn.response_id, "input": "x"}
    h.raw(json.dumps(steer))
    whole = {
        "id": "rs_up",
        "type": "reasoning",
        "summary": [{"type": "summary_text", "text": "Hmm"}],
        "encrypted_content": "sealed",
    }
    h.session.model_event(turn, OutputItem(json.dumps(whole).encode()))
    h.drain()
    assert turn not in h.stopped
    h.session.model_event(turn, TextDelta("answer"))  # a new item: steer point
    h.drain()
    assert turn in h.stopped
    incomplete = h.last("response.incomplete")["response"]
    assert incomplete["output"] == [whole]


def test_steer_lets_a_hosted_tool_call_finish_whole() -> None:
    # A hosted tool call under way (a web search) is one item from its start to its
    # whole item: its progress events and its done are not steer points.
    h = Harness()
    h.send(input="search", stream_id="s")
    turn = h.started[-1]
    started = {
        "id": "ws_up",
        "type": "web_search_call",
        "status": "in_progress",
        "action": {"type": "search"},
    }
    h.session.model_event(turn, HostedCallStart(json.dumps(started).encode()))
    h.drain()
    steer = {"type": "response.steer", "previous_response_id": turn.response_id, "input": "x"}
    h.raw(json.dumps(steer))
    for phase in ("in_progress", "searching", "completed"):
        progress = {"type": f"response.web_search_call.{phase}", "item_id": "ws_up"}
        h.session.model_event(turn, HostedCallEvent(json.dumps(progress).encode()))
    done = {
        "id": "ws_up",
        "type": "web_search_call",
        "status": "completed",
        "action": {"type": "search", "query": "q"},
    }
    h.session.model_event(turn, OutputItem(json.dumps(done).encode()))
    events = h.drain()
    assert turn not in h.stopped
    assert [e["type"] for e in events] == [
        "response.web_search_call.in_progress",
        "response.web_search_call.searching",
        "response.web_search_call.completed",
        "response.output_item.done",
    ]
    assert all(e["output_index"] == 0 and e["stream_id"] == "s" for e in events)
    h.session.model_event(turn, TextDelta("answer"))  # a new item: steer point
    h.drain()
    assert turn in h.stopped
    incomplete = h.last("response.incomplete")["response"]
    assert incomplete["output"] == [done]


def test_malformed_hosted_tool_events_are_left_out() -> None:
    # An upstream's broken hosted tool events cost the client nothing but them: the
    # turn goes on and completes, every event it gets valid.
    h = Harness()
    h.send(input="go")
    turn = h.started[-1]
    for bad in (b"[]", b'{"id": "x", "type": "message"}', b'{"type": "web_search_call"}'):
        h.session.model_event(turn, HostedCallStart(bad))
    h.session.model_event(turn, HostedCallEvent(b'{"item_id": "ws_1"}'))
    h.session.model_event(turn, HostedCallEvent(b"not json"))
    h.session.model_event(turn, TextDelta("fine"))
    h.session.model_done(turn)
    h.drain()
    completed = h.last("response.completed")["response"]
    assert [o["type"] for o in completed["output"]] == ["message"]


def test_response_fields_end_the_response_and_malformed_ones_are_left_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A backend's fields of what the upstream did replace the setting of their name
    # in the final Response (not in the events before it) and stay with the stored
    # response; fields that are not an object are left out, logged without content.
    h = Harness()
    h.send(input="go", service_tier="auto")
    turn = h.started[-1]
    h.session.model_event(turn, TextDelta("fine"))
    h.session.model_event(turn, ResponseFields(b'["secret"]'))
    h.session.model_event(
        turn,
        ResponseFields(
            b'{"service_tier":"default","prompt_cache_diagnostics":{"type":"cache_hit"}}'
        ),
    )
    h.session.model_done(turn)
    h.drain()
    assert h.events[0]["response"]["service_tier"] == "auto"
    completed = h.last("response.completed")["response"]
    hit = {"type": "cache_hit"}
    assert (completed["service_tier"], completed["prompt_cache_diagnostics"]) == ("default", hit)
    (left_out,) = [r for r in caplog.records if r.getMessage().startswith("a malformed")]
    assert getattr(left_out, "event", None) == "response fields"
    assert "secret" not in caplog.text
    info = h.cache.get(turn.response_id, owner="owner-1")
    stored = response_object(info, turn.items, include_output=False)
    assert (stored["service_tier"], stored["prompt_cache_diagnostics"]) == ("default", hit)


def test_steer_pending_then_prepended_to_the_explicit_continuation() -> None:
    h = Harness()
    h.send(input="go")
    turn = h.started[-1]
    h.session.model_event(turn, ToolCallStart("call_9", "lookup"))
    h.raw(
        json.dumps(
            {
                "type": "response.steer",
                "previous_response_id": turn.response_id,
                "input": "also check tests",
            }
        )
    )
    h.session.model_done(turn)
    h.drain()
    pending = h.last("response.steer.pending")
    assert pending["required_input"] == [
        {"type": "function_call_output", "call_id": "call_9", "name": "lookup"}
    ]
    assert h.events.index(pending) > h.events.index(h.last("response.completed"))
    h.send(
        input=[{"type": "function_call_output", "call_id": "call_9", "output": "x"}],
        previous_response_id=turn.response_id,
    )
    cont = h.started[-1]
    assert [i["type"] for i in cont.items.to_objects()] == ["message", "function_call_output"]


def test_steer_events_after_a_terminal_event_go_on_with_its_numbers() -> None:
    """`response.steer.pending` and later `response.steer.failed` events of a finished
    response go on with its sequence numbers, one each: the failed ones repeated the
    first pending event's number."""
    h = Harness()
    h.send(input="go")
    turn = h.started[-1]
    h.session.model_event(turn, ToolCallStart("call_9", "lookup"))
    steer = {"type": "response.steer", "previous_response_id": turn.response_id}
    h.raw(json.dumps({**steer, "input": "one"}))
    h.raw(json.dumps({**steer, "input": "two"}))
    h.session.model_done(turn)
    h.drain()
    for late in ("three", "four"):
        h.raw(json.dumps({**steer, "input": late}))
    h.drain()
    numbers = [e["sequence_number"] for e in h.events if "sequence_number" in e]
    assert numbers == list(range(len(numbers)))
    kinds = [e["type"] for e in h.events if e["type"].startswith("response.steer.")]
    assert kinds[-4:] == ["response.steer.pending"] * 2 + ["response.steer.failed"] * 2


def test_usage_asked_while_a_worker_counts_the_input_waits_for_its_counts() -> None:
    """A large input is tokenised in a worker thread; a steer (or the lifetime's end)
    meanwhile asks for the response's usage on the event loop. It read the input as
    not counted yet (`input_tokens: 0`); it waits for the worker's counts."""

    class SlowItems:
        """The cache, with `items` (tokenising) slowed down."""

        def __init__(self, cache: SessionCache) -> None:
            self._cache = cache

        def items(self, items: Items) -> Items:
            time.sleep(0.3)
            return self._cache.items(items)

        def __getattr__(self, name: str) -> Any:
            return getattr(self._cache, name)

    h = Harness(cache=SessionCache(tokenizer=Tokenizer.builtin("o200k_base")))
    h.send(input="word " * 2000)
    turn = h.started[-1]
    h.engine.cache = SlowItems(h.cache)  # type: ignore[assignment]
    worker = threading.Thread(target=turn.count_input_tokens)
    worker.start()
    time.sleep(0.05)  # the worker is tokenising
    input_tokens = turn.usage()[0]
    worker.join()
    assert input_tokens > 2000


def test_pending_steering_taken_over_by_a_later_response_is_failed() -> None:
    """Steering pending on one response (waiting for its tool output) that the client
    never continued, then a later response on the lane with steering pending too: the
    older steering will never be applied, and its steers are told so (they were
    dropped unanswered)."""
    h = Harness()
    targets = []
    for name in ("first", "second"):
        h.send(input=name, stream_id="s")
        turn = h.started[-1]
        targets.append(turn.response_id)
        h.session.model_event(turn, ToolCallStart(f"call_{name}", "lookup"))
        steer = {"type": "response.steer", "previous_response_id": turn.response_id}
        h.raw(json.dumps({**steer, "input": f"steer {name}"}))
        h.session.model_done(turn)
        h.drain()
    first_id = h.events[[e["type"] for e in h.events].index("response.steer.accepted")]["steer"][
        "id"
    ]
    failed = h.last("response.steer.failed")
    assert failed["steer"]["id"] == first_id and failed["stream_id"] == "s"
    assert failed["steer"]["previous_response_id"] == targets[0]
    assert failed["error"]["code"] == "response_not_active"
    assert h.last("response.steer.pending")["steer"]["previous_response_id"] == targets[1]
    assert h.events.index(failed) < h.events.index(h.last("response.steer.pending"))


def test_waiting_steering_counts_against_the_queued_bytes() -> None:
    """Steering accepted but not applied yet is held for the connection, as waiting
    creates are: past --max-queued-bytes it is refused (too_many_pending_steers), and
    the response and the connection go on."""
    h = Harness(Limits(max_queued_bytes=5000))
    h.send(input="go")
    turn = h.started[-1]
    h.session.model_event(turn, TextDelta("partial"))
    steer = {"type": "response.steer", "previous_response_id": turn.response_id}
    h.raw(json.dumps({**steer, "input": "a" * 3000}))
    assert h.last("response.steer.accepted")
    h.raw(json.dumps({**steer, "input": "b" * 3000}))
    refused = h.last("response.steer.failed")
    assert refused["error"]["code"] == "too_many_pending_steers"
    assert "--max-queued-bytes" in refused["error"]["message"]
    assert len(turn.steers) == 1


def test_every_client_owned_item_is_required_input() -> None:
    """What a steered response waits for from the client, whichever client-owned item
    holds it up (a Responses upstream passes them all through), as the SDK's
    `ResponseSteerRequiredInput` stubs: with any of them in its output, a steered
    response gets no automatic successor (its context would lack their answers)."""
    from openai.types.responses.response_steer_required_input import (
        ResponseSteerRequiredInput,
    )
    from pydantic import TypeAdapter

    output = Items.from_objects(
        [
            {"type": "message", "role": "assistant", "content": "working"},
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
            {"type": "custom_tool_call", "call_id": "c2", "name": "p", "input": "x"},
            {"type": "computer_call", "id": "cu_1", "call_id": "c3", "action": {}},
            {"type": "shell_call", "id": "sh_1", "call_id": "c4", "action": {}},
            {"type": "apply_patch_call", "id": "ap_1", "call_id": "c5", "operation": {}},
            {"type": "mcp_approval_request", "id": "mcpr_1", "name": "t", "server_label": "s"},
            {"type": "tool_search_call", "call_id": "c6", "execution": "client"},
            {"type": "tool_search_call", "call_id": "c7", "execution": "server"},
            {"type": "web_search_call", "id": "ws_1", "status": "completed"},
        ]
    )
    required = required_input(output)
    adapter = TypeAdapter(ResponseSteerRequiredInput)
    for stub in required:
        adapter.validate_python(stub)
    assert [(r["type"], r.get("call_id") or r.get("approval_request_id")) for r in required] == [
        ("function_call_output", "c1"),
        ("custom_tool_call_output", "c2"),
        ("computer_call_output", "c3"),
        ("shell_call_output", "c4"),
        ("apply_patch_call_output", "c5"),
        ("mcp_approval_response", "mcpr_1"),
        ("tool_search_output", "c6"),
    ]
    h = Harness()
    h.send(input="go")
    turn = h.started[-1]
    computer = {
        "type": "computer_call",
        "id": "cu_1",
        "call_id": "c3",
        "action": {"type": "screenshot"},
        "pending_safety_checks": [],
        "status": "completed",
    }
    h.session.model_event(turn, OutputItem(json.dumps(computer).encode()))
    steer = {"type": "response.steer", "previous_response_id": turn.response_id}
    h.raw(json.dumps({**steer, "input": "stop"}))
    h.session.model_event(turn, TextDelta("more"))  # a new item: the steer point
    h.drain()
    assert h.started == [turn]
    assert h.last("response.steer.pending")["required_input"] == [
        {"type": "computer_call_output", "call_id": "c3"}
    ]


def test_limits_of_lanes_and_queue() -> None:
    h = Harness(Limits(max_named_lanes=2, max_queued_requests=3, max_active_responses=1))
    h.send(input="1", stream_id="a")
    h.send(input="2", stream_id="b")
    h.send(input="3", stream_id="c")
    assert h.last("error")["error"]["code"] == "websocket_stream_limit_reached"
    h.send(input="4", stream_id="a")
    h.send(input="5", stream_id="a")
    h.send(input="6", stream_id="a")
    assert h.last("error")["error"]["code"] == "server_is_overloaded"
    assert h.last("error")["status"] == 503


def test_a_create_refused_for_a_full_queue_does_not_use_up_a_named_lane() -> None:
    """Creates on new lanes refused while the queue is full (by count or by bytes)
    open no lane: once the queue has room, new lanes are still available."""
    limits = Limits(
        max_named_lanes=2, max_queued_requests=2, max_active_responses=1, max_queued_bytes=3000
    )
    h = Harness(limits)
    h.send(input="run")
    h.send(input="q" * 2000)  # waits, holding most of the queued bytes
    h.send(input="x" * 2000, stream_id="a")  # refused: the queued bytes
    h.send(input="y", stream_id="b")  # waits: the queue is now full
    h.send(input="z", stream_id="c")  # refused: the queue's count
    codes = [e["error"]["code"] for e in h.events if e["type"] == "error"]
    assert codes == ["server_is_overloaded"] * 2
    assert h.session.named_lanes == 1
    for _ in range(3):
        h.reply(h.started[-1])
    h.send(input="later", stream_id="c")
    assert h.events[-1]["type"] == "response.in_progress"
    assert h.started[-1].stream_id == "c" and h.session.named_lanes == 2


def test_a_create_that_starts_at_once_is_not_refused_for_other_lanes_full_queue() -> None:
    """The queue's limits are for creates that wait: one on an idle lane with a free
    active slot starts at once, however full the other lanes' queues are (it got
    server_is_overloaded although a slot was free)."""
    h = Harness(Limits(max_active_responses=2, max_queued_requests=3))
    for n in range(4):  # one runs on lane a, three wait behind it: the queue is full
        h.send(input=f"a{n}", stream_id="a")
    assert len(h.started) == 1 and not any(e["type"] == "error" for e in h.events)
    h.send(input="b", stream_id="b")
    assert not any(e["type"] == "error" for e in h.events)
    assert len(h.started) == 2 and h.started[-1].stream_id == "b"
    h.send(input="c", stream_id="c")  # no slot free now: it would wait, and cannot
    assert h.last("error")["error"]["code"] == "server_is_overloaded"


def test_queued_bytes_are_bounded_and_the_connection_stays_usable() -> None:
    h = Harness(Limits(max_active_responses=1, max_queued_bytes=3000))
    h.send(input="x" * 5000)  # starts at once: nothing waits, nothing counted
    running = h.started[-1]
    h.send(input="a" * 1000, stream_id="q")
    h.send(input="b" * 1000, stream_id="q")
    assert len(h.started) == 1 and not any(e["type"] == "error" for e in h.events)
    h.send(input="c" * 1000, stream_id="q")  # would hold over 3,000 bytes waiting
    error = h.last("error")
    assert error["error"]["code"] == "server_is_overloaded" and error["status"] == 503
    assert "--max-queued-bytes" in error["error"]["message"] and error["stream_id"] == "q"
    h.reply(running)
    h.reply(h.started[1])  # the two that waited run, in order
    assert [t.items.to_objects()[-1]["content"][:1] for t in h.started[1:]] == ["a", "b"]
    h.send(input="d" * 1000, stream_id="q")  # room again
    assert h.events[-1]["type"] != "error"


def test_a_full_queue_of_warm_ups_behind_a_turn_all_complete_in_order() -> None:
    """A client may pipeline as many warm-ups (`generate: false`) as the queue holds
    behind a running turn: when the turn ends, every one of them completes, in the
    order sent, and the lane takes the next create (each warm-up ends as it starts,
    which must not nest one call per warm-up and overflow the stack)."""
    count = 1000
    assert count <= Limits().max_queued_requests  # the default queue holds them all
    h = Harness()
    h.send(input="running")
    running = h.started[-1]
    for i in range(count):
        h.send(input=f"w{i}", generate=False, metadata={"n": str(i)})
    assert h.session.queued_requests == count
    h.reply(running)
    completed = [e["response"] for e in h.events if e["type"] == "response.completed"]
    assert [r["metadata"].get("n") for r in completed[1:]] == [str(i) for i in range(count)]
    assert h.session.queued_requests == 0 and h.session.active_responses == 0
    assert h.session.lane_head(None) == completed[-1]["id"]
    h.send(input="next", previous_response_id=completed[-1]["id"])
    assert h.started[-1] is not running and h.events[-1]["type"] == "response.in_progress"


def test_lifetime_expiry_finishes_in_flight_then_closes() -> None:
    h = Harness(Limits(connection_lifetime=60.0, close_grace=10.0))
    h.send(input="running")
    running = h.started[-1]
    h.send(input="running on q", stream_id="q")
    h.send(input="queued", stream_id="q")
    assert h.session.next_deadline() == 60.0
    h.session.tick(60.0)
    # No connection-scoped notice while the default lane's response runs: the SDK
    # would take it as that response's error. The queued create's answer comes on its
    # lane after the lane's running response (spec Q13; a lane's events never overlap).
    assert not [e for e in h.drain() if e["type"] == "error"] and not h.closed
    h.send(input="too late", stream_id="r")
    assert (h.events[-1]["error"]["code"], h.events[-1]["stream_id"]) == (
        "websocket_connection_limit_reached",
        "r",
    )
    h.reply(h.started[1])
    refused = h.last("error")
    assert (refused["stream_id"], refused["error"]["code"]) == (
        "q",
        "websocket_connection_limit_reached",
    )
    assert h.events.index(refused) > h.events.index(h.last("response.completed"))
    h.reply(running)
    assert h.last("response.completed")["response"]["id"] == running.response_id
    assert h.closed == [CloseConnection(1000, "connection lifetime reached")]
    assert len(h.started) == 2  # the queued request never started


def test_lifetime_expiry_answers_a_lane_waiting_for_a_slot_at_once() -> None:
    """A create queued on a lane with nothing running (it waits for an active slot) is
    refused at once at expiry, not when a slot frees or the grace ends."""
    h = Harness(Limits(max_active_responses=1, connection_lifetime=100.0, close_grace=30.0))
    h.send(input="running", stream_id="a")
    h.send(input="waits for a slot", stream_id="b")
    assert len(h.started) == 1
    h.session.tick(100.0)
    h.drain()
    refused = h.last("error")
    assert (refused["stream_id"], refused["error"]["code"]) == (
        "b",
        "websocket_connection_limit_reached",
    )
    assert h.session.queued_requests == 0
    h.reply(h.started[-1])
    assert len(h.started) == 1
    assert h.closed == [CloseConnection(1000, "connection lifetime reached")]


def test_lifetime_expiry_fails_the_steering_of_a_successor_still_waiting() -> None:
    """An automatic successor waiting for an active slot holds its steering's bytes
    (--max-queued-bytes), and at expiry its steers get response.steer.failed; the lane
    gets no error for a create the client never sent."""
    h = Harness(Limits(max_active_responses=1, connection_lifetime=100.0, close_grace=30.0))
    h.send(input="target", stream_id="a")
    target = h.started[-1]
    h.send(input="waits", stream_id="b")
    h.session.model_event(target, TextDelta("partial"))
    steer = {"type": "response.steer", "previous_response_id": target.response_id}
    h.raw(json.dumps({**steer, "input": "s" * 3000}))
    steer_id = h.last("response.steer.accepted")["steer"]["id"]
    h.session.model_event(target, ToolCallStart("c", "f"))  # the steer point
    h.drain()
    assert h.last("response.incomplete") and len(h.started) == 2  # b took the slot
    assert h.session._queued_bytes >= 3000  # the successor's steering, waiting
    h.session.tick(100.0)
    h.drain()
    failed = h.last("response.steer.failed")
    assert failed["steer"]["id"] == steer_id and failed["stream_id"] == "a"
    assert not [e for e in h.events if e["type"] == "error" and e.get("stream_id") == "a"]
    assert h.session.queued_requests == 0


def test_a_message_refused_unread_on_a_new_lane_opens_no_lane() -> None:
    h = Harness(Limits(max_named_lanes=1))
    h.raw('{"type": "response.create", "stream_id": "z", "model": "m", "input": "\\ud800"}')
    refused = h.last("error")
    assert (refused["stream_id"], refused["error"]["code"]) == ("z", "invalid_json")
    assert h.session.named_lanes == 0
    h.send(input="fine", stream_id="y")  # the one named lane is still there to take
    assert h.started[-1].stream_id == "y"


def test_lifetime_expiry_of_an_idle_default_lane_sends_the_notice() -> None:
    """With nothing on its way on the default lane, the connection-scoped notice goes
    out at once (as OpenAI sends it on idle connections)."""
    h = Harness(Limits(connection_lifetime=60.0, close_grace=10.0))
    h.send(input="running", stream_id="a")
    h.session.tick(60.0)
    h.drain()
    notice = h.last("error")
    assert notice["error"]["code"] == "websocket_connection_limit_reached"
    assert "stream_id" not in notice and not h.closed
    h.reply(h.started[-1])
    assert h.closed == [CloseConnection(1000, "connection lifetime reached")]


def test_a_create_on_a_named_lane_after_the_lifetime_is_refused_on_that_lane() -> None:
    """Once the lifetime has run out, a new create on a named lane gets its error on
    that lane (the lanes helper would hand an error without stream_id to the default
    lane, and the named lane's caller would wait until the socket closes)."""
    h = Harness(Limits(connection_lifetime=60.0, close_grace=30.0))
    h.send(input="running", stream_id="a")
    h.session.tick(60.0)
    h.drain()
    h.send(input="too late", stream_id="b")
    refused = h.events[-1]
    assert (refused["type"], refused.get("stream_id")) == ("error", "b")
    assert refused["error"]["code"] == "websocket_connection_limit_reached"
    assert len(h.started) == 1 and not h.closed


def test_lifetime_grace_fails_stragglers() -> None:
    h = Harness(Limits(connection_lifetime=1.0, close_grace=2.0))
    h.send(input="slow")
    straggler = h.started[-1]
    h.session.tick(1.0)
    h.session.tick(3.0)
    h.drain()
    assert straggler in h.stopped
    assert h.last("response.failed")["response"]["error"]["code"] == "server_error"
    assert h.closed


def test_a_drain_finishes_what_is_under_way_refuses_new_creates_then_closes() -> None:
    # A server shutting down: the running response and the one queued behind it on
    # its lane end normally; a new create gets the error that says to reconnect, on
    # its own lane; the connection closes with 1001 (the SDK reconnects on it) once
    # nothing is left, not before.
    h = Harness(Limits(max_active_responses=1))
    h.send(input="running", stream_id="a")
    running = h.started[-1]
    h.send(input="queued", stream_id="a")
    h.session.drain(5.0, 30.0)
    assert h.session.next_deadline() == 35.0
    h.send(input="too late", stream_id="b")
    refused = h.events[-1]
    assert (refused["type"], refused["stream_id"]) == ("error", "b")
    assert refused["error"]["code"] == "websocket_connection_limit_reached"
    assert refused["status"] == 503 and "shutting down" in refused["error"]["message"]
    h.reply(running)
    assert not h.closed and len(h.started) == 2
    queued = h.started[-1]
    h.reply(queued)
    assert h.closed == [CloseConnection(1001, "server shutting down")]
    assert [e["type"] for e in h.events].count("response.completed") == 2
    assert h.session.closed and h.cache.stats().connections == 0


def test_a_drain_closes_an_idle_connection_at_once() -> None:
    h = Harness()
    h.send(input="done")
    h.reply(h.started[-1])
    h.session.drain(1.0, 30.0)
    h.drain()
    assert h.closed == [CloseConnection(1001, "server shutting down")]


def test_a_drain_that_runs_out_fails_what_is_left_then_closes() -> None:
    # At the end of the grace: each response under way gets its terminal event (a
    # failure that says why), each queued create its error, then the close.
    h = Harness(Limits(max_active_responses=1, connection_lifetime=100.0))
    h.send(input="slow", stream_id="a")
    slow = h.started[-1]
    h.send(input="waits", stream_id="a")
    h.session.drain(1.0, 2.0)
    h.session.tick(2.9)
    h.drain()
    assert not h.closed
    h.session.tick(3.0)
    h.drain()
    assert slow in h.stopped and len(h.started) == 1
    failed = h.last("response.failed")["response"]["error"]
    assert (failed["code"], failed["message"]) == ("server_error", "The server shut down first.")
    error = h.last("error")
    assert (error["stream_id"], error["error"]["code"]) == (
        "a",
        "websocket_connection_limit_reached",
    )
    assert h.closed == [CloseConnection(1001, "server shutting down")]


def test_disconnect_cancels_everything() -> None:
    h = Harness(Limits(max_active_responses=1))
    h.send(input="a", store=False)
    h.send(input="b", stream_id="x")
    running = h.started[-1]
    h.session.connection_lost()
    h.drain()
    assert h.stopped == [running]
    assert h.session.active_responses == 0 and h.session.queued_requests == 0
    h.session.model_event(running, TextDelta("late"))  # ignored
    assert h.drain() == []
    assert h.cache.stats().connections == 0


@pytest.mark.parametrize(
    ("message", "code"),
    [
        (b"", "invalid_json"),
        (b"{", "invalid_json"),
        (b"null", "invalid_type"),
        (b'{"type":"response.create","model":"m","input":"x","tools":"no"}', "invalid_type"),
        (
            b'{"type":"response.create","model":"m","input":[{"type":"function_call"}]}',
            "missing_required_parameter",
        ),
        (b'{"type":"response.unknown"}', "invalid_value"),
    ],
)
def test_bad_messages_never_raise(message: bytes, code: str) -> None:
    h = Harness()
    h.raw(message)
    assert h.events[-1]["error"]["code"] == code
    h.send(input="fine")
    assert h.events[-2]["type"] == "response.created"


def test_a_text_message_that_is_not_utf8_closes_with_1007_and_stops_the_responses() -> None:
    bad = b'{"type":"response.create","model":"m","input":"\xff"}'
    h = Harness()
    h.raw(bad)  # a binary message: an error event, and the session goes on
    assert h.events[-1]["error"]["code"] == "invalid_json" and h.closed == []
    h.send(input="slow", stream_id="a")
    running = h.started[-1]
    h.session.receive_message(bad, text=True)
    h.drain()
    assert [(c.code, "UTF-8" in c.reason) for c in h.closed] == [(1007, True)]
    assert h.stopped == [running] and h.session.closed
    assert h.cache.stats().connections == 0


def test_unresolved_parent_names_what_a_shared_store_could_supply() -> None:
    h = Harness()
    session = h.session

    def parse(**fields: Any) -> Any:
        message = {"type": "response.create", "model": "m", **fields}
        return session.parse_message(json.dumps(message))

    h.send(input="hi", generate=False)
    stored = h.events[-1]["response"]["id"]
    h.send(input="running")
    running = h.started[-1].response_id
    assert session.unresolved_parent(parse(previous_response_id="resp_elsewhere")) == (
        "resp_elsewhere"
    )
    assert session.unresolved_parent(parse(previous_response_id=stored)) is None
    assert session.unresolved_parent(parse(previous_response_id=running)) is None
    assert session.unresolved_parent(parse(input="no parent")) is None
    assert session.unresolved_parent(session.parse_message(b"not json")) is None
    # parse + receive_parsed is receive_message in two steps; parsing changes nothing.
    message = parse(previous_response_id=stored, input="next", stream_id="s")
    assert h.drain() == []
    session.receive_parsed(message)
    assert [e["type"] for e in h.drain()] == ["response.created", "response.in_progress"]
    tiny = ResponsesSession(h.engine, owner="o", now=0.0)
    too_large = tiny.parse_message(b"x" * (Limits().max_message_bytes + 1))
    tiny.receive_parsed(too_large)
    (frame,) = tiny.take_outbox()
    assert isinstance(frame, bytes) and b"message_too_large" in frame


def test_a_create_refused_for_an_unavailable_store_waits_its_turn_and_keeps_the_head() -> None:
    """The asyncio layer could not load a create's parent (Redis did not answer): the
    503 goes to the create's lane in order, and the lane's head is not evicted (unlike
    a failed continuation of it): the chain stays continuable."""
    h = Harness()
    session = h.session

    def parse(**fields: Any) -> Any:
        return session.parse_message(
            json.dumps({"type": "response.create", "model": "m", **fields})
        )

    h.send(input="p", store=False, stream_id="a")
    head = h.reply(h.started[-1])[-1]["response"]["id"]
    h.send(input="busy", store=False, stream_id="a", previous_response_id=head)
    busy = h.started[-1]
    refused = parse(previous_response_id=head, input="x", stream_id="a")
    session.refuse_create(refused, shared_store_unavailable(head))
    assert not [e for e in h.drain() if e["type"] == "error"]  # behind the running turn
    h.reply(busy)
    error = h.last("error")
    assert (error["status"], error["stream_id"]) == (503, "a")
    assert (error["error"]["code"], error["error"]["param"]) == (
        "server_error",
        "previous_response_id",
    )
    assert h.events.index(error) > h.events.index(h.last("response.completed"))
    # Refused right away on an idle lane whose head is the parent: the head stays.
    busy_id = busy.response_id
    session.refuse_create(
        parse(previous_response_id=busy_id, input="y", stream_id="a"),
        shared_store_unavailable(busy_id),
    )
    assert h.drain()[-1]["status"] == 503
    assert session.lane_head("a") == busy_id
    h.send(input="again", store=False, stream_id="a", previous_response_id=busy_id)
    assert h.last("response.created")["response"]["previous_response_id"] == busy_id
    assert h.engine.metrics.errors["server_error"] == 2


@pytest.mark.parametrize("diffing", [True, False])
def test_new_input_is_tokenised_off_the_request_path_once(diffing: bool) -> None:
    """A turn starts without tokenising its new input; the backend's `request_sent`
    (or, at the latest, the usage) does it, once, and the usage counts it."""
    tokenizer = Tokenizer.builtin("o200k_base")
    h = Harness(cache=SessionCache(tokenizer=tokenizer, prefix_index=diffing))
    h.send(input="first question", store=False)
    first = h.started[-1]
    h.reply(first, "first answer")
    parent = h.events[-1]["response"]
    text = "a longer second question " * 20
    h.send(input=text, store=False, previous_response_id=parent["id"])
    turn = h.started[-1]
    context = turn.context()
    assert context.request_sent is not None
    untokenised = context.view.tokens
    context.request_sent()
    tokens_after = turn.view.tokens
    assert tokens_after > untokenised
    context.request_sent()  # idempotent
    assert turn.view.tokens == tokens_after
    h.reply(turn)
    usage = h.events[-1]["response"]["usage"]
    assert usage["input_tokens"] == tokens_after
    assert usage["input_tokens_details"]["cached_tokens"] == untokenised
    # Without a call from the backend the usage still counts the new input.
    h.send(input=text, store=False, previous_response_id=h.events[-1]["response"]["id"])
    late = h.started[-1]
    before = late.view.tokens
    h.reply(late)
    assert h.events[-1]["response"]["usage"]["input_tokens"] > before
    # A cache without a tokenizer has nothing to defer.
    plain = Harness()
    plain.send(input="hi")
    assert plain.started[-1].context().request_sent is None


def test_the_stored_prompt_key_is_read_from_any_meta() -> None:
    key = prompt_key("be brief")
    assert key is not None
    encoder = ResponseEncoder("r", settings=b"{}", created_at=1)
    for instructions in (key, None):
        meta = encoder.terminal_meta((1, 0, 1), completed_at=2, instructions=instructions)
        assert stored_prompt_key(meta) == instructions
    written_by_python = json.dumps(
        {"status": "completed", "usage": None, "instructions": key}, separators=(",", ":")
    ).encode()
    assert stored_prompt_key(written_by_python) == key
    assert stored_prompt_key(b'{"status":"completed"}') is None  # older metas
    assert stored_prompt_key(json.dumps({"instructions": key, "x": 1}).encode()) == key
    tricky = json.dumps({"error": {"message": '"instructions":"x"'}, "instructions": None})
    assert stored_prompt_key(tricky.encode()) is None
