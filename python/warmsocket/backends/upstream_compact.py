"""`POST /v1/responses/compact` passed to a Responses upstream (`responses`,
`responses-ws`).

In front of a server that compacts conversations itself (OpenAI), its own
compaction is what its models read best: an `encrypted_content` only it can read.
So warmsocket sends the upstream the context it holds for the chain (its items, as a
turn's request would carry them, with warmsocket's own compaction items expanded),
the model, the instructions and the client's `service_tier`, `safety_identifier`,
`prompt_cache_key`, `prompt_cache_retention`, `prompt_cache_options` and `image`,
and answers with the upstream's window as it came.
The client then continues from that window; a Responses upstream gets its own
compaction item back as it was.

One request to the replica the router picks for the chain, over a keep-alive
connection of this module's own pool (the WebSocket backend has no HTTP pool). An
upstream without the endpoint (404, 405: vLLM, the simulated upstream told so) makes
`compact` return None, and warmsocket compacts with the model it serves instead; any
other failure is the upstream's error.
"""

from __future__ import annotations

import json
import time
from typing import Any

from warmsocket import __version__
from warmsocket.backends.base import TurnContext
from warmsocket.backends.http_upstream import TRANSPORT_FAILURES, chain_key, transport_failure
from warmsocket.compaction_items import expand_items_json
from warmsocket.httpclient import HTTPPool, Origin, proxy_for
from warmsocket.metrics import UpstreamMetrics
from warmsocket.router import Outcome, Router
from warmsocket.upstream import (
    UpstreamConfig,
    UpstreamError,
    explicit_settings,
    from_http_status,
    upstream_options,
)

PATH = "/responses/compact"
API = "responses_compact"
"""The `api` label of these requests in `warmsocket_upstream_requests_total`."""
MAX_ANSWER_BYTES = 64 * 1024 * 1024
_WITHOUT_ENDPOINT = frozenset({404, 405})
FORWARDED = ("service_tier", "safety_identifier", "prompt_cache_key", "prompt_cache_retention")
"""The client's settings the compact endpoint takes (the SDK's `ResponseCompactParams`),
passed on when set."""


class UpstreamCompactor:
    """The upstream's own compaction, for a Responses backend."""

    def __init__(self, config: UpstreamConfig, router: Router, stats: UpstreamMetrics) -> None:
        self.config = config
        self.router = router
        self.stats = stats
        self._origins = [Origin.parse(url) for url in config.urls]
        self._pools: list[HTTPPool] | None = None

    async def compact(self, turn: TurnContext, context: bytes) -> dict[str, Any] | None:
        """The upstream's `response.compaction` object for `context` (items as the
        cache keeps them, comma-joined) with the turn's model and instructions, None
        when the upstream has no compaction endpoint. Raises UpstreamError."""
        body: dict[str, Any] = {
            "model": self.config.upstream_model(turn.model),
            **explicit_settings(turn.settings, FORWARDED, turn.request.given_defaults),
            **upstream_options(turn.request, compact=True),
        }
        instructions = turn.request.instructions
        if instructions is not None:
            body["instructions"] = instructions
        head = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()[:-1]
        pieces = [head, b',"input":[', expand_items_json(context), b"]}"]
        length = sum(map(len, pieces))
        replica = self.router.route(
            turn.previous_response_id, lambda: chain_key(turn, self.config.router)
        )
        origin = self._origins[replica.index]
        pool = self._pool(replica.index)
        target = f"POST {origin.base_path}{PATH}"
        self.router.begin(replica)
        outcome: Outcome = "cancelled"
        error: UpstreamError | None = None
        try:
            started = time.perf_counter()
            key = self.config.key_for(turn.client_key)
            response = await pool.request(
                [self._head(origin, length, key), *pieces], timeout=self.config.timeout
            )
            self.stats.first_byte.observe(time.perf_counter() - started)
            try:
                data = await response.read(MAX_ANSWER_BYTES)
            finally:
                response.close()
        except TRANSPORT_FAILURES as exc:
            error = transport_failure(exc)
        else:
            outcome = "ok"
            self.stats.requests[(API, str(response.status))] += 1
            if response.status in _WITHOUT_ENDPOINT:
                return None
            if response.status == 200:
                return _compaction(data, target)
            error = from_http_status(
                response.status,
                data,
                response.head.headers,
                request=target,
                client_key=key is not self.config.api_key,
            )
            if error.retryable:  # the replica's health, as for a turn
                outcome = "failed"
            raise error
        finally:
            if error is not None and outcome == "cancelled":  # the transport failed
                outcome = "failed" if error.retryable else "ok"
            self.router.end(replica, outcome)
        self.stats.requests[(API, error.outcome)] += 1
        raise error

    def close(self) -> None:
        for pool in self._pools or ():
            pool.close()

    def _pool(self, index: int) -> HTTPPool:
        if self._pools is None:
            self._pools = [
                HTTPPool(
                    origin,
                    connect_timeout=self.config.connect_timeout,
                    max_idle=2,
                    proxy=proxy_for(origin),
                )
                for origin in self._origins
            ]
        return self._pools[index]

    def _head(self, origin: Origin, length: int, key: str | None) -> bytes:
        lines = [
            f"POST {origin.base_path}{PATH} HTTP/1.1",
            f"Host: {origin.host_header}",
            f"User-Agent: warmsocket/{__version__}",
            "Content-Type: application/json",
            "Accept: application/json",
        ]
        if key:
            lines.append(f"Authorization: Bearer {key}")
        lines.append(f"Content-Length: {length}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _compaction(data: bytes, target: str) -> dict[str, Any]:
    """The upstream's answer, checked to be a compaction object with an output list."""
    try:
        answer = json.loads(data)
    except ValueError:
        answer = None
    if not isinstance(answer, dict) or not isinstance(answer.get("output"), list):
        raise UpstreamError(
            "server_error",
            f"The upstream's answer to {target} is not a compaction object.",
            status=502,
            type="server_error",
            reason="protocol",
        )
    return answer
