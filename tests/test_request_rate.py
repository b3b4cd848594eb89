"""`--requests-per-minute-per-key`: a key's model requests (creates over HTTP and
WebSocket, compactions) are let through at its rate, a minute's worth at once; past it
429 `rate_limit_exceeded` with the headers the openai SDK waits by, other keys are
served as ever, and a refused WebSocket create loses neither the connection nor the
chain."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

import httpx2 as httpx
import openai
import pytest
import redis
import redis.asyncio as aioredis

from tests.redis_support import paused
from tests.support import WSClient, output_text, running_server
from tests.test_key_limit import A, B, bearer
from tests.test_shared_store_serve import redis_url, two_servers
from warmsocket import request_rate
from warmsocket.cli import build_parser
from warmsocket.request_rate import RequestRate, Taken, take
from warmsocket.serve import config_from_args
from warmsocket.shared_request_rate import SharedBuckets
from warmsocket.shared_store import SharedStore

__all__ = ["redis_url"]  # a fixture


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_bucket_gives_its_burst_then_one_per_interval() -> None:
    full_at, now = 0.0, 100.0
    answers = []
    for _ in range(4):
        taken, full_at = take(full_at, now, 2.0, 3)
        answers.append(taken)
    assert [t.allowed for t in answers] == [True, True, True, False]
    assert [t.remaining for t in answers] == [2, 1, 0, 0]
    assert answers[2].full_in == pytest.approx(6.0)
    assert answers[3].wait == pytest.approx(2.0)  # one refills in 2 s
    taken, full_at = take(full_at, now + 1.9, 2.0, 3)
    assert not taken.allowed and taken.wait == pytest.approx(0.1)
    taken, full_at = take(full_at, now + 2.0, 2.0, 3)
    assert taken.allowed and taken.remaining == 0
    # Idle long enough, the bucket is full again, and no fuller.
    taken, _ = take(full_at, now + 1000, 2.0, 3)
    assert taken == Taken(True, 2, 0.0, 2.0)


def test_each_key_has_its_own_bucket_and_full_ones_are_forgotten(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(request_rate, "SWEEP_EVERY", 6)
    clock = Clock()
    rate = RequestRate(60, burst=2, clock=clock)  # one a second
    assert rate.check_local("a") is None
    assert rate.check_local("a") is None
    refused = rate.check_local("a")
    assert refused is not None and refused.status == 429
    assert rate.check_local("b") is None  # another key
    clock.now += 1.0
    assert rate.check_local("a") is None
    assert rate.check_local("a") is not None
    assert rate.refused == 2
    assert rate.keys_tracked() == 2
    clock.now += 10  # both buckets full again: the next sweep forgets them
    for owner in ("c", "d"):
        assert rate.check_local(owner) is None
    assert rate.keys_tracked() == 2  # c and d; a and b are gone
    metrics = "\n".join(rate.collect())
    assert "warmsocket_requests_per_minute_per_key 60" in metrics
    assert "warmsocket_request_rate_refused_total 2" in metrics


def test_no_limit_counts_nothing() -> None:
    rate = RequestRate(None)
    assert not rate.limited and not rate.needs_io
    assert all(rate.check_local("a") is None for _ in range(1000))
    assert rate.keys_tracked() == 0
    assert list(rate.collect()) == []


def test_the_refusal_says_when_to_try_again() -> None:
    clock = Clock()
    rate = RequestRate(120, burst=1, clock=clock)  # one each half second
    assert rate.check_local("a") is None
    clock.now += 0.2
    refused = rate.check_local("a")
    assert refused is not None
    assert (refused.code, refused.type, refused.status) == (
        "rate_limit_exceeded",
        "rate_limit_error",
        429,
    )
    assert refused.headers == {
        "retry-after": "1",
        "retry-after-ms": "300",
        "x-ratelimit-limit-requests": "120",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "300ms",
    }
    assert "--requests-per-minute-per-key" in refused.message
    assert "300ms" in refused.message


def test_the_flag_sets_the_limit() -> None:
    parser = build_parser()
    args = parser.parse_args(["serve", "--requests-per-minute-per-key", "90"])
    assert config_from_args(args).requests_per_minute_per_key == 90
    args = parser.parse_args(["serve"])
    assert config_from_args(args).requests_per_minute_per_key is None


def test_http_creates_and_compactions_are_counted_per_key(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    with (
        running_server(requests_per_minute_per_key=6, request_burst_per_key=2) as srv,
        httpx.Client(base_url=srv.base_url, timeout=10, headers=bearer(A)) as http,
    ):
        create = {"model": "m", "input": "hi"}
        created = http.post("/responses", json=create)
        assert created.status_code == 200
        # Each answer says what the key has left, as OpenAI's do.
        assert created.headers["x-ratelimit-limit-requests"] == "6"
        assert created.headers["x-ratelimit-remaining-requests"] == "1"
        assert created.headers["x-ratelimit-reset-requests"] in {"9.999s", "10s"}
        compacted = http.post("/responses/compact", json=create)
        assert compacted.status_code == 200
        assert compacted.headers["x-ratelimit-remaining-requests"] == "0"
        # What runs no model, and what is refused before it would, is not counted.
        assert http.get("/models").status_code == 200
        assert http.post("/responses/input_tokens", json=create).status_code == 200
        assert http.post("/responses", json={"model": "m", "input": 5}).status_code == 400
        refused = http.post("/responses", json=create)
        assert refused.status_code == 429
        error = refused.json()["error"]
        assert (error["code"], error["type"]) == ("rate_limit_exceeded", "rate_limit_error")
        assert "6 requests per minute" in error["message"]
        assert refused.headers["x-ratelimit-limit-requests"] == "6"
        assert refused.headers["x-ratelimit-remaining-requests"] == "0"
        assert 9000 < int(refused.headers["retry-after-ms"]) <= 10000  # one in 10 s
        assert refused.headers["retry-after"] == "10"
        assert "x-request-id" in refused.headers
        assert http.post("/responses/compact", json=create).status_code == 429
        # The openai SDK raises it as a RateLimitError; another key is served.
        sdk = openai.OpenAI(base_url=srv.base_url, api_key=A, max_retries=0)
        with pytest.raises(openai.RateLimitError, match="per minute"):
            sdk.responses.create(model="m", input="again")
        sdk.close()
        with http.stream(
            "POST", "/responses", json={**create, "stream": True}, headers=bearer(B)
        ) as streamed:
            assert streamed.status_code == 200
            assert streamed.headers["x-ratelimit-remaining-requests"] == "1"
            assert b"response.completed" in streamed.read()
        assert "warmsocket_request_rate_refused_total 3" in srv.server.metrics.render()
        # What is not counted says nothing of it.
        assert "x-ratelimit-limit-requests" not in http.get("/models").headers
    (warned,) = [r for r in caplog.records if "--requests-per-minute-per-key" in r.getMessage()]
    assert warned.__dict__["owner"].startswith("key_")
    assert "hi" not in warned.getMessage()


def test_the_openai_sdk_waits_as_told_and_gets_through() -> None:
    # One each 3 s, two at once: the third create is refused and, retried by the SDK
    # after retry-after-ms, served. (The SDK's own backoff, 0.5 s then 1 s, would have
    # spent both retries before the bucket refilled.)
    with running_server(requests_per_minute_per_key=20, request_burst_per_key=2) as srv:
        sdk = openai.OpenAI(base_url=srv.base_url, api_key=A, max_retries=2)
        started = time.monotonic()
        texts = [sdk.responses.create(model="m", input=f"n{i}").output_text for i in range(3)]
        took = time.monotonic() - started
        sdk.close()
        assert texts == ["You said: n0", "You said: n1", "You said: n2"]
        assert "warmsocket_request_rate_refused_total 1" in srv.server.metrics.render()
        assert 2.5 < took < 6.0


def test_a_websocket_create_past_the_rate_is_refused_on_its_lane_and_the_chain_goes_on() -> None:
    with (
        running_server(requests_per_minute_per_key=60, request_burst_per_key=2) as srv,
        WSClient(srv.ws_url, additional_headers=bearer(A)) as ws,
    ):
        first = ws.turn(model="m", input="one", stream_id="agent")
        first_id = first[-1]["response"]["id"]
        ws.turn(model="m", input="two", generate=False)  # a warm-up counts too
        (error,) = ws.turn(
            model="m", input="three", previous_response_id=first_id, stream_id="agent"
        )
        assert error["type"] == "error" and error["status"] == 429
        assert error["stream_id"] == "agent"
        assert error["error"]["code"] == "rate_limit_exceeded"
        assert error["headers"]["x-ratelimit-limit-requests"] == "60"
        assert error["error"]["headers"] == error["headers"]
        # Invalid creates are answered as such, not counted.
        (invalid,) = ws.turn(model="m", input=5, stream_id="agent")
        assert invalid["status"] == 400
        time.sleep(float(error["headers"]["retry-after-ms"]) / 1000)
        # The same create, sent again once the bucket refilled: the chain is intact.
        again = ws.turn(model="m", input="three", previous_response_id=first_id, stream_id="agent")
        assert output_text(again).endswith("three")
        assert again[-1]["response"]["previous_response_id"] == first_id
        with WSClient(srv.ws_url, additional_headers=bearer(B)) as other:
            assert output_text(other.turn(model="m", input="b")) == "You said: b"


def test_a_refused_create_does_not_overtake_the_creates_before_it() -> None:
    with (
        running_server(requests_per_minute_per_key=60, request_burst_per_key=1) as srv,
        WSClient(srv.ws_url, additional_headers=bearer(A)) as ws,
    ):
        ws.create(model="m", input="/sleep 300 slow")
        ws.create(model="m", input="refused")
        events: list[dict[str, Any]] = []
        while not any(e["type"] == "error" for e in events):
            events.append(ws.recv())
        # One create on the default lane at a time: the refusal answers the second
        # create, in its turn, after the first create's response.
        kinds = [e["type"] for e in events]
        assert kinds.index("response.created") < kinds.index("response.completed")
        assert kinds[-1] == "error" and events[-1]["status"] == 429


def test_shared_buckets_that_do_not_answer_are_counted_locally(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(request_rate, "SHARED_TIMEOUT", 0.05)

    class Silent:
        asked = 0

        async def take(self, owner: str, interval: float, burst: int) -> Taken:
            self.asked += 1
            await asyncio.sleep(10)
            raise AssertionError("not reached")

    clock = Clock()
    silent = Silent()
    rate = RequestRate(60, burst=1, shared=silent, clock=clock)
    assert rate.needs_io

    async def two() -> list[Any]:
        return [await rate.check("a"), await rate.check("a")]

    with caplog.at_level(logging.WARNING):
        first, second = asyncio.run(two())
    # The process's own bucket.
    assert first.refusal is None and second.refusal is not None
    assert silent.asked == 1  # the second did not wait for Redis again
    assert rate.counted_locally == 2
    assert any("cannot count requests per key in Redis" in r.getMessage() for r in caplog.records)
    clock.now += request_rate.LOCAL_FOR + 0.1
    assert asyncio.run(rate.check("b")).refusal is None
    assert silent.asked == 2  # asked again once LOCAL_FOR is over
    # Still silent: asked again only after twice as long (each ask makes a request
    # wait SHARED_TIMEOUT), and so on, up to LOCAL_FOR_MAX.
    clock.now += 2 * request_rate.LOCAL_FOR - 0.1
    assert asyncio.run(rate.check("c")).refusal is None
    assert silent.asked == 2
    clock.now += 0.2
    asyncio.run(rate.check("d"))
    assert silent.asked == 3
    for _ in range(8):
        clock.now += request_rate.LOCAL_FOR_MAX + 0.1
        asyncio.run(rate.check("e"))
    assert silent.asked == 11  # (at most LOCAL_FOR_MAX apart)


def test_requests_that_ask_a_silent_redis_at_once_double_its_pause_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Eight requests asking Redis at the same moment, all timing out: the local period
    doubles once (1 s, then 2 s), not once per request (it reached 30 s at once)."""
    monkeypatch.setattr(request_rate, "SHARED_TIMEOUT", 0.05)

    class Silent:
        async def take(self, owner: str, interval: float, burst: int) -> Taken:
            await asyncio.sleep(10)
            raise AssertionError("not reached")

    clock = Clock()
    rate = RequestRate(600, burst=100, shared=Silent(), clock=clock)

    async def at_once() -> None:
        await asyncio.gather(*(rate.check(f"k{n}") for n in range(8)))

    asyncio.run(at_once())
    assert rate._local_until == clock.now + request_rate.LOCAL_FOR
    assert rate._local_for == 2 * request_rate.LOCAL_FOR


