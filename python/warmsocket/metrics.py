"""Counters and histograms, rendered in the Prometheus text exposition format.

Labels never carry conversation content: only status names, error codes (those that
look like identifiers: `errors.log_label`) and routes.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Callable, Iterable, Sequence

from warmsocket.errors import OTHER_LABEL, log_label

LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)


MAX_ERROR_CODES = 64
"""Distinct `code` labels of warmsocket_errors_total (see `Metrics.count_error`)."""


class Histogram:
    __slots__ = ("bounds", "count", "counts", "total")

    def __init__(self, bounds: Sequence[float] = LATENCY_BUCKETS) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def render(self, name: str, labels: str = "") -> Iterable[str]:
        cumulative = 0
        sep = "," if labels else ""
        for bound, count in zip(self.bounds, self.counts, strict=False):
            cumulative += count
            yield f'{name}_bucket{{{labels}{sep}le="{bound:g}"}} {cumulative}'
        yield f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}'
        suffix = f"{{{labels}}}" if labels else ""
        yield f"{name}_sum{suffix} {self.total:.9g}"
        yield f"{name}_count{suffix} {self.count}"


class Metrics:
    """Process-wide metrics. Not thread-safe: the server updates it from its event loop."""

    def __init__(self) -> None:
        self.connections_opened = Counter[str]()
        self.connections_active = Counter[str]()
        self.turns = Counter[str]()
        self.errors = Counter[str]()
        self.http_requests = Counter[tuple[str, int]]()
        self.write_stalls = Counter[str]()
        self.lookups = Counter[str]()
        self.prefix_matches = Counter[str]()
        self.prefix_matched_items = 0
        self.compactions = 0
        self.rebuild = Histogram()
        self.first_token = Histogram()
        self.turn_total = Histogram()
        self.bytes_received = 0
        self.bytes_sent = 0
        self.collectors: list[Callable[[], Iterable[str]]] = []
        self.upstream = UpstreamMetrics()

    # -- recording ----------------------------------------------------------------------

    def connection_opened(self, kind: str) -> None:
        self.connections_opened[kind] += 1
        self.connections_active[kind] += 1

    def connection_closed(self, kind: str) -> None:
        self.connections_active[kind] -= 1

    def cache_lookup(self, *, hit: bool) -> None:
        self.lookups["hit" if hit else "miss"] += 1

    def prefix_match(self, items: int) -> None:
        """A request without previous_response_id matched `items` cached items."""
        self.prefix_matches["hit" if items else "miss"] += 1
        self.prefix_matched_items += items

    def count_compaction(self) -> None:
        """A context was compacted (`POST /v1/responses/compact`, or server-side)."""
        self.compactions += 1

    def count_error(self, code: str) -> None:
        """Errors by code. Codes an upstream gives pass through to clients, so they are
        not a fixed set: past `MAX_ERROR_CODES` distinct ones, new codes count as
        'other' (the label set of an unauthenticated endpoint stays bounded)."""
        errors = self.errors
        code = log_label(code) or OTHER_LABEL  # (not an identifier: "other" too)
        if code not in errors and len(errors) >= MAX_ERROR_CODES:
            code = OTHER_LABEL
        errors[code] += 1

    def http_request(self, route: str, status: int) -> None:
        self.http_requests[(route, status)] += 1

    def write_stalled(self, kind: str) -> None:
        """A connection ("http" or "websocket") was dropped: its client read nothing of
        what the server had to send for --http-idle-timeout."""
        self.write_stalls[kind] += 1

    def observe_rebuild(self, seconds: float) -> None:
        self.rebuild.observe(seconds)

    def observe_first_token(self, seconds: float) -> None:
        self.first_token.observe(seconds)

    def observe_turn(self, seconds: float, status: str) -> None:
        self.turns[status] += 1
        self.turn_total.observe(seconds)

    # -- rendering ------------------------------------------------------------------------

    def render(self) -> str:
        lines: list[str] = []

        def family(name: str, kind: str, help_text: str) -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")

        family("warmsocket_connections_opened_total", "counter", "Connections accepted, by kind.")
        for kind in ("websocket", "http"):
            value = self.connections_opened[kind]
            lines.append(f'warmsocket_connections_opened_total{{kind="{kind}"}} {value}')
        family("warmsocket_connections", "gauge", "Open connections, by kind.")
        for kind in ("websocket", "http"):
            value = self.connections_active[kind]
            lines.append(f'warmsocket_connections{{kind="{kind}"}} {value}')
        family(
            "warmsocket_turns_total",
            "counter",
            "Responses finished, by terminal status (abandoned: the client left first).",
        )
        for status in ("completed", "incomplete", "failed", "cancelled", "abandoned"):
            lines.append(f'warmsocket_turns_total{{status="{status}"}} {self.turns[status]}')
        family("warmsocket_errors_total", "counter", "Errors sent to clients, by error code.")
        for code, count in sorted(self.errors.items()):
            lines.append(f'warmsocket_errors_total{{code="{_label(code)}"}} {count}')
        family("warmsocket_http_requests_total", "counter", "HTTP requests, by route and status.")
        for (route, http_status), count in sorted(self.http_requests.items()):
            labels = f'route="{_label(route)}",status="{http_status}"'
            lines.append(f"warmsocket_http_requests_total{{{labels}}} {count}")
        family(
            "warmsocket_write_stalls_total",
            "counter",
            "Connections dropped because the client read nothing of what the server had to "
            "send for --http-idle-timeout, by kind.",
        )
        for kind in ("websocket", "http"):
            value = self.write_stalls[kind]
            lines.append(f'warmsocket_write_stalls_total{{kind="{kind}"}} {value}')
        family(
            "warmsocket_previous_response_lookups_total",
            "counter",
            "previous_response_id lookups, by result.",
        )
        for result in ("hit", "miss"):
            lines.append(
                f'warmsocket_previous_response_lookups_total{{result="{result}"}} '
                f"{self.lookups[result]}"
            )
        family(
            "warmsocket_prefix_matches_total",
            "counter",
            "Full-history requests matched against cached chains, by result.",
        )
        for result in ("hit", "miss"):
            lines.append(
                f'warmsocket_prefix_matches_total{{result="{result}"}} '
                f"{self.prefix_matches[result]}"
            )
        family(
            "warmsocket_prefix_matched_items_total",
            "counter",
            "Items of full-history requests found in cached chains (not stored again).",
        )
        lines.append(f"warmsocket_prefix_matched_items_total {self.prefix_matched_items}")
        family(
            "warmsocket_compactions_total",
            "counter",
            "Contexts compacted (POST /v1/responses/compact, or server-side for "
            "context_management), each summarised by the model.",
        )
        lines.append(f"warmsocket_compactions_total {self.compactions}")
        family(
            "warmsocket_turn_context_rebuild_seconds",
            "histogram",
            "Time to validate a turn and rebuild its context from the cache.",
        )
        lines += self.rebuild.render("warmsocket_turn_context_rebuild_seconds")
        family(
            "warmsocket_turn_first_token_seconds",
            "histogram",
            "Time from the start of a turn to the backend's first event.",
        )
        lines += self.first_token.render("warmsocket_turn_first_token_seconds")
        family(
            "warmsocket_turn_seconds",
            "histogram",
            "Time from the start of a turn to its terminal event.",
        )
        lines += self.turn_total.render("warmsocket_turn_seconds")
        lines += self.upstream.render()
        for collect in self.collectors:
            lines += collect()
        lines.append("")
        return "\n".join(lines)


class UpstreamMetrics:
    """Counters of the upstream backends (`--upstream`); empty with the built-in model."""

    def __init__(self) -> None:
        self.requests = Counter[tuple[str, str]]()
        """(api, outcome): an HTTP status, or 'timeout', 'connect', 'closed', 'protocol'."""
        self.retries = 0
        self.replays = Counter[str]()
        """Full-context resends after the upstream lost a chain's state, by reason."""
        self.chained = 0
        """responses-ws turns sent with the upstream's own previous_response_id."""
        self.truncated_turns = 0
        """Chat turns sent without their oldest turns (`truncation: auto`)."""
        self.affinity = Counter[tuple[str, str]]()
        """(result, reason): hit/parent, miss/<why>, new/prefix..."""
        self.connections_opened = Counter[str]()
        self.first_byte = Histogram()

    def render(self) -> list[str]:
        if not self.requests and not self.connections_opened:
            return []
        lines: list[str] = []

        def family(name: str, kind: str, help_text: str) -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")

        family(
            "warmsocket_upstream_requests_total",
            "counter",
            "Requests sent upstream, by upstream API and outcome (HTTP status or failure).",
        )
        for (api, outcome), count in sorted(self.requests.items()):
            labels = f'api="{_label(api)}",outcome="{_label(outcome)}"'
            lines.append(f"warmsocket_upstream_requests_total{{{labels}}} {count}")
        family(
            "warmsocket_upstream_retries_total",
            "counter",
            "Upstream requests retried before any event reached the client.",
        )
        lines.append(f"warmsocket_upstream_retries_total {self.retries}")
        family(
            "warmsocket_upstream_replays_total",
            "counter",
            "Turns resent with their full context after the upstream lost the chain's state.",
        )
        for reason, count in sorted(self.replays.items()):
            lines.append(f'warmsocket_upstream_replays_total{{reason="{_label(reason)}"}} {count}')
        family(
            "warmsocket_upstream_chained_total",
            "counter",
            "Turns sent with the upstream's own previous_response_id (responses-ws).",
        )
        lines.append(f"warmsocket_upstream_chained_total {self.chained}")
        family(
            "warmsocket_upstream_truncated_turns_total",
            "counter",
            "Turns sent without their oldest turns to fit the model's window (truncation: auto).",
        )
        lines.append(f"warmsocket_upstream_truncated_turns_total {self.truncated_turns}")
        family(
            "warmsocket_upstream_affinity_total",
            "counter",
            "Replica choices: hit (the parent's replica), miss (moved away, by reason), new "
            "(a new chain placed by its prefix).",
        )
        for (result, reason), count in sorted(self.affinity.items()):
            labels = f'result="{_label(result)}",reason="{_label(reason)}"'
            lines.append(f"warmsocket_upstream_affinity_total{{{labels}}} {count}")
        family(
            "warmsocket_upstream_connections_opened_total",
            "counter",
            "Connections opened to upstream replicas, by upstream API.",
        )
        for api, count in sorted(self.connections_opened.items()):
            lines.append(
                f'warmsocket_upstream_connections_opened_total{{api="{_label(api)}"}} {count}'
            )
        family(
            "warmsocket_upstream_first_byte_seconds",
            "histogram",
            "Time from sending a turn upstream to the upstream's answer (response head or "
            "first event).",
        )
        lines += self.first_byte.render("warmsocket_upstream_first_byte_seconds")
        return lines


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")[:128]


