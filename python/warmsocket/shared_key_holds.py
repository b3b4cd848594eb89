"""What each API key holds in every process sharing a Redis, for
`--max-connections-per-key` across processes (`admission.KeyLimit`).

A key's WebSockets, HTTP creates and background responses are counted in the process
that holds them (`KeyLimit.held`), where a new one is let in or refused at once, with
no Redis round trip: the WebSocket handshake and the create stay as fast as without
Redis. So that the limit holds for the key across processes, each process also knows
what the key holds in the others, as of at most `SYNC_SECONDS` ago. Every
`SYNC_SECONDS` each process runs one script (`_SYNC`) that:

* adds the difference between its counts now and those it wrote last
  (``<prefix>:held:<process>``, a hash of owner -> count) to the totals of all
  processes (``<prefix>:held_total``, a sorted set of owners by total), and writes its
  counts;
* renews its place in ``<prefix>:holders`` (a sorted set scored by when it is to be
  thought dead, on Redis's clock, so that the processes' clocks do not matter), and
  takes the counts of the processes past theirs out of the totals;
* answers the totals of the owners this process holds, and of those at its limit or
  past it (a range of the sorted set: processes with other limits, during a rolling
  change, each read their own).

So the check knows what the key holds elsewhere when it holds something here or is at
its limit everywhere: a key's first connection to a process is let in when its total
elsewhere is below the limit, which is right. A sync costs O(owners held in this
process + owners at the limit), not O(all owners in all processes).

The limit is exact to within what a key opens in all processes within about
`SYNC_SECONDS`. A process that stops takes its counts out; one that dies stops
counting `TTL_SECONDS` after its last sync. While Redis does not answer, each process
goes on with what it last read for `TTL_SECONDS`, then counts its own only (logged
once per outage, counted).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import Counter
from typing import Any

log = logging.getLogger("warmsocket.shared_store")

SYNC_SECONDS = 0.5
"""Seconds between two writes of this process's counts (and reads of the others')."""
NUDGED_SYNC_SECONDS = 0.05
"""After a key let go of something here (`nudge`), the next write comes this soon: a
key that closes a WebSocket here and opens one on another process at once is not
refused there for what it no longer holds here, for as long."""
TTL_SECONDS = 5.0
"""Seconds a process's counts count after its last write."""

# KEYS: the holders, the totals, this process's counts. ARGV: this process's name,
# milliseconds it lives unless synced again, its limit, the prefix of the processes'
# counts, then owner, count, ... (this process's now). Answers {owners at the limit or
# past it and their totals (flat), the totals of ARGV's owners, the processes}.
# A process's counts outlive the shared keys (4 against 3 lifetimes): whoever renews
# those can still take a silent process's counts out. A process not among the holders
# (its first sync; or the shared keys expired, as when Redis was paused or unreachable
# for their lifetime; or another took it for dead) has none of its counts in the
# totals: its own are dropped first, so that all of them are added again, not only
# what changed since it last wrote them.
_SYNC = """
local holders, totals, mine = KEYS[1], KEYS[2], KEYS[3]
local ttl, limit, prefix = tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
if not redis.call('ZSCORE', holders, ARGV[1]) then
  redis.call('DEL', mine)
end
local function add(owner, delta)
  if tonumber(redis.call('ZINCRBY', totals, delta, owner)) <= 0 then
    redis.call('ZREM', totals, owner)
  end
end
for _, name in ipairs(redis.call('ZRANGEBYSCORE', holders, '-inf', now)) do
  if name ~= ARGV[1] then
    local key = prefix .. name
    local held = redis.call('HGETALL', key)
    for i = 1, #held, 2 do add(held[i], -tonumber(held[i + 1])) end
    redis.call('DEL', key)
    redis.call('ZREM', holders, name)
  end
end
local before = {}
local held = redis.call('HGETALL', mine)
for i = 1, #held, 2 do before[held[i]] = tonumber(held[i + 1]) end
local changed = false
for i = 5, #ARGV, 2 do
  local owner, count = ARGV[i], tonumber(ARGV[i + 1])
  local delta = count - (before[owner] or 0)
  if delta ~= 0 then
    add(owner, delta)
    changed = true
  end
  before[owner] = nil
end
for owner, count in pairs(before) do
  add(owner, -count)
  changed = true
end
if changed then
  redis.call('DEL', mine)
  for first = 5, #ARGV, 1000 do
    redis.call('HSET', mine, unpack(ARGV, first, math.min(first + 999, #ARGV)))
  end
end
redis.call('PEXPIRE', mine, ttl * 4)
redis.call('ZADD', holders, now + ttl, ARGV[1])
redis.call('PEXPIRE', holders, ttl * 3)
redis.call('PEXPIRE', totals, ttl * 3)
local at_limit = redis.call('ZRANGEBYSCORE', totals, limit, '+inf', 'WITHSCORES')
local my_totals = {}
for i = 5, #ARGV, 2 do
  my_totals[#my_totals + 1] = tonumber(redis.call('ZSCORE', totals, ARGV[i]) or '0')
end
return {at_limit, my_totals, redis.call('ZCARD', holders)}
"""

