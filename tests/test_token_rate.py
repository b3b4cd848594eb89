"""`--tokens-per-minute-per-key`: each response's input and output tokens (its usage)
are taken from its key's bucket of a minute's tokens as it ends; while the bucket is
empty the key's creates and compactions get 429 `rate_limit_exceeded` with
`x-ratelimit-*-tokens`, other keys are served, and a refused WebSocket create loses
neither the connection nor the chain."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import httpx2 as httpx
import openai
import pytest
import redis.asyncio as aioredis

from tests.support import WSClient, output_text, running_server
from tests.test_key_limit import A, B, bearer
from tests.test_request_rate import Clock
from tests.test_shared_store_serve import redis_url, two_servers
from warmsocket import request_rate
from warmsocket.backends.mock import MockBackend
from warmsocket.cli import build_parser
from warmsocket.errors import APIError
from warmsocket.request_rate import TokenRate, take
from warmsocket.serve import config_from_args
from warmsocket.shared_request_rate import SharedBuckets

__all__ = ["redis_url"]  # a fixture


def test_a_check_takes_nothing_and_spending_may_go_below_empty() -> None:
    # A bucket of 3 units refilled one per 2 s: a check needs one, takes none.
    taken, full_at = take(0.0, 100.0, 2.0, 3, cost=0, need=1)
    assert taken.allowed and taken.remaining == 3 and full_at == 100.0
    # A response of 5 units: forced, 2 below empty; full again in 10 s.
    taken, full_at = take(full_at, 100.0, 2.0, 3, cost=5, need=0, force=True)
    assert taken.allowed and taken.remaining == 0 and taken.full_in == pytest.approx(10.0)
    # A check now waits until one unit is back: 2 s to empty, 2 s for one.
    taken, _ = take(full_at, 100.0, 2.0, 3, cost=0, need=1)
    assert not taken.allowed and taken.wait == pytest.approx(6.0)
    taken, _ = take(full_at, 106.0, 2.0, 3, cost=0, need=1)
    assert taken.allowed and taken.remaining == 1


def test_a_key_whose_responses_used_its_minute_waits_for_them() -> None:
    clock = Clock()
    rate = TokenRate(600, clock=clock)  # ten a second, 600 in the bucket
    assert rate.check_local("a") is None
    rate.spend("a", 900)  # 300 past the bucket: 30 s, then 0.1 s for one token
    refused = rate.check_local("a")
    assert refused is not None
    assert (refused.code, refused.type, refused.status) == (
        "rate_limit_exceeded",
        "rate_limit_error",
        429,
    )
    assert refused.headers == {
        "retry-after": "31",
        "retry-after-ms": "30100",
        "x-ratelimit-limit-tokens": "600",
        "x-ratelimit-remaining-tokens": "0",
        "x-ratelimit-reset-tokens": "1m30s",
    }
    assert "600 tokens per minute" in refused.message
    assert "--tokens-per-minute-per-key" in refused.message
    assert rate.check_local("b") is None  # another key
    clock.now += 30.1
    assert rate.check_local("a") is None
    assert rate.refused == 1 and rate.spent == 900
    metrics = "\n".join(rate.collect())
    assert "warmsocket_tokens_per_minute_per_key 600" in metrics
    assert "warmsocket_token_rate_refused_total 1" in metrics
    assert "warmsocket_token_rate_spent_total 900" in metrics


def test_no_limit_counts_nothing() -> None:
    rate = TokenRate(None)
    rate.spend("a", 10**9)
    assert rate.check_local("a") is None and rate.spent == 0
    assert list(rate.collect()) == []


def test_the_flag_sets_the_limit() -> None:
    parser = build_parser()
    args = parser.parse_args(["serve", "--tokens-per-minute-per-key", "40000"])
    assert config_from_args(args).tokens_per_minute_per_key == 40000
    assert config_from_args(parser.parse_args(["serve"])).tokens_per_minute_per_key is None


def test_http_responses_spend_their_usage_and_an_empty_bucket_refuses() -> None:
    with (
        running_server(tokens_per_minute_per_key=600) as srv,
        httpx.Client(base_url=srv.base_url, timeout=10, headers=bearer(A)) as http,
    ):
        created = http.post("/responses", json={"model": "m", "input": "hi"})
        assert created.status_code == 200
        # Said before the response used any: the whole bucket.
        assert created.headers["x-ratelimit-limit-tokens"] == "600"
        assert created.headers["x-ratelimit-remaining-tokens"] == "600"
        usage = created.json()["usage"]
        used = usage["input_tokens"] + usage["output_tokens"]
        second = http.post("/responses", json={"model": "m", "input": "hi"})
        left = int(second.headers["x-ratelimit-remaining-tokens"])
        assert 600 - used <= left <= 600 - used + 2  # (refilled 10 a second meanwhile)
        # A long input: its usage takes the bucket far below empty.
        long_input = "word " * 3000
        big = http.post("/responses", json={"model": "m", "input": long_input})
        assert big.status_code == 200
        assert big.json()["usage"]["input_tokens"] > 2000
        refused = http.post("/responses", json={"model": "m", "input": "hi"})
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert refused.headers["x-ratelimit-remaining-tokens"] == "0"
        assert int(refused.headers["retry-after-ms"]) > 100_000  # minutes of tokens over
        assert http.post("/responses/compact", json={"model": "m", "input": "x"}).status_code == 429
        # What runs no model is served; another key is served.
        assert http.post("/responses/input_tokens", json={"input": "hi"}).status_code == 200
        other = http.post("/responses", json={"model": "m", "input": "hi"}, headers=bearer(B))
        assert other.status_code == 200
        sdk = openai.OpenAI(base_url=srv.base_url, api_key=A, max_retries=0)
        with pytest.raises(openai.RateLimitError, match="tokens per minute"):
            sdk.responses.create(model="m", input="again")
        sdk.close()
        metrics = srv.server.metrics.render()
        assert "warmsocket_token_rate_refused_total 3" in metrics


def test_compactions_spend_their_usage() -> None:
    with (
        running_server(tokens_per_minute_per_key=6000) as srv,
        httpx.Client(base_url=srv.base_url, timeout=10, headers=bearer(A)) as http,
    ):
        compacted = http.post("/responses/compact", json={"model": "m", "input": "word " * 500})
        assert compacted.status_code == 200
        usage = compacted.json()["usage"]
        assert srv.server.token_rate.spent == usage["input_tokens"] + usage["output_tokens"] > 500


def test_a_websocket_create_refused_for_tokens_keeps_the_connection_and_the_chain() -> None:
    with (
        running_server(tokens_per_minute_per_key=600) as srv,
        WSClient(srv.ws_url, additional_headers=bearer(A)) as ws,
    ):
        first = ws.turn(model="m", input="word " * 700, stream_id="agent")
        first_id = first[-1]["response"]["id"]
        usage = first[-1]["response"]["usage"]
        over = usage["input_tokens"] + usage["output_tokens"] - 600
        assert over > 50
        (error,) = ws.turn(
            model="m", input="next", previous_response_id=first_id, stream_id="agent"
        )
        assert error["type"] == "error" and error["status"] == 429
        assert error["stream_id"] == "agent"
        assert error["headers"]["x-ratelimit-limit-tokens"] == "600"
        # Waits for what was used past the bucket, ten tokens a second.
        assert (over - 2) * 100 < int(error["headers"]["retry-after-ms"]) <= (over + 1) * 100
        with WSClient(srv.ws_url, additional_headers=bearer(B)) as other:
            assert output_text(other.turn(model="m", input="b")) == "You said: b"
        srv.server.token_rate._full_at.clear()  # (the minute passed)
        again = ws.turn(model="m", input="next", previous_response_id=first_id, stream_id="agent")
        assert output_text(again).endswith("next")
        assert again[-1]["response"]["previous_response_id"] == first_id


def wait_for_spent(srv: Any) -> int:
    for _ in range(200):
        if srv.server.token_rate.spent:
            break
        time.sleep(0.02)
    spent: int = srv.server.token_rate.spent
    return spent


@pytest.mark.parametrize("when", ["mid-answer", "before the first token"])
def test_a_response_its_websocket_left_still_spends_what_the_model_was_given(when: str) -> None:
    backend = (
        MockBackend(tokens_per_second=20) if when == "mid-answer" else MockBackend(ttft_ms=2000)
    )
    with running_server(tokens_per_minute_per_key=100_000, backend=backend) as srv:
        ws = WSClient(srv.ws_url, additional_headers=bearer(A))
        ws.create(model="m", input="a long answer " * 50)
        awaited = "response.output_text.delta" if when == "mid-answer" else "response.created"
        while ws.recv()["type"] != awaited:
            pass
        time.sleep(0.1)
        ws.close()
        assert wait_for_spent(srv) > 100  # the input, at least


def test_an_http_stream_its_client_left_before_the_first_token_still_spends() -> None:
    with (
        running_server(tokens_per_minute_per_key=100_000, backend=MockBackend(ttft_ms=2000)) as srv,
        httpx.Client(base_url=srv.base_url, timeout=10, headers=bearer(A)) as http,
    ):
        create = {"model": "m", "input": "a long answer " * 50, "stream": True}
        with http.stream("POST", "/responses", json=create) as streamed:
            for line in streamed.iter_lines():
                if "response.in_progress" in line:
                    break
        # (Closed: the server's task for it is cancelled while the model waits.)
        assert wait_for_spent(srv) > 100


class RefusesTheRequest(MockBackend):
    """An upstream that refuses every request before any model work (400)."""

    async def stream(self, turn: Any) -> Any:
        raise APIError("context_length_exceeded", "Too long.", status=400)
        yield  # (an async generator)


def test_a_request_the_model_refused_spends_nothing() -> None:
    with (
        running_server(tokens_per_minute_per_key=100_000, backend=RefusesTheRequest()) as srv,
        httpx.Client(base_url=srv.base_url, timeout=10, headers=bearer(A)) as http,
    ):
        failed = http.post("/responses", json={"model": "m", "input": "word " * 500})
        assert failed.status_code == 400
        assert failed.json()["error"]["code"] == "context_length_exceeded"
        assert srv.server.token_rate.spent == 0


def test_redis_buckets_spend_and_check_as_the_local_ones(redis_url: str) -> None:
    async def answers() -> list[request_rate.Taken]:
        client = aioredis.Redis.from_url(redis_url)
        buckets = SharedBuckets(client, f"t{uuid.uuid4().hex[:8]}")
        spend = {"cost": 5, "need": 0, "force": True, "unit": "tokens"}
        check = {"cost": 0, "need": 1, "unit": "tokens"}
        try:
            return [
                await buckets.take("key_a", 2.0, 3, **check),  # type: ignore[arg-type]
                await buckets.take("key_a", 2.0, 3, **spend),  # type: ignore[arg-type]
                await buckets.take("key_a", 2.0, 3, **check),  # type: ignore[arg-type]
                await buckets.take("key_a", 2.0, 3),  # its requests are another bucket
            ]
        finally:
            await client.aclose()

    checked, spent, refused, request = asyncio.run(answers())
    assert checked.allowed and checked.remaining == 3
    assert spent.allowed and spent.full_in == pytest.approx(10.0, abs=0.5)
    assert not refused.allowed and refused.wait == pytest.approx(6.0, abs=0.5)
    assert request.allowed and request.remaining == 2


def test_redis_buckets_refill_at_the_rate_asked_at_millions_of_tokens(redis_url: str) -> None:
    """40M tokens a minute is 1.5 microseconds a token: rounded to whole microseconds,
    the bucket would refill a quarter slower."""
    interval = 60 / 40_000_000

    async def refilled() -> int:
        client = aioredis.Redis.from_url(redis_url)
        buckets = SharedBuckets(client, f"t{uuid.uuid4().hex[:8]}")
        try:
            await buckets.take("k", interval, 40_000_000, cost=40_000_000, need=0, force=True)
            await asyncio.sleep(0.5)
            checked = await buckets.take("k", interval, 40_000_000, cost=0, need=1)
            return checked.remaining
        finally:
            await client.aclose()

    remaining = asyncio.run(refilled())
    assert 0.5 * 40_000_000 / 60 <= remaining < 0.6 * 40_000_000 / 60


def test_the_token_limit_holds_for_a_key_across_processes(redis_url: str) -> None:
    with (
        two_servers(redis_url, tokens_per_minute_per_key=600) as (a, b),
        httpx.Client(base_url=a.base_url, timeout=10, headers=bearer(A)) as http_a,
        httpx.Client(base_url=b.base_url, timeout=10, headers=bearer(A)) as http_b,
    ):
        long_input = {"model": "m", "input": "word " * 1000, "store": False}
        assert http_a.post("/responses", json=long_input).status_code == 200
        # Spent in Redis by a task of A's: B sees it within moments.
        for _ in range(100):
            refused = http_b.post("/responses", json={"model": "m", "input": "hi"})
            if refused.status_code == 429:
                break
            time.sleep(0.05)
        assert refused.status_code == 429
        assert refused.headers["x-ratelimit-limit-tokens"] == "600"


def test_a_cancelled_background_response_spends_what_the_model_was_given() -> None:
    with (
        running_server(tokens_per_minute_per_key=100_000) as srv,
        httpx.Client(base_url=srv.base_url, timeout=10, headers=bearer(A)) as http,
    ):
        create = {"model": "m", "input": "/sleep 5000\n" + "word " * 300, "background": True}
        created = http.post("/responses", json=create).json()
        for _ in range(100):
            if http.get(f"/responses/{created['id']}").json()["status"] == "in_progress":
                break
            time.sleep(0.02)
        cancelled = http.post(f"/responses/{created['id']}/cancel").json()
        assert cancelled["status"] == "cancelled"
        assert wait_for_spent(srv) > 300


def test_a_compaction_its_client_left_runs_on_and_is_charged() -> None:
    with (
        running_server(tokens_per_minute_per_key=100_000, backend=MockBackend(ttft_ms=1000)) as srv,
        httpx.Client(base_url=srv.base_url, timeout=0.3, headers=bearer(A)) as http,
    ):
        with pytest.raises(httpx.ReadTimeout):  # the client gives up, and closes
            http.post("/responses/compact", json={"model": "m", "input": "word " * 500})
        assert wait_for_spent(srv) > 500