# -- shared by the processes on one Redis -------------------------------------------------


def test_redis_buckets_answer_as_the_local_ones(redis_url: str) -> None:
    async def answers() -> list[Taken]:
        client = aioredis.Redis.from_url(redis_url)
        buckets = SharedBuckets(client, f"t{uuid.uuid4().hex[:8]}")
        try:
            return [await buckets.take("key_a", 10.0, 3) for _ in range(4)]
        finally:
            await client.aclose()

    taken = asyncio.run(answers())
    assert [t.allowed for t in taken] == [True, True, True, False]
    assert [t.remaining for t in taken] == [2, 1, 0, 0]
    assert taken[2].full_in == pytest.approx(30.0, abs=0.5)
    assert taken[3].wait == pytest.approx(10.0, abs=0.5)


def test_the_limit_holds_for_a_key_across_processes(redis_url: str) -> None:
    with (
        two_servers(redis_url, requests_per_minute_per_key=6, request_burst_per_key=2) as (a, b),
        httpx.Client(base_url=a.base_url, timeout=10, headers=bearer(A)) as http_a,
        WSClient(b.ws_url, additional_headers=bearer(A)) as ws_b,
    ):
        create = {"model": "m", "input": "hi", "store": False}
        assert http_a.post("/responses", json=create).status_code == 200
        assert output_text(ws_b.turn(model="m", input="hi", store=False)) == "You said: hi"
        # Each process let through one: the key's two are spent on both.
        assert http_a.post("/responses", json=create).status_code == 429
        (error,) = ws_b.turn(model="m", input="hi", store=False)
        assert error["status"] == 429
        assert http_a.post("/responses", json=create, headers=bearer(B)).status_code == 200
        shared = a.server.engine.shared
        assert isinstance(shared, SharedStore)
        with redis.Redis.from_url(redis_url) as client:
            keys = client.keys(f"{shared.prefix}:rate:*")
            ttls = sorted(client.pttl(key) for key in keys)
        # A's bucket is full again in 20 s, B's in 10 s: then they are gone.
        assert len(ttls) == 2
        assert 0 < ttls[0] <= 10_000 < ttls[1] <= 20_000