def cache_collector(stats: Callable[[], dict[str, int]]) -> Callable[[], Iterable[str]]:
    """Render the session cache's stats as gauges and counters."""

    def collect() -> Iterable[str]:
        values = stats()
        counters = {"hits", "misses", "evictions"}
        for key, value in sorted(values.items()):
            name = f"warmsocket_cache_{key}" + ("_total" if key in counters else "")
            kind = "counter" if key in counters else "gauge"
            yield f"# HELP {name} Session cache {key.replace('_', ' ')}."
            yield f"# TYPE {name} {kind}"
            yield f"{name} {value}"

    return collect


def rust_heap_collector(held: Callable[[], tuple[int, int]]) -> Callable[[], Iterable[str]]:
    """Render what the Rust core holds on the heap (`_core.rust_heap`)."""

    def collect() -> Iterable[str]:
        size, blocks = held()
        yield (
            "# HELP warmsocket_rust_heap_bytes Bytes the Rust core holds on the heap "
            "(the session cache, tokenizers, buffers); Python's memory is not in it."
        )
        yield "# TYPE warmsocket_rust_heap_bytes gauge"
        yield f"warmsocket_rust_heap_bytes {size}"
        yield "# HELP warmsocket_rust_heap_blocks Heap blocks the Rust core holds."
        yield "# TYPE warmsocket_rust_heap_blocks gauge"
        yield f"warmsocket_rust_heap_blocks {blocks}"

    return collect


