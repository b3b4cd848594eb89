"""What each API key holds in every process sharing a Redis, for
`--max-connections-per-key` across processes (`admission.KeyLimit`).

A key's WebSockets, HTTP creates and background responses are counted in the process
that holds them (`KeyLimit.held`), where a new one is let in or refused at once, with
no Redis round trip: the WebSocket handshake and the create stay as fast as without
Redis. So that the limit holds for the key across processes, each process also knows
what the key holds in the others, as of at most `SYNC_SECONDS` ago:

* every `SYNC_SECONDS` it writes its counts, ``<prefix>:held:<process>`` (a hash of
  owner -> count, only the owners holding something), which expires `TTL_SECONDS`
  later unless written again, and its name in ``<prefix>:holders`` (a sorted set
  scored by that expiry on Redis's clock, so that the processes' clocks do not
  matter), then reads the others' hashes and sums them (`elsewhere`);
* a process that stops deletes its hash; one that dies stops writing it, and what its
  keys held stops counting `TTL_SECONDS` later.

The limit is so exact to within what a key opens in all processes within about
`SYNC_SECONDS`. While Redis does not answer, each process goes on with what it last
read for `TTL_SECONDS`, then counts its own only (logged once per outage, counted).
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
TTL_SECONDS = 5.0
"""Seconds a process's counts count after its last write."""
MAX_HOLDERS = 1024
"""Processes read at most (the others are not counted: logged)."""

# KEYS[1]: the holders' sorted set, KEYS[2]: this process's hash. ARGV[1]: this
# process's name, ARGV[2]: milliseconds its counts live, ARGV[3..]: owner, count, ...
# Writes the counts, drops the holders whose time is over, and returns the others.
_WRITE = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('DEL', KEYS[2])
if #ARGV > 2 then
  for first = 3, #ARGV, 1000 do
    redis.call('HSET', KEYS[2], unpack(ARGV, first, math.min(first + 999, #ARGV)))
  end
  redis.call('PEXPIRE', KEYS[2], ttl)
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('PEXPIRE', KEYS[1], ttl)
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""


class SharedKeyHolds:
    """This process's share of `<prefix>:held:*`; `follow(held)` to take part."""

    def __init__(self, client: Any, prefix: str, *, address: str = "") -> None:
        self._client = client
        self._prefix = prefix
        self._address = address
        self.process = uuid.uuid4().hex[:16]
        self._holders_key = f"{prefix}:holders"
        self._write = client.register_script(_WRITE)
        self._held: Counter[str] | None = None
        self._elsewhere: Counter[str] = Counter()
        self._read_at: float | None = None
        self._task: asyncio.Task[None] | None = None
        self.errors = 0
        self.holders = 1
        """Processes whose counts were read last (this one included)."""

    @property
    def following(self) -> bool:
        return self._held is not None

    def follow(self, held: Counter[str]) -> None:
        """Share `held` (`KeyLimit.held`, owner -> count) once `start` runs."""
        self._held = held

    def elsewhere(self, owner: str) -> int:
        """What `owner` holds in the other processes, as last read (0 once that is
        older than `TTL_SECONDS`)."""
        if self._read_at is None:
            return 0
        if time.monotonic() - self._read_at > TTL_SECONDS:
            self._elsewhere = Counter()
            self._read_at = None
            return 0
        return self._elsewhere.get(owner, 0)

    def start(self) -> None:
        if self._held is not None and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def sync(self) -> None:
        """Write this process's counts and read the others'. Raises Redis and OS errors."""
        assert self._held is not None
        args: list[Any] = [self.process, round(TTL_SECONDS * 1000)]
        for owner, count in self._held.items():
            if count > 0:
                args += (owner, count)
        holders = await self._write(keys=[self._holders_key, self._key(self.process)], args=args)
        others = [_text(name) for name in holders if _text(name) != self.process]
        if len(others) > MAX_HOLDERS:
            log.warning(
                "more processes share --max-connections-per-key than are read",
                extra={"processes": len(others) + 1, "read": MAX_HOLDERS},
            )
            others = others[:MAX_HOLDERS]
        elsewhere: Counter[str] = Counter()
        if others:
            async with self._client.pipeline(transaction=False) as pipe:
                for name in others:
                    pipe.hgetall(self._key(name))
                counts = await pipe.execute()
            for held in counts:
                for owner, count in held.items():
                    elsewhere[_text(owner)] += int(count)
        self._elsewhere = elsewhere
        self._read_at = time.monotonic()
        self.holders = len(others) + 1

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
            await asyncio.sleep(SYNC_SECONDS)

    async def aclose(self) -> None:
        """Stop, and take this process's counts out of Redis (best effort)."""
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        with contextlib.suppress(Exception):
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.delete(self._key(self.process))
                pipe.zrem(self._holders_key, self.process)
                await asyncio.wait_for(pipe.execute(), 1.0)

    def _key(self, process: str) -> str:
        return f"{self._prefix}:held:{process}"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