def test_while_redis_does_not_answer_each_process_counts_its_own(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(request_rate, "SHARED_TIMEOUT", 0.2)
    with (
        two_servers(redis_url, requests_per_minute_per_key=6, request_burst_per_key=2) as (a, _b),
        httpx.Client(base_url=a.base_url, timeout=10, headers=bearer(A)) as http,
    ):
        create = {"model": "m", "input": "hi", "store": False}
        with paused(redis_url):
            started = time.monotonic()
            codes = [http.post("/responses", json=create).status_code for _ in range(3)]
            took = time.monotonic() - started
        assert codes == [200, 200, 429]
        assert took < 2.0  # one wait for Redis, then this process's own bucket
        metrics = a.server.metrics.render()
        assert "warmsocket_request_rate_counted_locally_total 3" in metrics


def test_the_table_of_keys_is_swept_as_it_grows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Many keys, each making one request (no API keys: any token is a key): the table
    keeps only the buckets not yet full, however fast they come."""
    monkeypatch.setattr(request_rate, "SWEEP_EVERY", 10**9)
    monkeypatch.setattr(request_rate, "SWEEP_AT_KEYS", 100)
    clock = Clock()
    rate = RequestRate(600, burst=10, clock=clock)  # a bucket is full 0.1 s after a request
    for n in range(10_000):
        clock.now += 0.001  # 1,000 keys a second: about 100 not yet full at any time
        assert rate.check_local(f"key_{n}") is None
        assert rate.keys_tracked() <= 300
