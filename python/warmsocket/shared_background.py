"""Background responses seen, followed, cancelled and deleted from every process, through Redis.

A background response runs in the process that created it (`background.py`). With
several processes behind a load balancer, a client that polls `GET
/v1/responses/{id}`, streams its events again, cancels or deletes it may land on
another one. So the process that runs it keeps, in Redis:

* the Response object as it is now, under ``<prefix>:b:<owner>:<id>``: written when
  the run starts (`queued`), when its status changes (`in_progress`), and every
  `background.HEARTBEAT_SECONDS` while it runs (with the output so far), each time to
  expire `RUNNING_TTL` seconds later: a record whose process died goes away. It is
  written once more when the run ends: a `failed` or `cancelled` one is not stored as
  a response, so its record is what other processes (and this one, once its own copy
  is forgotten) answer with, for the store's TTL; a `completed` or `incomplete` one is
  stored and shared as any stored response, and its record only bridges the
  write-behind (`RUNNING_TTL`);
* its events (SSE frames), under ``<prefix>:be:<owner>:<id>``: a Redis stream whose
  entry ``0-<n + 1>`` is the event of sequence number n, and whose last entry, once
  the run ended, is an end mark (field ``end``: the status). Any process streams them
  again (`follow`): the ones written so far, then live until the end mark. The
  stream expires with the record while the run goes on, and `RETAIN_SECONDS` after it
  ended, as the running process's own copy;
* what its request sent (`GET .../input_items` on any process), under
  ``<prefix>:bi:<owner>:<id>``: a JSON array of the input items, written with the
  first record and expiring with the record;
* all deleted with the response.

A cancel asked of another process is announced to all (`shared_announcements`, with
the deletions); the process that runs the response cancels it, and the record says
`cancelled`. The cancel is also kept, ``<prefix>:bc:<owner>:<id>`` for the store's TTL,
and the process that runs the response looks for its runs' cancels every
`background.HEARTBEAT_SECONDS`: a cancel whose announcement it missed (trimmed from
the stream while it could not read) still ends the run, that much later.

Writes are queued and written in order by one task (on a request's path only in
that a background create waits, briefly, for its first writes: `written`), and tried
again until Redis takes them (`write_retry`, through a failover too; at most
`MAX_QUEUED_WRITES` wait); a write given up (`--redis-write-retry`) or dropped is
logged (without content) and counted, and the run goes on (a follower elsewhere whose
stream then misses events ends it there, rather than skip them). A
read that Redis does not answer raises `SharedStoreUnavailable`, answered with a
retriable 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import redis.asyncio as redis

from warmsocket.engine import SharedStoreUnavailable
from warmsocket.write_retry import keep_writing_to_redis

if TYPE_CHECKING:
    from redis.asyncio.client import Pipeline

    from warmsocket.shared_store import SharedStore

log = logging.getLogger("warmsocket.shared_background")

RUNNING_TTL = 30
"""Seconds a running response's record lives unless its process writes it again."""

OnCancel = Callable[[str, str], None]
"""Called with (owner, response_id) when any process asks for a cancel."""


Write = Callable[["Pipeline"], object]
"""One queued write: adds its commands to the writer's pipeline."""

MAX_QUEUED_WRITES = 100_000
"""Writes waiting at most, queued or being written (Redis slower than the runs, or
not answering); more are dropped, counted and logged."""
MAX_QUEUED_BYTES = 256 * 1024 * 1024
"""What the queued writes may hold (Response objects, events), besides their count."""
FOLLOW_BLOCK_MS = 1000
"""How long one read of a followed stream waits for new events (well under the
client's socket timeout); a follower that went away is noticed within it."""
FOLLOW_BATCH = 256
"""Events read at most at once by a follower."""
_END = b"end"
_EVENT = b"e"


