"""Stored responses shared between warmsocket processes, through Redis.

One process keeps everything in its own session cache. When several processes serve
one API (replicas behind a load balancer), a client that reconnects may land on
another process; its `store=true` responses must still be continuable by id there.
This module writes each stored response to Redis behind the turn (write-behind, off
the hot path) and, on a local miss, loads a chain from Redis into the local cache.
`store=false` state is never written: it lives only in its connection's process.

Records (one Redis hash per response, key ``<prefix>:r:<owner>:<id>``):

* ``parent``  — the parent's response id, or empty;
* ``data``    — msgpack ``{"v": 1, "input": <JSON array>, "output": <JSON array>,
  "settings": <content hash>, "meta": <JSON>, "store": true}``, plus ``"prefix": n``
  when the parent was found by prefix matching (the client re-sent its history
  instead of naming a `previous_response_id`): the context is then the first n
  items of the parent's context, followed by this response's own items;
* ``settings`` — the content hash of its settings (also in ``data``: here for the
  script that keeps a chain alive);
* ``live``    — its horizon: a time until which all of its ancestors exist (``inf``
  for a root);
* ``deleted`` — present once the response was deleted: lookups say not found, but
  descendants still load through it (as in the local cache).

Settings (instructions, tools: often tens of KB, the same for every turn of a chain)
are stored once under their content hash, ``<prefix>:s:<hash>``.

A record expires the configured TTL after its write, unless a chain keeps it: a
chain that goes on stays loadable as long as its newest record. When a record is
written (`_KEEP`, one script call in the write's pipeline), its parent's expiry is
raised to the parent's horizon, which becomes the new record's, as long as that is
at least a TTL away; otherwise the script walks the chain once and raises every
ancestor (and its settings) to now + 2 TTL, the chain's new horizon. So a chain
costs one walk per TTL, not one per turn, and a chain that stops is gone at most
two TTLs after its last walk (settings are written with two TTLs too). Records
written before horizons existed (no ``live``) get a walk when continued.

Loading walks the chain from the requested id towards the root with a server-side
script, in batches, and stops at the first ancestor already in the local cache; the
missing part is rebuilt oldest first with `SessionCache.create`, so locally cached
ancestors are shared, not copied. A chain with a missing link is not found: never a
partial context.

Deletion marks the record and announces ``[owner, id]`` to every process
(`shared_announcements`: a Redis stream each reads from where it stopped, so a
process that could not read for a while still hears it); each that follows them
(`start(on_deleted=...)`) drops its local copy. A process that missed announcements
(more were made while it could not read than the stream keeps) checks every stored
response it caches (`start(stored_ids=...)`) against the records, and drops those
marked deleted. A response deleted before the writer wrote it is written as deleted;
so is a background response deleted while another process runs it (the mark is
written alone, before its record: `_DELETE`), even if that process never hears of it.

Background responses that another process runs, or that failed or were cancelled
(never stored), are shared through the same Redis by `shared_background` (its
`BackgroundBoard` is this store's `background_board`).

The write-behind queue is flushed within milliseconds; a client that reconnects to
another process in that window may not find its newest response yet. A Redis outage
is logged (where Redis is, the error's type and the OS's reason, e.g. 'Connection
refused'; never content) and counted; local service goes on. A write Redis does not
answer, or refuses (READONLY: a primary that a failover demoted), is tried again until
Redis takes it (`write_retry`: a restart or a failover loses nothing; the writes
queued behind it wait, up to `QUEUE_LIMIT`; past that new ones are dropped, logged and
counted), or for `--redis-write-retry` seconds when set. A load
that Redis does not answer (connection refused or lost, timed out: up to about twice
`SOCKET_TIMEOUT` with the one retry) raises `SharedStoreUnavailable`, and the request
is answered with a retriable 503 `server_error` (`errors.shared_store_unavailable`),
not 'not found': the response may well be there, and a client told 'not found' drops
its chain. Only a record that is missing (expired, never written, deleted) or
unreadable is not found.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import socket
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack  # type: ignore[import-untyped]
import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.typing import EncodableT, FieldT

from warmsocket import _core, write_retry
from warmsocket._core import Binding, Items, SessionCache
from warmsocket.admission import REDIS_CONNECTIONS
from warmsocket.engine import SharedStoreUnavailable
from warmsocket.logs import Tally
from warmsocket.shared_announcements import Announcements
from warmsocket.shared_background import BackgroundBoard, OnCancel
from warmsocket.shared_conversations import SharedConversations
from warmsocket.shared_key_holds import SharedKeyHolds
from warmsocket.shared_request_rate import SharedBuckets
from warmsocket.write_retry import keep_writing_to_redis

log = logging.getLogger("warmsocket.shared_store")

RECORD_VERSION = 1
DEFAULT_TTL = 30 * 24 * 3600
"""Seconds a record lives after it was written: OpenAI's retention of stored responses."""
LOAD_BATCH = 64
MAX_CHAIN = 100_000
EXISTS_BATCH = 10_000
"""Record ids asked about in one pipeline (`having_records`)."""
QUEUE_LIMIT = 10_000
QUEUE_BYTES = 256 * 1024 * 1024
"""What the stored responses waiting to be written may hold (their own items, settings
and meta), besides `QUEUE_LIMIT` of them: past either, new ones are not shared."""
WRITE_BATCH = 256
SOCKET_TIMEOUT = 5.0
CONNECT_TIMEOUT = 2.0
FOLLOW_CONNECTIONS = 16
"""Redis connections for background responses' followers (`BackgroundBoard.follow`):
each holds one through a blocking read; more followers wait their turn."""
REQUEST_CONNECTIONS = REDIS_CONNECTIONS - FOLLOW_CONNECTIONS
"""Redis connections for everything else. More calls at once wait for one, for at
most `SOCKET_TIMEOUT` (then they fail as when Redis does not answer)."""
FOLLOW_WAIT = 30.0
"""Seconds a follower waits for a connection before its stream ends (the client may
stream again from where it got to)."""
ANNOUNCED_MEMORY = 4096
"""Deletion announcements remembered, for loads that read a record before its own."""
RECHECK_BATCH = 1000
"""Records asked of Redis in one round trip when the cache is checked against them."""
SHUTDOWN_FLUSH_TIMEOUT = 10.0
_KNOWN_SETTINGS_LIMIT = 4096