# Takes a stopping process's counts out (KEYS and ARGV[1] as `_SYNC`).
_LEAVE = """
local totals, mine = KEYS[2], KEYS[3]
local held = redis.call('HGETALL', mine)
for i = 1, #held, 2 do
  if tonumber(redis.call('ZINCRBY', totals, -tonumber(held[i + 1]), held[i])) <= 0 then
    redis.call('ZREM', totals, held[i])
  end
end
redis.call('DEL', mine)
redis.call('ZREM', KEYS[1], ARGV[1])
return 1
"""


class SharedKeyHolds:
    """This process's share of `<prefix>:held*`; `follow(held, limit)` to take part."""

    def __init__(self, client: Any, prefix: str, *, address: str = "") -> None:
        self._client = client
        self._prefix = prefix
        self._address = address
        self.process = uuid.uuid4().hex[:16]
        self._keys = [
            f"{prefix}:holders",
            f"{prefix}:held_total",
            f"{prefix}:held:{self.process}",
        ]
        self._sync = client.register_script(_SYNC)
        self._leave = client.register_script(_LEAVE)
        self._held: Counter[str] | None = None
        self._limit = 0
        self._elsewhere: dict[str, int] = {}
        self._read_at: float | None = None
        self._task: asyncio.Task[None] | None = None
        self._nudged: asyncio.Event | None = None
        self.errors = 0
        self.holders = 1
        """Processes sharing the counts at the last sync (this one included)."""

    @property
    def following(self) -> bool:
        return self._held is not None

    def follow(self, held: Counter[str], limit: int) -> None:
        """Share `held` (`KeyLimit.held`, owner -> count; `limit` its limit) once
        `start` runs."""
        self._held = held
        self._limit = limit

    def elsewhere(self, owner: str) -> int:
        """What `owner` holds in the other processes, as last read (0 once that is
        older than `TTL_SECONDS`)."""
        if self._read_at is None:
            return 0
        if time.monotonic() - self._read_at > TTL_SECONDS:
            self._elsewhere = {}
            self._read_at = None
            return 0
        return self._elsewhere.get(owner, 0)

    def start(self) -> None:
        if self._held is not None and self._task is None:
            self._nudged = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run())

    def nudge(self) -> None:
        """A key let go of something here: write the counts soon, not at the next
        periodic sync (`NUDGED_SYNC_SECONDS`)."""
        if self._nudged is not None:
            self._nudged.set()

    async def sync(self) -> None:
        """Write this process's counts and read the totals it needs (`_SYNC`). Raises
        Redis and OS errors."""
        assert self._held is not None
        mine = {owner: count for owner, count in self._held.items() if count > 0}
        args: list[Any] = [self.process, round(TTL_SECONDS * 1000), self._limit, self._key("")]
        for owner, count in mine.items():
            args += (owner, count)
        at_limit, my_totals, holders = await self._sync(keys=self._keys, args=args)
        elsewhere: dict[str, int] = {}
        for owner, total in zip(at_limit[::2], at_limit[1::2], strict=True):
            elsewhere[_text(owner)] = int(float(total))
        for (owner, count), total in zip(mine.items(), my_totals, strict=True):
            elsewhere[owner] = int(float(total)) - count
        self._elsewhere = {owner: n for owner, n in elsewhere.items() if n > 0}
        self._read_at = time.monotonic()
        self.holders = int(holders)

    async def _run(self) -> None:
        failing = False
        while True:
            try:
                await self.sync()
                if failing:
                    log.info("sharing --max-connections-per-key counts through Redis again")
                    failing = False
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis down or refusing: go on with what was read
                self.errors += 1
                if not failing:
                    log.error(
                        "cannot share --max-connections-per-key counts through Redis; "
                        "each process counts its own once what it read is older than "
                        f"{TTL_SECONDS:g} s",
                        extra={"redis": self._address, "error_type": type(exc).__name__},
                    )
                    failing = True
            await self._pause()

    async def _pause(self) -> None:
        """Until the next sync: `SYNC_SECONDS`, or `NUDGED_SYNC_SECONDS` once nudged."""
        nudged = self._nudged
        assert nudged is not None
        if not nudged.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(nudged.wait(), SYNC_SECONDS - NUDGED_SYNC_SECONDS)
        await asyncio.sleep(NUDGED_SYNC_SECONDS)
        nudged.clear()

    async def aclose(self) -> None:
        """Stop, and take this process's counts out of Redis (best effort)."""
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        with contextlib.suppress(Exception):
            args = [self.process, 0, self._limit]
            await asyncio.wait_for(self._leave(keys=self._keys, args=args), 1.0)

    def _key(self, process: str) -> str:
        return f"{self._prefix}:held:{process}"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
