"""The simulated upstream on its own: its latency model, its prefix cache, and its
non-streaming answers (checked against the openai SDK's types)."""

from __future__ import annotations

import json
import random
import time
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx2 as httpx
import pytest
from openai.types.chat import ChatCompletion
from openai.types.chat.chat_completion import Choice
from openai.types.responses import Response
from pydantic import BaseModel
from websockets.sync.client import connect

from tests.support import FUNCTION_TOOLS, check_sse_event
from tests.upstream_support import RunningSim, running_sim, sim_compaction_summary
from warmsocket import mockmodel
from warmsocket.prefixhash import PromptHasher, count_tokens
from warmsocket.simulate import server as sim_server
from warmsocket.simulate.model import (
    LatencyModel,
    Prefill,
    PrefixCache,
    canonical_items,
    seal_reasoning,
    unsealed_reasoning,
)

# -- the latency model ----------------------------------------------------------------------


def test_latency_model_arithmetic() -> None:
    instant = LatencyModel()
    assert instant.first_token_seconds(10_000) == 0.0
    assert instant.first_token_seconds(10_000, sleep_ms=250) == pytest.approx(0.25)
    assert instant.decode_seconds("many words here") == 0.0
    model = LatencyModel(
        overhead_ms=40, prefill_tokens_per_second=2_000, decode_tokens_per_second=50
    )
    # overhead + uncached tokens / prefill rate (+ any /sleep)
    assert model.first_token_seconds(0) == pytest.approx(0.040)
    assert model.first_token_seconds(500) == pytest.approx(0.040 + 0.25)
    assert model.first_token_seconds(500, sleep_ms=100) == pytest.approx(0.140 + 0.25)
    # one token / decode rate per token of the delta, at least one token
    text = " the quick brown fox jumps over the lazy dog"
    assert count_tokens(text) > 1
    assert model.decode_seconds(text) == pytest.approx(count_tokens(text) / 50)
    assert model.decode_seconds("") == pytest.approx(1 / 50)
    overhead_only = LatencyModel(overhead_ms=15)
    assert overhead_only.first_token_seconds(10**6) == pytest.approx(0.015)


LATENCY = LatencyModel(
    overhead_ms=20, prefill_tokens_per_second=10_000, decode_tokens_per_second=100
)
LONG_INSTRUCTIONS = "You are the build agent of a large repository. " * 300  # ~3,000 tokens
EARLY = 0.005
"""How early the simulator's event loop may wake (libuv timers have ms resolution)."""
LATE = 0.2
"""Scheduling slack on a busy machine; well below what a wrong formula would add."""


def ask(sim: RunningSim, api: str, text: str) -> dict[str, Any]:
    """One streamed request straight to the simulator; returns its /stats record."""
    url = f"http://127.0.0.1:{sim.port}/v1"
    if api == "chat":
        messages = [
            {"role": "system", "content": LONG_INSTRUCTIONS},
            {"role": "user", "content": text},
        ]
        body = {"model": "m", "messages": messages, "stream": True}
        with httpx.Client(base_url=url, timeout=10) as http:
            answer = http.post("/chat/completions", json=body)
        assert answer.status_code == 200 and answer.text.endswith("data: [DONE]\n\n")
    elif api == "responses":
        body = {"model": "m", "instructions": LONG_INSTRUCTIONS, "input": text, "stream": True}
        with httpx.Client(base_url=url, timeout=10) as http:
            answer = http.post("/responses", json=body)
        assert answer.status_code == 200 and "event: response.completed" in answer.text
    else:
        with connect(url.replace("http", "ws") + "/responses", open_timeout=5) as ws:
            ws.send(
                json.dumps(
                    {
                        "type": "response.create",
                        "model": "m",
                        "instructions": LONG_INSTRUCTIONS,
                        "input": text,
                    }
                )
            )
            while json.loads(ws.recv(timeout=10))["type"] != "response.completed":
                pass
    record: dict[str, Any] = sim.stats()["requests"][-1]
    assert record["status"] == 200 and record["finished"] is not None
    return record


@pytest.mark.parametrize("api", ["chat", "responses", "responses-ws"])
def test_a_running_simulator_follows_its_latency_model(api: str) -> None:
    """The first output comes overhead + uncached prompt tokens / prefill rate after
    the request was read; then each delta takes its tokens / decode rate. A repeated
    prompt is cached, so only its new tail is prefilled."""
    with running_sim(latency=LATENCY) as sim:
        cold = ask(sim, api, "hello")
        warm = ask(sim, api, "hello again")
    assert cold["cached_tokens"] == 0 and cold["prompt_tokens"] > 2_500
    assert warm["prompt_tokens"] - warm["cached_tokens"] < 40  # the instructions are cached
    for record, said in [(cold, "hello"), (warm, "hello again")]:
        uncached = record["prompt_tokens"] - record["cached_tokens"]
        first = 0.020 + uncached / 10_000
        assert first - EARLY <= record["first_token"] - record["started"] < first + LATE
        deltas = mockmodel.text_deltas(f"You said: {said}")
        decode = sum(LATENCY.decode_seconds(delta) for delta in deltas)
        assert decode >= 0.03
        took = record["finished"] - record["first_token"]
        assert decode - EARLY * len(deltas) <= took < decode + LATE


