"""How many requests one API key may make per minute (`--requests-per-minute-per-key`),
and how many tokens its responses may use (`--tokens-per-minute-per-key`).

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

Tokens (`TokenRate`) are counted as OpenAI's tokens-per-minute limit counts them, the
input and output tokens of each model response (`usage`, compactions' too), but once
the response has ended: what a response will use is not known before. So a key's
bucket holds a minute's tokens, each response's usage is taken from it as the
response ends (however far that takes it below empty), and a create is let through
while the bucket holds any token: a key that used a minute's tokens at once waits
until they refilled. Answers carry `x-ratelimit-*-tokens` as the request headers.

With `--redis-url` the buckets are in Redis (`SharedBuckets`), so the limit holds for
a key across all the processes that share it, at one Redis round trip per counted
request (and one, not awaited, per response's tokens). When Redis does not answer
within `SHARED_TIMEOUT`, the process counts the key in its own bucket for `LOCAL_FOR`
seconds (logged, counted): the limit then holds per process, and turns are neither
refused nor held up by the outage.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from warmsocket import errors
from warmsocket.errors import APIError
from warmsocket.logs import Tally, Throttle

log = logging.getLogger("warmsocket.server")

SHARED_TIMEOUT = 0.5
"""Seconds a counted request waits for Redis's answer before its own process counts it."""
LOCAL_FOR = 1.0
"""Seconds buckets stay local after Redis did not answer (then Redis is asked again).
Doubled each time it still does not answer, up to `LOCAL_FOR_MAX`: each time Redis is
asked, the request that asks waits up to `SHARED_TIMEOUT` (with those arriving
meanwhile), which a long outage should not cost every second."""
LOCAL_FOR_MAX = 30.0
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


def take(
    full_at: float,
    now: float,
    interval: float,
    burst: int,
    cost: int = 1,
    need: int = 1,
    force: bool = False,
) -> tuple[Taken, float]:
    """Take `cost` units from a bucket that is full at `full_at` (or earlier), holding
    `burst` units and refilled one per `interval` seconds, if it holds `need` (or
    whatever it holds, with `force`): the answer, and when the bucket is full
    afterwards. A request takes 1 and needs 1; a token check takes 0 and needs 1; a
    response's tokens are forced. (The Redis script `_TAKE` does the same in
    microseconds.)"""
    behind = max(full_at - now, 0.0)
    short = behind + need * interval - burst * interval
    if short > 1e-9 and not force:
        return Taken(False, 0, short, behind), max(full_at, now)
    behind += cost * interval
    remaining = max(math.floor((burst * interval - behind) / interval + 1e-9), 0)
    return Taken(True, remaining, 0.0, behind), now + behind


@dataclass(frozen=True, slots=True)
class Verdict:
    """`RequestRate.check`'s answer: the 429 to answer with, or None and the headers
    of the answer."""

    refusal: APIError | None
    headers: list[tuple[str, str]]


class SharedBuckets(Protocol):
    """The buckets in Redis (`shared_store.SharedStore.request_buckets`)."""

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
        """`take` on `owner`'s bucket of `unit`; raises when Redis does not answer."""
        ...


@dataclass(frozen=True, slots=True)
class Unit:
    """What a `RateLimit` counts, and the names it goes by."""

    name: str
    """'requests' or 'tokens': in the `x-ratelimit-*-<name>` headers, and the Redis key."""
    flag: str
    metric: str
    """The stem of its metrics: `warmsocket_<metric>_refused_total`, ..."""
    counted: str
    """What is counted, for the refused metric's help."""


REQUESTS = Unit(
    "requests", "--requests-per-minute-per-key", "request_rate", "Creates and compactions"
)
TOKENS = Unit(
    "tokens",
    "--tokens-per-minute-per-key",
    "token_rate",
    "Creates and compactions, while their key's responses had used its tokens",
)