def connection_limit_collector(
    limit: int | None, counts: dict[str, int]
) -> Callable[[], Iterable[str]]:
    """Render `--max-connections` and what it did (`warmsocket.admission`)."""

    def collect() -> Iterable[str]:
        if limit is not None:
            yield "# HELP warmsocket_connection_limit Connections kept open at most."
            yield "# TYPE warmsocket_connection_limit gauge"
            yield f"warmsocket_connection_limit {limit}"
        yield (
            "# HELP warmsocket_connections_refused_total Connections that came past the "
            "limit, by how: answered (503; a probe of /healthz or /metrics as usual) or "
            "dropped (too many were being answered already)."
        )
        yield "# TYPE warmsocket_connections_refused_total counter"
        yield f'warmsocket_connections_refused_total{{how="answered"}} {counts["refused"]}'
        yield f'warmsocket_connections_refused_total{{how="dropped"}} {counts["dropped"]}'
        yield (
            "# HELP warmsocket_idle_connections_closed_for_room_total Idle HTTP keep-alive "
            "connections closed to let a new connection in under the limit."
        )
        yield "# TYPE warmsocket_idle_connections_closed_for_room_total counter"
        yield f"warmsocket_idle_connections_closed_for_room_total {counts['closed_idle']}"

    return collect


