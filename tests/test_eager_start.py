"""The eager start of a model task (`Server.eager_start`): `_Resumed` continues a
coroutine whose first step already ran, as awaiting it would have."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import uvloop

from warmsocket.server import _Resumed


async def _body(log: list[Any], future: asyncio.Future[str]) -> None:
    log.append("first step")
    try:
        log.append(await future)
        await asyncio.sleep(0)  # a bare yield
        log.append("after a bare yield")
    except BaseException as exc:
        log.append(type(exc).__name__)
        raise
    finally:
        await asyncio.sleep(0)  # cleanup that waits, after a cancellation too
        log.append("finally")


def _run(case: Any) -> list[Any]:
    log: list[Any] = []

    async def main() -> None:
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        coro = _body(log, future)
        pending = coro.send(None)  # the eager first step, outside any task
        assert pending is future and log == ["first step"]
        task = asyncio.get_running_loop().create_task(_Resumed(coro, pending))
        await case(task, future)

    uvloop.run(main())
    return log


def test_the_rest_runs_as_the_task_once_the_future_is_done() -> None:
    async def case(task: asyncio.Task[None], future: asyncio.Future[str]) -> None:
        await asyncio.sleep(0)
        assert not task.done()  # waiting for the future
        future.set_result("answer")
        await task

    assert _run(case) == ["first step", "answer", "after a bare yield", "finally"]


def test_an_exception_of_the_future_is_raised_in_the_coroutine() -> None:
    async def case(task: asyncio.Task[None], future: asyncio.Future[str]) -> None:
        future.set_exception(ValueError("upstream broke"))
        with pytest.raises(ValueError):
            await task

    assert _run(case) == ["first step", "ValueError", "finally"]


def test_cancelling_the_task_throws_into_the_coroutine_and_its_cleanup_still_waits() -> None:
    async def case(task: asyncio.Task[None], future: asyncio.Future[str]) -> None:
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert task.cancelled() and future.cancelled()

    assert _run(case) == ["first step", "CancelledError", "finally"]


def test_a_task_cancelled_before_its_first_step_still_throws_into_the_coroutine() -> None:
    """A client that closes in the same event-loop pass as its create: the task is
    cancelled before it ever ran. The coroutine still gets the cancellation, so its
    handlers and cleanup run (an upstream connection it was opening is let go);
    as a coroutine awaiting it, the task never started it and it stayed suspended."""

    async def case(task: asyncio.Task[None], future: asyncio.Future[str]) -> None:
        task.cancel()  # (no await before: its first step has not run)
        with pytest.raises(asyncio.CancelledError):
            await task
        assert task.cancelled() and future.cancelled()

    assert _run(case) == ["first step", "CancelledError", "finally"]
