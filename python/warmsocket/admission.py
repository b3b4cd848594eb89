"""How many connections one process keeps open (`--max-connections`), and what happens
to those past it.

Every connection is a file descriptor. Without a bound, a process that runs out of them
cannot accept (the event loop closes new connections unanswered, and says nothing) and
cannot open its upstream connections either: every turn fails. With one, the process
stays inside its open-file limit and a client past it is told why (503
`server_is_overloaded`, `Retry-After`), so the SDKs' retries and load balancers can act.

Past the limit, in order:

1. An idle HTTP keep-alive connection (one that has been answered and waits for its
   client's next request) is closed to make room, oldest first, as nginx does with its
   keep-alive connections. HTTP clients expect a server to close those at any time and
   open a new one. WebSockets are never closed for room: they carry session state.
2. Else the new connection is refused: its request is read (at most `REFUSED_BODY_BYTES`
   of body, for at most `REFUSED_WAIT` seconds) and answered 503; `GET /healthz` and
   `GET /metrics` are answered as usual, so that probes keep working on a full server.
3. Past `REFUSING_AT_ONCE` refusals in progress, new connections are closed at once.

`--max-connections-per-key` bounds what one API key holds at once (`KeyLimit`): its
open WebSockets, HTTP creates being answered and background responses running, so that
one client (a runaway agent loop, say) cannot take every connection a process has, or
every model turn, from the others. One past it gets 429 `rate_limit_exceeded` with
`Retry-After`. With `--redis-url`, what the key holds in the other processes counts
too, as last read (`shared_key_holds`, at most half a second old).
"""

from __future__ import annotations

import contextlib
import logging
import resource
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Literal, Protocol

from warmsocket.logs import Tally, Throttle

log = logging.getLogger("warmsocket.server")

FILE_RESERVE = 64
"""Open files kept out of `auto_max_connections`' count: the listening socket, the
snapshot, the tokenizer file, logs."""
REDIS_CONNECTIONS = 64
"""Connections to Redis one process opens at most (`shared_store.SharedStore.from_url`):
kept out of `auto_max_connections`' count too, with `--redis-url`."""
REFUSING_AT_ONCE = 64
"""Connections past the limit answered 503 at once; more are closed unanswered."""
REFUSED_BODY_BYTES = 64 * 1024
"""How much of a refused request's body is read before it is answered (a larger one is
answered as soon as that much has arrived)."""
REFUSED_WAIT = 5.0
"""Seconds a refused connection has to send its request before it is closed."""
LOG_INTERVAL = 10.0
"""Seconds between two log lines about refused connections (the metrics count all)."""

Verdict = Literal["admitted", "refused", "dropped"]


class Reclaimable(Protocol):
    """A connection that can be closed to make room while it is idle."""

    def close_for_room(self) -> None: ...


def open_file_limit() -> int:
    """The process's open-file limit (soft)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def raise_open_file_limit() -> int:
    """Raise the open-file limit to its hard limit, as the kernel lets any process do
    (the soft limit is often 1,024 for compatibility with `select`, which warmsocket
    does not use). Returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != resource.RLIM_INFINITY and soft < hard:
        # Refused, e.g. by a sandbox: the soft limit stays.
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return open_file_limit()


def auto_max_connections(open_files: int, *, upstream: bool, redis: bool = False) -> int:
    """What `--max-connections 0` means: as many connections as the open-file limit
    leaves room for after `FILE_RESERVE` (and `REDIS_CONNECTIONS` with `redis`); with an
    upstream, half that, since each connection's turn holds an upstream connection too."""
    room = max(open_files - reserved_files(redis=redis), 2)
    return room // 2 if upstream else room


def reserved_files(*, redis: bool) -> int:
    """Open files the server keeps for other things than its clients' connections."""
    return FILE_RESERVE + (REDIS_CONNECTIONS if redis else 0)