# Walks parent links server-side: returns [id, parent, data, deleted] for up to
# ARGV[2] records starting at ARGV[1]; stops at a missing record.
_WALK = """
local out = {}
local id = ARGV[1]
local limit = tonumber(ARGV[2])
local n = 0
while id and id ~= '' and n < limit do
  local rec = redis.call('HMGET', KEYS[1] .. id, 'parent', 'data', 'deleted')
  if not rec[2] then break end
  table.insert(out, id)
  table.insert(out, rec[1] or '')
  table.insert(out, rec[2])
  table.insert(out, rec[3] or '')
  id = rec[1]
  n = n + 1
end
return out
"""

# Keeps the chain of a record just written alive at least as long as the record.
# KEYS[1]: the new record. ARGV: the record key prefix (`<prefix>:r:<owner>:`), the
# parent's id ('' for a root), the TTL, the settings key prefix, the walk limit.
#
# Each record holds `live`: its "horizon", a time (Redis's clock, in milliseconds)
# until which every one of its ancestors (records and their settings) exists. A
# record written while its parent's horizon is at least a TTL away takes that
# horizon, and only the parent's own expiry is raised to it: one step. Otherwise the
# walk raises the parent and every ancestor (and their settings) to now + 2 TTL, the
# new horizon. So a chain that goes on stays loadable, each record a TTL past its
# write at least (its ancestors to its horizon), for one walk of the chain per TTL;
# records of a chain that stops expire at most two TTLs after its last walk.
# Expiries are only ever raised.
_KEEP = """
local prefix, parent = ARGV[1], ARGV[2]
local ttl, sprefix, limit = tonumber(ARGV[3]) * 1000, ARGV[4], tonumber(ARGV[5])
if parent == '' then
  redis.call('HSET', KEYS[1], 'live', 'inf')
  return 0
end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local function raise(key, at)
  local left = redis.call('PTTL', key)
  if left >= 0 and now + left < at then redis.call('PEXPIREAT', key, at) end
end
local function keep(key, at)
  raise(key, at)
  local settings = redis.call('HGET', key, 'settings')
  if settings then raise(sprefix .. settings, at) end
end
local pkey = prefix .. parent
local live = redis.call('HGET', pkey, 'live')
if not live and redis.call('EXISTS', pkey) == 0 then
  redis.call('HSET', KEYS[1], 'live', '0')  -- its chain is gone already
  return 0
end
local horizon = 0
if live == 'inf' then horizon = now + 2 * ttl elseif live then horizon = tonumber(live) or 0 end
if horizon >= now + ttl then
  keep(pkey, horizon)
  redis.call('HSET', KEYS[1], 'live', string.format('%d', horizon))
  return 1
end
horizon = now + 2 * ttl
local id, n = parent, 0
while id and id ~= '' and n < limit do
  local key = prefix .. id
  if redis.call('EXISTS', key) == 0 then break end
  keep(key, horizon)
  id = redis.call('HGET', key, 'parent')
  n = n + 1
end
redis.call('HSET', KEYS[1], 'live', string.format('%d', horizon))
return n
"""

