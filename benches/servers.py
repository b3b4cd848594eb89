"""Benchmark fixtures: servers in their own processes, and an interleaved A/B timer.

Servers run in subprocesses so the client being timed never shares a GIL with them.
Ratios are measured by alternating the two arms call by call (so drift on a shared,
noisy machine hits both alike) and comparing medians.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import pytest

from warmsocket import _core
from warmsocket.bench.procs import Process, child_env, printed_port, stop, wait_for_port

BARE_SERVER = """
import asyncio, json, sys, uvloop
from websockets.asyncio.server import serve
from websockets.frames import Frame, Opcode

async def echo(ws):
    async for message in ws:
        await ws.send(message)

async def replay(ws):
    # A recorded answer, framed once: every request gets it as one write, as
    # warmsocket writes the frames of a burst of events.
    async for _message in ws:
        ws.transport.write(ANSWER)

HANDLER = {"echo": echo, "replay": replay}[sys.argv[1]]
if HANDLER is replay:
    ANSWER = b"".join(
        Frame(Opcode.TEXT, message.encode()).serialize(mask=False, extensions=[])
        for message in json.loads(sys.stdin.readline())
    )

async def main():
    async with serve(HANDLER, "127.0.0.1", 0, max_size=None, compression=None) as server:
        port = server.sockets[0].getsockname()[1]
        print(port, flush=True)
        await asyncio.Future()

uvloop.run(main())
"""
"""A bare `websockets` server on uvloop (`echo` or `replay`, argv[1])."""


@contextmanager
def _bare_server(handler: str, stdin: str | None = None) -> Iterator[Process]:
    process = subprocess.Popen(
        [sys.executable, "-c", BARE_SERVER, handler],
        stdin=subprocess.PIPE if stdin is not None else None,
        stdout=subprocess.PIPE,
        text=True,
        env=child_env(),
    )
    try:
        if stdin is not None:
            assert process.stdin is not None
            process.stdin.write(stdin + "\n")
            process.stdin.close()
        assert process.stdout is not None
        port = wait_for_port(process, process.stdout, f"the {handler} server", printed_port)
        yield Process(process, port, handler)
    finally:
        stop(process)


def echo_server() -> AbstractContextManager[Process]:
    """A bare `websockets` echo server on uvloop, in its own process."""
    return _bare_server("echo")


def replay_server(messages: list[str]) -> AbstractContextManager[Process]:
    """A bare `websockets` server on uvloop, in its own process, that answers every
    message with `messages` (text frames, framed once, written in one call): what a
    server costs that does no work for an answer."""
    return _bare_server("replay", json.dumps(messages))


def require_release_build(benchmark: object) -> None:
    """Timing a debug build would measure the wrong thing: refuse."""
    if not getattr(benchmark, "disabled", True) and _core.BUILD_PROFILE != "release":
        pytest.fail("benchmarks time release builds only: pip install -e . (release) first")


def timing_enabled(benchmark: object) -> bool:
    return not getattr(benchmark, "disabled", True)


def interleaved_medians(
    arms: dict[str, Callable[[], object]], *, rounds: int, warmup: int = 20
) -> dict[str, float]:
    """Median seconds per call of each arm, calling the arms in turn round by round."""
    for _ in range(warmup):
        for fn in arms.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(rounds):
        for name, fn in arms.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}
