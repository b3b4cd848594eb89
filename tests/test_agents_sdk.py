"""`openai-agents` running real tool-calling agent loops over its WebSocket transport."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest
from agents import (
    Agent,
    ModelSettings,
    OpenAIResponsesCompactionSession,
    SQLiteSession,
    WebSearchTool,
    function_tool,
    responses_websocket_session,
)
from agents.tracing import set_tracing_disabled
from openai import AsyncOpenAI
from pydantic import BaseModel, Field

from tests.support import RunningServer
from tests.upstream_support import (
    RESPONSES_UPSTREAMS,
    running_sim,
    sim_compaction_summary,
    warmsocket_upstream,
)
from warmsocket import compaction_items

MODEL = "warmsocket-mock"


@pytest.fixture(autouse=True)
def no_tracing() -> Iterator[None]:
    # The tracing exporter would try to reach api.openai.com; tests stay offline.
    set_tracing_disabled(True)
    yield


calls: list[str] = []


@function_tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    calls.append(f"get_weather:{city}")
    return f"sunny in {city}"


@function_tool
def read_file(path: str) -> str:
    """Read a file."""
    calls.append(f"read_file:{path}")
    return f"contents of {path}"


def make_agent() -> Agent:
    return Agent(
        name="coder",
        instructions="You are a coding agent.",
        model=MODEL,
        tools=[get_weather, read_file],
        model_settings=ModelSettings(store=True),
    )


@pytest.mark.parametrize("chained", [False, True], ids=["full-replay", "previous_response_id"])
def test_agent_tool_loop_over_websocket(any_backend: RunningServer, chained: bool) -> None:
    server = any_backend
    calls.clear()
    metrics = server.server.metrics

    async def main() -> tuple[str, str]:
        async with responses_websocket_session(
            api_key="sk-test", base_url=server.base_url
        ) as session:
            agent = make_agent()
            first = await session.run(
                agent,
                '/repeat 3 read_file {"path": "src/main.py"}',
                auto_previous_response_id=chained,
            )
            ask = {"role": "user", "content": '/call get_weather {"city": "Lima"}'}
            second = await session.run(
                agent,
                [*first.to_input_list(), ask],
                auto_previous_response_id=chained,
            )
            return str(first.final_output), str(second.final_output)

    first, second = asyncio.run(main())
    assert first == "done after 3 calls"
    assert second == "get_weather returned: sunny in Lima"
    assert calls == ["read_file:src/main.py"] * 3 + ["get_weather:Lima"]
    # It really went over WebSocket mode, in the mode asked for.
    assert metrics.connections_opened["websocket"] >= 1
    assert not any(route == "responses" for route, _ in metrics.http_requests)
    if chained:
        assert metrics.lookups["hit"] >= 3
    else:
        assert metrics.lookups["hit"] == 0


def test_agent_streamed_run(any_backend: RunningServer) -> None:
    server = any_backend
    calls.clear()

    async def main() -> str:
        async with responses_websocket_session(
            api_key="sk-test", base_url=server.base_url
        ) as session:
            result = session.run_streamed(make_agent(), '/call read_file {"path": "x"}')
            kinds = [event.type async for event in result.stream_events()]
            assert "raw_response_event" in kinds
            return str(result.final_output)

    assert asyncio.run(main()) == "read_file returned: contents of x"
    assert calls == ["read_file:x"]


def test_agent_sees_the_transcript_it_sent(server: RunningServer) -> None:
    async def main() -> str:
        async with responses_websocket_session(
            api_key="sk-test", base_url=server.base_url
        ) as session:
            agent = make_agent()
            first = await session.run(agent, "remember this", auto_previous_response_id=True)
            second = await session.run(
                agent, "/transcript", previous_response_id=first.last_response_id
            )
            return str(second.final_output)

    lines = asyncio.run(main()).splitlines()
    assert lines == [
        "instructions: You are a coding agent.",
        "user: remember this",
        "assistant: You said: remember this",
        "user: /transcript",
    ]


def test_agent_parallel_tool_calls(any_backend: RunningServer) -> None:
    """One model response with two tool calls: the agent runs both and sends both
    outputs back in one turn, chained by previous_response_id."""
    calls.clear()
    agent = Agent(
        name="coder",
        instructions="You are a coding agent.",
        model=MODEL,
        tools=[get_weather, read_file],
        model_settings=ModelSettings(parallel_tool_calls=True, store=False),
    )
    prompt = '/call get_weather {"city": "Lima"}\n/call read_file {"path": "a.py"}'

    async def main() -> tuple[str, int]:
        async with responses_websocket_session(
            api_key="sk-test", base_url=any_backend.base_url
        ) as session:
            result = await session.run(agent, prompt, auto_previous_response_id=True)
            return str(result.final_output), len(result.raw_responses)

    final, responses = asyncio.run(main())
    assert final == "get_weather returned: sunny in Lima; read_file returned: contents of a.py"
    assert sorted(calls) == ["get_weather:Lima", "read_file:a.py"]
    assert responses == 2  # both calls in the first response, the answer in the second


@function_tool
def list_files() -> str:
    """The files of the project."""
    calls.append("list_files")
    return "a.py b.py"


def test_agent_tool_choice_and_one_call_at_a_time(any_backend: RunningServer) -> None:
    """`tool_choice="required"` makes the model call a tool (the agent's first, with
    no arguments), and the agent resets it to auto after the call, as it does with
    any model; `parallel_tool_calls=False` makes two asked-for calls come one
    response at a time, in order. On every backend."""
    calls.clear()

    async def main() -> list[tuple[str, int]]:
        async with responses_websocket_session(
            api_key="sk-test", base_url=any_backend.base_url
        ) as session:
            forced = Agent(
                name="lister",
                model=MODEL,
                tools=[list_files, read_file],
                model_settings=ModelSettings(tool_choice="required"),
            )
            first = await session.run(forced, "What is in the project?")
            one_by_one = Agent(
                name="reader",
                model=MODEL,
                tools=[get_weather, read_file],
                model_settings=ModelSettings(parallel_tool_calls=False),
            )
            two = '/call get_weather {"city": "Lima"}\n/call read_file {"path": "a.py"}'
            second = await session.run(one_by_one, two)
            return [
                (str(result.final_output), len(result.raw_responses)) for result in (first, second)
            ]

    first, second = asyncio.run(main())
    assert first == ("list_files returned: a.py b.py", 2)
    assert second == (
        "get_weather returned: sunny in Lima; read_file returned: contents of a.py",
        3,
    )
    assert calls == ["list_files", "get_weather:Lima", "read_file:a.py"]


@pytest.mark.parametrize("api", ["responses", "responses-ws"])
def test_an_agent_with_a_prompt_template(api: str) -> None:
    """An agent whose instructions are a prompt template stored at OpenAI
    (`Agent(prompt=...)`, no model of its own: the SDK then sends none) runs through
    warmsocket in front of a Responses upstream, which reads the template (the
    simulated upstream as OpenAI does), over the agent's WebSocket transport."""
    with (
        running_sim() as sim,
        warmsocket_upstream(sim.base_url, api) as (server, _metrics),
    ):
        sim.control(prompts={"pmpt_coder": "You review {{language}} code."})

        async def main() -> tuple[str, Any]:
            async with responses_websocket_session(
                api_key="sk-test", base_url=server.base_url
            ) as session:
                agent = Agent(
                    name="reviewer",
                    prompt={"id": "pmpt_coder", "variables": {"language": "Rust"}},
                )
                result = await session.run(agent, "/transcript")
                return str(result.final_output), sim.stats(bodies=True)["requests"]

        final, requests = asyncio.run(main())
    assert final.splitlines()[0] == "instructions: You review Rust code."
    (body,) = [json.loads(r["body"]) for r in requests]
    assert "model" not in body
    assert body["prompt"] == {"id": "pmpt_coder", "variables": {"language": "Rust"}}


