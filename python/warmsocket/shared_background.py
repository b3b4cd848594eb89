"""Background responses seen, cancelled and deleted from every process, through Redis.

A background response runs in the process that created it (`background.py`); its
events stay there. With several processes behind a load balancer, a client that
polls `GET /v1/responses/{id}`, cancels or deletes it may land on another one. So
the process that runs it keeps the Response object as it is now on a board in
Redis, under ``<prefix>:b:<owner>:<id>``:

* written when the run starts (`queued`), when its status changes (`in_progress`),
  and every `background.HEARTBEAT_SECONDS` while it runs (with the output so far),
  each time to expire `RUNNING_TTL` seconds later: a record whose process died goes
  away;
* written once more when the run ends: a `failed` or `cancelled` one is not stored
  as a response, so its record is what other processes (and this one, once its own copy
  is forgotten) answer with, for the store's TTL; a `completed` or `incomplete` one
  is stored and shared as any stored response, and its record only bridges the
  write-behind (`RUNNING_TTL`);
* deleted with the response.

A cancel asked of another process is announced on the channel ``<prefix>:cancel``
(which `SharedStore` follows with its deletions); the process that runs the response
cancels it, and the record says `cancelled`.

Writes are queued and written in order by one task (never on a request's path); a
Redis outage is logged (without content) and counted, and the run goes on. A read
that Redis does not answer raises `SharedStoreUnavailable`, answered with a
retriable 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import redis.asyncio as redis

from warmsocket.engine import SharedStoreUnavailable

if TYPE_CHECKING:
    from warmsocket.shared_store import SharedStore

log = logging.getLogger("warmsocket.shared_background")

RUNNING_TTL = 30
"""Seconds a running response's record lives unless its process writes it again."""

OnCancel = Callable[[str, str], None]
"""Called with (owner, response_id) when any process asks for a cancel."""


class BackgroundBoard:
    """The Redis side of background responses shared between processes."""

    def __init__(self, store: SharedStore) -> None:
        self._store = store
        self._client: redis.Redis = store.client
        self._prefix = store.prefix
        self._ops: deque[tuple[str, bytes | None, int]] = deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._writer: asyncio.Task[None] | None = None

    @property
    def channel(self) -> str:
        return f"{self._prefix}:cancel"

    def start(self) -> None:
        self._writer = asyncio.get_running_loop().create_task(self._write_loop())

    async def aclose(self) -> None:
        """Write what is queued (the caller bounds the time), then stop."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.flush(), 5.0)
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer

    async def flush(self) -> None:
        """Wait until every queued write was written (or failed)."""
        if self._writer is not None and not self._writer.done():
            await self._idle.wait()

    # -- writing (the process that runs the response) ---------------------------------

    def publish(self, owner: str, response_id: str, response: bytes, *, status: str) -> None:
        """Queue the Response object as it is now; never blocks, never raises."""
        if status in ("queued", "in_progress", "completed", "incomplete"):
            ttl = RUNNING_TTL
        else:
            ttl = self._store.ttl  # failed, cancelled: never stored otherwise
        self._queue(self._key(owner, response_id), response, ttl)

    def forget(self, owner: str, response_id: str) -> None:
        """Queue the record's deletion (after any write queued before)."""
        self._queue(self._key(owner, response_id), None, 0)

    def _queue(self, key: str, value: bytes | None, ttl: int) -> None:
        self._ops.append((key, value, ttl))
        self._idle.clear()
        self._wake.set()

    async def _write_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            ops = list(self._ops)
            self._ops.clear()
            try:
                async with self._client.pipeline(transaction=False) as pipe:
                    for key, value, ttl in ops:
                        if value is None:
                            pipe.delete(key)
                        else:
                            pipe.set(key, value, ex=ttl)
                    await pipe.execute()
            except Exception as exc:  # Redis and OS errors: the runs go on
                self._failed("cannot write background responses' state to Redis", exc, len(ops))
            if not self._ops:
                self._idle.set()

    # -- reading and asking (any process) -----------------------------------------------

    async def get(self, owner: str, response_id: str) -> dict[str, Any] | None:
        """The Response object another process (or this one) last wrote, None when
        there is none. Raises SharedStoreUnavailable when Redis does not answer."""
        try:
            value = await self._client.get(self._key(owner, response_id))
        except (redis.RedisError, OSError) as exc:
            self._failed("cannot read a background response's state from Redis", exc)
            raise SharedStoreUnavailable(response_id) from None
        if value is None:
            return None
        try:
            response: dict[str, Any] = json.loads(value)
        except ValueError:
            log.error("an unreadable background response record was ignored")
            return None
        return response

    async def request_cancel(self, owner: str, response_id: str) -> None:
        """Ask every process to cancel the response (the one that runs it does).
        Raises SharedStoreUnavailable when Redis does not answer."""
        try:
            await self._client.publish(self.channel, json.dumps([owner, response_id]))
        except (redis.RedisError, OSError) as exc:
            self._failed("cannot ask for a cancel through Redis", exc)
            raise SharedStoreUnavailable(response_id) from None

    def _key(self, owner: str, response_id: str) -> str:
        return f"{self._prefix}:b:{owner}:{response_id}"

    def _failed(self, message: str, exc: BaseException, count: int = 1) -> None:
        """Count and log a failed Redis call (where Redis is and why; no content)."""
        self._store.errors += count
        fields: dict[str, object] = {
            "redis": self._store.address,
            **self._store.failure_fields(exc),
        }
        if count > 1:
            fields["responses"] = count
        log.error(message, extra=fields)


def parse_announcement(data: Any, kind: str) -> tuple[str, str] | None:
    """The (owner, response id) a pub/sub announcement (`[owner, id]`) names; None,
    logged with its `kind`, when it is malformed."""
    try:
        owner, response_id = json.loads(data)
    except Exception as exc:
        log.error(f"bad {kind} announcement", extra={"error_type": type(exc).__name__})
        return None
    return str(owner), str(response_id)


def announced_cancel(data: Any, on_cancel: OnCancel) -> None:
    """A message of the cancel channel: call `on_cancel` with what it names."""
    named = parse_announcement(data, "cancel")
    if named is None:
        return
    owner, response_id = named
    try:
        on_cancel(owner, response_id)
    except Exception as exc:
        log.error("cannot cancel a background response", extra={"error_type": type(exc).__name__})