class Admission:
    """The connection count against `limit` (None: no limit) and the idle keep-alive
    connections that may be closed to make room. Not thread-safe: the server's event
    loop owns it."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.admitted = 0
        """Connections counted against the limit."""
        self.refusing = 0
        """Connections past the limit being answered 503."""
        self.counts = {"refused": 0, "dropped": 0, "closed_idle": 0}
        """Totals since the start, for `/metrics`."""
        self._idle: dict[Reclaimable, None] = {}  # insertion order: oldest idle first
        self._unlogged = {"refused": 0, "dropped": 0}
        self._throttle = Throttle(LOG_INTERVAL)

    def admit(self) -> Verdict:
        """A new connection: counted against the limit (perhaps in place of an idle
        one, which is closed), or past it."""
        if self.limit is None or self.admitted < self.limit:
            self.admitted += 1
            return "admitted"
        if self._idle:
            oldest = next(iter(self._idle))
            del self._idle[oldest]
            self.counts["closed_idle"] += 1
            oldest.close_for_room()  # it no longer counts: the new one takes its place
            return "admitted"
        verdict: Verdict = "refused" if self.refusing < REFUSING_AT_ONCE else "dropped"
        if verdict == "refused":
            self.refusing += 1
        self.counts[verdict] += 1
        self._unlogged[verdict] += 1
        self._log()
        return verdict

    def release(self, verdict: Verdict | None) -> None:
        """A connection admitted or refused with `verdict` closed (None: one that had
        been closed for room, or never counted)."""
        if verdict == "admitted":
            self.admitted -= 1
        elif verdict == "refused":
            self.refusing -= 1

    def idle(self, connection: Reclaimable) -> None:
        """`connection` (admitted, HTTP) waits for its client's next request."""
        self._idle[connection] = None

    def busy(self, connection: Reclaimable) -> None:
        """`connection` is no longer idle (its client sent bytes, or it closed)."""
        self._idle.pop(connection, None)

    def _log(self) -> None:
        if not self._throttle.due():
            return
        log.warning(
            "connection limit reached; new connections are refused (503) until some close. "
            "Raise --max-connections (and the open-file limit) or add replicas",
            extra={"limit": self.limit, **self._unlogged},
        )
        self._unlogged = {"refused": 0, "dropped": 0}


class KeySlot:
    """One of an owner's places under `KeyLimit`, freed by `release` (once)."""

    __slots__ = ("_held", "_limit", "owner")

    def __init__(self, limit: KeyLimit, owner: str) -> None:
        self._limit = limit
        self.owner = owner
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._limit.free(self.owner)

    def hand_over(self) -> KeySlot:
        """The same place, now held by whoever gets the returned slot (this one's
        `release` no longer frees it)."""
        self._held = False
        return KeySlot(self._limit, self.owner)


class KeyLimit:
    """What each owner (API key, `httpapi.Auth.owner`) holds at once against `limit`
    (None: no limit): its open WebSockets, its HTTP creates (and compactions) being
    answered, and its background responses running. Requests that run no model
    (retrieve, cancel, delete, lists) hold nothing: a key at its limit can still
    look at and cancel what it runs."""

    def __init__(self, limit: int | None, elsewhere: Callable[[str], int] | None = None) -> None:
        self.limit = limit
        self.held = Counter[str]()
        self.elsewhere = elsewhere
        """What an owner holds in other processes (`SharedKeyHolds.elsewhere`), if any."""
        self.on_release: Callable[[], None] | None = None
        """Told when an owner lets go of a place (`SharedKeyHolds.nudge`: the other
        processes learn it sooner than at the next periodic sync)."""
        self.refused = 0
        """Refusals since the start, for `/metrics`."""
        self._refusals = Tally(LOG_INTERVAL)

    def take(self, owner: str) -> KeySlot | None:
        """A place for `owner` (to `release` once done), or None: it holds its limit."""
        if self.limit is None:
            return KeySlot(self, owner)
        held = self.held[owner]
        if self.elsewhere is not None:
            held += self.elsewhere(owner)
        if held >= self.limit:
            self.refused += 1
            if (unlogged := self._refusals.count()) is not None:
                log.warning(
                    "an API key is at --max-connections-per-key; its new WebSockets and "
                    "responses are refused (429) until some end",
                    extra={"owner": owner, "limit": self.limit, "refused": unlogged},
                )
            return None
        self.held[owner] += 1
        return KeySlot(self, owner)

    def free(self, owner: str) -> None:
        """(`KeySlot.release`.)"""
        if self.limit is None:
            return
        left = self.held[owner] - 1
        if left > 0:
            self.held[owner] = left
        else:
            del self.held[owner]
        if self.on_release is not None:
            self.on_release()

    def collect(self) -> Iterator[str]:
        """`/metrics` lines (none without a limit)."""
        if self.limit is None:
            return
        yield (
            "# HELP warmsocket_connection_limit_per_key WebSockets, HTTP creates and "
            "background responses one key holds at once."
        )
        yield "# TYPE warmsocket_connection_limit_per_key gauge"
        yield f"warmsocket_connection_limit_per_key {self.limit}"
        yield "# HELP warmsocket_keys_at_limit API keys holding their limit now."
        yield "# TYPE warmsocket_keys_at_limit gauge"
        yield f"warmsocket_keys_at_limit {sum(1 for n in self.held.values() if n >= self.limit)}"
        yield (
            "# HELP warmsocket_key_limit_refused_total WebSockets, creates and background "
            "responses refused (429) because their key held its limit."
        )
        yield "# TYPE warmsocket_key_limit_refused_total counter"
        yield f"warmsocket_key_limit_refused_total {self.refused}"
