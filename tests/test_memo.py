"""`memo.Memo`: what is computed from instructions and tools is remembered, within a
bound on entries and on the bytes of the keys, so that requests that each send
other large instructions cannot make a process hold them all."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import httpx2 as httpx

from tests.support import WSClient, running_server
from warmsocket._core import Tokenizer
from warmsocket.memo import Memo, str_bytes


def test_a_value_is_computed_once_while_it_is_kept() -> None:
    memo: Memo[str, int] = Memo(entries=4, key_bytes=100)
    calls: list[str] = []

    def compute(key: str) -> int:
        calls.append(key)
        return len(key)

    assert memo.get("abc", 3, lambda: compute("abc")) == 3
    assert memo.get("abc", 3, lambda: compute("abc")) == 3
    assert calls == ["abc"] and "abc" in memo and memo.held_bytes == 3


def test_the_oldest_go_past_the_entries_or_the_characters() -> None:
    memo: Memo[str, str] = Memo(entries=3, key_bytes=40)
    for key in ("a", "b", "c", "d"):
        memo.get(key, 1, lambda key=key: key)  # type: ignore[misc]
    assert "a" not in memo and len(memo) == 3
    memo.get("x" * 10, 10, lambda: "ten")
    memo.get("y" * 10, 10, lambda: "ten")
    memo.get("z" * 10, 10, lambda: "ten")
    assert memo.held_bytes <= 40 and len(memo) <= 3
    assert "z" * 10 in memo and "b" not in memo


def test_a_key_larger_than_a_quarter_of_the_bound_is_not_kept() -> None:
    memo: Memo[str, int] = Memo(entries=8, key_bytes=40)
    memo.get("small", 5, lambda: 1)
    big = "b" * 11
    assert memo.get(big, 11, lambda: 2) == 2
    assert big not in memo and "small" in memo and memo.held_bytes == 5


def test_a_key_computed_by_two_threads_at_once_is_counted_once() -> None:
    """Token counts are computed in worker threads, by a tokenizer that releases the
    GIL: two requests with the same new instructions compute them at once. Each added
    the key's size, so the bytes held drifted up with every such race until the bound
    was all phantom and the memo kept one entry at most."""
    memo: Memo[str, int] = Memo(entries=8, key_bytes=400)
    both_computing = threading.Barrier(2, timeout=5)

    def compute() -> int:
        both_computing.wait()  # neither has kept the key yet
        return 42

    results: list[int] = []
    threads = [
        threading.Thread(target=lambda: results.append(memo.get("rules", 100, compute)))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    assert results == [42, 42]
    assert len(memo) == 1 and memo.held_bytes == 100
    # The bound still holds what it says: three more keys of 100 bytes fit beside it.
    for key in ("a", "b", "c"):
        memo.get(key, 100, lambda: 0)
    assert "rules" in memo and len(memo) == 4 and memo.held_bytes == 400


def test_keys_are_measured_in_the_bytes_their_strings_take() -> None:
    """Python keeps a string of 4-byte characters in four times the bytes of an ASCII
    one as long: a memo that counted characters would hold four times its bound."""
    ascii_text = "a" * 1_000
    wide_text = "\U0001f600" * 1_000
    assert str_bytes(wide_text) > 3 * str_bytes(ascii_text) > 3_000
    assert str_bytes(None) == 0
    memo: Memo[str, int] = Memo(entries=8, key_bytes=4 * 2_000)
    memo.get(ascii_text, str_bytes(ascii_text), lambda: 1)
    memo.get(wide_text, str_bytes(wide_text), lambda: 2)
    assert ascii_text in memo and wide_text not in memo
    assert memo.held_bytes == str_bytes(ascii_text)


def test_large_instructions_sent_once_each_are_not_held() -> None:
    """A client sending other 3 MB instructions on every request: counted, not kept."""
    with (
        running_server(tokenizer="o200k_base") as srv,
        httpx.Client(base_url=srv.base_url, timeout=60) as http,
    ):
        for n in range(3):
            instructions = f"{n} " + "rule. " * 500_000
            created = http.post(
                "/responses", json={"model": "m", "input": "hi", "instructions": instructions}
            )
            assert created.status_code == 200
            assert created.json()["usage"]["input_tokens"] > 500_000
        engine = srv.server.engine
        assert engine._instruction_tokens.held_bytes == 0
        # 600,000 characters of 4 bytes each: fewer characters than a quarter of the
        # bound's bytes, but more bytes.
        wide = "\U0001f600" * 600_000
        created = http.post("/responses", json={"model": "m", "input": "hi", "instructions": wide})
        assert created.status_code == 200
        assert wide not in engine._instruction_tokens
        assert engine._instruction_tokens.held_bytes == 0
        # Ordinary instructions are kept (the next turn does not count them again).
        http.post("/responses", json={"model": "m", "input": "hi", "instructions": "Be brief."})
        assert "Be brief." in engine._instruction_tokens


class LoopWatchingTokenizer:
    """A tokenizer that notes, for each count of instructions, whether it ran on the
    event loop (where it holds up every other connection) or in a worker thread."""

    def __init__(self, inner: Tokenizer) -> None:
        self.inner = inner
        self.on_loop: list[bool] = []

    def count_instructions(self, text: str) -> int:
        try:
            asyncio.get_running_loop()
            self.on_loop.append(True)
        except RuntimeError:
            self.on_loop.append(False)
        return self.inner.count_instructions(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_large_instructions_not_kept_are_counted_once_a_turn_off_the_event_loop() -> None:
    """Instructions too large for the memo are counted in a worker thread, once a turn:
    neither the response's usage nor server-side compaction's threshold counts them
    again on the event loop (3 MB took seconds there, and every other request of the
    process waited), over HTTP, streamed, and over WebSocket."""
    instructions = "rule. " * 500_000
    body = {"model": "m", "input": "hi", "instructions": instructions}
    compacting = {**body, "context_management": [{"type": "compaction", "compact_threshold": 1000}]}
    with (
        running_server(tokenizer="o200k_base") as srv,
        httpx.Client(base_url=srv.base_url, timeout=60) as http,
    ):
        engine = srv.server.engine
        watching = LoopWatchingTokenizer(engine.tokenizer)
        engine.tokenizer = watching  # type: ignore[assignment]
        for sent in (body, {**body, "stream": True}, compacting):
            created = http.post("/responses", json=sent)
            assert created.status_code == 200
            assert watching.on_loop == [False], sent.keys()
            watching.on_loop.clear()
        with WSClient(srv.ws_url) as ws:
            events = ws.turn(input="hi", instructions=instructions)
            assert events[-1]["response"]["usage"]["input_tokens"] > 500_000
            assert watching.on_loop == [False]
            watching.on_loop.clear()
            # A warm-up (generate: false) is counted off the loop too.
            warmed = ws.turn(input="hi", instructions=instructions, generate=False)
            assert warmed[-1]["type"] == "response.completed"
            assert watching.on_loop == [False]
            watching.on_loop.clear()
        prewarm = {**body, "prompt_cache_options": {"prewarm": True}}
        for sent in (prewarm, {**prewarm, "stream": True}):
            assert http.post("/responses", json=sent).status_code == 200
            assert watching.on_loop == [False], sent.keys()
            watching.on_loop.clear()
