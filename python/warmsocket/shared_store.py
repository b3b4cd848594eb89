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
  "settings": <content hash>, "meta": <JSON>, "store": true}``;
* ``deleted`` — present once the response was deleted: lookups say not found, but
  descendants still load through it (as in the local cache).

Settings (instructions, tools: often tens of KB, the same for every turn of a chain)
are stored once under their content hash, ``<prefix>:s:<hash>``. Every key expires
after the configured TTL.

Loading walks the chain from the requested id towards the root with a server-side
script, in batches, and stops at the first ancestor already in the local cache; the
missing part is rebuilt oldest first with `SessionCache.create`, so locally cached
ancestors are shared, not copied. A chain with a missing link is not found: never a
partial context.

The write-behind queue is flushed within milliseconds; a client that reconnects to
another process in that window may not find its newest response yet. A Redis outage
is logged and counted; local service goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from dataclasses import dataclass
from typing import Any

import msgpack  # type: ignore[import-untyped]
import redis.asyncio as redis

from warmsocket import _core
from warmsocket._core import Items, SessionCache

log = logging.getLogger("warmsocket.shared_store")

RECORD_VERSION = 1
LOAD_BATCH = 64
MAX_CHAIN = 100_000
QUEUE_LIMIT = 10_000

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


@dataclass(frozen=True, slots=True)
class _Record:
    response_id: str
    owner: str
    parent: str | None
    input: bytes
    output: bytes
    settings: bytes
    meta: bytes


