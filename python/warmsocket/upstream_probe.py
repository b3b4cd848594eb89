"""At start, one `GET <url>/models` to each upstream replica, so that a
misconfiguration shows in the log at once instead of at the first turn: a URL where
nothing listens, one without `/v1`, a key the upstream refuses, a mapped model it
does not serve.

It never holds serving back (an upstream may come up later: vLLM loads its weights
for minutes) and never stops the server: each finding is one log line
(`upstream_probe`), a warning for a problem. Every OpenAI-compatible server warmsocket
fronts answers `GET /v1/models` (vLLM, SGLang, llama.cpp, Ollama, OpenAI). Nothing
of a conversation is in it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from warmsocket import __version__
from warmsocket.httpclient import HTTPClientError, HTTPPool, Origin, proxy_for, request_head
from warmsocket.upstream import UpstreamConfig

log = logging.getLogger("warmsocket")

MAX_BODY = 4 << 20
"""The most of a `/models` answer read (OpenAI's list is some tens of KiB)."""
LISTED = 10
"""Model ids a finding names at most."""


@dataclass(frozen=True, slots=True)
class Finding:
    """What one replica's `GET /models` found."""

    upstream: str
    """The replica as warmsocket uses it (`Origin`: no credentials, no query)."""
    status: int | None = None
    """The HTTP status; None when no answer came (`reason` says why)."""
    models: tuple[str, ...] = ()
    windows: dict[str, int] = field(default_factory=dict)
    """The models' context windows, where the list gives them (`max_model_len`:
    vLLM, SGLang)."""
    reason: str | None = None


async def probe(origin: Origin, api_key: str | None, timeout: float) -> Finding:
    """`GET <origin>/models`, given up when connecting, or any wait for the answer,
    takes longer than `timeout` seconds. Never raises, except for cancellation. Needs
    no current task (a backend's eager first step asks it)."""
    headers = [("Host", origin.host_header), ("User-Agent", f"warmsocket/{__version__}")]
    headers.append(("Accept", "application/json"))
    if api_key:
        headers.append(("Authorization", f"Bearer {api_key}"))
    try:
        pool = HTTPPool(origin, connect_timeout=timeout, max_idle=0, proxy=proxy_for(origin))
    except ValueError as exc:  # a proxy this client cannot use (responses-ws: SOCKS)
        return Finding(str(origin), reason=f"not probed: {exc}")
    try:
        response = await pool.request(
            [request_head("GET", f"{origin.base_path}/models", headers)], timeout=timeout
        )
        try:
            body = await response.read(MAX_BODY)
        finally:
            response.abort()
    except (HTTPClientError, OSError, TimeoutError) as exc:
        return Finding(str(origin), reason=str(exc) or type(exc).__name__)
    finally:
        pool.close()
    cards = _model_cards(body) if response.status == 200 else []
    windows = {
        card["id"]: window
        for card in cards
        if isinstance(window := card.get("max_model_len"), int)
        and not isinstance(window, bool)
        and window > 0
    }
    return Finding(str(origin), response.status, tuple(c["id"] for c in cards), windows)


def _model_cards(body: bytes) -> list[dict[str, Any]]:
    """The cards of an OpenAI model list (`{"data": [{"id": ...}]}`) that have an
    id; [] for anything else."""
    try:
        listing = json.loads(body)
    except ValueError:
        return []
    cards = listing.get("data") if isinstance(listing, dict) else None
    if not isinstance(cards, list):
        return []
    return [c for c in cards if isinstance(c, dict) and isinstance(c.get("id"), str)]


def report(finding: Finding, config: UpstreamConfig) -> None:
    """One log line for `finding`: `upstream reachable`, or a warning saying what to fix."""
    where = {"upstream": finding.upstream}
    status = finding.status
    if status is None:
        log.warning(
            "upstream not reachable yet; turns fail until it answers: check --upstream "
            "and that the server is up",
            extra={**where, "reason": finding.reason},
        )
    elif status in (401, 403) and config.forward_key and not config.api_key:
        log.info(
            "upstream reachable; it wants a key, and gets each client's own "
            "(--upstream-forward-key)",
            extra={**where, "status": status},
        )
    elif status in (401, 403):
        advice = "check --upstream-api-key" if config.api_key else "set --upstream-api-key"
        log.warning(
            f"the upstream refused the probe's key; {advice}", extra={**where, "status": status}
        )
    elif status == 404:
        if finding.upstream.endswith("/v1"):
            advice = "if turns fail with 'no such endpoint', check the --upstream path"
        else:
            advice = f"--upstream most likely needs /v1 at its end: {finding.upstream}/v1"
        log.warning(f"the upstream has no GET /models; {advice}", extra={**where, "status": status})
    elif status >= 400:
        log.warning(
            "the upstream answered the probe with an error", extra={**where, "status": status}
        )
    else:
        log.info(
            "upstream reachable",
            extra={
                **where,
                "status": status,
                "model_count": len(finding.models),
                "models": list(finding.models[:LISTED]),
                **(
                    {"context_windows": dict(list(finding.windows.items())[:LISTED])}
                    if finding.windows
                    else {}
                ),
            },
        )
        served = set(finding.models)
        for model in sorted(set(config.model_map.values())):
            if finding.models and model not in served:
                log.warning(
                    "the upstream does not list a model --upstream-model-map maps to; "
                    "turns for it may fail",
                    extra={**where, "model": model, "models": list(finding.models[:LISTED])},
                )


async def probe_upstreams(
    config: UpstreamConfig,
    *,
    timeout: float | None = None,
    learn: Callable[[dict[str, int]], None] | None = None,
) -> list[Finding]:
    """Probe every replica at once and log what each shows (`report`). `timeout`
    defaults to `--upstream-connect-timeout`; `learn` gets the context windows the
    lists give (the chat backend's, for `truncation: auto`)."""
    limit = config.connect_timeout if timeout is None else timeout
    origins = [Origin.parse(url) for url in config.urls]
    findings = await asyncio.gather(*(probe(o, config.api_key, limit) for o in origins))
    for finding in findings:
        report(finding, config)
        if learn is not None and finding.windows:
            learn(finding.windows)
    return list(findings)