# Marks a record deleted; 1 if it existed and was not deleted yet. KEYS[2]: the
# response's background record (`shared_background`). A response with no record yet
# whose background run goes on (elsewhere: its process may miss the deletion's
# announcement, or store it just before it hears it) gets the mark alone, for ARGV[1]
# seconds: the record its process writes (HSET, of other fields) is then deleted too.
# KEYS[3]: its published input (`shared_background`), deleted.
_DELETE = """
if KEYS[3] then redis.call('DEL', KEYS[3]) end
local rec = redis.call('HMGET', KEYS[1], 'data', 'deleted')
if rec[2] then return 0 end
if not rec[1] then
  if redis.call('EXISTS', KEYS[2]) == 1 then
    redis.call('HSET', KEYS[1], 'deleted', '1')
    redis.call('EXPIRE', KEYS[1], ARGV[1])
  end
  return 0
end
redis.call('HSET', KEYS[1], 'deleted', '1')
return 1
"""


class RedisUnreachable(ConnectionError):
    """Redis did not answer at start: where it was looked for and why not."""

    advice = "cannot reach Redis; check --redis-url, or start without it"

    def __init__(self, address: str, reason: str, error_type: str) -> None:
        super().__init__(f"cannot reach Redis at {address} ({reason})")
        self.address = address
        self.reason = reason
        self.error_type = error_type


class RedisClusterUnsupported(ConnectionError):
    """Redis runs in cluster mode: a chain's records, a conversation's two keys, are
    read and written together by scripts, which a cluster refuses across its slots."""

    advice = (
        "Redis runs in cluster mode, which warmsocket does not support; point "
        "--redis-url at a single Redis primary"
    )

    def __init__(self, address: str) -> None:
        super().__init__(
            f"Redis at {address} runs in cluster mode, which warmsocket does not support: "
            "point --redis-url at a single Redis primary (replicas with Sentinel, or a "
            "managed service's failover endpoint, keep it available)"
        )
        self.address = address


def failure_reason(exc: BaseException) -> str:
    """Why a Redis call failed, for the log: the operating system's reason found under
    the client's error ('Connection refused', 'Name or service not known', 'timed
    out'), else the error's type. Never the error's own text, which can quote a key
    or a reply."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, socket.gaierror) and cause.strerror:
            return cause.strerror
        if isinstance(cause, TimeoutError):
            return "timed out"
        if isinstance(cause, OSError) and cause.errno is not None and cause.errno > 0:
            return os.strerror(cause.errno)
        cause = cause.__cause__ or cause.__context__
    return type(exc).__name__


def _failure(exc: BaseException) -> dict[str, str]:
    """The log fields of a failed Redis call."""
    return {"error_type": type(exc).__name__, "reason": failure_reason(exc)}


OnDeleted = Callable[[str, str], None]
StoredIds = Callable[[], list[tuple[str, str]]]
"""(owner, response id) of each stored response a process caches."""
"""Called with (owner, response_id) when any process deleted a shared response."""


@dataclass(frozen=True, slots=True)
class _Record:
    """A stored response waiting to be written."""

    key: str
    owner_keys: str
    """The prefix of its owner's record keys (`<prefix>:r:<owner>:`)."""
    parent: str | None
    prefix: int | None
    input: Items
    output: Items
    settings: bytes
    meta: bytes

    @property
    def nbytes(self) -> int:
        return self.input.nbytes + self.output.nbytes + len(self.settings) + len(self.meta)


@dataclass(frozen=True, slots=True)
class _Loaded:
    """A record read back, newest first in a chain."""

    response_id: str
    parent: str | None
    data: dict[str, Any]
    deleted: bool


