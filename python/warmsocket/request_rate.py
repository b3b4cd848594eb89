"""How many requests one API key may make per minute (`--requests-per-minute-per-key`).

`--max-connections-per-key` (`admission.KeyLimit`) bounds what a key holds at once; a
key that holds one WebSocket can still send turn after turn as fast as the model
answers. This bounds the rate: model requests per minute, per key, as OpenAI's
requests-per-minute limit does. Counted as they arrive: creates (WebSocket
`response.create`, HTTP `POST /v1/responses`, background or not, warm-ups with
`generate: false` too) and compactions. Not counted: what runs no model (retrieve,
cancel, delete, lists, input token counts), invalid requests, and HTTP requests
refused by `--max-connections-per-key`.

Each key has a bucket of `burst` requests (a minute's worth unless told otherwise)
that refills at `per_minute` / 60 a second: a key may spend a minute's requests at
once, then makes one every 60 / `per_minute` seconds. Kept as the time the bucket is
full again (the generic cell rate algorithm): one number per key, and a key whose
bucket is full holds nothing.

One past it is refused with 429 `rate_limit_exceeded`: on HTTP with `Retry-After`
and `retry-after-ms` (the openai SDK waits that long and tries again) and OpenAI's
`x-ratelimit-*-requests` headers; on a WebSocket an `error` event with the same
headers, on the create's lane, the lane's chain kept (the create can be sent again).

With `--redis-url` the buckets are in Redis (`SharedBuckets`), so the limit holds for
a key across all the processes that share it, at one Redis round trip per counted
request. When Redis does not answer within `SHARED_TIMEOUT`, the process counts the
key in its own bucket for `LOCAL_FOR` seconds (logged, counted): the limit then holds
per process, and turns are neither refused nor held up by the outage.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from warmsocket import errors
from warmsocket.errors import APIError
from warmsocket.logs import Tally, Throttle

log = logging.getLogger("warmsocket.server")

SHARED_TIMEOUT = 0.5
"""Seconds a counted request waits for Redis's answer before its own process counts it."""
LOCAL_FOR = 1.0
"""Seconds buckets stay local after Redis did not answer (then Redis is asked again)."""
LOG_INTERVAL = 10.0
"""Seconds between two log lines about refused requests (the metrics count all)."""
SWEEP_EVERY = 1024
"""Counted requests between two sweeps of the full buckets from the local table."""
SWEEP_AT_KEYS = 65_536
"""Keys in the table past which it is swept at once (then again at twice what a sweep
left, so that sweeps cost O(1) a request): the table holds at most about twice the
keys whose buckets are not full, whatever the rate."""


@dataclass(frozen=True, slots=True)
class Taken:
    """A bucket's answer. `wait`: seconds until the next request would be let through
    (0 when this one was); `full_in`: seconds until the bucket is full again."""

    allowed: bool
    remaining: int
    wait: float
    full_in: float


def take(full_at: float, now: float, interval: float, burst: int) -> tuple[Taken, float]:
    """One request from a bucket that is full at `full_at` (or earlier), holding `burst`
    requests and refilled one per `interval` seconds: the answer, and when the bucket
    is full afterwards. (The Redis script `_TAKE` does the same in microseconds.)"""
    behind = max(full_at - now, 0.0)
    slack = (burst - 1) * interval
    if behind > slack:
        return Taken(False, 0, behind - slack, behind), max(full_at, now)
    behind += interval
    remaining = math.floor((burst * interval - behind) / interval + 1e-9)
    return Taken(True, remaining, 0.0, behind), now + behind


@dataclass(frozen=True, slots=True)
class Verdict:
    """`RequestRate.check`'s answer: the 429 to answer with, or None and the headers
    of the answer."""

    refusal: APIError | None
    headers: list[tuple[str, str]]


class SharedBuckets(Protocol):
    """The buckets in Redis (`shared_store.SharedStore.request_buckets`)."""

    async def take(self, owner: str, interval: float, burst: int) -> Taken:
        """One request from `owner`'s bucket; raises when Redis does not answer."""
        ...