class BackgroundBoard:
    """The Redis side of background responses shared between processes."""

    def __init__(self, store: SharedStore) -> None:
        self._store = store
        self._client: redis.Redis = store.client
        self._followers: redis.Redis = store.followers
        self._prefix = store.prefix
        self._ops: deque[tuple[Write, int]] = deque()
        """Writes queued, with the bytes each holds."""
        self._ops_bytes = 0
        """What the queued writes, and those being written, hold."""
        self._writing = 0
        """Writes being written (perhaps tried again): they wait too."""
        self._dropped = 0
        self._queued_total = 0
        """Writes queued since the start (not those dropped)."""
        self._done_total = 0
        """Of those, the ones written or given up (in queue order)."""
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        """`written` calls waiting: until `_done_total` reaches each's count."""
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._writer: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._writer = asyncio.get_running_loop().create_task(self._write_loop())

    async def aclose(self, timeout: float = 5.0) -> None:
        """Write what is queued (for at most `timeout` seconds), then stop; what is
        left then is dropped (logged)."""
        # (Only when something is left: `wait_for` with no time left times out before
        # the flush has looked, on Python 3.11.)
        if self._waiting:
            try:
                await asyncio.wait_for(self.flush(), timeout)
            except TimeoutError:
                log.error(
                    "background responses' writes to Redis dropped at shutdown",
                    extra={"redis": self._store.address, "writes": self._waiting},
                )
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer

    @property
    def _waiting(self) -> int:
        """Writes not written yet: queued, or being written."""
        return len(self._ops) + self._writing

    async def flush(self) -> None:
        """Wait until every queued write was written (or failed)."""
        if self._writer is not None and not self._writer.done():
            await self._idle.wait()

    async def written(self, timeout: float) -> bool:
        """Wait until the writes queued so far were written (or given up), for at most
        `timeout` seconds; whether they were. Those queued later are not waited for."""
        target = self._queued_total
        if self._done_total >= target or self._writer is None or self._writer.done():
            return self._done_total >= target
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((target, done))
        try:
            await asyncio.wait_for(asyncio.shield(done), timeout)
        except TimeoutError:
            return False
        finally:
            self._waiters = [(t, f) for t, f in self._waiters if f is not done]
        return True

    # -- writing (the process that runs the response) ---------------------------------

    def publish(
        self,
        owner: str,
        response_id: str,
        response: bytes,
        *,
        status: str,
        input_json: bytes | None = None,
    ) -> None:
        """Queue the Response object as it is now (with the first, `input_json`: what
        its request sent, as JSON items); never blocks, never raises. While the run
        goes on, its events' expiry is put off with the record's; its input's always
        is."""
        if status in ("queued", "in_progress", "completed", "incomplete"):
            ttl = RUNNING_TTL
        else:
            ttl = self._store.ttl  # failed, cancelled: never stored otherwise
        key = self._key(owner, response_id)
        events = self._events_key(owner, response_id)
        sent = self.input_key(owner, response_id)
        running = status in ("queued", "in_progress")

        def write(pipe: Pipeline) -> None:
            pipe.set(key, response, ex=ttl)
            if input_json is not None:
                pipe.set(sent, input_json, ex=ttl)
            else:
                pipe.expire(sent, ttl)
            if running:
                pipe.expire(events, RUNNING_TTL)

        self._queue(write, len(response) + len(input_json or b""))

    def append_events(self, owner: str, response_id: str, first: int, events: list[bytes]) -> None:
        """Queue a run's new events, the first of sequence number `first`; never
        blocks, never raises."""
        key = self._events_key(owner, response_id)

        def write(pipe: Pipeline) -> None:
            for number, event in enumerate(events, first):
                pipe.xadd(key, {_EVENT: event}, id=f"0-{number + 1}")
            pipe.expire(key, RUNNING_TTL)

        self._queue(write, sum(len(event) for event in events))

    def end_events(
        self, owner: str, response_id: str, count: int, status: str, keep_seconds: int
    ) -> None:
        """Queue the end mark after a run's `count` events; they are kept
        `keep_seconds` more."""
        key = self._events_key(owner, response_id)

        def write(pipe: Pipeline) -> None:
            pipe.xadd(key, {_END: status}, id=f"0-{count + 1}")
            pipe.expire(key, keep_seconds)

        self._queue(write)

    def forget(self, owner: str, response_id: str) -> None:
        """Queue the deletion of the record and the events (after any write queued
        before)."""
        keys = (
            self._key(owner, response_id),
            self._events_key(owner, response_id),
            self.input_key(owner, response_id),
        )
        self._queue(lambda pipe: pipe.delete(*keys))

    def _queue(self, write: Write, nbytes: int = 0) -> None:
        if self._waiting >= MAX_QUEUED_WRITES or self._ops_bytes + nbytes > MAX_QUEUED_BYTES:
            self._dropped += 1
            self._store.errors += 1
            if self._dropped == 1:
                log.error(
                    "background responses' writes to Redis dropped: too many queued",
                    extra={"redis": self._store.address, "queued": self._waiting},
                )
            return
        self._ops.append((write, nbytes))
        self._queued_total += 1
        self._ops_bytes += nbytes
        self._idle.clear()
        self._wake.set()

    async def _write_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            # (A call of its own: nothing of the writes is held while the loop waits.)
            await self._write_queued()
            if not self._ops:
                self._idle.set()

    async def _write_queued(self) -> None:
        """Write what is queued now, in one pipeline (tried again: `write_retry`)."""
        ops = [write for write, _nbytes in self._ops]
        nbytes = sum(n for _write, n in self._ops)
        self._ops.clear()
        self._dropped = 0
        self._writing = len(ops)
        try:
            await keep_writing_to_redis(self._client, functools.partial(self._write, ops))
        except Exception as exc:  # Redis and OS errors: the runs go on
            self._failed("cannot write background responses' state to Redis", exc, len(ops))
        finally:
            self._writing = 0
            self._ops_bytes -= nbytes  # (held while they were tried)
            self._done_total += len(ops)
            self._wake_waiters()

    def _wake_waiters(self) -> None:
        """Let the `written` calls whose writes are all done go on."""
        for target, done in self._waiters:
            if target <= self._done_total and not done.done():
                done.set_result(None)

    async def _write(self, ops: list[Write]) -> None:
        """One try of `ops`, in one pipeline. Idempotent: SET, EXPIRE, DEL, and XADDs
        whose entries a try whose answer was lost (or redis-py's retry) may have added:
        those are refused by Redis and ignored."""
        async with self._client.pipeline(transaction=False) as pipe:
            for write in ops:
                write(pipe)
            results = await pipe.execute(raise_on_error=False)
        for result in results:
            if isinstance(result, redis.ResponseError) and not _added_already(result):
                raise result

    # -- reading and asking (any process) -----------------------------------------------

    async def get(self, owner: str, response_id: str) -> dict[str, Any] | None:
        """The Response object another process (or this one) last wrote, None when
        there is none. Raises SharedStoreUnavailable when Redis does not answer."""
        value = await self._unless_deleted(self._key(owner, response_id), owner, response_id)
        if value is None:
            return None
        try:
            response: dict[str, Any] = json.loads(value)
        except ValueError:
            log.error("an unreadable background response record was ignored")
            return None
        return response

    async def get_input(self, owner: str, response_id: str) -> bytes | None:
        """What the request of a background response another process (or this one)
        runs or ran sent, as a JSON array of items; None when there is none (not
        written yet, expired, or the response deleted). Raises SharedStoreUnavailable
        when Redis does not answer."""
        key = self.input_key(owner, response_id)
        return await self._unless_deleted(key, owner, response_id)

    async def _unless_deleted(self, key: str, owner: str, response_id: str) -> bytes | None:
        """The value at `key`, one of the response's, unless the response was deleted
        (None then, or when there is none)."""
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.get(key)
                pipe.hexists(self._stored_key(owner, response_id), "deleted")
                value, deleted = await pipe.execute()
        except (redis.RedisError, OSError) as exc:
            self._failed("cannot read a background response from Redis", exc)
            raise SharedStoreUnavailable(response_id) from None
        return None if value is None or deleted else bytes(value)

    @property
    def ttl(self) -> int:
        """Seconds a failed or cancelled response's record is kept (the store's)."""
        return self._store.ttl

    async def deleted(self, owner: str, response_id: str) -> bool:
        """Whether the response was deleted (its stored record is marked so, by any
        process). Raises SharedStoreUnavailable when Redis does not answer."""
        try:
            marked = await self._client.hexists(self._stored_key(owner, response_id), "deleted")
        except (redis.RedisError, OSError) as exc:
            self._failed("cannot read a background response's state from Redis", exc)
            raise SharedStoreUnavailable(response_id) from None
        return bool(marked)

    async def can_follow(self, owner: str, response_id: str) -> bool:
        """Whether the response's events can be streamed from here: a process keeps
        them (it runs the response, or ended it at most `RETAIN_SECONDS` ago), or one
        runs it and has not written any yet. Raises SharedStoreUnavailable."""
        try:
            return await self._followable(owner, response_id)
        except (redis.RedisError, OSError) as exc:
            self._failed("cannot read a background response's events from Redis", exc)
            raise SharedStoreUnavailable(response_id) from None

    async def _followable(self, owner: str, response_id: str) -> bool:
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.exists(self._events_key(owner, response_id))
            pipe.get(self._key(owner, response_id))
            pipe.hexists(self._stored_key(owner, response_id), "deleted")
            events, record, deleted = await pipe.execute()
        if deleted:
            return False
        return bool(events) or (record is not None and _running(record))

    async def _more_to_come(self, owner: str, response_id: str, expected: int) -> bool:
        """Whether a follower waiting for the event of sequence number `expected` may
        still get it: the run's events have no end mark at or before it (a client may
        ask to start past the last event of a run that ended), and are there or their
        response runs (neither deleted nor expired with its process)."""
        top: Any = await self._client.xrevrange(self._events_key(owner, response_id), count=1)
        if top:
            entry_id: bytes
            fields: dict[bytes, bytes]
            entry_id, fields = top[0]
            # (An end mark past `expected` is read next, after the events before it.)
            if _END in fields and int(entry_id.rpartition(b"-")[2]) - 1 <= expected:
                return False
        return await self._followable(owner, response_id)

    async def follow(
        self,
        owner: str,
        response_id: str,
        after: int,
        write: Callable[[bytes], None],
        drain: Callable[[], Awaitable[None]],
        closing: Callable[[], bool],
    ) -> None:
        """Write the response's events after sequence number `after` (each call one or
        more whole events, never none), then the new ones as the running process
        writes them, until its end mark (at once when `after` is past it), until the
        events are gone and the response does not run (deleted, or its process died),
        or until the reader goes away. A gap in the events (writes lost in an outage),
        or Redis not answering, ends it early (logged)."""
        key = self._events_key(owner, response_id)
        expected = max(after + 1, 0)
        last = f"0-{expected}"
        reply: Any = None
        while not closing():
            try:
                # Before the first read (`after` may be past the end already), and after
                # each that found nothing new.
                if not reply and not await self._more_to_come(owner, response_id, expected):
                    return
                reply = await self._followers.xread(
                    {key: last}, count=FOLLOW_BATCH, block=FOLLOW_BLOCK_MS
                )
            except (redis.RedisError, OSError) as exc:
                self._failed("cannot read a background response's events from Redis", exc)
                return
            if not reply:
                continue
            frames: list[bytes] = []
            entries: list[tuple[bytes, dict[bytes, bytes]]] = reply[0][1]
            for entry_id, fields in entries:
                number = int(entry_id.rpartition(b"-")[2]) - 1
                if number != expected or _END in fields:
                    if number != expected:
                        log.error(
                            "a background response's events in Redis have a gap: "
                            "its stream ends there",
                            extra={"sequence_number": expected},
                        )
                    if frames:
                        write(b"".join(frames))
                    return
                frames.append(fields[_EVENT])
                expected += 1
                last = entry_id.decode()
            write(b"".join(frames))
            await drain()

    async def request_cancel(self, owner: str, response_id: str) -> None:
        """Ask every process to cancel the response (the one that runs it does).
        Raises SharedStoreUnavailable when Redis does not answer."""
        try:
            # Kept as long as a stored response: the process that runs the response may
            # be cut off from Redis for long, and looks for it when it is back.
            await self._client.set(self._cancel_key(owner, response_id), 1, ex=self._store.ttl)
        except (redis.RedisError, OSError) as exc:
            self._failed("cannot ask for a cancel through Redis", exc)
            raise SharedStoreUnavailable(response_id) from None
        try:
            await self._store.announcements.announce("cancel", owner, response_id)
        except (redis.RedisError, OSError) as exc:
            # Asked all the same: the process that runs it finds the kept cancel at its
            # next heartbeat.
            self._failed("cannot announce a cancel through Redis", exc)

    async def cancels_asked(self, runs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """Those of `runs` (owner, response id) whose cancel was asked within
        `RUNNING_TTL` seconds. Raises Redis and OS errors."""
        if not runs:
            return []
        async with self._client.pipeline(transaction=False) as pipe:
            for owner, response_id in runs:
                pipe.exists(self._cancel_key(owner, response_id))
            asked = await pipe.execute()
        return [run for run, found in zip(runs, asked, strict=True) if found]

    def record_key(self, owner: str, response_id: str) -> str:
        """Where the response's record is (`SharedStore.delete` looks for it)."""
        return self._key(owner, response_id)

    def input_key(self, owner: str, response_id: str) -> str:
        """Where what the response's request sent is (`SharedStore.delete` deletes it)."""
        return f"{self._prefix}:bi:{owner}:{response_id}"

    def _key(self, owner: str, response_id: str) -> str:
        return f"{self._prefix}:b:{owner}:{response_id}"

    def _stored_key(self, owner: str, response_id: str) -> str:
        """The `SharedStore` record of the response, marked `deleted` once it was
        deleted; before the response was stored, too, while it ran (the process that
        runs it may not have heard yet, and writes its state again)."""
        return f"{self._prefix}:r:{owner}:{response_id}"

    def _cancel_key(self, owner: str, response_id: str) -> str:
        return f"{self._prefix}:bc:{owner}:{response_id}"

    def _events_key(self, owner: str, response_id: str) -> str:
        return f"{self._prefix}:be:{owner}:{response_id}"

    def _failed(self, message: str, exc: BaseException, count: int = 1) -> None:
        """Count and log a failed Redis call (where Redis is and why; no content)."""
        self._store.errors += count
        fields: dict[str, object] = {
            "redis": self._store.address,
            **self._store.failure_fields(exc),
        }
        if count > 1:
            fields["writes"] = count
        log.error(message, extra=fields)


def _added_already(error: redis.ResponseError) -> bool:
    """Whether Redis refused an XADD because the stream has the entry's id (or a later
    one): the event was written before."""
    return "equal or smaller than the target stream top item" in str(error)


def _running(record: bytes | str) -> bool:
    """Whether a record says its response still runs (`queued` or `in_progress`)."""
    try:
        status = json.loads(record).get("status")
    except (ValueError, AttributeError):
        return False
    return status in ("queued", "in_progress")
