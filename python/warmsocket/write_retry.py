"""Writes behind the turn, tried again while Redis does not answer.

Stored responses (`shared_store`), background responses' state and events
(`shared_background`) and the items responses add to conversations (`conversations`)
are written to Redis after the turn. A Redis restart or failover takes seconds to a
minute or more (Sentinel notices a dead primary after 30 s by default); a write that
failed then and was dropped would leave the response or the addition only in the
process that made it, and a client sent to another process would be told 'not found'.
So a failed write is tried again, with a backoff, until Redis answers: by default for
as long as it takes (`serve --redis-write-retry SECONDS` gives up after that long, from
the write's first try). Each writer writes in order, so the writes behind a failing one
wait in their queue, which is bounded: past it new writes are dropped (logged and
counted by the writer). A shutdown gives the writers what is left of its timeout.

A failover shows in one more way: the primary a connection leads to, demoted to a
replica, refuses writes (READONLY) until the connection is made again (to the new
primary, where a failover endpoint now points). So `keep_writing_to_redis` tries such a
write again too, after closing the idle connections that lead there.

A write whose answer was lost (a timeout) may have been done: every write tried again
must be idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from redis.asyncio import Redis

T = TypeVar("T")

WRITE_RETRY_SECONDS: float | None = None
"""How long a write is tried again while Redis does not answer, from its first try;
None: until it answers (`serve --redis-write-retry`)."""
STILL_FAILING_SECONDS = 60.0
"""While a write keeps failing, `on_retry` is called again this often (a log line)."""
FIRST_DELAY = 0.1
MAX_DELAY = 2.0


async def keep_trying(
    write: Callable[[], Awaitable[T]],
    *,
    retriable: tuple[type[BaseException], ...],
    on_retry: Callable[[BaseException], None] | None = None,
) -> T:
    """`write()`'s result. An exception of `retriable` is tried again after a delay
    (0.1 s, doubling up to 2 s), unless `WRITE_RETRY_SECONDS` is set and the next try
    would start later than that after the first: then it is raised. `on_retry` is
    called at the first failure tried again, and every `STILL_FAILING_SECONDS` while
    the write keeps failing."""
    limit = WRITE_RETRY_SECONDS
    started = time.monotonic()
    delay = FIRST_DELAY
    told: float | None = None
    while True:
        try:
            return await write()
        except retriable as exc:
            now = time.monotonic()
            if limit is not None and now - started + delay > limit:
                raise
            if on_retry is not None and (told is None or now - told >= STILL_FAILING_SECONDS):
                told = now
                on_retry(exc)
        await asyncio.sleep(delay)
        delay = min(delay * 2, MAX_DELAY)


async def keep_writing_to_redis(
    client: Redis,
    write: Callable[[], Awaitable[T]],
    *,
    on_retry: Callable[[BaseException], None] | None = None,
) -> T:
    """`keep_trying(write)` for a write to Redis through `client`: tried again while
    Redis does not answer (down, restarting, unreachable, hung) or answers READONLY (a
    failover demoted it). After a READONLY answer the pool's idle connections are
    closed (as redis-py's Sentinel connections do): they lead to the demoted primary,
    and new ones reach the new primary where a failover endpoint (a DNS name) points
    to it now; with the old primary promoted again, they lead there as before."""
    # Imported here: the server imports this module without --redis-url, where the
    # Redis client need not be installed.
    from redis import exceptions as redis_errors

    async def once() -> T:
        try:
            return await write()
        except redis_errors.ReadOnlyError:
            await leave_demoted_primary(client)
            raise

    failures = (
        redis_errors.ConnectionError,
        redis_errors.TimeoutError,
        redis_errors.ReadOnlyError,
        OSError,
    )
    return await keep_trying(once, retriable=failures, on_retry=on_retry)


async def leave_demoted_primary(client: Redis) -> None:
    """After a READONLY answer: close the pool's idle connections, which lead to a
    primary a failover demoted, so that the next command connects again (to where a
    failover endpoint points now). For every writer, those tried again here and those
    whose caller is answered 503 and tries again itself."""
    from redis import exceptions as redis_errors

    # (Closing can only fail on a connection already broken: the next command makes
    # a new one anyway.)
    with contextlib.suppress(redis_errors.RedisError, OSError):
        await client.connection_pool.disconnect(inuse_connections=False)