class RequestRate:
    """Requests per minute per owner (API key, `httpapi.Auth.owner`); `per_minute`
    None: no limit."""

    def __init__(
        self,
        per_minute: int | None,
        *,
        burst: int | None = None,
        shared: SharedBuckets | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_minute = per_minute
        self.burst = burst or per_minute or 1
        self.interval = 60.0 / per_minute if per_minute else 0.0
        self.shared = shared if per_minute else None
        self._clock = clock
        self._full_at: dict[str, float] = {}
        self._sweep_at = SWEEP_AT_KEYS
        self._counted = 0
        self._local_until = 0.0
        self.refused = 0
        """Requests refused since the start, for `/metrics`."""
        self.counted_locally = 0
        """Requests counted in this process's buckets because Redis did not answer."""
        self._refusals = Tally(LOG_INTERVAL)
        self._shared_throttle = Throttle(LOG_INTERVAL)

    @property
    def limited(self) -> bool:
        return self.per_minute is not None

    @property
    def needs_io(self) -> bool:
        """Whether `check` asks Redis (else `check_local` gives the same answer)."""
        return self.shared is not None

    def check_local(self, owner: str) -> APIError | None:
        """Count one request of `owner` in this process: None when it may go on, else
        the 429 to answer it with."""
        if self.per_minute is None:
            return None
        return self._refusal(owner, self._take_local(owner))

    async def check(self, owner: str) -> Verdict:
        """Count one request of `owner` (in Redis when the buckets are shared): the 429
        to answer it with, if any, and the `x-ratelimit-*-requests` headers an answer
        that lets it through carries."""
        if self.per_minute is None:
            return Verdict(None, [])
        taken = await self._take(owner)
        refusal = self._refusal(owner, taken)
        if refusal is not None:
            return Verdict(refusal, [])
        return Verdict(
            None,
            [
                ("x-ratelimit-limit-requests", str(self.per_minute)),
                ("x-ratelimit-remaining-requests", str(taken.remaining)),
                ("x-ratelimit-reset-requests", errors.reset_duration(taken.full_in)),
            ],
        )

    def _take_local(self, owner: str) -> Taken:
        now = self._clock()
        taken, full_at = take(self._full_at.get(owner, now), now, self.interval, self.burst)
        if taken.allowed:
            self._full_at[owner] = full_at
            self._counted += 1
            if self._counted % SWEEP_EVERY == 0 or len(self._full_at) > self._sweep_at:
                self._sweep(now)
        return taken

    async def _take(self, owner: str) -> Taken:
        if self.shared is None:
            return self._take_local(owner)
        if self._clock() < self._local_until:
            self.counted_locally += 1
            return self._take_local(owner)
        try:
            return await asyncio.wait_for(
                self.shared.take(owner, self.interval, self.burst), SHARED_TIMEOUT
            )
        except Exception as exc:  # Redis down, slow or refusing: count it here
            self._local_until = self._clock() + LOCAL_FOR
            self.counted_locally += 1
            if self._shared_throttle.due():
                log.warning(
                    "cannot count requests per key in Redis; each process counts its own for now",
                    extra={"error_type": type(exc).__name__, "retry_in_seconds": LOCAL_FOR},
                )
            return self._take_local(owner)

    def _refusal(self, owner: str, taken: Taken) -> APIError | None:
        if taken.allowed:
            return None
        self.refused += 1
        if (unlogged := self._refusals.count()) is not None:
            log.warning(
                "an API key is past --requests-per-minute-per-key; its requests are "
                "refused (429) until its bucket refills",
                extra={"owner": owner, "limit": self.per_minute, "refused": unlogged},
            )
        assert self.per_minute is not None
        return errors.request_rate_exceeded(self.per_minute, taken.wait, taken.full_in)

    def _sweep(self, now: float) -> None:
        """Forget the buckets that are full: they hold nothing a new one would not."""
        self._full_at = {owner: at for owner, at in self._full_at.items() if at > now}
        self._sweep_at = max(SWEEP_AT_KEYS, 2 * len(self._full_at))

    def keys_tracked(self) -> int:
        return len(self._full_at)

    def collect(self) -> Iterator[str]:
        """`/metrics` lines (none without a limit)."""
        if self.per_minute is None:
            return
        yield (
            "# HELP warmsocket_requests_per_minute_per_key Model requests one key may make "
            "a minute."
        )
        yield "# TYPE warmsocket_requests_per_minute_per_key gauge"
        yield f"warmsocket_requests_per_minute_per_key {self.per_minute}"
        yield (
            "# HELP warmsocket_request_rate_refused_total Creates and compactions refused "
            "(429) because their key was past its requests per minute."
        )
        yield "# TYPE warmsocket_request_rate_refused_total counter"
        yield f"warmsocket_request_rate_refused_total {self.refused}"
        if self.shared is not None:
            yield (
                "# HELP warmsocket_request_rate_counted_locally_total Requests counted in "
                "this process's buckets because Redis did not answer."
            )
            yield "# TYPE warmsocket_request_rate_counted_locally_total counter"
            yield f"warmsocket_request_rate_counted_locally_total {self.counted_locally}"
