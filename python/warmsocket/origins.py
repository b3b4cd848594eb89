"""Which web pages may use this server (`--allowed-origin`), and the CORS headers that
let an allowed page read its HTTP answers.

Browsers send an `Origin` header with every WebSocket handshake and with every
cross-origin or non-GET request; the SDKs and agents this server is for send none. A
WebSocket handshake is not subject to CORS, and a server on the loopback interface is
reachable from any page a user's browser shows: without a check, any web site could
open `ws://127.0.0.1:8080/v1/responses` on a developer's machine and run turns on the
upstream's key, reading the answers (cross-site WebSocket hijacking; Ollama closed the
same hole with `OLLAMA_ORIGINS`). So a request with an `Origin` that is not allowed is
refused with 403 before anything else, and by default none is.

An allowed page gets CORS: a preflight (`OPTIONS` with `Access-Control-Request-Method`)
is answered 204 with the methods and the headers it asks for, and every answer carries
`Access-Control-Allow-Origin` with the page's origin (never `*`: answers differ by
origin), `Vary: Origin`, and exposes `x-request-id` and `retry-after`.
"""

from __future__ import annotations

from collections.abc import Iterable

ALLOWED_METHODS = "GET, POST, DELETE, OPTIONS"
PREFLIGHT_MAX_AGE = "600"
"""Seconds a browser may reuse a preflight's answer."""
EXPOSED_HEADERS = "x-request-id, retry-after"
MAX_REQUESTED_HEADERS = 1024
"""The longest `Access-Control-Request-Headers` echoed back (a browser's list is short)."""


class OriginPolicy:
    """The web origins whose requests are served (`--allowed-origin`)."""

    def __init__(self, allowed: Iterable[str] = ()) -> None:
        origins = {_normal(origin) for origin in allowed if origin.strip()}
        self.any = "*" in origins
        self.allowed = frozenset(origins - {"*"})

    def allows(self, origin: str | None) -> bool:
        """Whether a request with this `Origin` header (None: without one) is served."""
        return origin is None or self.any or _normal(origin) in self.allowed


def _normal(origin: str) -> str:
    """Origins compare without case and without a trailing slash (as browsers send
    them: `https://app.example.com`, `http://localhost:3000`, `null`)."""
    return origin.strip().rstrip("/").lower()


def cors_headers(origin: str) -> list[tuple[str, str]]:
    """What every answer to an allowed page carries."""
    return [
        ("access-control-allow-origin", origin),
        ("vary", "Origin"),
        ("access-control-expose-headers", EXPOSED_HEADERS),
    ]


def preflight_headers(origin: str, requested_headers: str) -> list[tuple[str, str]]:
    """The answer to an allowed page's preflight: the methods the API has and the
    request headers it asked for (any: the API reads what it knows and ignores the
    rest, as for any other client)."""
    headers = [
        ("access-control-allow-origin", origin),
        ("vary", "Origin"),
        ("access-control-allow-methods", ALLOWED_METHODS),
        ("access-control-max-age", PREFLIGHT_MAX_AGE),
    ]
    requested = requested_headers.strip()
    if requested and len(requested) <= MAX_REQUESTED_HEADERS:
        headers.append(("access-control-allow-headers", requested))
    return headers