def background_collector(stats: Callable[[], dict[str, int]]) -> Callable[[], Iterable[str]]:
    """Render the background responses' gauges (`background: true`)."""

    def collect() -> Iterable[str]:
        values = stats()
        yield (
            "# HELP warmsocket_background_responses Background responses running, and "
            "finished ones whose events are kept."
        )
        yield "# TYPE warmsocket_background_responses gauge"
        for state in ("running", "finished"):
            yield f'warmsocket_background_responses{{state="{state}"}} {values[state]}'
        yield (
            "# HELP warmsocket_background_retained_bytes Events of finished background "
            "responses kept for replay."
        )
        yield "# TYPE warmsocket_background_retained_bytes gauge"
        yield f"warmsocket_background_retained_bytes {values['retained_bytes']}"

    return collect


def conversation_collector(stats: Callable[[], dict[str, int]]) -> Callable[[], Iterable[str]]:
    """Render the Conversations API's gauges and counter."""

    def collect() -> Iterable[str]:
        values = stats()
        yield (
            "# HELP warmsocket_conversations Conversations this process keeps (with "
            "--redis-url: its copies of those it used)."
        )
        yield "# TYPE warmsocket_conversations gauge"
        yield f"warmsocket_conversations {values['conversations']}"
        yield (
            "# HELP warmsocket_conversation_bytes Item bytes of those conversations "
            "(bounded by --conversation-budget)."
        )
        yield "# TYPE warmsocket_conversation_bytes gauge"
        yield f"warmsocket_conversation_bytes {values['bytes']}"
        yield (
            "# HELP warmsocket_conversation_write_errors_total Responses whose input and "
            "output could not be added to their conversation in Redis."
        )
        yield "# TYPE warmsocket_conversation_write_errors_total counter"
        yield f"warmsocket_conversation_write_errors_total {values['write_errors']}"
        yield (
            "# HELP warmsocket_conversation_hold_conflicts_total With --redis-url: "
            "responses that added to a conversation another process held (a queued "
            "WebSocket create, or a hold Redis did not renew in time)."
        )
        yield "# TYPE warmsocket_conversation_hold_conflicts_total counter"
        yield f"warmsocket_conversation_hold_conflicts_total {values['hold_conflicts']}"

    return collect


def shared_store_collector(stats: Callable[[], dict[str, int]]) -> Callable[[], Iterable[str]]:
    """Render the shared store's counters (`--redis-url`)."""

    def collect() -> Iterable[str]:
        values = stats()
        yield "# HELP warmsocket_shared_store_published_total Stored responses written to Redis."
        yield "# TYPE warmsocket_shared_store_published_total counter"
        yield f"warmsocket_shared_store_published_total {values['published']}"
        yield (
            "# HELP warmsocket_shared_store_loads_total Local misses looked up in Redis, by "
            "result (error: Redis did not answer; the request was answered 503)."
        )
        yield "# TYPE warmsocket_shared_store_loads_total counter"
        yield f'warmsocket_shared_store_loads_total{{result="hit"}} {values["load_hits"]}'
        yield f'warmsocket_shared_store_loads_total{{result="miss"}} {values["load_misses"]}'
        yield f'warmsocket_shared_store_loads_total{{result="error"}} {values["load_errors"]}'
        yield (
            "# HELP warmsocket_shared_store_loaded_responses_total Responses copied from "
            "Redis into the local cache (a chain's missing part)."
        )
        yield "# TYPE warmsocket_shared_store_loaded_responses_total counter"
        yield f"warmsocket_shared_store_loaded_responses_total {values['loaded']}"
        yield "# HELP warmsocket_shared_store_deletes_total Responses marked deleted in Redis."
        yield "# TYPE warmsocket_shared_store_deletes_total counter"
        yield f"warmsocket_shared_store_deletes_total {values['deleted']}"
        yield (
            "# HELP warmsocket_shared_store_errors_total Redis operations that failed (and "
            "responses not written); service went on from local state."
        )
        yield "# TYPE warmsocket_shared_store_errors_total counter"
        yield f"warmsocket_shared_store_errors_total {values['errors']}"
        yield "# HELP warmsocket_shared_store_queue Stored responses waiting to be written."
        yield "# TYPE warmsocket_shared_store_queue gauge"
        yield f"warmsocket_shared_store_queue {values['queued']}"

    return collect
