"""Writes behind the turn, tried again while Redis does not answer.

Stored responses (`shared_store`) and the items responses add to conversations
(`conversations`) are written to Redis after the turn. A Redis restart or failover
takes seconds; a write that failed then and was dropped would leave the response or
the addition only in the process that made it, and a client sent to another process
would be told 'not found'. So a failed write is tried again, with a backoff, for up to
`WRITE_RETRY_SECONDS`, before it is given up (logged and counted by the caller).

A write whose answer was lost (a timeout) may have been done: every write tried again
must be idempotent.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

WRITE_RETRY_SECONDS = 30.0
"""How long a write is tried again while Redis does not answer, from its first try."""
FIRST_DELAY = 0.1
MAX_DELAY = 2.0


async def keep_trying(
    write: Callable[[], Awaitable[T]],
    *,
    retriable: tuple[type[BaseException], ...],
    on_retry: Callable[[BaseException], None] | None = None,
) -> T:
    """`write()`'s result. An exception of `retriable` is tried again after a delay
    (0.1 s, doubling up to 2 s) unless the next try would start more than
    `WRITE_RETRY_SECONDS` after the first: then it is raised. `on_retry` is called
    once, at the first failure tried again."""
    limit = WRITE_RETRY_SECONDS
    started = time.monotonic()
    delay = FIRST_DELAY
    failed = False
    while True:
        try:
            return await write()
        except retriable as exc:
            if time.monotonic() - started + delay > limit:
                raise
            if not failed and on_retry is not None:
                on_retry(exc)
            failed = True
        await asyncio.sleep(delay)
        delay = min(delay * 2, MAX_DELAY)