PREFILL_ONLY = LatencyModel(prefill_tokens_per_second=20_000)


def test_a_prompt_is_cached_only_once_its_prefill_has_run() -> None:
    """Two identical prompts sent at once both pay the prefill (neither's blocks are
    cached before its prefill ends), and a request refused for the context window or
    cut off during its prefill caches nothing: the same prompt again pays in full."""

    def body(instructions: str, **more: Any) -> dict[str, Any]:
        text = instructions + LONG_INSTRUCTIONS  # ~3,000 tokens: 0.15 s of prefill
        return {"model": "m", "instructions": text, "input": "hi", "stream": True, **more}

    def records_of(sim: RunningSim, instructions: str) -> list[dict[str, Any]]:
        return [
            r
            for r in sim.stats(bodies=True)["requests"]
            if json.loads(r["body"])["instructions"].startswith(instructions)
        ]

    with (
        running_sim(latency=PREFILL_ONLY, max_model_len=4_000) as sim,
        httpx.Client(base_url=sim.base_url, timeout=10) as http,
    ):
        with ThreadPoolExecutor(2) as pool:
            same = body("Twins. ")
            answers = list(pool.map(lambda _n: http.post("/responses", json=same), range(2)))
        assert [a.status_code for a in answers] == [200, 200]
        refused = http.post("/responses", json=body("Refused. ", max_output_tokens=2_000))
        assert refused.status_code == 400
        http.post("/responses", json=body("Refused. "))
        with pytest.raises(httpx.ReadTimeout):  # the client gives up during the prefill
            http.post("/responses", json=body("Cut. "), timeout=httpx.Timeout(10, read=0.05))
        for _wait in range(200):  # until the simulator has seen the client go
            if records_of(sim, "Cut. ")[0]["aborted"] is not None:
                break
            time.sleep(0.005)
        http.post("/responses", json=body("Cut. "))
        twins = records_of(sim, "Twins. ")
        after_refusal = records_of(sim, "Refused. ")[-1]
        after_cut = records_of(sim, "Cut. ")[-1]
    for record in twins:
        assert record["cached_tokens"] == 0
        assert record["first_token"] - record["started"] >= record["prompt_tokens"] / 20_000 - EARLY
    assert after_refusal["status"] == 200 and after_refusal["cached_tokens"] == 0
    assert after_cut["status"] == 200 and after_cut["cached_tokens"] == 0


WHOLE = LatencyModel(
    overhead_ms=20, prefill_tokens_per_second=10_000, decode_tokens_per_second=1_000
)
LONG_REPLY = "/reply " + " ".join(f"word{i}" for i in range(60))  # ~120 output tokens


def test_non_streamed_answers_take_their_decode_time_too() -> None:
    """A non-streamed answer arrives when a streamed one would end: overhead + prefill
    of the uncached prompt + its output tokens / decode rate. A compaction likewise:
    the input's prefill, then the summary's decode time."""
    messages = [{"role": "user", "content": LONG_REPLY}]
    compact_input = [
        {"type": "message", "role": "user", "content": " ".join(f"fact{i}" for i in range(80))}
    ]
    with running_sim(latency=WHOLE) as sim, httpx.Client(base_url=sim.base_url, timeout=10) as h:
        assert h.post("/chat/completions", json={"model": "m", "messages": messages}).is_success
        chat = sim.stats()["requests"][-1]
        assert h.post("/responses", json={"model": "m", "input": LONG_REPLY + " again"}).is_success
        responses = sim.stats()["requests"][-1]
        compacted = h.post("/responses/compact", json={"model": "m", "input": compact_input})
        compact = sim.stats()["requests"][-1]
    for record in (chat, responses):
        assert record["stream"] is False and record["output_tokens"] > 100
        uncached = record["prompt_tokens"] - record["cached_tokens"]
        took = record["finished"] - record["started"]
        whole = 0.020 + uncached / 10_000 + record["output_tokens"] / 1_000
        assert whole - EARLY <= took < whole + LATE, (record["api"], took, whole)
    summary = sim_compaction_summary(compacted.json()["output"][-1])
    assert summary is not None
    prompt_tokens, _blocks = PromptHasher(BLOCK).hash(None, [], canonical_items(compact_input))
    whole = 0.020 + prompt_tokens / 10_000 + count_tokens(summary) / 1_000
    took = compact["finished"] - compact["started"]
    assert count_tokens(summary) > 80 and whole - EARLY <= took < whole + LATE, (took, whole)