class Forecast(BaseModel):
    city: str
    days: int = Field(ge=1, le=7)
    unit: Literal["c", "f"]


@function_tool
def forecast(request: Forecast, hourly: bool) -> str:
    """The forecast for a city."""
    calls.append(f"forecast:{request.city!r},{request.days},{request.unit},{hourly}")
    return f"{request.days} days of sun"


def test_agent_forced_call_gets_arguments_its_tool_accepts(any_backend: RunningServer) -> None:
    """Forced to call a tool that takes arguments (a nested model with a bounded
    integer and an enum), with no ``/call`` saying which: the model makes the
    simplest arguments the tool's schema accepts, so the SDK runs the tool instead
    of failing on invalid arguments. A named `tool_choice` picks the tool. On every
    backend."""
    calls.clear()

    async def main() -> list[str]:
        async with responses_websocket_session(
            api_key="sk-test", base_url=any_backend.base_url
        ) as session:
            outputs = []
            for choice in ("required", "forecast"):
                agent = Agent(
                    name="forecaster",
                    model=MODEL,
                    tools=[forecast, get_weather],
                    model_settings=ModelSettings(tool_choice=choice),
                )
                result = await session.run(agent, "Will it rain?")
                outputs.append(str(result.final_output))
            return outputs

    assert asyncio.run(main()) == ["forecast returned: 1 days of sun"] * 2
    assert calls == ["forecast:'',1,c,False"] * 2


