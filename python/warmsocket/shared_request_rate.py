"""The request buckets of `--requests-per-minute-per-key` in Redis, so that the limit
holds for a key across every process sharing that Redis (`request_rate`).

One string per key that has spent some of its bucket, ``<prefix>:rate:<owner>``: the
time (microseconds, Redis's clock, so that the processes' clocks do not matter) at
which its bucket is full again. It expires then: a key whose bucket is full holds
nothing. One script call per counted request takes from the bucket and answers.
"""

from __future__ import annotations

from typing import Any

from warmsocket.request_rate import Taken

# KEYS[1]: the key's bucket. ARGV: microseconds per request, requests the bucket holds.
# Returns {allowed (0|1), remaining, microseconds to wait, microseconds until full}.
# Numbers stay below 2^53 (microseconds since 1970), exact in Lua's doubles; written
# with %.0f, since tostring would round them to 14 digits.
_TAKE = """
local interval, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local full_at = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
local behind = full_at - now
if behind < 0 then behind = 0 end
local slack = (burst - 1) * interval
if behind > slack then
  return {0, 0, behind - slack, behind}
end
behind = behind + interval
redis.call('SET', KEYS[1], string.format('%.0f', now + behind), 'PX',
           math.ceil(behind / 1000))
return {1, math.floor((burst * interval - behind) / interval), 0, behind}
"""


class SharedBuckets:
    """`request_rate.SharedBuckets` on a Redis client (redis.asyncio)."""

    def __init__(self, client: Any, prefix: str) -> None:
        self.prefix = prefix
        self._take = client.register_script(_TAKE)

    async def take(self, owner: str, interval: float, burst: int) -> Taken:
        interval_us = max(1, round(interval * 1_000_000))
        allowed, remaining, wait_us, full_us = await self._take(
            keys=[f"{self.prefix}:rate:{owner}"], args=[interval_us, burst]
        )
        return Taken(bool(allowed), int(remaining), wait_us / 1e6, full_us / 1e6)