# -- the prefix cache ---------------------------------------------------------------------------

BLOCK = 16


def prompt(name: str, words: int = 60) -> tuple[str, list[Any], list[bytes]]:
    """A prompt of its own from its first block on (8 full blocks for 60 words)."""
    text = " ".join(f"{name}{i}" for i in range(words))
    return f"Agent {name}.", [], canonical_items([{"role": "user", "content": text}])


def cached(cache: PrefixCache, instructions: str, tools: list[Any], items: list[bytes]) -> str:
    """Which of the prompt's full blocks the cache holds: '1' held, '.' not."""
    _tokens, keys = PromptHasher(BLOCK).hash(instructions, tools, items)
    return "".join("1" if key in cache else "." for key in keys)


def test_the_prefix_cache_evicts_least_recently_used_leaves_first() -> None:
    cache = PrefixCache(capacity=20, block_tokens=BLOCK)
    a, b, c = prompt("a"), prompt("b"), prompt("c")
    assert cached(cache, *a) == "." * 8
    assert cache.prefill(*a).cached_tokens == 0
    assert cache.prefill(*b).cached_tokens == 0
    assert cache.prefill(*a).cached_tokens == 8 * BLOCK  # used again: now newer than b
    assert len(cache) == 16
    assert cache.prefill(*c).cached_tokens == 0
    # 24 blocks > 20: back to 20 by dropping the 4 least recently used, which are b's
    # last blocks (a block is marked used after the blocks that follow it).
    assert len(cache) == 20
    assert (cached(cache, *a), cached(cache, *b), cached(cache, *c)) == (
        "11111111",
        "1111....",
        "11111111",
    )
    assert cache.prefill(*b).cached_tokens == 4 * BLOCK


class CountingTable(OrderedDict[bytes, Any]):
    """A prefix cache's block table that counts the entries walked through (iterating
    it, or its keys, values or items) and the blocks evicted from it."""

    walked = 0
    evicted = 0

    def __iter__(self) -> Iterator[bytes]:
        self.walked += len(self)
        return super().__iter__()

    def keys(self) -> Any:
        self.walked += len(self)
        return super().keys()

    def values(self) -> Any:
        self.walked += len(self)
        return super().values()

    def items(self) -> Any:
        self.walked += len(self)
        return super().items()

    def popitem(self, last: bool = True) -> tuple[bytes, Any]:
        self.evicted += 1
        return super().popitem(last)

    def __delitem__(self, key: bytes) -> None:
        self.evicted += 1
        super().__delitem__(key)


def test_the_prefix_cache_evicts_without_walking_its_table() -> None:
    """Going over capacity evicts one least recently used block per block added, and
    walks none of the table (sorting it all stalled every stream for half a second at
    the default --cache-blocks); what is cached of any prompt stays a prefix, while
    requests look up and fill in any order."""
    rng = random.Random(7)
    capacity = 2_000
    cache = PrefixCache(capacity=capacity, block_tokens=BLOCK)
    table = cache._blocks = CountingTable()  # how much work eviction does
    chains = [[f"root{n}".encode() for n in range(capacity)]]
    cache.fill(Prefill(0, 0, chains[0]))
    assert len(cache) == capacity and table.evicted == 0
    in_flight: list[list[bytes]] = []
    for step in range(600):
        base = rng.choice(chains)  # continue or fork a cached prompt by a few blocks
        new = [f"s{step}b{n}".encode() for n in range(rng.randint(1, 4))]
        in_flight.append(base[: rng.randint(1, len(base))] + new)
        if rng.random() < 0.5:  # a prefill ends: its blocks are cached now
            chain = in_flight.pop(rng.randrange(len(in_flight)))
            before = len(cache) + sum(key not in cache for key in chain)
            evicted = table.evicted
            cache.fill(Prefill(0, 0, chain))
            assert len(cache) == capacity
            assert table.evicted - evicted == before - capacity  # only as many as needed
            chains.append(chain)
        for chain in chains[-8:]:
            held = "".join("1" if key in cache else "." for key in chain)
            assert "1" not in held.lstrip("1"), held  # a prefix: no hole, no tail alone
    assert table.walked == 0 and table.evicted > 500