class SharedStore:
    """Write-behind publication and on-demand loading of stored responses."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        ttl_seconds: int = DEFAULT_TTL,
        prefix: str = "warmsocket",
        followers: redis.Redis | None = None,
    ) -> None:
        self.client = client
        self.followers = client if followers is None else followers
        """The client of background responses' followers' blocking reads: on a pool of
        its own (`from_url`), so that many followers cannot take every connection."""
        self.ttl = ttl_seconds
        self.prefix = prefix
        self.errors = 0
        self.published = 0
        self.loaded = 0
        self.load_hits = 0
        self.load_misses = 0
        self.load_errors = 0
        self.deleted = 0
        self.rechecks = 0
        """Times the cached responses were checked against Redis after missed deletions."""
        self._queue: asyncio.Queue[_Record] = asyncio.Queue(QUEUE_LIMIT)
        self._writer: asyncio.Task[None] | None = None
        self._listener: asyncio.Task[None] | None = None
        self._walk = client.register_script(_WALK)
        self._mark_deleted = client.register_script(_DELETE)
        self._keep = client.register_script(_KEEP)
        # settings digest -> when this process last wrote it (refreshed with EXPIRE since)
        self._known_settings: dict[str, float] = {}
        # Keys queued but not written yet, and those of them deleted meanwhile.
        self._unwritten: set[str] = set()
        self._queued_bytes = 0
        """What the records queued (or being written) hold."""
        self._writing = 0
        """Responses of the batch being written (perhaps tried again)."""
        self._drops = Tally()
        self._tombstones: set[str] = set()
        # (owner, response id) of the deletions announced lately: a load that read a
        # record before its deletion was announced drops it after inserting it.
        self._announced: OrderedDict[tuple[str, str], None] = OrderedDict()
        self.background_board = BackgroundBoard(self)
        """Background responses' state and cancels, for every process."""
        self.conversation_board = SharedConversations(
            client, ttl_seconds=ttl_seconds, prefix=prefix, failure_fields=_failure
        )
        """The Conversations API's conversations, for every process."""
        self.request_buckets = SharedBuckets(client, prefix)
        """`--requests-per-minute-per-key`'s buckets, for every process."""
        self.key_holds = SharedKeyHolds(client, prefix, address=self.address)
        """`--max-connections-per-key`'s counts, for every process (once followed)."""
        self.announcements = Announcements(
            client, prefix, address=self.address, failure_fields=_failure
        )
        """Deletions and background cancels, told to every process."""

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> SharedStore:
        """A store on new connection pools, with short timeouts and one retry: a Redis
        outage must cost a request milliseconds to seconds, not minutes. The pools are
        bounded (`REDIS_CONNECTIONS` in all, which `--max-connections 0` leaves room
        for) and calls past the bound wait for a connection: redis-py's own pool fails
        the 101st call at once, which read as Redis not answering."""

        def pool(connections: int, wait: float) -> redis.BlockingConnectionPool:
            return redis.BlockingConnectionPool.from_url(
                url,
                max_connections=connections,
                timeout=wait,
                socket_timeout=SOCKET_TIMEOUT,
                socket_connect_timeout=CONNECT_TIMEOUT,
                retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), 1),
            )

        # (Each client owns its pool: closing it closes the pool's connections.)
        client = redis.Redis.from_pool(pool(REQUEST_CONNECTIONS, SOCKET_TIMEOUT))
        followers = redis.Redis.from_pool(pool(FOLLOW_CONNECTIONS, FOLLOW_WAIT))
        return cls(client, followers=followers, **kwargs)

    @property
    def address(self) -> str:
        """Where Redis is, for the log: host:port or the socket's path (never the
        URL's password)."""
        options = self.client.connection_pool.connection_kwargs
        if options.get("path"):
            return f"unix:{options['path']}"
        host = str(options.get("host", "localhost"))
        host = f"[{host}]" if ":" in host else host
        return f"{host}:{options.get('port', 6379)}"

    @staticmethod
    def failure_fields(exc: BaseException) -> dict[str, str]:
        """The log fields of a failed Redis call (its type and the OS's reason)."""
        return _failure(exc)

    async def start(
        self,
        on_deleted: OnDeleted | None = None,
        on_cancel: OnCancel | None = None,
        stored_ids: StoredIds | None = None,
    ) -> None:
        """Check the connection, start the writers and, with `on_deleted` and
        `on_cancel`, follow the deletions and background cancels other processes
        announce. With `stored_ids` too, deletions missed (trimmed from the stream
        before this process read them) are found by checking the responses it lists
        against their records. Raises ConnectionError."""
        listening = on_deleted is not None or on_cancel is not None
        try:
            await self.client.ping()
            cluster = await self._cluster_info()
        except (redis.RedisError, OSError) as exc:
            raise RedisUnreachable(self.address, failure_reason(exc), type(exc).__name__) from None
        if str(cluster.get("cluster_enabled", 0)) == "1":
            raise RedisClusterUnsupported(self.address)
        if listening:
            try:
                await self.announcements.begin()
            except (redis.RedisError, OSError) as exc:
                reason = failure_reason(exc)
                raise RedisUnreachable(self.address, reason, type(exc).__name__) from None
        loop = asyncio.get_running_loop()
        self._writer = loop.create_task(self._write_loop())
        if listening:
            self._listener = loop.create_task(self._listen(on_deleted, on_cancel, stored_ids))
        self.background_board.start()
        self.key_holds.start()

    async def _cluster_info(self) -> dict[str, Any]:
        """`INFO cluster`; empty where the command is not allowed (some managed Redis
        services rename or forbid it)."""
        try:
            info: dict[str, Any] = await self.client.info("cluster")
        except redis.ResponseError:
            return {}
        return info

    async def aclose(self, flush_timeout: float = SHUTDOWN_FLUSH_TIMEOUT) -> None:
        """Flush pending writes (background responses', then stored responses', for at
        most `flush_timeout` seconds in all), then close."""
        deadline = time.monotonic() + flush_timeout
        await self.background_board.aclose(min(5.0, flush_timeout))
        # (Only when something is left: `wait_for` with no time left times out before
        # the flush has looked, on Python 3.11.)
        if self._queue.qsize() + self._writing:
            try:
                await asyncio.wait_for(self.flush(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                log.error(
                    "shared store: pending writes dropped at shutdown",
                    extra={"responses": self._queue.qsize() + self._writing},
                )
        for task in (self._writer, self._listener):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.key_holds.aclose()
        await self.client.aclose()
        if self.followers is not self.client:
            await self.followers.aclose()

    async def flush(self) -> None:
        """Wait until everything published so far was written (or failed)."""
        if self._writer is not None and not self._writer.done():
            await self._queue.join()

    def stats(self) -> dict[str, int]:
        return {
            "published": self.published,
            "loaded": self.loaded,
            "load_hits": self.load_hits,
            "load_misses": self.load_misses,
            "load_errors": self.load_errors,
            "deleted": self.deleted,
            "errors": self.errors
            + self.conversation_board.errors
            + self.announcements.errors
            + self.key_holds.errors,
            "queued": self._queue.qsize(),
        }

    # -- publishing -----------------------------------------------------------------------

    def publish(self, info: _core.ResponseInfo, input: Items, output: Items) -> None:
        """Queue one stored response for Redis. Never blocks; drops (and counts) when full.

        `input` and `output` are the response's own items (`SessionCache.own_items`)."""
        if info.connection is not None:
            return  # connection-local (store=false, or built on such): never shared
        parent = info.parent_id
        prefix: int | None = None
        if parent is not None and info.previous_response_id is None:
            # Found by prefix matching: possibly the first n own items of a response
            # (`<id>#<n>`). Link to that response; `prefix` says how much of it counts.
            parent = parent.partition("#")[0]
            prefix = info.items - info.input_items - info.output_items
        record = _Record(
            key=self._key(info.owner, info.id),
            owner_keys=self._key(info.owner, ""),
            parent=parent,
            prefix=prefix,
            input=input,
            output=output,
            settings=info.settings,
            meta=info.meta,
        )
        try:
            if self._queued_bytes + record.nbytes > QUEUE_BYTES:
                raise asyncio.QueueFull
            self._queue.put_nowait(record)
            self._queued_bytes += record.nbytes
        except asyncio.QueueFull:
            self.errors += 1
            if (unlogged := self._drops.count()) is not None:
                log.error(
                    "stored responses not shared: too many queued while Redis does not "
                    "answer (they stay in this process)",
                    extra={
                        "queued": self._queue.qsize(),
                        "queued_bytes": self._queued_bytes,
                        "dropped": unlogged,
                    },
                )
            return
        self._unwritten.add(record.key)

    async def _write_loop(self) -> None:
        while True:
            # (A call of its own: nothing of a batch is held while the loop waits.)
            await self._write_batch(await self._queue.get())

    async def _write_batch(self, first: _Record) -> None:
        """Write `first` and what is queued behind it, up to `WRITE_BATCH` in all."""
        batch = [first]
        while not self._queue.empty() and len(batch) < WRITE_BATCH:
            batch.append(self._queue.get_nowait())
        self._writing = len(batch)
        try:
            await self._write_trying_again(batch)
            self.published += len(batch)
        except Exception as exc:
            self.errors += len(batch)
            log.error(
                "cannot write stored responses to Redis",
                extra={"responses": len(batch), "redis": self.address, **_failure(exc)},
            )
        finally:
            self._writing = 0
            for record in batch:
                self._unwritten.discard(record.key)
                self._queued_bytes -= record.nbytes
                self._tombstones.discard(record.key)
                self._queue.task_done()

    async def _write_trying_again(self, batch: list[_Record]) -> None:
        """`_write` (idempotent: HSET, EXPIRE, the chain kept alive), tried again while
        Redis does not answer (`write_retry`); logs a failure tried again."""
        started = time.monotonic()
        tried_again = False

        def retrying(exc: BaseException) -> None:
            nonlocal tried_again
            tried_again = True
            log.warning(
                "cannot write stored responses to Redis; trying again",
                extra={
                    "responses": len(batch),
                    "queued": self._queue.qsize(),
                    "failing_for_seconds": round(time.monotonic() - started, 1),
                    "give_up_after_seconds": write_retry.WRITE_RETRY_SECONDS,
                    "redis": self.address,
                    **_failure(exc),
                },
            )

        await keep_writing_to_redis(self.client, lambda: self._write(batch), on_retry=retrying)
        if tried_again:
            log.warning(
                "stored responses written to Redis after all",
                extra={"responses": len(batch), "seconds": round(time.monotonic() - started, 3)},
            )

    async def _write(self, batch: list[_Record]) -> None:
        now = time.monotonic()
        written: dict[str, float] = {}
        # Settings only refreshed (EXPIRE): their position in the pipeline's replies.
        refreshed: dict[int, tuple[str, bytes]] = {}
        commands = 0
        async with self.client.pipeline(transaction=False) as pipe:
            for record in batch:
                digest = hashlib.blake2b(record.settings, digest_size=16).hexdigest()
                settings_key = f"{self.prefix}:s:{digest}"
                last = self._known_settings.get(digest)
                # Settings live two TTLs: as long as the records that a chain's walk
                # keeps alive (`_KEEP`), which raises them further when it must.
                if digest in written or (last is not None and now - last < self.ttl / 2):
                    pipe.expire(settings_key, 2 * self.ttl)  # written lately: still there?
                    refreshed[commands] = (digest, record.settings)
                else:
                    pipe.set(settings_key, record.settings, ex=2 * self.ttl)
                    written[digest] = now
                commands += 4  # the settings, HSET, EXPIRE, the chain kept alive
                fields: dict[str, Any] = {
                    "v": RECORD_VERSION,
                    "input": record.input.json(),
                    "output": record.output.json(),
                    "settings": digest,
                    "meta": record.meta,
                    "store": True,
                }
                if record.prefix is not None:
                    fields["prefix"] = record.prefix
                mapping: dict[FieldT, EncodableT] = {
                    "parent": record.parent or "",
                    "data": msgpack.packb(fields),
                    "settings": digest,
                }
                if record.key in self._tombstones:
                    mapping["deleted"] = "1"  # deleted before it was written
                pipe.hset(record.key, mapping=mapping)
                pipe.expire(record.key, self.ttl)
                await self._keep(  # queued on the pipeline
                    keys=[record.key],
                    args=[
                        record.owner_keys,
                        record.parent or "",
                        self.ttl,
                        f"{self.prefix}:s:",
                        MAX_CHAIN,
                    ],
                    client=pipe,
                )
            replies = await pipe.execute()
        # EXPIRE answers 0 for a key that is gone (Redis restarted empty, flushed, or
        # evicted it): write those settings again, or every record would point at none.
        lost = {digest: value for i, (digest, value) in refreshed.items() if not replies[i]}
        if lost:
            async with self.client.pipeline(transaction=False) as pipe:
                for digest, value in lost.items():
                    pipe.set(f"{self.prefix}:s:{digest}", value, ex=self.ttl)
                    written[digest] = now
                await pipe.execute()
        if len(self._known_settings) + len(written) > _KNOWN_SETTINGS_LIMIT:
            self._known_settings.clear()
        self._known_settings.update(written)
        # Deleted while being written: mark them now (and those deleted while these
        # marks were written, until there are none).
        marked: set[str] = set()
        while late := [
            record.key
            for record in batch
            if record.key in self._tombstones and record.key not in marked
        ]:
            async with self.client.pipeline(transaction=False) as pipe:
                for key in late:
                    pipe.hset(key, "deleted", "1")
                await pipe.execute()
            marked.update(late)

    # -- loading --------------------------------------------------------------------------

    async def load(
        self, cache: SessionCache, response_id: str, *, owner: str, connection: int | None = None
    ) -> bool:
        """Make `response_id` available in the local cache. Returns whether it is now there.

        A deleted response is not found (but loads as the ancestor of another one), nor
        is one with a missing link, or an unreadable record (counted as an error).
        Loaded responses are stored entries of `owner`. Raises SharedStoreUnavailable
        when Redis did not answer (connection refused or lost, timed out, still loading
        its data): the response may exist, so the caller must not say not found.
        """
        if _present(cache, response_id, owner, connection):
            return True
        found = False
        try:
            records = await self._chain(cache, response_id, owner)
            if records is not None and not records[0].deleted:
                settings = await self._settings(records)
                # Inserting tokenises every loaded item (Rust, without the GIL): off the
                # event loop, so a long chain does not stall every other connection.
                found = await asyncio.to_thread(self._insert, cache, records, settings, owner)
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            self.errors += 1
            log.error("cannot read from Redis", extra={"redis": self.address, **_failure(exc)})
            if _present(cache, response_id, owner, connection):
                self.load_hits += 1  # another request loaded it meanwhile
                return True
            self.load_errors += 1
            raise SharedStoreUnavailable(response_id) from None
        except redis.RedisError as exc:  # Redis answered, with an error (e.g. WRONGTYPE)
            self.errors += 1
            log.error("cannot read from Redis", extra={"redis": self.address, **_failure(exc)})
        except (ValueError, KeyError, TypeError, _core.CacheError) as exc:
            self.errors += 1
            log.error("cannot load a shared response", extra={"error_type": type(exc).__name__})
        found = found and _present(cache, response_id, owner, connection)
        if found:
            self.load_hits += 1
        else:
            self.load_misses += 1
        return found

    async def _chain(
        self, cache: SessionCache, response_id: str, owner: str
    ) -> list[_Loaded] | None:
        """The records from `response_id` back to the first ancestor cached here (or
        the root), newest first; None when a link is missing."""
        records: list[_Loaded] = []
        next_id = response_id
        while len(records) < MAX_CHAIN:
            raw = await self._walk(keys=[f"{self.prefix}:r:{owner}:"], args=[next_id, LOAD_BATCH])
            for i in range(0, len(raw), 4):
                parent = raw[i + 1].decode() or None
                data = msgpack.unpackb(raw[i + 2])
                if not isinstance(data, dict) or data.get("v") != RECORD_VERSION:
                    raise ValueError("unknown shared record version")
                records.append(_Loaded(raw[i].decode(), parent, data, bool(raw[i + 3])))
                if parent is None or _present(cache, parent, owner, None):
                    return records
                next_id = parent
            if len(raw) < 4 * LOAD_BATCH:
                return None  # a link is missing (expired, or never written)
        return None

    async def _settings(self, records: list[_Loaded]) -> dict[str, bytes]:
        digests = sorted({record.data["settings"] for record in records})
        values = await self.client.mget([f"{self.prefix}:s:{d}" for d in digests])
        found: dict[str, bytes] = {
            d: v for d, v in zip(digests, values, strict=True) if isinstance(v, bytes)
        }
        if len(found) < len(digests):
            raise redis.DataError(f"{len(digests) - len(found)} settings records expired")
        return found

    def _insert(
        self, cache: SessionCache, records: list[_Loaded], settings: dict[str, bytes], owner: str
    ) -> bool:
        """Create the loaded chain oldest first (in a worker thread: a task that looks
        meanwhile may see part of it, and then loads the rest itself; a duplicate is
        skipped). Each response made is pinned (bound) until the next one is made on
        it: other connections' turns meanwhile make the budget evict least recently
        used leaves, and the newest loaded response is one until its child exists."""
        newest: Binding | None = None
        try:
            for record in reversed(records):
                data = record.data
                parent: str | Binding | None = record.parent
                if newest is not None and newest.response_id == record.parent:
                    parent = newest
                input: bytes | list[Any] | Items = data["input"]
                binding: Binding | None = None
                if data.get("prefix") is not None and record.parent is not None:
                    binding, input = _rematch(
                        cache, record.parent, data["prefix"], data["input"], owner
                    )
                    parent = binding
                try:
                    cache.create(
                        record.response_id,
                        owner=owner,
                        input=input,
                        output=data["output"],
                        previous_response_id=parent,
                        settings=settings[data["settings"]],
                        meta=data["meta"],
                        store=True,
                    )
                    self.loaded += 1
                except _core.DuplicateResponseId:
                    pass  # loaded meanwhile by another request
                finally:
                    if binding is not None:
                        binding.release()
                pinned = cache.bind(record.response_id, owner=owner)
                if newest is not None:
                    newest.release()
                newest = pinned
        finally:
            if newest is not None:
                newest.release()
        for record in records:
            # Deleted, or deleted since it was read (the announcement came during the
            # load and found nothing here to drop): loaded only as an ancestor, its
            # descendants need it, lookups must not see it.
            if record.deleted or (owner, record.response_id) in self._announced:
                cache.delete(record.response_id, owner=owner)
        return True

    # -- deleting -------------------------------------------------------------------------

    async def delete(self, response_id: str, *, owner: str) -> bool:
        """Mark a shared response deleted and tell the other processes. Returns whether
        it existed (and was not deleted yet) in Redis or in the write queue. Raises
        ConnectionError when Redis could not be told: the caller must not report the
        response deleted (the other processes, and this one after an eviction, would
        still load it)."""
        key = self._key(owner, response_id)
        existed = False
        try:
            if key in self._unwritten:
                self._tombstones.add(key)
                existed = True
            else:
                board = self.background_board
                running = board.record_key(owner, response_id)
                sent = board.input_key(owner, response_id)
                existed = bool(await self._mark_deleted(keys=[key, running, sent], args=[self.ttl]))
            await self.announcements.announce("deleted", owner, response_id)
        except (redis.RedisError, OSError) as exc:
            self.errors += 1
            log.error("cannot delete from Redis", extra={"redis": self.address, **_failure(exc)})
            raise ConnectionError("Redis could not be told of the deletion") from None
        self.deleted += existed
        return existed

    async def _listen(
        self,
        on_deleted: OnDeleted | None,
        on_cancel: OnCancel | None,
        stored_ids: StoredIds | None,
    ) -> None:
        """Follow the deletions and the background cancels any process announces."""

        def heard(kind: str, owner: str, response_id: str) -> None:
            if kind == "deleted" and on_deleted is not None:
                self._deleted_elsewhere(owner, response_id, on_deleted)
            elif kind == "cancel" and on_cancel is not None:
                on_cancel(owner, response_id)

        async def missed() -> bool:
            if on_deleted is None or stored_ids is None:
                return True
            return await self._recheck_deletions(stored_ids(), on_deleted)

        # Responses cached already (restored from a snapshot) may have been deleted
        # while this process was not following: checked first.
        cached = stored_ids is not None and bool(stored_ids())
        await self.announcements.follow(heard, missed, check_first=cached)

    async def _recheck_deletions(
        self, stored: list[tuple[str, str]], on_deleted: OnDeleted
    ) -> bool:
        """Drop the responses of `stored` whose records are marked deleted; one round trip
        per `RECHECK_BATCH`. Returns False (logged) when Redis did not answer."""
        dropped = 0
        try:
            for start in range(0, len(stored), RECHECK_BATCH):
                batch = stored[start : start + RECHECK_BATCH]
                async with self.client.pipeline(transaction=False) as pipe:
                    for owner, response_id in batch:
                        pipe.hget(self._key(owner, response_id), "deleted")
                    marks = await pipe.execute()
                for (owner, response_id), mark in zip(batch, marks, strict=True):
                    if mark is None:
                        continue
                    try:
                        self._deleted_elsewhere(owner, response_id, on_deleted)
                    except Exception as exc:  # one response's trouble: the others go on
                        log.error(
                            "cannot drop a response deleted elsewhere",
                            extra={"error_type": type(exc).__name__},
                        )
                    dropped += 1
        except (redis.RedisError, OSError) as exc:
            self.errors += 1
            log.error(
                "cannot check the cached responses against Redis; trying again",
                extra={"redis": self.address, **_failure(exc)},
            )
            return False
        self.rechecks += 1
        log.info(
            "checked the cached responses against Redis",
            extra={"checked": len(stored), "dropped": dropped},
        )
        return True

    def _deleted_elsewhere(self, owner: str, response_id: str, on_deleted: OnDeleted) -> None:
        announced = self._announced
        announced[(owner, response_id)] = None
        while len(announced) > ANNOUNCED_MEMORY:
            announced.popitem(last=False)
        key = self._key(owner, response_id)
        if key in self._unwritten:
            # Deleted elsewhere before this process wrote it: written as deleted.
            self._tombstones.add(key)
        on_deleted(owner, response_id)

    async def having_records(self, response_ids: list[str], *, owner: str) -> list[str]:
        """Those of `response_ids` (in order) Redis has a record of for `owner`: one
        pipeline of EXISTS, sent in pieces of `EXISTS_BATCH`."""
        found: list[str] = []
        try:
            for first in range(0, len(response_ids), EXISTS_BATCH):
                batch = response_ids[first : first + EXISTS_BATCH]
                pipe = self.client.pipeline(transaction=False)
                for response_id in batch:
                    pipe.exists(self._key(owner, response_id))
                answers = await pipe.execute()
                found += [rid for rid, there in zip(batch, answers, strict=True) if there]
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            self.errors += 1
            log.error("cannot read from Redis", extra={"redis": self.address, **_failure(exc)})
            raise SharedStoreUnavailable(response_ids[0]) from None
        except redis.RedisError as exc:  # Redis answered, with an error (e.g. NOPERM)
            self.errors += 1
            log.error("cannot read from Redis", extra={"redis": self.address, **_failure(exc)})
            return response_ids  # each loaded (`load`) as before: a miss at worst
        return found

    def _key(self, owner: str, response_id: str) -> str:
        return f"{self.prefix}:r:{owner}:{response_id}"


def _rematch(
    cache: SessionCache, base: str, prefix: int, input: bytes, owner: str
) -> tuple[Binding | None, Items | list[Any]]:
    """The parent and own input of a response whose parent was found by prefix matching:
    matched again here, so the response lists its input as the one the client sent
    (`SessionCache.input_items`); without a prefix index, the whole input as a root."""
    context = cache.context_objects(base, owner=owner)
    if len(context) < prefix:
        raise ValueError("the prefix is longer than the parent's context")
    sent = context[:prefix] + json.loads(input)
    if cache.prefix_index:
        match = cache.match(sent, owner=owner)
        if match.binding is not None:
            return match.binding, match.new_items
    return None, sent


def _present(cache: SessionCache, response_id: str, owner: str, connection: int | None) -> bool:
    try:
        cache.get(response_id, owner=owner, connection=connection)
    except _core.ResponseNotFound:
        return False
    return True
