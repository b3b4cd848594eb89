"""Background responses (`background: true`) with the official SDK: created `queued`,
polled, streamed and resumed from a sequence number, cancelled; the run outlives
its request and ends at shutdown."""

from __future__ import annotations

import gc
import json
import threading
import time
from typing import Any

import httpx2 as httpx
import openai
import pytest
from openai import OpenAI

from tests.support import RunningServer, WSClient, check_sse_event, running_server
from warmsocket import background

MODEL = "warmsocket-mock"


def http_client(server: RunningServer) -> httpx.Client:
    """Raw HTTP with the SDK's API key: responses belong to the key that made them."""
    return httpx.Client(
        base_url=server.base_url, timeout=10, headers={"Authorization": "Bearer sk-test"}
    )


def wait_for(sdk: OpenAI, rid: str, status: str, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        response = sdk.responses.retrieve(rid)
        if response.status == status:
            return response
        assert time.monotonic() < deadline, f"still {response.status}"
        time.sleep(0.02)


def sse_events(response: httpx.Response) -> list[dict[str, Any]]:
    events = [
        json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: ")
    ]
    for event in events:
        check_sse_event(event)
    return events


def test_created_queued_then_polled_to_its_end_and_continued(sdk: OpenAI) -> None:
    created = sdk.responses.create(model=MODEL, input="hello", background=True)
    assert (created.status, created.background, created.output) == ("queued", True, [])
    done = wait_for(sdk, created.id, "completed")
    assert done.background is True and done.output_text == "You said: hello"
    assert done.usage is not None and done.usage.input_tokens > 0
    # Stored like any other: continued by id.
    follow = sdk.responses.create(model=MODEL, input="/transcript", previous_response_id=created.id)
    assert follow.output_text.splitlines()[:2] == ["user: hello", "assistant: You said: hello"]
    assert follow.background is False


def test_streamed_then_resumed_from_a_sequence_number(server: RunningServer) -> None:
    body = {"model": MODEL, "input": "resume me", "background": True, "stream": True}
    with http_client(server) as http:
        first = sse_events(http.post("responses", json=body))
        rid = first[0]["response"]["id"]
        again = sse_events(http.get(f"responses/{rid}", params={"stream": "true"}))
        tail = sse_events(
            http.get(f"responses/{rid}", params={"stream": "true", "starting_after": "4"})
        )
        bad = http.get(f"responses/{rid}", params={"stream": "true", "starting_after": "x"})
    kinds = [e["type"] for e in first]
    assert kinds[:3] == ["response.created", "response.queued", "response.in_progress"]
    assert kinds[-1] == "response.completed"
    assert first[0]["response"]["status"] == "queued" and first[0]["response"]["background"]
    assert [e["sequence_number"] for e in first] == list(range(len(first)))
    assert again == first
    assert tail == first[5:]
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "starting_after"


def test_a_client_that_leaves_its_stream_does_not_stop_the_response(sdk: OpenAI) -> None:
    with sdk.responses.create(
        model=MODEL, input="/sleep 300\nstill here", background=True, stream=True
    ) as stream:
        first = next(iter(stream))
    assert first.type == "response.created"
    done = wait_for(sdk, first.response.id, "completed")
    assert done.output_text == "You said: /sleep 300\nstill here"


def test_cancel_stops_a_running_response(server: RunningServer, sdk: OpenAI) -> None:
    created = sdk.responses.create(model=MODEL, input="/sleep 5000\nslow", background=True)
    wait_for(sdk, created.id, "in_progress")
    started = time.monotonic()
    cancelled = sdk.responses.cancel(created.id)
    assert cancelled.status == "cancelled" and time.monotonic() - started < 2
    assert sdk.responses.retrieve(created.id).status == "cancelled"
    # Its stream ends with what there was (the API has no event for a cancel).
    with http_client(server) as http:
        events = sse_events(http.get(f"responses/{created.id}", params={"stream": "true"}))
    assert events[-1]["type"] == "response.in_progress"
    # Not stored: it cannot be continued.
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.responses.create(model=MODEL, input="x", previous_response_id=created.id)
    assert refused.value.code == "previous_response_not_found"
    # Cancelling again, or cancelling one that ended, gives it as it is.
    assert sdk.responses.cancel(created.id).status == "cancelled"
    finished = sdk.responses.create(model=MODEL, input="quick", background=True)
    wait_for(sdk, finished.id, "completed")
    assert sdk.responses.cancel(finished.id).status == "completed"
    assert server.server.metrics.turns["cancelled"] == 1


def test_a_stored_background_response_is_still_one_after_its_run_is_forgotten(
    server: RunningServer, sdk: OpenAI
) -> None:
    created = sdk.responses.create(model=MODEL, input="keep", background=True)
    wait_for(sdk, created.id, "completed")
    server.call(lambda: server.server.http.background._finished.clear())
    stored = sdk.responses.retrieve(created.id)
    assert stored.background is True and stored.output_text == "You said: keep"
    assert sdk.responses.cancel(created.id).status == "completed"
    with http_client(server) as http:
        replay = http.get(f"responses/{created.id}", params={"stream": "true"})
    assert replay.status_code == 400 and replay.json()["error"]["param"] == "stream"


def test_bad_background_requests(server: RunningServer, sdk: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as unstored:
        sdk.responses.create(model=MODEL, input="x", background=True, store=False)
    assert unstored.value.param == "store"
    plain = sdk.responses.create(model=MODEL, input="x")
    with pytest.raises(openai.BadRequestError) as not_background:
        sdk.responses.cancel(plain.id)
    assert "background" in not_background.value.message
    with pytest.raises(openai.NotFoundError):
        sdk.responses.cancel("resp_unknown")
    with http_client(server) as http:
        assert http.get("responses/resp_unknown", params={"stream": "true"}).status_code == 404
        assert http.get(f"responses/{plain.id}", params={"stream": "true"}).status_code == 400


def test_too_many_running_at_once_is_overloaded(
    monkeypatch: pytest.MonkeyPatch, sdk: OpenAI
) -> None:
    monkeypatch.setattr(background, "MAX_RUNNING", 1)
    first = sdk.responses.create(model=MODEL, input="/sleep 5000\nslow", background=True)
    with pytest.raises(openai.InternalServerError) as overloaded:
        sdk.responses.create(model=MODEL, input="x", background=True)
    assert overloaded.value.status_code == 503
    assert overloaded.value.code == "server_is_overloaded"
    sdk.responses.cancel(first.id)
    assert sdk.responses.create(model=MODEL, input="x", background=True).status == "queued"


def test_shutdown_cancels_the_runs_still_going() -> None:
    with running_server() as server:
        client = OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0)
        created = client.responses.create(model=MODEL, input="/sleep 30000\nslow", background=True)
        client.close()
        runs = server.server.http.background
        started = time.monotonic()
    assert time.monotonic() - started < 5
    (run,) = runs._finished.values()
    assert run.turn.response_id == created.id and run.turn.stream.status == "cancelled"
    # No expiry timer left armed by the run's end (it would hold the runs 10 minutes).
    assert runs._expiry is None


def test_finished_runs_are_kept_within_their_bounds(
    monkeypatch: pytest.MonkeyPatch, server: RunningServer, sdk: OpenAI
) -> None:
    # The oldest finished run is forgotten first: its response stays retrievable
    # (stored), its events can no longer be streamed again.
    monkeypatch.setattr(background, "MAX_FINISHED", 2)
    ids = []
    for text in ("one", "two", "three"):
        created = sdk.responses.create(model=MODEL, input=text, background=True)
        wait_for(sdk, created.id, "completed")
        ids.append(created.id)
    with http_client(server) as http:
        replays = [http.get(f"responses/{rid}", params={"stream": "true"}) for rid in ids]
    assert [r.status_code for r in replays] == [400, 200, 200]
    refused = replays[0].json()["error"]
    assert refused["param"] == "stream" and "with --redis-url, from any" in refused["message"]
    assert sdk.responses.retrieve(ids[0]).output_text == "You said: one"
    # And by the bytes their events hold.
    monkeypatch.setattr(background, "MAX_RETAINED_BYTES", 1)
    with http_client(server) as http:
        last = http.get(f"responses/{ids[2]}", params={"stream": "true"})
    assert last.status_code == 400


def test_a_finished_run_counts_its_request_and_context_not_only_its_events(
    server: RunningServer, sdk: OpenAI
) -> None:
    """What a finished run keeps is its turn too (request, context): counted against
    MAX_RETAINED_BYTES, else 1,024 runs of large requests were held past any bound."""
    background_runs = server.server.http.background
    before = background_runs.stats()["retained_bytes"]
    big = [{"role": "user", "content": "a" * 1_000_000}, {"role": "user", "content": "b"}]
    created = sdk.responses.create(model=MODEL, input=big, background=True)  # type: ignore[arg-type]
    wait_for(sdk, created.id, "completed")
    assert sdk.responses.retrieve(created.id).output_text == "You said: b"
    assert background_runs.stats()["retained_bytes"] - before > 2_000_000


def test_delete_stops_and_forgets_a_background_response(server: RunningServer, sdk: OpenAI) -> None:
    running = sdk.responses.create(model=MODEL, input="/sleep 5000\nslow", background=True)
    wait_for(sdk, running.id, "in_progress")
    with http_client(server) as http:
        gauges = http.get("metrics").text
    assert 'warmsocket_background_responses{state="running"} 1' in gauges
    sdk.responses.delete(running.id)
    finished = sdk.responses.create(model=MODEL, input="done", background=True)
    wait_for(sdk, finished.id, "completed")
    sdk.responses.delete(finished.id)
    for rid in (running.id, finished.id):
        with pytest.raises(openai.NotFoundError):
            sdk.responses.retrieve(rid)
        with pytest.raises(openai.NotFoundError):
            sdk.responses.cancel(rid)
        with pytest.raises(openai.NotFoundError):
            sdk.responses.delete(rid)
    with http_client(server) as http:
        gauges = http.get("metrics").text
    assert 'warmsocket_background_responses{state="running"} 0' in gauges
    assert 'warmsocket_background_responses{state="finished"} 0' in gauges


def test_failed_and_cancelled_responses_outlive_their_runs(
    monkeypatch: pytest.MonkeyPatch, server: RunningServer, sdk: OpenAI
) -> None:
    """Never stored, so once their runs (and events) are forgotten, their Response
    objects are what GET, cancel and DELETE find; the oldest go first past the bound."""
    monkeypatch.setattr(background, "MAX_FINISHED", 1)
    monkeypatch.setattr(background, "MAX_ENDED", 2)
    failed = sdk.responses.create(model=MODEL, input="/fail", background=True)
    wait_for(sdk, failed.id, "failed")
    cancelled = sdk.responses.create(model=MODEL, input="/sleep 5000\nslow", background=True)
    assert sdk.responses.cancel(cancelled.id).status == "cancelled"
    completed = sdk.responses.create(model=MODEL, input="done", background=True)
    wait_for(sdk, completed.id, "completed")  # and forgets the runs before it
    assert server.call(lambda: server.server.http.background.stats())["finished"] == 1
    kept = sdk.responses.retrieve(failed.id)
    assert kept.status == "failed" and kept.error is not None and kept.background is True
    assert sdk.responses.cancel(failed.id).status == "failed"  # as it is
    assert sdk.responses.retrieve(cancelled.id).status == "cancelled"
    with http_client(server) as http:  # its events are gone
        assert http.get(f"responses/{failed.id}", params={"stream": "true"}).status_code == 400
    sdk.responses.delete(failed.id)
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve(failed.id)
    # Past the bound, the oldest kept one goes.
    for _ in range(2):
        again = sdk.responses.create(model=MODEL, input="/fail", background=True)
        wait_for(sdk, again.id, "failed")
    sdk.responses.create(model=MODEL, input="x", background=True)
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve(cancelled.id)


def test_input_items_of_a_response_that_is_not_stored(
    monkeypatch: pytest.MonkeyPatch, sdk: OpenAI
) -> None:
    """A queued, running, cancelled or failed background response is retrievable, so
    `input_items.list` lists what it was sent too (a 404 before), with the ids and
    paging of a stored response's, also once its run is forgotten."""

    def texts(rid: str, **page: Any) -> list[tuple[str, str]]:
        listed = sdk.responses.input_items.list(rid, order="asc", **page)
        return [(item.id, item.content[0].text) for item in listed]  # type: ignore[union-attr]

    monkeypatch.setattr(background, "MAX_FINISHED", 1)
    sent = [{"role": "user", "content": "first"}, {"role": "user", "content": "/sleep 5000\nslow"}]
    running = sdk.responses.create(model=MODEL, input=sent, background=True)  # type: ignore[arg-type]
    listed = texts(running.id)
    assert [text for _id, text in listed] == ["first", "/sleep 5000\nslow"]
    assert texts(running.id, limit=1) == listed  # paged by id, one at a time
    wait_for(sdk, running.id, "in_progress")
    assert texts(running.id) == listed
    assert sdk.responses.cancel(running.id).status == "cancelled"
    assert texts(running.id) == listed
    failed = sdk.responses.create(model=MODEL, input="/fail", background=True)
    wait_for(sdk, failed.id, "failed")
    assert [text for _id, text in texts(failed.id)] == ["/fail"]
    completed = sdk.responses.create(model=MODEL, input="done", background=True)
    wait_for(sdk, completed.id, "completed")  # and forgets the runs before it
    assert texts(running.id) == listed
    assert [text for _id, text in texts(failed.id)] == ["/fail"]
    assert [text for _id, text in texts(completed.id)] == ["done"]
    sdk.responses.delete(running.id)
    with pytest.raises(openai.NotFoundError):
        sdk.responses.input_items.list(running.id)


def test_a_cancel_whose_caller_is_cancelled_does_not_go_on() -> None:
    """`cancel` waits for the run's end; a DELETE whose client left meanwhile had its
    own cancellation swallowed there and went on to forget a run still running (which
    then came back as finished, retrievable for 10 minutes after its deletion)."""
    import asyncio
    from types import SimpleNamespace

    async def scenario() -> tuple[bool, bool]:
        responses = background.BackgroundResponses()

        async def body() -> None:
            try:
                await asyncio.sleep(100)
            except asyncio.CancelledError:
                await asyncio.sleep(0.2)  # a cleanup that awaits (an upstream's close)
                raise

        run: Any = SimpleNamespace(task=asyncio.create_task(body()))
        await asyncio.sleep(0)
        went_on = False

        async def delete() -> None:
            nonlocal went_on
            await responses.cancel(run)
            went_on = True

        handler = asyncio.create_task(delete())
        await asyncio.sleep(0.05)
        handler.cancel()  # the client went away
        await asyncio.sleep(0.01)
        cancelled = handler.cancelled()
        await asyncio.sleep(0.3)
        return cancelled, went_on

    assert asyncio.run(scenario()) == (True, False)


def test_finished_runs_expire_without_anything_asking(
    monkeypatch: pytest.MonkeyPatch, server: RunningServer, sdk: OpenAI
) -> None:
    """Expiry ran only when something looked (a background request, a `/metrics`
    scrape): a quiet server kept up to 1,024 finished runs, their events and
    contexts, past their retention."""
    monkeypatch.setattr(background, "RETAIN_SECONDS", 0.3)
    created = sdk.responses.create(model=MODEL, input="quiet", background=True)
    wait_for(sdk, created.id, "completed")
    runs = server.server.http.background
    assert created.id in runs._finished
    deadline = time.monotonic() + 5
    while runs._finished and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not runs._finished


def test_continuing_a_background_response_still_running_says_so(sdk: OpenAI) -> None:
    """It said "not found" of a response the client had just created and could poll."""
    running = sdk.responses.create(model=MODEL, input="/sleep 3000 slow", background=True)
    with pytest.raises(openai.BadRequestError) as info:
        sdk.responses.create(model=MODEL, input="next", previous_response_id=running.id)
    assert info.value.code == "previous_response_not_found"
    assert "still in progress" in info.value.message
    assert "GET /v1/responses/{id}" in info.value.message
    sdk.responses.cancel(running.id)


def _delete(
    server: RunningServer, response_id: str, barrier: threading.Barrier, statuses: list[int]
) -> None:
    with http_client(server) as http:
        barrier.wait()
        statuses.append(http.delete(f"responses/{response_id}").status_code)


def test_two_deletes_at_once_delete_once(server: RunningServer, sdk: OpenAI) -> None:
    """Both found the run while the first waited for its cancellation, and both
    answered 200; a stored response deleted twice at once gets one 200 and one 404."""
    for _ in range(10):
        running = sdk.responses.create(model=MODEL, input="/sleep 5000 slow", background=True)
        wait_for(sdk, running.id, "in_progress")
        barrier = threading.Barrier(2)
        statuses: list[int] = []
        args = (running.id, barrier, statuses)
        threads = [threading.Thread(target=_delete, args=(server, *args)) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert sorted(statuses) == [200, 404]


def test_cancelled_turns_are_counted_with_the_others(server: RunningServer, sdk: OpenAI) -> None:
    running = sdk.responses.create(model=MODEL, input="/sleep 5000 slow", background=True)
    wait_for(sdk, running.id, "in_progress")
    sdk.responses.cancel(running.id)
    with http_client(server) as http:
        text = http.get("metrics").text
    assert 'warmsocket_turns_total{status="cancelled"} 1' in text
    assert "warmsocket_turn_seconds_count 1" in text


def test_a_websocket_create_continuing_a_running_one_is_told_so(
    server: RunningServer, sdk: OpenAI
) -> None:
    """Over HTTP the create was told the parent is still in progress; over a
    WebSocket it was told "not found" of a response it could poll."""
    running = sdk.responses.create(model=MODEL, input="/sleep 3000 slow", background=True)
    with WSClient(server.ws_url, additional_headers={"Authorization": "Bearer sk-test"}) as ws:
        error = ws.turn(input="next", previous_response_id=running.id)[-1]
    assert (error["type"], error["error"]["code"]) == ("error", "previous_response_not_found")
    assert "still in progress" in error["error"]["message"]
    sdk.responses.cancel(running.id)


def test_a_turn_its_client_left_is_counted_and_forgotten(server: RunningServer) -> None:
    """A WebSocket dropped mid-turn: the turn never appeared in the turn metrics
    (dashboards of started minus finished drifted), and the backend was not told to
    forget the response it will never store."""
    forgotten: list[str] = []
    server.server.engine.forget = forgotten.extend  # type: ignore[method-assign]
    with WSClient(server.ws_url) as ws:
        ws.create(input="/sleep 5000 slow")
        started = ws.recv()
        assert started["type"] == "response.created"
    deadline = time.monotonic() + 5
    with http_client(server) as http:
        while 'warmsocket_turns_total{status="abandoned"} 1' not in http.get("metrics").text:
            assert time.monotonic() < deadline, "the abandoned turn was not counted"
            time.sleep(0.02)
        assert "warmsocket_turn_seconds_count 1" in http.get("metrics").text
    assert started["response"]["id"] in forgotten


def test_a_background_create_refused_for_too_many_leaves_its_conversation_free(
    monkeypatch: pytest.MonkeyPatch, sdk: OpenAI
) -> None:
    """Refused with a 503 after it was prepared, the turn held its conversation until
    the garbage collector happened to free it: the SDK's retry of the 503 got a 400
    conversation_locked, which it does not retry."""
    monkeypatch.setattr(background, "MAX_RUNNING", 1)
    conversation = sdk.conversations.create(items=[{"role": "user", "content": "start"}])
    first = sdk.responses.create(model=MODEL, input="/sleep 5000\nslow", background=True)
    gc.disable()  # (what frees the turn must not be the collector)
    try:
        for _ in range(2):
            with pytest.raises(openai.InternalServerError) as overloaded:
                sdk.responses.create(
                    model=MODEL, input="x", background=True, conversation=conversation.id
                )
            assert overloaded.value.code == "server_is_overloaded"
    finally:
        gc.enable()
    sdk.responses.cancel(first.id)
    answer = sdk.responses.create(model=MODEL, input="after", conversation=conversation.id)
    assert answer.status == "completed"