def test_the_prefix_cache_stays_within_capacity_and_caches_prefixes() -> None:
    """Conversations that grow, fork and share instructions, through a small cache:
    after every request the cache holds at most its capacity, what it holds of any
    prompt is a prefix of its blocks, and a request is told exactly that prefix."""
    rng = random.Random(5)
    capacity = 24
    cache = PrefixCache(capacity=capacity, block_tokens=BLOCK)
    prompts: list[tuple[str, list[Any], list[bytes]]] = []
    for step in range(300):
        if prompts and rng.random() < 0.6:  # continue (or fork) an earlier conversation
            instructions, tools, items = rng.choice(prompts)
            keep = rng.randint(max(1, len(items) - 2), len(items))
            items = items[:keep]
        else:
            instructions, tools, items = f"System {rng.randint(0, 3)}.", [], []
            if rng.random() < 0.5:
                tools = [FUNCTION_TOOLS[rng.randint(0, 1)]]
        words = " ".join(f"w{step}_{i}" for i in range(rng.randint(1, 40)))
        items = [*items, *canonical_items([{"role": "user", "content": words}])]
        held = cached(cache, instructions, tools, items)
        leading = len(held) - len(held.lstrip("1"))
        result = cache.prefill(instructions, tools, items)
        assert result.cached_tokens == min(result.prompt_tokens, leading * BLOCK)
        assert len(cache) <= capacity
        prompts.append((instructions, tools, items))
        for earlier in prompts[-40:]:
            held = cached(cache, *earlier)
            assert "1" not in held.lstrip("1"), held  # a prefix: no hole, no tail alone
    assert cache.lookups == 300 and 0 < cache.hits < 300


# -- non-streaming answers ------------------------------------------------------------------------

PARALLEL = '/call get_weather {"city": "Lima"}\n/call read_file {"path": "a.txt"}'
CHAT_TOOLS = [
    {"type": "function", "function": {k: v for k, v in tool.items() if k != "type"}}
    for tool in FUNCTION_TOOLS
]


def undeclared(model: Any, path: str = "$") -> list[tuple[str, dict[str, Any]]]:
    """Fields the SDK's type does not declare, anywhere in a validated object."""
    found: list[tuple[str, dict[str, Any]]] = []
    if isinstance(model, BaseModel):
        if model.model_extra:
            found.append((path, model.model_extra))
        for name in type(model).model_fields:
            found += undeclared(getattr(model, name), f"{path}.{name}")
    elif isinstance(model, list):
        for index, value in enumerate(model):
            found += undeclared(value, f"{path}[{index}]")
    return found


def calls_of(choice: Choice) -> list[tuple[str, str, str]]:
    calls = choice.message.tool_calls or []
    return [
        (c["type"], c["function"]["name"], c["function"]["arguments"])
        for c in (call.model_dump(mode="json") for call in calls)
    ]


def test_non_streaming_chat_completions() -> None:
    with running_sim() as sim, httpx.Client(base_url=sim.base_url, timeout=10) as http:

        def complete(messages: list[dict[str, Any]]) -> ChatCompletion:
            answer = http.post(
                "/chat/completions", json={"model": "m", "messages": messages, "tools": CHAT_TOOLS}
            )
            assert answer.status_code == 200
            assert answer.headers["content-type"].startswith("application/json")
            completion = ChatCompletion.model_validate(answer.json())
            assert undeclared(completion) == []
            assert completion.object == "chat.completion" and completion.model == "m"
            # usage: what /stats recorded for this request
            record = sim.stats()["requests"][-1]
            assert record["stream"] is False
            usage = completion.usage
            assert usage is not None and usage.prompt_tokens_details is not None
            assert (
                usage.prompt_tokens,
                usage.prompt_tokens_details.cached_tokens,
                usage.completion_tokens,
            ) == (record["prompt_tokens"], record["cached_tokens"], record["output_tokens"])
            assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
            assert record["output_tokens"] > 0
            return completion

        system = {"role": "system", "content": "Be brief."}
        text = complete([system, {"role": "user", "content": "hello"}])
        (choice,) = text.choices
        assert (choice.index, choice.finish_reason) == (0, "stop")
        assert choice.message.role == "assistant" and choice.message.content == "You said: hello"
        assert choice.message.tool_calls is None
        assert sim.stats()["requests"][-1]["output_tokens"] == count_tokens("You said: hello")

        one = complete([system, {"role": "user", "content": '/call get_weather {"city": "Oslo"}'}])
        (choice,) = one.choices
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert calls_of(choice) == [("function", "get_weather", '{"city": "Oslo"}')]

        user = {"role": "user", "content": PARALLEL}
        parallel = complete([system, user])
        (choice,) = parallel.choices
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert calls_of(choice) == [
            ("function", "get_weather", '{"city": "Lima"}'),
            ("function", "read_file", '{"path": "a.txt"}'),
        ]
        calls = choice.message.tool_calls or []
        assert len({c.id for c in calls}) == 2
        assert sim.stats()["requests"][-1]["output_tokens"] == count_tokens(
            'get_weather{"city": "Lima"}read_file{"path": "a.txt"}'
        )
        # The calls' ids work when their results come back (in the other order).
        assistant = choice.message.model_dump(mode="json", exclude_none=True)
        results = [
            {"role": "tool", "tool_call_id": calls[1].id, "content": "text of a"},
            {"role": "tool", "tool_call_id": calls[0].id, "content": "sunny"},
        ]
        back = complete([system, user, assistant, *results])
        assert back.choices[0].message.content == (
            "get_weather returned: sunny; read_file returned: text of a"
        )
        assert sim.stats()["requests"][-1]["cached_tokens"] > 0