@pytest.mark.parametrize("chained", [False, True], ids=["full-replay", "previous_response_id"])
def test_agent_with_a_reasoning_model(any_backend: RunningServer, chained: bool) -> None:
    """Each response starts with a reasoning item, as a reasoning model's does: the
    agent keeps them (and, replaying its history, sends them back, matched to the
    cached chain), and the loop goes on to its answer."""
    calls.clear()
    metrics = any_backend.server.metrics

    async def main() -> tuple[str, list[str]]:
        async with responses_websocket_session(
            api_key="sk-test", base_url=any_backend.base_url
        ) as session:
            result = await session.run(
                make_agent(),
                '/think Read it twice.\n/repeat 2 read_file {"path": "a.py"}',
                auto_previous_response_id=chained,
            )
            return str(result.final_output), [item.type for item in result.new_items]

    final, kinds = asyncio.run(main())
    assert final == "done after 2 calls"
    assert kinds == [
        *["reasoning_item", "tool_call_item", "tool_call_output_item"] * 2,
        "reasoning_item",
        "message_output_item",
    ]
    assert calls == ["read_file:a.py"] * 2
    if not chained:
        # Turns 2 and 3 re-sent the history, reasoning items included, all matched:
        # the user message, reasoning and call (3), then those, the output, a second
        # reasoning and call (6).
        assert metrics.prefix_matched_items == 3 + 6


@pytest.mark.parametrize("any_backend", ["builtin", "responses", "responses-ws"], indirect=True)
@pytest.mark.parametrize("chained", [False, True], ids=["full-replay", "previous_response_id"])
def test_agent_with_a_hosted_web_search(any_backend: RunningServer, chained: bool) -> None:
    """An agent with the hosted `WebSearchTool` beside a function tool: each response
    starts with a web search call (its progress events streamed, as OpenAI's are), the
    agent keeps the calls in its history (and, replaying it, sends them back, matched
    to the cached chain), and the loop goes on to its answer. (Chat Completions
    upstreams have no hosted tools.)"""
    calls.clear()
    metrics = any_backend.server.metrics
    agent = Agent(
        name="researcher",
        instructions="Search, then read.",
        model=MODEL,
        tools=[WebSearchTool(), read_file],
        model_settings=ModelSettings(store=True),
    )

    async def main() -> tuple[str, list[str], list[str]]:
        async with responses_websocket_session(
            api_key="sk-test", base_url=any_backend.base_url
        ) as session:
            result = session.run_streamed(
                agent,
                '/search warm caches\n/repeat 1 read_file {"path": "a.py"}',
                auto_previous_response_id=chained,
            )
            events = [
                event.data.type
                async for event in result.stream_events()
                if event.type == "raw_response_event"
            ]
            kinds = [item.type for item in result.new_items]
            return str(result.final_output), kinds, events

    final, kinds, events = asyncio.run(main())
    assert final == "done after 1 calls"
    assert kinds == [
        "tool_call_item",  # the web search
        "tool_call_item",
        "tool_call_output_item",
        "tool_call_item",  # the web search again, in the second response
        "message_output_item",
    ]
    assert events.count("response.web_search_call.searching") == 2
    assert calls == ["read_file:a.py"]
    if not chained:
        # The second turn re-sent the history, the search call included, all matched.
        assert metrics.prefix_matched_items == 3


