"""Conversations shared between warmsocket processes, through Redis.

With `--redis-url`, Redis holds every conversation (`conversations.Conversations`
keeps a copy of those it used):

* ``<prefix>:c:<owner>:<id>``: a hash of ``created_at``, ``metadata`` (JSON) and
  ``version``, which every change raises, and ``incomplete`` once items a process
  could not write are known lost (`mark_incomplete`);
* ``<prefix>:ci:<owner>:<id>``: a list of the items, oldest first, each entry the
  item's id (its `%` and spaces written `%25` and `%20`: a client may choose an id
  with a space), a space and its canonical JSON;
* ``<prefix>:cl:<owner>:<id>``: while a process generates a response that will add
  to the conversation, and until the addition is written, the token of its hold
  (`conversation_holds`), set only if no other process's is there, and expiring
  unless renewed.

Every change is one script (atomic): it answers the version before and after it, so
the process that made it knows whether its copy is the conversation as it now is
(no other process changed it in between) or must be read again. Both keys expire
`--redis-ttl` after the last change. Before each use a process asks for the version
(one round trip) and reads the conversation again only when it is not its copy's.

A call Redis does not answer raises `engine.SharedStoreUnavailable` (a retriable
503 for the client, never 'not found'); its failure is logged without content.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as redis

from warmsocket.engine import SharedStoreUnavailable
from warmsocket.write_retry import leave_demoted_primary

Arg = bytes | str | int

log = logging.getLogger("warmsocket.shared_conversations")

# Creates once (the id is new: a conversation there is an earlier try, see _APPEND).
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'created_at', ARGV[1], 'metadata', ARGV[2], 'version', 1)
if #ARGV > 3 then
  redis.call('RPUSH', KEYS[2], unpack(ARGV, 4))
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
return 1
"""


def _change(body: str) -> str:
    """A script that changes a conversation (ARGV[1]: the TTL): nil when it is gone,
    else `body` runs and the version is raised, the expiry renewed, and {version
    before, after} answered."""
    return f"""
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local before = tonumber(redis.call('HGET', KEYS[1], 'version'))
{body}
local after = redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[1])
return {{before, after}}
"""


# Appends ARGV[2..], once: a try whose answer was lost (a timeout) may have been done
# (Redis runs what was sent before it stopped answering), and the client tries again
# (redis-py's one retry, `write_retry`). When the list has the first entry (item ids
# are unique), nothing is added and {-1, version} is answered: no copy's version.
_APPEND = _change("""
if #ARGV > 1 and redis.call('LPOS', KEYS[2], ARGV[2], 'RANK', -1) then
  return {-1, before}
end
for first = 2, #ARGV, 1000 do
  redis.call('RPUSH', KEYS[2], unpack(ARGV, first, math.min(first + 999, #ARGV)))
end""")

# Appends ARGV[3..] if the version is still ARGV[2]: {before, after}, or {-2,
# version} when the conversation changed since (nothing done).
_APPEND_AT = _change("""
if before ~= tonumber(ARGV[2]) then return {-2, before} end
for first = 3, #ARGV, 1000 do
  redis.call('RPUSH', KEYS[2], unpack(ARGV, first, math.min(first + 999, #ARGV)))
end""")