def test_non_streaming_responses() -> None:
    with running_sim() as sim, httpx.Client(base_url=sim.base_url, timeout=10) as http:

        def create(input: Any) -> tuple[Response, list[dict[str, Any]]]:
            """The validated Response, and its output items as JSON."""
            body = {
                "model": "m",
                "instructions": "Be brief.",
                "input": input,
                "tools": FUNCTION_TOOLS,
                "store": False,
            }
            answer = http.post("/responses", json=body)
            assert answer.status_code == 200
            assert answer.headers["content-type"].startswith("application/json")
            response = Response.model_validate(answer.json())
            # `store` is in the API's Response object; this SDK's type does not declare it.
            assert undeclared(response) == [("$", {"store": False})]
            assert (response.object, response.status, response.model) == (
                "response",
                "completed",
                "m",
            )
            assert response.id.startswith("resp_") and response.error is None
            assert response.instructions == "Be brief." and response.parallel_tool_calls
            tools = [tool.model_dump(mode="json", exclude_none=True) for tool in response.tools]
            assert tools == FUNCTION_TOOLS
            record = sim.stats()["requests"][-1]
            assert record["stream"] is False
            usage = response.usage
            assert usage is not None
            assert (
                usage.input_tokens,
                usage.input_tokens_details.cached_tokens,
                usage.output_tokens,
            ) == (record["prompt_tokens"], record["cached_tokens"], record["output_tokens"])
            assert usage.total_tokens == usage.input_tokens + usage.output_tokens
            assert record["output_tokens"] > 0
            output = [item.model_dump(mode="json", exclude_none=True) for item in response.output]
            assert all(item["status"] == "completed" for item in output)
            return response, output

        text, output = create("hello")
        assert text.output_text == "You said: hello"
        assert [(o["type"], o["role"], o["content"]) for o in output] == [
            (
                "message",
                "assistant",
                [
                    {
                        "type": "output_text",
                        "text": "You said: hello",
                        "annotations": [],
                        "logprobs": [],
                    }
                ],
            )
        ]

        _one, output = create('/call get_weather {"city": "Oslo"}')
        assert [(o["type"], o["name"], o["arguments"]) for o in output] == [
            ("function_call", "get_weather", '{"city": "Oslo"}')
        ]

        user = {"role": "user", "content": PARALLEL}
        _parallel, calls = create([user])
        assert [(o["type"], o["name"], o["arguments"]) for o in calls] == [
            ("function_call", "get_weather", '{"city": "Lima"}'),
            ("function_call", "read_file", '{"path": "a.txt"}'),
        ]
        assert len({o["call_id"] for o in calls}) == len({o["id"] for o in calls}) == 2
        results = [
            {"type": "function_call_output", "call_id": calls[1]["call_id"], "output": "text of a"},
            {"type": "function_call_output", "call_id": calls[0]["call_id"], "output": "sunny"},
        ]
        back, _output = create([user, *calls, *results])
        assert back.output_text == "get_weather returned: sunny; read_file returned: text of a"
        assert sim.stats()["requests"][-1]["cached_tokens"] > 0


def test_call_ids_depend_on_the_conversation_not_its_json() -> None:
    """The same conversation gets the same call id however its JSON is spaced or
    escaped, whatever ids and statuses its items carry, over HTTP or WebSocket; a
    different conversation gets another."""
    ask_call = {"type": "message", "role": "user", "content": '/call get_weather {"city": "Oslo"}'}
    body = {"model": "m", "tools": FUNCTION_TOOLS, "input": [ask_call]}
    with_ids = {**body, "input": [{**ask_call, "id": "msg_1", "status": "completed"}]}
    sent = [
        json.dumps(body, separators=(",", ":")).encode(),
        json.dumps(body).encode(),
        json.dumps(body, indent=2).encode(),
        json.dumps(body, ensure_ascii=False, separators=(" ,", " : ")).encode(),
        json.dumps(with_ids).encode(),
    ]
    other = {**body, "input": [{**ask_call, "content": '/call get_weather {"city": "Rome"}'}]}
    with running_sim() as sim, httpx.Client(base_url=sim.base_url, timeout=10) as http:
        headers = {"content-type": "application/json"}
        ids = [http.post("/responses", content=raw, headers=headers).json() for raw in sent]
        with connect(sim.base_url.replace("http", "ws") + "/responses", open_timeout=5) as ws:
            ws.send(json.dumps({"type": "response.create", **body}, indent=1))
            while (event := json.loads(ws.recv(timeout=10)))["type"] != "response.completed":
                pass
        elsewhere = http.post("/responses", json=other).json()
    call_ids = {answer["output"][0]["call_id"] for answer in ids}
    assert call_ids == {event["response"]["output"][0]["call_id"]}
    assert elsewhere["output"][0]["call_id"] not in call_ids