class SharedStore:
    """Write-behind publication and on-demand loading of stored responses."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        ttl_seconds: int = 30 * 24 * 3600,
        prefix: str = "warmsocket",
    ) -> None:
        self.client = client
        self.ttl = ttl_seconds
        self.prefix = prefix
        self.errors = 0
        self.published = 0
        self.loaded = 0
        self._queue: asyncio.Queue[_Record] = asyncio.Queue(QUEUE_LIMIT)
        self._writer: asyncio.Task[None] | None = None
        self._walk = client.register_script(_WALK)
        self._known_settings: set[str] = set()

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> SharedStore:
        return cls(redis.Redis.from_url(url), **kwargs)

    async def start(self) -> None:
        """Check the connection and start the writer. Raises ConnectionError."""
        try:
            await self.client.ping()
        except redis.RedisError as exc:
            raise ConnectionError(f"cannot reach Redis ({type(exc).__name__})") from None
        self._writer = asyncio.get_running_loop().create_task(self._write_loop())

    async def aclose(self) -> None:
        """Flush pending writes, then close the connection pool."""
        await self.flush()
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
        await self.client.aclose()

    async def flush(self) -> None:
        if self._writer is not None and not self._writer.done():
            await self._queue.join()

    # -- publishing -----------------------------------------------------------------------

    def publish(self, info: _core.ResponseInfo, own: tuple[Items, Items]) -> None:
        """Queue one stored response for Redis. Never blocks; drops (and counts) when full."""
        if info.connection is not None:
            return  # connection-local (store=false, or built on such): never shared
        record = _Record(
            response_id=info.id,
            owner=info.owner,
            parent=info.previous_response_id,
            input=own[0].json(),
            output=own[1].json(),
            settings=info.settings,
            meta=info.meta,
        )
        try:
            self._queue.put_nowait(record)
        except asyncio.QueueFull:
            self.errors += 1
            log.error("shared store queue full; a stored response was not shared")

    async def _write_loop(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty() and len(batch) < 256:
                batch.append(self._queue.get_nowait())
            try:
                await self._write(batch)
                self.published += len(batch)
            except redis.RedisError as exc:
                self.errors += len(batch)
                log.error(
                    "cannot write stored responses to Redis",
                    extra={"responses": len(batch), "error_type": type(exc).__name__},
                )
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _write(self, batch: list[_Record]) -> None:
        async with self.client.pipeline(transaction=False) as pipe:
            for record in batch:
                digest = hashlib.blake2b(record.settings, digest_size=16).hexdigest()
                settings_key = f"{self.prefix}:s:{digest}"
                if digest not in self._known_settings:
                    pipe.set(settings_key, record.settings, ex=self.ttl)
                    self._known_settings.add(digest)
                else:
                    pipe.expire(settings_key, self.ttl)
                data = msgpack.packb(
                    {
                        "v": RECORD_VERSION,
                        "input": record.input,
                        "output": record.output,
                        "settings": digest,
                        "meta": record.meta,
                        "store": True,
                    }
                )
                key = self._key(record.owner, record.response_id)
                pipe.hset(key, mapping={"parent": record.parent or "", "data": data})
                pipe.expire(key, self.ttl)
            await pipe.execute()

    # -- loading --------------------------------------------------------------------------

    async def load(
        self, cache: SessionCache, response_id: str, *, owner: str, connection: int | None = None
    ) -> bool:
        """Make `response_id` available in the local cache. Returns whether it is now there.

        A deleted response is not found (but loads as the ancestor of another one).
        """
        if _present(cache, response_id, owner, connection):
            return True
        records: list[tuple[str, str, bytes, bool]] = []
        next_id: str | None = response_id
        try:
            while next_id is not None and len(records) < MAX_CHAIN:
                raw = await self._walk(
                    keys=[f"{self.prefix}:r:{owner}:"], args=[next_id, LOAD_BATCH]
                )
                if not raw:
                    return False
                stop = False
                for i in range(0, len(raw), 4):
                    rid = raw[i].decode()
                    parent = raw[i + 1].decode() or None
                    deleted = bool(raw[i + 3])
                    if rid != response_id and _present(cache, rid, owner, connection):
                        stop = True
                        break
                    records.append((rid, parent or "", raw[i + 2], deleted))
                    next_id = parent
                    if parent is None:
                        stop = True
                        break
                if stop:
                    break
                if len(raw) < 4 * LOAD_BATCH:
                    # The walk ended early: a link is missing (expired or never written).
                    return False
            if records and records[0][3]:
                return False  # the requested response itself was deleted
            settings = await self._settings(records)
        except redis.RedisError as exc:
            self.errors += 1
            log.error("cannot read from Redis", extra={"error_type": type(exc).__name__})
            return False
        for rid, parent, data, _deleted in reversed(records):
            record = msgpack.unpackb(data)
            if record.get("v") != RECORD_VERSION:
                log.error("unknown shared record version", extra={"version": record.get("v")})
                return False
            try:
                cache.create(
                    rid,
                    owner=owner,
                    input=Items.parse(record["input"]),
                    output=Items.parse(record["output"]),
                    previous_response_id=parent or None,
                    settings=settings[record["settings"]],
                    meta=record["meta"],
                    store=True,
                )
            except _core.DuplicateResponseId:
                continue  # loaded meanwhile by another request
            except _core.CacheError as exc:
                log.error("cannot load a shared response", extra={"error_type": type(exc).__name__})
                return False
            self.loaded += 1
        for rid, _parent, _data, deleted in records:
            if deleted:
                # Loaded only as an ancestor: its descendants need it, lookups must not see it.
                cache.delete(rid, owner=owner)
        return _present(cache, response_id, owner, connection)

    async def _settings(self, records: list[tuple[str, str, bytes, bool]]) -> dict[str, bytes]:
        digests = sorted({msgpack.unpackb(data)["settings"] for _r, _p, data, _d in records})
        values = (
            await self.client.mget([f"{self.prefix}:s:{d}" for d in digests]) if digests else []
        )
        found: dict[str, bytes] = {
            d: v for d, v in zip(digests, values, strict=True) if isinstance(v, bytes)
        }
        missing = set(digests) - set(found)
        if missing:
            raise redis.DataError(f"{len(missing)} settings records expired")
        return found

    async def delete(self, response_id: str, *, owner: str) -> bool:
        """Mark a shared response deleted. Returns whether it existed."""
        key = self._key(owner, response_id)
        try:
            if not await self.client.exists(key):
                return False
            await self.client.hset(key, "deleted", "1")
        except redis.RedisError as exc:
            self.errors += 1
            log.error("cannot delete from Redis", extra={"error_type": type(exc).__name__})
            return False
        return True

    def _key(self, owner: str, response_id: str) -> str:
        return f"{self.prefix}:r:{owner}:{response_id}"


def _present(cache: SessionCache, response_id: str, owner: str, connection: int | None) -> bool:
    try:
        cache.get(response_id, owner=owner, connection=connection)
    except _core.ResponseNotFound:
        return False
    return True