# Replaces the items with ARGV[3..] if the version is still ARGV[2] (the copy that
# writes them is the conversation as it was, plus what Redis lacks): {before, after},
# or {-2, version} when another process changed it since (nothing done).
_REPLACE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local before = tonumber(redis.call('HGET', KEYS[1], 'version'))
if before ~= tonumber(ARGV[2]) then return {-2, before} end
redis.call('DEL', KEYS[2])
for first = 3, #ARGV, 1000 do
  redis.call('RPUSH', KEYS[2], unpack(ARGV, first, math.min(first + 999, #ARGV)))
end
local after = redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[1])
return {before, after}
"""

# Marks the conversation incomplete.
_INCOMPLETE = _change("redis.call('HSET', KEYS[1], 'incomplete', 1)")

# Sets the metadata to ARGV[2].
_METADATA = _change("redis.call('HSET', KEYS[1], 'metadata', ARGV[2])")

# Removes the item whose entry starts with ARGV[2] (its id and a space), or with
# ARGV[3] when given (an entry written before ids were escaped):
# {before, after, removed (0 or 1)}, or nil when the conversation is gone.
_DELETE_ITEM = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local before = tonumber(redis.call('HGET', KEYS[1], 'version'))
local entries = redis.call('LRANGE', KEYS[2], 0, -1)
for _, entry in ipairs(entries) do
  if string.sub(entry, 1, #ARGV[2]) == ARGV[2]
      or (ARGV[3] and string.sub(entry, 1, #ARGV[3]) == ARGV[3]) then
    redis.call('LREM', KEYS[2], 1, entry)
    local after = redis.call('HINCRBY', KEYS[1], 'version', 1)
    redis.call('EXPIRE', KEYS[1], ARGV[1])
    redis.call('EXPIRE', KEYS[2], ARGV[1])
    return {before, after, 1}
  end
end
return {before, before, 0}
"""

# Takes the hold KEYS[1] with token ARGV[1] for ARGV[2] ms unless another process
# holds it: a token of this process's own (ARGV[1] up to its ':') left there is one it
# no longer holds (a take or let-go whose answer was lost), and is replaced.
_LOCK = """
local held = redis.call('GET', KEYS[1])
if held and held ~= ARGV[1] then
  local mine = string.match(ARGV[1], '^[^:]*:')
  if string.sub(held, 1, #mine) ~= mine then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

# Renews the holds of KEYS whose token is still ARGV[i + 1] for ARGV[1] ms; answers
# the (1-based) indices of those that are not (expired, and perhaps taken since).
_RENEW = """
local lost = {}
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[i + 1] then
    redis.call('PEXPIRE', key, ARGV[1])
  else
    lost[#lost + 1] = i
  end
end
return lost
"""

# Deletes the hold KEYS[1] if its token is still ARGV[1] (not one taken after it
# expired).
_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


@dataclass(frozen=True, slots=True)
class Stored:
    """A conversation as Redis has it."""

    version: int
    created_at: int
    metadata: dict[str, str]
    entries: list[tuple[str, bytes]]
    """(item id, canonical JSON), oldest first."""
    incomplete: bool = False
    """Items a process could not write are lost from it (`mark_incomplete`)."""


Change = tuple[int, int]
"""(version before, version after) of a change."""


class SharedConversations:
    """The Redis side of `conversations.Conversations`."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        ttl_seconds: int,
        prefix: str,
        failure_fields: Callable[[BaseException], dict[str, str]],
    ) -> None:
        """`failure_fields`: the log fields of a failed Redis call (never content)."""
        self.client = client
        self.failure_fields = failure_fields
        self.ttl = ttl_seconds
        self.prefix = prefix
        self.errors = 0
        self._create = client.register_script(_CREATE)
        self._append = client.register_script(_APPEND)
        self._metadata = client.register_script(_METADATA)
        self._replace = client.register_script(_REPLACE)
        self._append_at = client.register_script(_APPEND_AT)
        self._incomplete = client.register_script(_INCOMPLETE)
        self._delete_item = client.register_script(_DELETE_ITEM)
        self._lock = client.register_script(_LOCK)
        self._renew = client.register_script(_RENEW)
        self._unlock = client.register_script(_UNLOCK)

    def _keys(self, owner: str, conv_id: str) -> list[str]:
        return [f"{self.prefix}:c:{owner}:{conv_id}", f"{self.prefix}:ci:{owner}:{conv_id}"]

    async def _call(self, conv_id: str, work: Any) -> Any:
        try:
            return await work
        except (redis.RedisError, OSError) as exc:
            if isinstance(exc, redis.ReadOnlyError):
                await leave_demoted_primary(self.client)
            self.errors += 1
            log.error("shared conversations: Redis did not answer", extra=self.failure_fields(exc))
            raise SharedStoreUnavailable(conv_id) from None

    async def create(
        self,
        owner: str,
        conv_id: str,
        created_at: int,
        metadata: bytes,
        entries: list[tuple[str, bytes]],
    ) -> None:
        args: list[Arg] = [created_at, metadata, self.ttl, *(_entry(e) for e in entries)]
        await self._call(conv_id, self._create(keys=self._keys(owner, conv_id), args=args))

    async def version(self, owner: str, conv_id: str) -> int | None:
        """The conversation's version; None when Redis has no such conversation."""
        meta, _items = self._keys(owner, conv_id)
        found = await self._call(conv_id, self.client.hget(meta, "version"))
        return None if found is None else int(found)

    async def read(self, owner: str, conv_id: str) -> Stored | None:
        meta, items = self._keys(owner, conv_id)
        pipe = self.client.pipeline(transaction=True)
        pipe.hgetall(meta)
        pipe.lrange(items, 0, -1)
        fields, entries = await self._call(conv_id, pipe.execute())
        if not fields:
            return None
        parsed: list[tuple[str, bytes]] = []
        for entry in entries:
            item_id, _, item = bytes(entry).partition(b" ")
            parsed.append((_unescape(item_id).decode(), item))
        return Stored(
            version=int(fields[b"version"]),
            created_at=int(fields[b"created_at"]),
            metadata=_metadata(fields[b"metadata"]),
            entries=parsed,
            incomplete=b"incomplete" in fields,
        )

    async def append(
        self, owner: str, conv_id: str, entries: list[tuple[str, bytes]]
    ) -> Change | None:
        """(before, after); None when the conversation is gone; (-1, version) when the
        entries were there already (an earlier try's answer was lost): no copy's
        version matches it, so the copy is read again."""
        args: list[Arg] = [self.ttl, *(_entry(e) for e in entries)]
        found = await self._call(conv_id, self._append(keys=self._keys(owner, conv_id), args=args))
        return None if not found else (int(found[0]), int(found[1]))

    async def replace(
        self, owner: str, conv_id: str, version: int, entries: list[tuple[str, bytes]]
    ) -> Change | None:
        """Make the items `entries` if the conversation is still at `version`:
        (before, after); (-2, version) when it is not (nothing done); None when the
        conversation is gone."""
        args: list[Arg] = [self.ttl, version, *(_entry(e) for e in entries)]
        found = await self._call(conv_id, self._replace(keys=self._keys(owner, conv_id), args=args))
        return None if not found else (int(found[0]), int(found[1]))

    async def append_at(
        self, owner: str, conv_id: str, version: int, entries: list[tuple[str, bytes]]
    ) -> Change | None:
        """Append `entries` if the conversation is still at `version`: (before,
        after); (-2, version) when it is not (nothing done); None when it is gone."""
        args: list[Arg] = [self.ttl, version, *(_entry(e) for e in entries)]
        found = await self._call(
            conv_id, self._append_at(keys=self._keys(owner, conv_id), args=args)
        )
        return None if not found else (int(found[0]), int(found[1]))

    async def mark_incomplete(self, owner: str, conv_id: str) -> Change | None:
        """Say the conversation lost items (every process reads it again, and it
        refuses to be continued)."""
        found = await self._call(
            conv_id, self._incomplete(keys=self._keys(owner, conv_id), args=[self.ttl])
        )
        return None if not found else (int(found[0]), int(found[1]))

    async def set_metadata(self, owner: str, conv_id: str, metadata: bytes) -> Change | None:
        args: list[Arg] = [self.ttl, metadata]
        found = await self._call(
            conv_id, self._metadata(keys=self._keys(owner, conv_id), args=args)
        )
        return None if not found else (int(found[0]), int(found[1]))

    async def delete_item(self, owner: str, conv_id: str, item_id: str) -> Change | None:
        """(before, after) when the item was removed, (v, v) when there was none; None
        when the conversation is gone."""
        raw = item_id.encode()
        args: list[Arg] = [self.ttl, _escape(raw) + b" "]
        if b"%" in raw and b" " not in raw and _ESCAPED.search(raw) is None:
            # Written before ids were escaped, the entry starts with the id as it is
            # (unambiguous: no escaped id has a '%' but before 20 or 25).
            args.append(raw + b" ")
        found = await self._call(
            conv_id, self._delete_item(keys=self._keys(owner, conv_id), args=args)
        )
        return None if not found else (int(found[0]), int(found[1]))

    async def delete(self, owner: str, conv_id: str) -> bool:
        removed = await self._call(conv_id, self.client.delete(*self._keys(owner, conv_id)))
        return bool(removed)

    # -- holds (`conversation_holds`) --------------------------------------------------------

    def _hold_key(self, owner: str, conv_id: str) -> str:
        return f"{self.prefix}:cl:{owner}:{conv_id}"

    async def lock(self, owner: str, conv_id: str, token: str, lease_ms: int) -> bool:
        """Hold the conversation with `token` ('<process>:<n>') for `lease_ms`, unless
        another process holds it: whether it was taken."""
        key = self._hold_key(owner, conv_id)
        taken = await self._call(conv_id, self._lock(keys=[key], args=[token, lease_ms]))
        return bool(taken)

    async def renew(self, held: list[tuple[str, str, str]], lease_ms: int) -> list[int]:
        """Renew the holds `held` ((owner, id, token) each) for `lease_ms`: the
        indices in `held` of those that expired (another process may hold them now)."""
        keys = [self._hold_key(owner, conv_id) for owner, conv_id, _token in held]
        args: list[Arg] = [lease_ms, *(token for _owner, _id, token in held)]
        lost = await self._call(held[0][1], self._renew(keys=keys, args=args))
        return [int(i) - 1 for i in lost]

    async def unlock(self, owner: str, conv_id: str, token: str) -> None:
        """Let go of the hold taken with `token` (nothing if it expired meanwhile)."""
        key = self._hold_key(owner, conv_id)
        await self._call(conv_id, self._unlock(keys=[key], args=[token]))


def _entry(entry: tuple[str, bytes]) -> bytes:
    item_id, item = entry
    return _escape(item_id.encode()) + b" " + item


def _escape(item_id: bytes) -> bytes:
    """An item id without spaces, so that an entry's first space ends it."""
    return item_id.replace(b"%", b"%25").replace(b" ", b"%20")


def _unescape(item_id: bytes) -> bytes:
    return _ESCAPED.sub(lambda m: b" " if m[1] == b"20" else b"%", item_id)


_ESCAPED = re.compile(rb"%(20|25)")


def _metadata(value: bytes) -> dict[str, str]:
    parsed = json.loads(value)
    return parsed if isinstance(parsed, dict) else {}