class RateLimit:
    """Units per minute per owner (API key, `httpapi.Auth.owner`); `per_minute` None:
    no limit. A check takes `COST` and needs `NEED`."""

    UNIT = REQUESTS
    COST = 1
    NEED = 1

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
        self._local_for = LOCAL_FOR
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
        return self._refusal(owner, self._take_local(owner, self.COST, self.NEED, False))

    async def check(self, owner: str) -> Verdict:
        """Count one request of `owner` (in Redis when the buckets are shared): the 429
        to answer it with, if any, and the `x-ratelimit-*` headers an answer that lets
        it through carries."""
        if self.per_minute is None:
            return Verdict(None, [])
        taken = await self._take(owner, self.COST, self.NEED, False)
        refusal = self._refusal(owner, taken)
        if refusal is not None:
            return Verdict(refusal, [])
        name = self.UNIT.name
        return Verdict(
            None,
            [
                (f"x-ratelimit-limit-{name}", str(self.per_minute)),
                (f"x-ratelimit-remaining-{name}", str(taken.remaining)),
                (f"x-ratelimit-reset-{name}", errors.reset_duration(taken.full_in)),
            ],
        )

    def _take_local(self, owner: str, cost: int, need: int, force: bool) -> Taken:
        now = self._clock()
        full_at = self._full_at.get(owner, now)
        taken, full_at = take(full_at, now, self.interval, self.burst, cost, need, force)
        if taken.allowed and cost:
            self._full_at[owner] = full_at
            self._counted += 1
            if self._counted % SWEEP_EVERY == 0 or len(self._full_at) > self._sweep_at:
                self._sweep(now)
        return taken

    async def _take(self, owner: str, cost: int, need: int, force: bool) -> Taken:
        if self.shared is None:
            return self._take_local(owner, cost, need, force)
        if self._clock() < self._local_until:
            self.counted_locally += 1
            return self._take_local(owner, cost, need, force)
        try:
            taken = await asyncio.wait_for(
                self._take_shared(owner, cost, need, force), SHARED_TIMEOUT
            )
        except Exception as exc:  # Redis down, slow or refusing: count it here
            local_for = self._local_for
            if self._clock() >= self._local_until:
                # The first of the requests that asked Redis at once to give up: one
                # doubling per silent period, not one per request that asked.
                self._local_until = self._clock() + local_for
                self._local_for = min(2 * local_for, LOCAL_FOR_MAX)
            self.counted_locally += 1
            if self._shared_throttle.due():
                log.warning(
                    f"cannot count {self.UNIT.name} per key in Redis; each process counts "
                    "its own for now",
                    extra={"error_type": type(exc).__name__, "retry_in_seconds": local_for},
                )
            return self._take_local(owner, cost, need, force)
        self._local_for = LOCAL_FOR
        return taken

    async def _take_shared(self, owner: str, cost: int, need: int, force: bool) -> Taken:
        assert self.shared is not None
        return await self.shared.take(owner, self.interval, self.burst)

    def _refusal(self, owner: str, taken: Taken) -> APIError | None:
        if taken.allowed:
            return None
        self.refused += 1
        if (unlogged := self._refusals.count()) is not None:
            log.warning(
                f"an API key is past {self.UNIT.flag}; its requests are refused (429) "
                "until its bucket refills",
                extra={"owner": owner, "limit": self.per_minute, "refused": unlogged},
            )
        assert self.per_minute is not None
        return errors.rate_exceeded(self.UNIT.name, self.per_minute, taken.wait, taken.full_in)

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
        unit = self.UNIT
        yield (
            f"# HELP warmsocket_{unit.name}_per_minute_per_key The {unit.name} one key may "
            f"use a minute ({unit.flag})."
        )
        yield f"# TYPE warmsocket_{unit.name}_per_minute_per_key gauge"
        yield f"warmsocket_{unit.name}_per_minute_per_key {self.per_minute}"
        yield (
            f"# HELP warmsocket_{unit.metric}_refused_total {unit.counted} refused (429) "
            f"because their key was past its {unit.name} per minute."
        )
        yield f"# TYPE warmsocket_{unit.metric}_refused_total counter"
        yield f"warmsocket_{unit.metric}_refused_total {self.refused}"
        if self.shared is not None:
            yield (
                f"# HELP warmsocket_{unit.metric}_counted_locally_total Counts made in this "
                "process's buckets because Redis did not answer."
            )
            yield f"# TYPE warmsocket_{unit.metric}_counted_locally_total counter"
            yield f"warmsocket_{unit.metric}_counted_locally_total {self.counted_locally}"


class RequestRate(RateLimit):
    """`--requests-per-minute-per-key`: a check takes one request."""


MAX_SPENDING = 10_000
"""Token counts being written to Redis at once; past it, counted in the process."""


class TokenRate(RateLimit):
    """`--tokens-per-minute-per-key`: a check takes nothing and needs a token left;
    `spend` takes a response's tokens as it ends."""

    UNIT = TOKENS
    COST = 0
    NEED = 1

    def __init__(self, per_minute: int | None, **kwargs: Any) -> None:
        super().__init__(per_minute, **kwargs)
        self.spent = 0
        """Tokens taken from the buckets since the start, for `/metrics`."""
        self._spending: set[asyncio.Task[None]] = set()

    def spend(self, owner: str, tokens: int) -> None:
        """Take a response's `tokens` from `owner`'s bucket, however far below empty
        (in Redis by a task not awaited; in the process while Redis does not answer)."""
        if self.per_minute is None or tokens <= 0:
            return
        self.spent += tokens
        if self.shared is None or len(self._spending) >= MAX_SPENDING:
            self._take_local(owner, tokens, 0, True)
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._take_local(owner, tokens, 0, True)
            return
        task = loop.create_task(self._spend(owner, tokens))
        self._spending.add(task)
        task.add_done_callback(self._spending.discard)

    async def _spend(self, owner: str, tokens: int) -> None:
        await self._take(owner, tokens, 0, True)

    async def _take_shared(self, owner: str, cost: int, need: int, force: bool) -> Taken:
        assert self.shared is not None
        return await self.shared.take(
            owner, self.interval, self.burst, cost=cost, need=need, force=force, unit="tokens"
        )

    def collect(self) -> Iterator[str]:
        yield from super().collect()
        if self.per_minute is None:
            return
        yield (
            "# HELP warmsocket_token_rate_spent_total Tokens responses used, taken from "
            "their keys' buckets."
        )
        yield "# TYPE warmsocket_token_rate_spent_total counter"
        yield f"warmsocket_token_rate_spent_total {self.spent}"


class RateLimits:
    """The request and token limits together, as the servers ask them: tokens first (a
    check that takes nothing), then requests."""

    def __init__(self, requests: RequestRate, tokens: TokenRate) -> None:
        self.requests = requests
        self.tokens = tokens

    @property
    def limited(self) -> bool:
        return self.requests.limited or self.tokens.limited

    @property
    def needs_io(self) -> bool:
        return self.requests.needs_io or self.tokens.needs_io

    def check_local(self, owner: str) -> APIError | None:
        return self.tokens.check_local(owner) or self.requests.check_local(owner)

    async def check(self, owner: str) -> Verdict:
        tokens = await self.tokens.check(owner)
        if tokens.refusal is not None:
            return tokens
        requests = await self.requests.check(owner)
        if requests.refusal is not None:
            return requests
        return Verdict(None, requests.headers + tokens.headers)
