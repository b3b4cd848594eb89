"""`POST /v1/responses/input_tokens` with the official SDK: the count is the usage the
same create reports, nothing is stored, bad requests get the create's errors."""

from __future__ import annotations

import json
from typing import Any

import httpx2 as httpx
import openai
import pytest
from openai import OpenAI

from tests.support import FUNCTION_TOOLS, RunningServer
from warmsocket._core import CreateRequest, parse_client_message

MODEL = "warmsocket-mock"


def usage_of(sdk: OpenAI, **request: Any) -> int:
    response = sdk.responses.create(model=MODEL, **request)
    assert response.usage is not None
    return response.usage.input_tokens


def test_the_count_is_the_usage_of_the_same_create(sdk: OpenAI) -> None:
    first = {"input": "hello there", "instructions": "Be brief.", "tools": FUNCTION_TOOLS}
    counted = sdk.responses.input_tokens.count(model=MODEL, **first)  # type: ignore[arg-type]
    assert counted.object == "response.input_tokens"
    assert counted.input_tokens == usage_of(sdk, **first) > 0
    # On a chain: the previous response's context, its tokens cached, plus the input.
    parent = sdk.responses.create(model=MODEL, input="a long first turn " * 50)
    turn = {"input": "and then?", "previous_response_id": parent.id}
    counted = sdk.responses.input_tokens.count(**turn)  # no model: it is optional
    assert counted.input_tokens == usage_of(sdk, **turn)
    assert parent.usage is not None and counted.input_tokens > parent.usage.input_tokens
    # Without input: the chain and the instructions alone.
    chain = sdk.responses.input_tokens.count(previous_response_id=parent.id)
    with_instructions = sdk.responses.input_tokens.count(
        previous_response_id=parent.id, instructions="Be brief."
    )
    assert 0 < chain.input_tokens < counted.input_tokens < 1_000
    assert with_instructions.input_tokens > chain.input_tokens
    assert sdk.responses.input_tokens.count(input=[]).input_tokens == 0


def test_tools_are_counted_and_cached_with_the_prompt(server: RunningServer, sdk: OpenAI) -> None:
    tools: Any = FUNCTION_TOOLS
    body = json.dumps({"model": MODEL, "input": "hi", "tools": tools}).encode()
    request = parse_client_message(body, websocket=False)
    assert isinstance(request, CreateRequest) and request.tools_json is not None
    tokenizer = server.server.engine.tokenizer
    assert tokenizer is not None
    tool_tokens = tokenizer.count_tools(request.tools_json)
    assert tool_tokens > 20
    bare = sdk.responses.input_tokens.count(model=MODEL, input="hi").input_tokens
    counted = sdk.responses.input_tokens.count(model=MODEL, input="hi", tools=tools)
    assert counted.input_tokens == bare + tool_tokens == usage_of(sdk, input="hi", tools=tools)
    # The prompt starts with the instructions and tools: the same ones are cached
    # with the chain's context; other tools make a new prompt, nothing cached.
    first = {"instructions": "Be brief.", "tools": tools}
    parent = sdk.responses.create(model=MODEL, input="a first turn " * 20, **first)
    prefix = sdk.responses.input_tokens.count(previous_response_id=parent.id, **first)
    same = sdk.responses.create(model=MODEL, input="go on", previous_response_id=parent.id, **first)
    other = sdk.responses.create(
        model=MODEL,
        input="go on",
        previous_response_id=parent.id,
        instructions="Be brief.",
        tools=tools[:1],
    )
    assert same.usage is not None and other.usage is not None
    assert same.usage.input_tokens_details.cached_tokens == prefix.input_tokens
    assert prefix.input_tokens > tool_tokens
    assert other.usage.input_tokens_details.cached_tokens == 0


def test_a_resent_history_counts_like_its_chain(sdk: OpenAI) -> None:
    # The stateless pattern: the whole history again, no previous_response_id. It is
    # matched to the cached chain (only the suffix is tokenised) and counts the same.
    first = sdk.responses.create(model=MODEL, input="remember this " * 40)
    history: list[Any] = [
        {"role": "user", "content": "remember this " * 40},
        *[item.model_dump(exclude_none=True) for item in first.output],
        {"role": "user", "content": "what was it?"},
    ]
    replayed = sdk.responses.input_tokens.count(model=MODEL, input=history)
    chained = sdk.responses.input_tokens.count(
        model=MODEL, input="what was it?", previous_response_id=first.id
    )
    assert replayed.input_tokens == chained.input_tokens == usage_of(sdk, input=history)


def test_counting_stores_nothing(server: RunningServer, sdk: OpenAI) -> None:
    cache = server.server.cache
    parent = sdk.responses.create(model=MODEL, input="x")
    before = cache.stats()
    for _ in range(3):
        sdk.responses.input_tokens.count(model=MODEL, input="y", previous_response_id=parent.id)
    after = cache.stats()
    assert (after.entries, after.bytes) == (before.entries, before.bytes)
    # The chain's parent is not pinned by a count: it can still be deleted.
    sdk.responses.delete(parent.id)


def test_bad_requests_get_the_creates_errors(server: RunningServer, sdk: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as missing:
        sdk.responses.input_tokens.count(input="x", previous_response_id="resp_nope")
    assert missing.value.code == "previous_response_not_found"
    assert missing.value.param == "previous_response_id"
    with pytest.raises(openai.BadRequestError) as invalid:
        sdk.responses.input_tokens.count(input=[{"type": "message", "role": 5}])  # type: ignore[list-item]
    assert invalid.value.param == "input[0].role"
    with pytest.raises(openai.BadRequestError) as unanswered:
        orphan = {"type": "function_call_output", "call_id": "call_x", "output": "1"}
        sdk.responses.input_tokens.count(input=[orphan])
    assert unanswered.value.param == "input"
    with pytest.raises(openai.BadRequestError) as model:
        sdk.responses.input_tokens.count(model=7, input="x")  # type: ignore[arg-type]
    assert model.value.param == "model"
    with httpx.Client(base_url=server.base_url) as http:
        not_json = http.post("responses/input_tokens", content=b"{nope")
        wrong_method = http.get("responses/input_tokens")
    assert not_json.status_code == 400 and not_json.json()["error"]["message"]
    assert wrong_method.status_code == 405