class Weather(BaseModel):
    city: str
    sky: str


def test_agent_structured_output_after_a_tool_call(any_backend: RunningServer) -> None:
    """An agent with an `output_type` asks for JSON (`text.format`): it calls its tool,
    then parses the final answer into its type."""
    calls.clear()
    agent = Agent(
        name="forecaster",
        instructions="Answer with the forecast.",
        model=MODEL,
        tools=[get_weather],
        output_type=Weather,
        model_settings=ModelSettings(store=True),
    )
    prompt = '/call get_weather {"city": "Lima"}\n/reply {"city": "Lima", "sky": "sunny"}'

    async def main() -> object:
        async with responses_websocket_session(
            api_key="sk-test", base_url=any_backend.base_url
        ) as session:
            result = await session.run(agent, prompt, auto_previous_response_id=True)
            return result.final_output

    assert asyncio.run(main()) == Weather(city="Lima", sky="sunny")
    assert calls == ["get_weather:Lima"]


def test_agent_handoff_changes_instructions_and_tools_mid_chain(
    any_backend: RunningServer,
) -> None:
    """A handoff: the triage agent's response calls the handoff tool; the next turn,
    chained to it, carries the specialist's instructions and tools instead. The
    specialist's model must see the specialist's settings with the whole conversation."""
    specialist = Agent(
        name="specialist",
        instructions="You are the specialist.",
        model=MODEL,
        tools=[read_file],
        model_settings=ModelSettings(store=False),
    )
    triage = Agent(
        name="triage",
        instructions="You route requests.",
        model=MODEL,
        tools=[get_weather],
        handoffs=[specialist],
        model_settings=ModelSettings(store=False),
    )

    async def main() -> tuple[str, str, str]:
        async with responses_websocket_session(
            api_key="sk-test", base_url=any_backend.base_url
        ) as session:
            result = await session.run(
                triage, "/call transfer_to_specialist {}", auto_previous_response_id=True
            )
            after = await session.run(
                result.last_agent, "/transcript", previous_response_id=result.last_response_id
            )
            return result.last_agent.name, str(result.final_output), str(after.final_output)

    last_agent, final, transcript = asyncio.run(main())
    assert last_agent == "specialist"
    # The specialist's model could not call the triage agent's handoff tool (not one of
    # its tools) and said so: the second turn carried the specialist's tools.
    assert final == (
        "Cannot call transfer_to_specialist: it is not one of this request's function tools."
    )
    # And the chain held through the change of instructions and tools.
    lines = transcript.splitlines()
    assert lines[0] == "instructions: You are the specialist."
    assert lines[1] == "user: /call transfer_to_specialist {}"
    kind, name, call_id = lines[2].split()
    assert (kind, name) == ("function_call", "transfer_to_specialist")
    assert lines[3].startswith(f"function_call_output {call_id} ")
    assert lines[4:] == [f"assistant: {final}", "user: /transcript"]


