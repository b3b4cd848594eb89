"""The buckets of `--requests-per-minute-per-key` and `--tokens-per-minute-per-key` in
Redis, so that the limits hold for a key across every process sharing that Redis
(`request_rate`).

One string per key and unit that has spent some of its bucket, ``<prefix>:rate:<owner>``
(requests) and ``<prefix>:tokens:<owner>``: the time (microseconds, Redis's clock, so
that the processes' clocks do not matter) at which its bucket is full again. It
expires then: a key whose bucket is full holds nothing. One script call per count
takes from the bucket and answers.
"""

from __future__ import annotations

from typing import Any

from warmsocket.request_rate import Taken

# KEYS[1]: the key's bucket. ARGV: microseconds per unit (a fraction, perhaps), units
# the bucket holds, units to take, units it must hold, 1 to take them whatever it holds
# (`request_rate.take`).
# Returns {allowed (0|1), remaining, microseconds to wait, microseconds until full}.
# Numbers stay below 2^53 (microseconds since 1970), exact in Lua's doubles; written
# with %.0f, since tostring would round them to 14 digits.
_TAKE = """
local interval, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local cost, need, force = tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5] == '1'
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local full_at = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
local behind = full_at - now
if behind < 0 then behind = 0 end
local short = behind + need * interval - burst * interval
if short > 0 and not force then
  return {0, 0, short, behind}
end
if cost > 0 then
  behind = behind + cost * interval
  redis.call('SET', KEYS[1], string.format('%.0f', now + behind), 'PX',
             math.ceil(behind / 1000))
end
local remaining = math.floor((burst * interval - behind) / interval)
if remaining < 0 then remaining = 0 end
return {1, remaining, 0, behind}
"""

_KEY_STEMS = {"requests": "rate", "tokens": "tokens"}


class SharedBuckets:
    """`request_rate.SharedBuckets` on a Redis client (redis.asyncio)."""

    def __init__(self, client: Any, prefix: str) -> None:
        self.prefix = prefix
        self._take = client.register_script(_TAKE)

    async def take(
        self,
        owner: str,
        interval: float,
        burst: int,
        *,
        cost: int = 1,
        need: int = 1,
        force: bool = False,
        unit: str = "requests",
    ) -> Taken:
        # Not rounded to whole microseconds: at millions of tokens a minute a unit
        # is a microsecond or less, and rounding would change the rate.
        interval_us = max(interval * 1_000_000, 1e-3)
        allowed, remaining, wait_us, full_us = await self._take(
            keys=[f"{self.prefix}:{_KEY_STEMS[unit]}:{owner}"],
            args=[repr(interval_us), burst, cost, need, 1 if force else 0],
        )
        return Taken(bool(allowed), int(remaining), wait_us / 1e6, full_us / 1e6)