def test_an_answer_over_the_output_limit_is_cut_short() -> None:
    """As an inference server stops at its token limit: the text cut to fit, with
    `finish_reason: length` (chat, streamed or not) or `response.incomplete`."""
    text = "word " * 50
    with running_sim() as sim, httpx.Client(base_url=sim.base_url, timeout=10) as http:
        messages = [{"role": "user", "content": text}]
        chat = http.post("/chat/completions", json={"model": "m", "messages": messages})
        for limit in ("max_tokens", "max_completion_tokens"):
            body = {"model": "m", "messages": messages, limit: 16}
            cut = ChatCompletion.model_validate(http.post("/chat/completions", json=body).json())
            choice = cut.choices[0]
            assert choice.finish_reason == "length"
            assert cut.usage is not None and cut.usage.completion_tokens <= 16
            full = chat.json()["choices"][0]["message"]["content"]
            assert choice.message.content and full.startswith(choice.message.content)
            assert count_tokens(choice.message.content) <= 16 < count_tokens(full)
        body = {"model": "m", "input": text, "max_output_tokens": 16}
        response = Response.model_validate(http.post("/responses", json=body).json())
        within = {"model": "m", "input": "hi", "max_output_tokens": 16}
        fits = Response.model_validate(http.post("/responses", json=within).json())
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.output[0].type == "message" and response.output[0].status == "incomplete"
    assert count_tokens(response.output_text) <= 16
    assert fits.status == "completed" and fits.output[0].status == "completed"


def test_reasoning_is_sealed_and_a_tampered_item_is_refused() -> None:
    # Like OpenAI's `encrypted_content`: a reasoning item comes back only as it went out.
    with running_sim() as sim, httpx.Client(base_url=sim.base_url, timeout=10) as http:
        body = {
            "model": "m",
            "input": "/think Step one.\nhi",
            "store": False,
            "include": ["reasoning.encrypted_content"],
        }
        answer = http.post("/responses", json=body)
        assert answer.status_code == 200
        reasoning, message = answer.json()["output"]
        assert reasoning["summary"] == [{"type": "summary_text", "text": "Step one."}]
        assert reasoning["encrypted_content"] == seal_reasoning("Step one.")
        history = [{"role": "user", "content": "/think Step one.\nhi"}, reasoning, message]
        again = {"model": "m", "input": [*history, {"role": "user", "content": "ok"}]}
        assert http.post("/responses", json=again).status_code == 200
        reasoning["summary"][0]["text"] = "Step two."  # no longer what was sealed
        refused = http.post("/responses", json=again)
        assert refused.status_code == 400
        error = refused.json()["error"]
        assert (error["code"], error["param"]) == ("invalid_encrypted_content", "input")
        assert reasoning["id"] in error["message"]
        assert sim.stats()["requests"][-1]["status"] == 400
    assert unsealed_reasoning([{"type": "reasoning", "summary": []}]) is None  # nothing sealed


@pytest.mark.parametrize("store", [False, True])
def test_reasoning_without_its_content_is_an_unknown_item(store: bool) -> None:
    """As OpenAI answers: without `include: ["reasoning.encrypted_content"]` a
    reasoning item comes without its content, and sent back so (only its id) it is
    not found, over HTTP and in WebSocket mode; with the content it is read."""
    first = {"model": "m", "input": "/think Step one.\nhi", "store": store}
    with running_sim() as sim, httpx.Client(base_url=sim.base_url, timeout=10) as http:
        reasoning, message = http.post("/responses", json=first).json()["output"]
        assert "encrypted_content" not in reasoning and reasoning["id"].startswith("rs_")
        history = [{"role": "user", "content": "/think Step one.\nhi"}, reasoning, message]
        again = {"model": "m", "input": [*history, {"role": "user", "content": "ok"}]}
        refused = http.post("/responses", json={**again, "store": store})
        with connect(sim.base_url.replace("http", "ws") + "/responses", open_timeout=5) as ws:
            ws.send(json.dumps({"type": "response.create", **again, "store": store}))
            event = json.loads(ws.recv(timeout=10))
        sealed = {**reasoning, "encrypted_content": seal_reasoning("Step one.")}
        read = {**again, "input": [history[0], sealed, message, again["input"][-1]]}
        assert http.post("/responses", json=read).status_code == 200
    assert refused.status_code == 404
    error = refused.json()["error"]
    assert (error["code"], error["param"]) == (None, "input")
    assert error["message"].startswith(f"Item with id '{reasoning['id']}' not found.")
    assert ("Items are not persisted when `store` is set to false" in error["message"]) is (
        not store
    )
    assert (event["type"], event["status"], event["error"]["message"]) == (
        "error",
        404,
        error["message"],
    )
    assert unsealed_reasoning([{"type": "reasoning", "encrypted_content": 5}]) == "input[0]"


