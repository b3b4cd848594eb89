"""The built-in model's rules, as documented in README.md."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx2 as httpx
import pytest

from tests.support import RunningServer
from tests.test_schema_example import HUGE_EXAMPLES
from warmsocket.mockmodel import (
    AUTO,
    Call,
    Reply,
    ToolChoice,
    argument_deltas,
    custom_tool_names,
    function_parameters,
    iter_text_deltas,
    plan_reply,
    text_deltas,
    tool_choice,
    transcript,
)


def user(text: str) -> dict[str, Any]:
    return {"type": "message", "role": "user", "content": text}


def call(name: str, call_id: str) -> dict[str, Any]:
    return {"type": "function_call", "name": name, "call_id": call_id, "arguments": "{}"}


def output(call_id: str, text: str) -> dict[str, Any]:
    return {"type": "function_call_output", "call_id": call_id, "output": text}


def plan(tail: list[dict[str, Any]], tools: tuple[str, ...] = ("get_weather",), **kw: Any) -> Reply:
    full = kw.pop("full", tail)
    tool_types: tuple[str, ...] = kw.pop("tool_types", ("function",))
    return plan_reply(
        tail,
        function_names=tools,
        instructions=kw.get("instructions"),
        full_context=lambda: full,
        tool_types=lambda: tool_types,
        custom_names=lambda: kw.get("customs", ()),
        choice=kw.get("choice", AUTO),
        parameters=lambda name: kw.get("schemas", {}).get(name),
    )


def test_default_echoes_the_newest_user_message() -> None:
    assert plan([user("hello there")]) == Reply("text", "You said: hello there")


def test_parts_content_is_joined() -> None:
    item = {
        "role": "user",
        "content": [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}],
    }
    assert plan([item]).text == "You said: ab"


def test_call_then_returned() -> None:
    first = plan([user('/call get_weather {"city": "Paris"}')])
    assert first == Reply("call", calls=(Call("get_weather", '{"city": "Paris"}'),))
    second = plan(
        [
            user('/call get_weather {"city": "Paris"}'),
            call("get_weather", "c1"),
            output("c1", "sunny"),
        ]
    )
    assert second == Reply("text", "get_weather returned: sunny")


def test_several_call_lines_are_parallel_calls() -> None:
    msg = user('/call get_weather {"city": "Lima"}\n/call read_file {"path": "a"}')
    tools = ("get_weather", "read_file")
    wanted = (Call("get_weather", '{"city": "Lima"}'), Call("read_file", '{"path": "a"}'))
    assert plan([msg], tools) == Reply("call", calls=wanted)
    calls = [msg, call("get_weather", "c1"), call("read_file", "c2")]
    # One output back: still waiting for the other (the same calls again).
    assert plan([*calls, output("c1", "sunny")], tools) == Reply("call", calls=wanted)
    # Outputs in another order than the calls: the reply follows the calls' order.
    done = [*calls, output("c2", "text of a"), output("c1", "sunny")]
    assert plan(done, tools) == Reply(
        "text", "get_weather returned: sunny; read_file returned: text of a"
    )


def test_tool_choice_is_read_in_both_apis_shapes() -> None:
    assert tool_choice(None) == tool_choice("auto") == AUTO
    assert tool_choice("none") == ToolChoice("none")
    assert tool_choice("required", False) == ToolChoice("required", parallel=False)
    named = ToolChoice("required", "read_file")
    assert tool_choice({"type": "function", "name": "read_file"}) == named
    assert tool_choice({"type": "function", "function": {"name": "read_file"}}) == named
    assert tool_choice({"type": "custom", "name": "patch"}) == ToolChoice("required", "patch", True)
    for other in ({"type": "function"}, {"type": "web_search"}, {"type": "allowed_tools"}, 5):
        assert tool_choice(other) == AUTO, other


def test_tool_choice_none_answers_in_text() -> None:
    msg = user('/call get_weather {"city": "Lima"}')
    assert plan([msg], choice=ToolChoice("none")) == Reply(
        "text", 'You said: /call get_weather {"city": "Lima"}'
    )


def test_tool_choice_required_and_named_tools_force_a_call() -> None:
    tools = ("get_weather", "read_file")
    required = ToolChoice("required")
    # No call asked for: the first tool, with empty arguments; a custom tool's empty input.
    assert plan([user("hi")], tools, choice=required) == Reply(
        "call", calls=(Call("get_weather", "{}"),)
    )
    assert plan([user("hi")], (), customs=("patch",), choice=required) == Reply(
        "call", calls=(Call("patch", "", custom=True),)
    )
    assert plan([user("hi")], (), choice=required) == Reply("text", "You said: hi")  # no tool
    # A named tool: only the calls to it, else one call to it.
    both = user('/call get_weather {"city": "Lima"}\n/call read_file {"path": "a"}')
    named = ToolChoice("required", "read_file")
    assert plan([both], tools, choice=named) == Reply(
        "call", calls=(Call("read_file", '{"path": "a"}'),)
    )
    assert plan([user("hi")], tools, choice=named) == Reply(
        "call", calls=(Call("read_file", "{}"),)
    )
    # Made-up arguments are the simplest its schema accepts.
    path = {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}
    assert plan([user("hi")], tools, choice=named, schemas={"read_file": path}) == Reply(
        "call", calls=(Call("read_file", '{"path":""}'),)
    )
    # /fail and /transcript stay what they are.
    assert plan([user("/fail")], tools, choice=required).kind == "fail"
    # The output of a forced call is reported, as a directive's is.
    answered = [user("hi"), call("get_weather", "c1"), output("c1", "sunny")]
    assert plan(answered, tools) == Reply("text", "get_weather returned: sunny")


def test_a_forced_call_whose_arguments_are_too_large_to_make_is_explained() -> None:
    """As for any other call it cannot make, the model says why in text."""
    schema = HUGE_EXAMPLES["self-references"]
    reply = plan([user("hi")], choice=ToolChoice("required"), schemas={"get_weather": schema})
    assert reply == Reply(
        "text",
        "Cannot call get_weather: the simplest value its schema accepts is too large to make "
        "(over 10,000 steps or 65,536 bytes).",
    )


def test_huge_forced_arguments_leave_the_server_responsive(server: RunningServer) -> None:
    """Each schema asking for a huge value gets its answer within a second while
    `/healthz` keeps answering (one froze the server: 640 MB, no health check)."""
    health: list[float] = []
    done = threading.Event()

    def check_health() -> None:
        with httpx.Client(base_url=server.base_url.removesuffix("/v1"), timeout=5) as http:
            while not done.is_set():
                started = time.monotonic()
                assert http.get("/healthz").status_code == 200
                health.append(time.monotonic() - started)

    checker = threading.Thread(target=check_health, daemon=True)
    checker.start()
    try:
        with httpx.Client(base_url=server.base_url, timeout=5) as http:
            for name, schema in HUGE_EXAMPLES.items():
                request = {
                    "model": "warmsocket-mock",
                    "input": "hi",
                    "tools": [{"type": "function", "name": "f", "parameters": schema}],
                    "tool_choice": "required",
                }
                started = time.monotonic()
                answer = http.post("responses", json=request)
                assert time.monotonic() - started < 1, name
                assert answer.status_code == 200, answer.text
                text = answer.json()["output"][0]["content"][0]["text"]
                assert text.startswith(
                    "Cannot call f: the simplest value its schema accepts is too large"
                ), text
    finally:
        done.set()
        checker.join(10)
    assert health and max(health) < 1


def test_function_parameters_of_both_apis_tools() -> None:
    schema = {"type": "object", "properties": {}}
    responses = [
        {"type": "custom", "name": "f"},
        {"type": "function", "name": "f", "parameters": schema},
    ]
    chat = [{"type": "function", "function": {"name": "f", "parameters": schema}}]
    assert function_parameters(responses, "f") is schema
    assert function_parameters(chat, "f") is schema
    assert function_parameters(chat, "g") is None
    assert function_parameters(None, "f") is None
    assert function_parameters([{"type": "function", "name": "f"}], "f") is None


def test_without_parallel_tool_calls_the_calls_come_one_at_a_time() -> None:
    msg = user('/call get_weather {"city": "Lima"}\n/call read_file {"path": "a"}')
    tools = ("get_weather", "read_file")
    one = ToolChoice(parallel=False)
    assert plan([msg], tools, choice=one) == Reply(
        "call", calls=(Call("get_weather", '{"city": "Lima"}'),)
    )
    first = [msg, call("get_weather", "c1"), output("c1", "sunny")]
    assert plan(first, tools, choice=one) == Reply(
        "call", calls=(Call("read_file", '{"path": "a"}'),)
    )
    both = [*first, call("read_file", "c2"), output("c2", "text of a")]
    assert plan(both, tools, choice=one) == Reply(
        "text", "get_weather returned: sunny; read_file returned: text of a"
    )


def test_parallel_calls_are_checked_one_by_one() -> None:
    text = plan([user("/call get_weather {}\n/call nope {}")]).text
    assert text == "Cannot call nope: it is not one of this request's function tools."
    text = plan([user("/call get_weather {}\n/call get_weather {bad")]).text
    assert text == "Cannot call get_weather: the arguments are not valid JSON."


def test_call_unknown_tool_and_bad_json_are_explained() -> None:
    assert "not one of this request's function tools" in plan([user("/call nope {}")]).text
    assert "not valid JSON" in plan([user("/call get_weather {nope")]).text


def test_repeat_counts_outputs_after_the_user_message() -> None:
    msg = user("/repeat 2 get_weather {}")
    assert plan([msg]).kind == "call"
    one = [msg, call("get_weather", "a"), output("a", "x")]
    assert plan(one).kind == "call"
    two = [*one, call("get_weather", "b"), output("b", "y")]
    assert plan(two) == Reply("text", "done after 2 calls")


@pytest.mark.parametrize("count", ["²", "٣", "1" * 5_000, "1" * 10])
def test_repeat_without_a_plain_count_is_not_a_directive(count: str) -> None:
    """A count that is not up to nine ASCII digits (a superscript, another script's
    digit, one longer than `int` takes) is plain text, as any non-directive line:
    echoed back, not a failed response."""
    text = f"/repeat {count} get_weather {{}}"
    assert plan([user(text)]) == Reply("text", f"You said: {text}")


def test_reply_sets_the_answer_after_any_calls() -> None:
    answer = '{"city": "Lima", "sky": "sunny"}'
    assert plan([user(f"/reply {answer}")]) == Reply("text", answer)
    # Before or after the call line: the call comes first, then the answer.
    for text in (
        f"/call get_weather {{}}\n/reply {answer}",
        f"/reply {answer}\n/call get_weather {{}}",
    ):
        msg = user(text)
        assert plan([msg]) == Reply("call", calls=(Call("get_weather", "{}"),))
        assert plan([msg, call("get_weather", "c1"), output("c1", "x")]) == Reply("text", answer)
    repeat = user("/repeat 1 get_weather {}\n/reply all done")
    assert plan([repeat]).kind == "call"
    assert plan([repeat, call("get_weather", "a"), output("a", "x")]).text == "all done"
    # Spaces inside TEXT are kept; an empty TEXT is ignored.
    assert plan([user("/reply  a  b ")]).text == "a  b"
    assert plan([user("/reply")]).text == "You said: /reply"


def test_search_adds_a_web_search_when_the_request_has_the_tool() -> None:
    web = ("function", "web_search")
    assert plan([user("/search warm caches\nhi")], tool_types=web) == Reply(
        "text", "You said: /search warm caches\nhi", search="warm caches"
    )
    msg = user("/think First look.\n/search weather Lima\n/call get_weather {}")
    assert plan([msg], tool_types=("web_search_preview",)) == Reply(
        "call", calls=(Call("get_weather", "{}"),), reasoning="First look.", search="weather Lima"
    )
    assert plan([user("/search q\n/reply Found.")], tool_types=web).text == "Found."
    # Without a web search tool there is no search, and the reply says why.
    assert plan([user("/search q")]) == Reply(
        "text", "Cannot search: this request has no web_search tool."
    )
    assert plan([user("/search")], tool_types=web).search is None  # an empty QUERY
    searched = {
        "type": "web_search_call",
        "id": "ws_1",
        "status": "completed",
        "action": {"type": "search", "query": "warm caches"},
    }
    assert transcript([searched, {"type": "web_search_call"}], None) == (
        "web_search_call warm caches\nweb_search_call"
    )


def test_think_adds_reasoning_to_any_reply() -> None:
    assert plan([user("/think Plan.\nhi")]) == Reply(
        "text", "You said: /think Plan.\nhi", reasoning="Plan."
    )
    msg = user("/think Why not.\n/call get_weather {}")
    assert plan([msg]) == Reply("call", calls=(Call("get_weather", "{}"),), reasoning="Why not.")
    after = [msg, call("get_weather", "c1"), output("c1", "x")]
    assert plan(after) == Reply("text", "get_weather returned: x", reasoning="Why not.")
    assert plan([user("/fail\n/think t")]) == Reply("fail", reasoning="t")
    assert plan([user("/think")]).reasoning is None  # an empty TEXT is no reasoning
    reasoning = {
        "type": "reasoning",
        "summary": [{"type": "summary_text", "text": "a"}, {"type": "summary_text", "text": "b"}],
    }
    assert transcript([reasoning, {"type": "reasoning", "summary": []}], None) == (
        "reasoning a b\nreasoning"
    )


def test_custom_calls_a_custom_tool_with_free_form_input() -> None:
    def custom(tail: list[dict[str, Any]], customs: tuple[str, ...] = ("apply_patch",)) -> Reply:
        return plan_reply(
            tail,
            function_names=("get_weather",),
            instructions=None,
            full_context=lambda: tail,
            custom_names=lambda: customs,
        )

    msg = user("/custom apply_patch *** Begin Patch {not json}\n/call get_weather {}")
    wanted = (
        Call("apply_patch", "*** Begin Patch {not json}", custom=True),
        Call("get_weather", "{}"),
    )
    assert custom([msg]) == Reply("call", calls=wanted)
    outputs = [
        msg,
        {"type": "custom_tool_call", "name": "apply_patch", "call_id": "c1", "input": "x"},
        call("get_weather", "c2"),
        {"type": "custom_tool_call_output", "call_id": "c1", "output": "applied"},
        output("c2", "sun"),
    ]
    assert custom(outputs).text == "apply_patch returned: applied; get_weather returned: sun"
    text = custom([user("/custom apply_patch x")], customs=()).text
    assert text == "Cannot call apply_patch: it is not one of this request's custom tools."
    # A function tool of that name is not a custom tool, nor the other way round.
    assert "custom tools" in custom([user("/custom get_weather x")]).text
    assert "function tools" in custom([user("/call apply_patch {}")]).text

    # The request's custom tools are looked up only for /custom.
    def unasked() -> tuple[str, ...]:
        raise AssertionError("custom tools looked up")

    for text in ("hi", "/call get_weather {}", "/transcript"):
        plan_reply(
            [user(text)],
            function_names=("get_weather",),
            instructions=None,
            full_context=list,
            custom_names=unasked,
        )
    assert transcript(outputs[1:2], None) == "custom_tool_call apply_patch c1"
    assert transcript(outputs[3:4], None) == "custom_tool_call_output c1 applied"
    assert custom_tool_names(
        [{"type": "custom", "name": "a"}, {"type": "function", "name": "b"}, {"type": "custom"}]
    ) == ["a"]


def test_transcript_reads_the_full_context_only_when_asked() -> None:
    history = [
        user("hi"),
        {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "You said: hi"}],
        },
        call("get_weather", "c9"),
        output("c9", "rain"),
        user("/transcript"),
    ]
    reply = plan(history[-1:], full=history, instructions="be brief")
    assert reply.text.splitlines() == [
        "instructions: be brief",
        "user: hi",
        "assistant: You said: hi",
        "function_call get_weather c9",
        "function_call_output c9 rain",
        "user: /transcript",
    ]


def test_transcript_is_not_built_for_ordinary_turns() -> None:
    def explode() -> list[dict[str, Any]]:
        raise AssertionError("full context read")

    plan_reply([user("hi")], function_names=(), instructions=None, full_context=explode)


def test_fail_and_sleep_combine() -> None:
    assert plan([user("/sleep 50\n/fail")]) == Reply("fail", sleep_ms=50)
    assert plan([user("/sleep 20\nhello")]).sleep_ms == 20


@pytest.mark.parametrize("text", ["", "one", "You said: a b c", "  lead\nnew line  ", "   "])
def test_text_deltas_rebuild_the_text(text: str) -> None:
    assert "".join(text_deltas(text)) == text
    assert list(iter_text_deltas(text)) == text_deltas(text)


def test_deltas_are_words() -> None:
    assert text_deltas("   ") == ["   "]
    assert text_deltas("a b  ") == ["a", " b  "]
    assert text_deltas("You said: a b c d e f") == [
        "You",
        " said:",
        " a",
        " b",
        " c",
        " d",
        " e",
        " f",
    ]
    assert "".join(argument_deltas('{"city": "Paris"}')) == '{"city": "Paris"}'


def test_no_user_message() -> None:
    assert plan([output("x", "y")]).kind == "text"


def test_transcript_function() -> None:
    assert transcript([], None) == ""