def test_agent_session_compacts_through_the_server(
    any_backend: RunningServer, tmp_path: Path
) -> None:
    """`OpenAIResponsesCompactionSession` calls `responses.compact` once a run leaves 10
    or more items besides user messages; the session then holds the window, and the
    next run's model reads the summary in place of the history."""
    server = any_backend
    calls.clear()

    async def main() -> tuple[list[Any], str]:
        client = AsyncOpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0)
        store = SQLiteSession("coder", tmp_path / "sessions.db")
        memory = OpenAIResponsesCompactionSession("coder", store, client=client, model="gpt-4.1")
        try:
            async with responses_websocket_session(
                api_key="sk-test", base_url=server.base_url
            ) as session:
                agent = make_agent()
                first = await session.run(
                    agent, '/repeat 5 read_file {"path": "src/main.py"}', session=memory
                )
                assert first.final_output == "done after 5 calls"
                kept = await memory.get_items()
                second = await session.run(agent, "/transcript", session=memory)
        finally:
            await client.close()
            store.close()  # its SQLite connections (one per thread that used it)
        return kept, str(second.final_output)

    kept, transcript = asyncio.run(main())
    assert calls == ["read_file:src/main.py"] * 5
    # The window: the user's message, then the compaction item for the rest.
    assert [item.get("type", "message") for item in kept] == ["message", "compaction"]
    backend = server.server.engine.backend.name
    if backend in RESPONSES_UPSTREAMS:  # the upstream compacted it, its own way
        summary = sim_compaction_summary(kept[1])
    else:
        summary = compaction_items.summary_of(kept[1])
    assert summary is not None
    assert summary.count("function_call read_file") == 5
    assert summary.endswith("assistant: done after 5 calls")
    if backend == "mock":
        in_place = "compaction: " + summary
    elif backend in RESPONSES_UPSTREAMS:  # its own item back: listed by its type
        in_place = "compaction"
    else:
        in_place = "user: " + compaction_items.SUMMARY_HEADER + summary
    assert transcript == "\n".join(
        [
            "instructions: You are a coding agent.",
            '/repeat 5 read_file {"path": "src/main.py"}'.join(("user: ", "")),
            in_place,
            "user: /transcript",
        ]
    )


@function_tool
def read_log(path: str) -> str:
    """Read a long log file."""
    calls.append(f"read_log:{path}")
    return " ".join(f"line{i}" for i in range(600))


@pytest.mark.parametrize("chained", [False, True], ids=["full-replay", "previous_response_id"])
def test_agent_loop_with_server_side_compaction(any_backend: RunningServer, chained: bool) -> None:
    """`ModelSettings.context_management`: the turn that brings a long tool output
    past the threshold compacts; the agent gets its answer, and carries on from the
    compaction item, re-sending its history or chaining by id."""
    server = any_backend
    calls.clear()
    agent = Agent(
        name="coder",
        instructions="You are a coding agent.",
        model=MODEL,
        tools=[read_log],
        model_settings=ModelSettings(
            store=True, context_management=[{"type": "compaction", "compact_threshold": 1000}]
        ),
    )

    async def main() -> tuple[Any, Any]:
        async with responses_websocket_session(
            api_key="sk-test", base_url=server.base_url
        ) as session:
            first = await session.run(
                agent, '/call read_log {"path": "ci.log"}', auto_previous_response_id=chained
            )
            again = [*first.to_input_list(), {"role": "user", "content": "/transcript"}]
            second = await session.run(agent, again, auto_previous_response_id=chained)
            return first, second

    first, second = asyncio.run(main())
    assert calls == ["read_log:ci.log"]
    assert first.final_output.startswith("read_log returned: line0 line1")
    output_types = [[item.type for item in raw.output] for raw in first.raw_responses]
    assert output_types == [["function_call"], ["compaction", "message"]]
    lines = str(second.final_output).splitlines()
    assert lines[:2] == [
        "instructions: You are a coding agent.",
        'user: /call read_log {"path": "ci.log"}',
    ]
    assert lines[-1] == "user: /transcript"
    assert any(line.startswith(("compaction: ", "user: Summary of the earlier")) for line in lines)