def test_custom_tool_calls_stream_in_openais_events() -> None:
    # What warmsocket relays: the simulator's own events, checked against the SDK's types.
    tools = [{"type": "custom", "name": "apply_patch"}]
    body = {"model": "m", "input": "/custom apply_patch a b c", "tools": tools, "stream": True}
    with running_sim() as sim, httpx.Client(base_url=sim.base_url, timeout=10) as http:
        answer = http.post("/responses", json=body)
    events = [
        json.loads(line[6:]) for line in answer.text.splitlines() if line.startswith("data: ")
    ]
    for event in events:
        check_sse_event(event)
    kinds = [e["type"] for e in events]
    assert kinds[2:-1] == [
        "response.output_item.added",
        *["response.custom_tool_call_input.delta"] * 3,
        "response.custom_tool_call_input.done",
        "response.output_item.done",
    ]
    assert [e["delta"] for e in events[3:6]] == ["a", " b", " c"]
    call = events[-2]["item"]
    assert (call["type"], call["name"], call["input"]) == (
        "custom_tool_call",
        "apply_patch",
        "a b c",
    )
    assert events[-1]["response"]["output"] == [call]


def test_web_search_streams_in_openais_events() -> None:
    # What warmsocket relays: the simulator's own events, checked against the SDK's types.
    tools = [{"type": "web_search"}]
    body = {"model": "m", "input": "/search warm caches", "tools": tools, "stream": True}
    with running_sim() as sim, httpx.Client(base_url=sim.base_url, timeout=10) as http:
        answer = http.post("/responses", json=body)
        whole = http.post("/responses", json={**body, "stream": False}).json()
        assert [r["status"] for r in sim.stats()["requests"]] == [200, 200]
    events = [
        json.loads(line[6:]) for line in answer.text.splitlines() if line.startswith("data: ")
    ]
    for event in events:
        check_sse_event(event)
    kinds = [e["type"] for e in events]
    assert kinds[2:7] == [
        "response.output_item.added",
        "response.web_search_call.in_progress",
        "response.web_search_call.searching",
        "response.web_search_call.completed",
        "response.output_item.done",
    ]
    search = events[6]["item"]
    assert search["status"] == "completed" and search["action"]["query"] == "warm caches"
    assert all(e["item_id"] == search["id"] and e["output_index"] == 0 for e in events[3:6])
    output = events[-1]["response"]["output"]
    assert [o["type"] for o in output] == ["web_search_call", "message"]
    assert output[0] == search
    # The answer cites the search after its text, as OpenAI's do.
    text = output[1]["content"][0]["text"]
    citation = mockmodel.search_citation("warm caches", text)
    assert output[1]["content"][0]["annotations"] == [citation]
    assert (
        kinds.index("response.output_text.annotation.added")
        == kinds.index("response.output_text.done") - 1
    )
    # Not streamed: the same output, a new call id.
    assert [o["type"] for o in whole["output"]] == ["web_search_call", "message"]


def test_stats_keep_the_most_recent_requests_and_count_them_all(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A long run keeps only the last `KEPT_REQUESTS` records; `since` still counts
    from the first request, and `requests_total` counts every one."""
    monkeypatch.setattr(sim_server, "KEPT_REQUESTS", 3)
    with running_sim() as sim:
        replies = [ask(sim, "chat", f"turn {n}")["reply"] for n in range(5)]
        report = sim.stats()
        assert report["requests_total"] == 5
        assert [r["seq"] for r in report["requests"]] == [2, 3, 4]
        assert [r["reply"] for r in report["requests"]] == replies[2:]
        assert [r["seq"] for r in sim.stats(since=4)["requests"]] == [4]
        assert [r["seq"] for r in sim.stats(since=1)["requests"]] == [2, 3, 4]
        assert sim.stats(since=5)["requests"] == []


def test_reset_stats_keeps_counting_the_open_connections() -> None:
    """`{"reset_stats": true}` starts the request counts afresh, but the connections
    open then are still open: `connections_open` counts them, and drops to 0 (not
    below) once they close."""
    with running_sim() as sim:
        with httpx.Client(base_url=f"http://127.0.0.1:{sim.port}", timeout=10) as http:
            http.post("/v1/responses", json={"model": "m", "input": "hi"})
            assert http.post("/control", json={"reset_stats": True}).status_code == 200
            report = http.get("/stats").json()
            assert (report["requests_total"], report["connections_open"]) == (0, 1)
        for _wait in range(200):  # until the simulator has seen the client go
            if not sim.call(lambda: sim.server.connections):
                break
            time.sleep(0.005)
        assert sim.call(lambda: sim.server.stats.connections_open) == 0


def test_the_context_is_recorded_when_stats_read_it_not_per_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The full context of a recorded request (`context`, `context_sha256`) is made
    from it when /stats reads it, once, not while answering: the simulator's own cost
    per request does not grow with the conversation. As `body`, it is kept for the
    latest --record-bodies requests."""
    digests: list[int] = []  # the length of each context made
    real_digest = sim_server.context_digest

    def counted_digest(items: list[dict[str, Any]]) -> str:
        digests.append(len(items))
        return real_digest(items)

    monkeypatch.setattr(sim_server, "context_digest", counted_digest)
    history: list[dict[str, Any]] = []
    with running_sim(record_bodies=2) as sim, httpx.Client(base_url=sim.base_url) as http:
        for turn in range(3):
            history.append({"type": "message", "role": "user", "content": f"turn {turn}"})
            answer = http.post("/responses", json={"model": "m", "input": history})
            history += answer.json()["output"]
        assert digests == []  # nothing made while answering
        first, second, third = sim.stats(bodies=True)["requests"]
        assert digests == [3, 5]  # the two kept contexts, when read
        assert sim.stats(bodies=True)["requests"][1:] == [second, third]
        assert digests == [3, 5]  # once
    assert (first["context"], first["context_sha256"]) == (None, "")
    assert json.loads(third["context"]) == history[:5]
    assert third["context_sha256"] == real_digest(history[:5])
    assert "context_items" not in third


# -- malformed input ------------------------------------------------------------------------------


def test_malformed_requests_get_a_400_naming_the_field() -> None:
    """Fields the simulator reads, in a shape it cannot use, are refused at once with
    a 400 naming them (the client used to wait forever for an answer)."""
    tools = [{"type": "function", "name": "f", "parameters": {"type": "object"}}]
    hi = [{"role": "user", "content": "hi"}]
    cases = [
        (
            "/chat/completions",
            {"model": "m", "messages": [{"role": "assistant", "tool_calls": [1]}]},
            "messages[0].tool_calls[0]",
        ),
        (
            "/chat/completions",
            {"model": "m", "messages": hi, "stream": True, "stream_options": "x"},
            "stream_options",
        ),
        (
            "/responses",
            {
                "model": "m",
                "tools": tools,
                "input": [
                    {"role": "user", "content": "/call f {}"},
                    {"type": "function_call_output", "call_id": {"a": 1}, "output": "x"},
                ],
            },
            "input[1].call_id",
        ),
    ]
    with running_sim() as sim, httpx.Client(base_url=sim.base_url, timeout=1) as http:
        for path, body, param in cases:
            answer = http.post(path, json=body)
            assert answer.status_code == 400, answer.text
            assert answer.json()["error"]["param"] == param
        since = http.get(f"http://127.0.0.1:{sim.port}/stats?since=abc")
        assert since.status_code == 400 and since.json()["error"]["param"] == "since"
        assert [r["status"] for r in sim.stats()["requests"]] == [400, 400, 400]


def test_an_unexpected_error_is_answered_as_a_server_error(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Whatever goes wrong inside the simulator, the request is answered (a 500
    `server_error`, an `error` event in WebSocket mode), its /stats record ends with
    status 500, the connection still serves, and the log names the error's type only."""

    def broken_model(*_args: Any, **_kwargs: Any) -> mockmodel.Reply:
        raise RuntimeError("secret conversation text")

    monkeypatch.setattr(sim_server, "plan", broken_model)
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    with (
        caplog.at_level("ERROR", logger="warmsocket.simulate"),
        running_sim() as sim,
        httpx.Client(base_url=sim.base_url, timeout=1) as http,
    ):
        answers = [
            http.post("/chat/completions", json=chat),
            http.post("/responses", json={"model": "m", "input": "hi", "stream": True}),
        ]
        with connect(sim.base_url.replace("http", "ws") + "/responses", open_timeout=5) as ws:
            ws.send(json.dumps({"type": "response.create", "model": "m", "input": "hi"}))
            event = json.loads(ws.recv(timeout=1))
        assert http.get("/models").status_code == 200  # the same connection still serves
        records = sim.stats()["requests"]
    for answer in answers:
        assert answer.status_code == 500
        assert answer.json()["error"]["type"] == "server_error"
    assert (event["type"], event["status"], event["error"]["type"]) == (
        "error",
        500,
        "server_error",
    )
    assert [(r["status"], r["finished"] is not None) for r in records] == [(500, True)] * 3
    assert "RuntimeError" in caplog.text and "secret" not in caplog.text
