"""Upstream configuration and the error mapping shared by every upstream API.

An *upstream* is an OpenAI-compatible server (vLLM, SGLang, llama.cpp, Ollama,
OpenAI, another warmsocket) that does the inference; warmsocket keeps the session
state and sends each turn upstream as a full, byte-stable request. Several URLs are
replicas of one model (see `warmsocket.router`).

Failure mapping (docs/upstreams.md):

* an upstream 4xx becomes the matching error: its status, code, type, param and
  message are kept (`UpstreamError`); 401/403 mean warmsocket's own upstream key is
  wrong and become a 502 `server_error` instead of blaming the client's key; a 404
  for a route the upstream does not have (`unknown_route`: the upstream URL lacks
  `/v1`, say) is a 502 `server_error` too, not the prompt's fault; so is a 3xx (the
  upstream URL redirects: `http://` for an `https://` server, say), which is not
  followed: `--upstream` should name where it leads;
* 5xx, 408, timeouts, refused or broken connections and streams that end early are
  `retryable`: they are retried (on another replica when there is one) only while
  nothing has gone to the client yet, and otherwise end the response
  `response.failed` with `server_error`. A retry on the replica that just answered
  5xx waits first (`retry_delay`): its `Retry-After` when it gave one of at most
  `RETRY_AFTER_LIMIT`, a short backoff otherwise; a longer `Retry-After` is not waited
  out here: the client gets the upstream's 503 (`server_is_overloaded`) or 5xx with
  that `Retry-After`, which the SDKs honour.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, Literal
from urllib.parse import urlsplit

from warmsocket._core import CreateRequest
from warmsocket.client_events import ECHOED_DEFAULTS
from warmsocket.errors import INVALID_REQUEST, RATE_LIMIT, SERVER_ERROR, APIError
from warmsocket.router import RouterConfig

UpstreamAPI = Literal["chat", "responses", "responses-ws"]
UPSTREAM_APIS: tuple[UpstreamAPI, ...] = ("chat", "responses", "responses-ws")
MAX_ERROR_MESSAGE = 2000


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """Everything the upstream backends need (from `--upstream*` flags)."""

    urls: tuple[str, ...]
    api: UpstreamAPI = "chat"
    api_key: str | None = None
    connect_timeout: float = 10.0
    timeout: float = 600.0
    """Seconds to wait for the response head and for each piece of a streamed answer."""
    retries: int = 2
    """Extra attempts after a retryable failure, only before any event reached the client."""
    model_map: Mapping[str, str] = field(default_factory=dict)
    """Client model name -> upstream model name; the key '*' maps every other name."""
    max_idle_connections: int = 64
    """Idle keep-alive connections kept per replica."""
    context_window: int | None = None
    """The model's context window in tokens, for `truncation: auto` (chat API);
    None: learned from the upstream's `GET /models` (`max_model_len`)."""
    ws_lifetime: float = 3300.0
    """responses-ws: seconds after which a connection gets no new turn (rotated)."""
    ws_warm_connections: int = 1
    """responses-ws: idle connections kept open and ready per replica."""
    router: RouterConfig = field(default_factory=RouterConfig)
    forward_key: bool = False
    """`--upstream-forward-key`: each client's own bearer token goes upstream in place
    of `api_key` (which then serves requests without one); a `responses-ws` connection
    is opened with one key and carries only its turns."""

    def __post_init__(self) -> None:
        if not self.urls:
            raise ValueError("at least one upstream URL is required")
        if self.api not in UPSTREAM_APIS:
            raise ValueError(f"unknown upstream API {self.api!r}")

    def key_for(self, client_key: str | None) -> str | None:
        """The bearer token a request goes upstream with: the client's own with
        `forward_key` (when it sent one), else `api_key`."""
        if self.forward_key and client_key:
            return client_key
        return self.api_key

    @property
    def at_openai(self) -> bool:
        """Every upstream is OpenAI (api.openai.com) or Azure OpenAI
        (`*.openai.azure.com`): a Chat Completions request then takes OpenAI's own
        fields (`chat_translate.chat_request_fields`), which other servers do not
        know (vLLM logs every unknown field; Ollama ignores `max_completion_tokens`,
        so an answer would be unbounded)."""
        hosts = [urlsplit(url).hostname or "" for url in self.urls]
        return all(host == "api.openai.com" or host.endswith(".openai.azure.com") for host in hosts)

    def upstream_model(self, model: str) -> str:
        mapped = self.model_map.get(model)
        if mapped is None:
            mapped = self.model_map.get("*", model)
        return mapped


def parse_model_map(entries: list[str]) -> dict[str, str]:
    """`["gpt-4o=Qwen/Qwen3-8B", "*=llama3"]` -> mapping. Raises ValueError."""
    mapping: dict[str, str] = {}
    for entry in entries:
        name, sep, target = entry.partition("=")
        if not sep or not name.strip() or not target.strip():
            raise ValueError(f"not a CLIENT=UPSTREAM model mapping: {entry!r}")
        mapping[name.strip()] = target.strip()
    return mapping


# -- errors ---------------------------------------------------------------------------------


class UpstreamError(APIError):
    """An error from, or about, the upstream.

    `retryable` errors may be retried while nothing has been sent to the client.
    `response_error()` keeps the upstream's type and param, and maps the code to one
    the Response object allows (`server_error`, `rate_limit_exceeded`, `invalid_prompt`).
    """

    def __init__(
        self,
        code: str | None,
        message: str,
        *,
        status: int,
        type: str,
        param: str | None = None,
        retryable: bool = False,
        headers: dict[str, str] | None = None,
        reason: str = "error",
        upstream_code: str | None = None,
        detail: str | None = None,
        upstream_status: int | None = None,
        misconfigured: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(code, message, param=param, status=status, type=type, headers=headers)
        self.retryable = retryable
        self.misconfigured = misconfigured
        """warmsocket's upstream configuration is wrong (credentials, URL, scheme): a
        server error whatever the request, never retried. A create without `stream`
        answers it with its HTTP status (502) rather than a failed Response."""
        self.reason = reason
        """A short label for metrics and logs: 'status', 'timeout', 'connect', 'stream',
        'out_of_step' (a WebSocket-mode upstream sent another response's events)..."""
        self.upstream_code = upstream_code
        """The code the upstream's error event gave, before mapping (None otherwise)."""
        self.detail = detail
        """For the operator's log only, never the client: what failed below the HTTP
        level (e.g. 'SSLCertVerificationError: ...'); never conversation content."""
        self.upstream_status = upstream_status
        """The HTTP status the upstream answered (`reason` 'status'); `status` is what
        the client gets, which differs (a 401 from the upstream is the client's 502)."""
        self.retry_after = retry_after
        """Seconds the upstream asked to be left alone (its `Retry-After` or
        `retry-after-ms`), None when it did not say."""

    @property
    def outcome(self) -> str:
        """The label of this failure in metrics and logs: the upstream's HTTP status,
        or what failed ('timeout', 'connect', 'closed', 'protocol', 'out_of_step',
        'stream')."""
        if self.reason == "status":
            return str(self.upstream_status or self.status)
        return self.reason

    def response_error(self) -> dict[str, Any]:
        if self.status == 429:
            code = "rate_limit_exceeded"
        elif 400 <= self.status < 500:
            code = "invalid_prompt"
        else:
            code = SERVER_ERROR
        error: dict[str, Any] = {"code": code, "message": self.message, "type": self.type}
        if self.param is not None:
            error["param"] = self.param
        return error


def from_http_status(
    status: int,
    body: bytes,
    headers: Mapping[str, str],
    *,
    request: str | None = None,
    client_key: bool = False,
) -> UpstreamError:
    """The error for a non-2xx upstream answer to `request` (e.g. 'POST /v1/responses':
    method and path only, for the log). With `client_key` (the request carried the
    client's own key, `--upstream-forward-key`) a 401 or 403 is the client's, as the
    upstream gave it."""
    if client_key and status in {401, 403}:
        code, message, param, error_type = _error_fields(body)
        error = UpstreamError(
            code or "invalid_api_key",
            message or f"The upstream refused your API key (HTTP {status}).",
            status=status,
            type=error_type or INVALID_REQUEST,
            param=param,
            reason="status",
        )
    else:
        error = _from_http_status(status, body, headers, request)
    error.upstream_status = status
    return error


def _from_http_status(
    status: int, body: bytes, headers: Mapping[str, str], request: str | None
) -> UpstreamError:
    code, message, param, error_type = _error_fields(body)
    if status == 404 and unknown_route(body):
        # Not the request's fault: the upstream URL points where there is no API.
        return UpstreamError(
            "upstream_endpoint_not_found",
            "The upstream server has no such endpoint (HTTP 404): warmsocket's upstream "
            "URL is misconfigured. This is a server error, not a problem with the request.",
            status=502,
            type=SERVER_ERROR,
            reason="status",
            detail=f"the upstream has no {request or 'such endpoint'} (HTTP 404); "
            "does --upstream end in /v1?",
            misconfigured=True,
        )
    if status < 400:
        return _unexpected_status(status, headers)
    if status in {401, 403}:
        return UpstreamError(
            "upstream_auth_failed",
            f"The upstream rejected warmsocket's credentials (HTTP {status}); "
            "check --upstream-api-key.",
            status=502,
            type=SERVER_ERROR,
            reason="status",
            detail="the upstream rejected warmsocket's credentials; check --upstream-api-key",
            misconfigured=True,
        )
    if status == 503:
        return UpstreamError(
            "server_is_overloaded",
            "The upstream server is overloaded or not ready (HTTP 503); try again later.",
            status=503,
            type=SERVER_ERROR,
            retryable=True,
            reason="status",
            headers=_retry_headers(headers),
            retry_after=retry_after_seconds(headers),
        )
    if status == 408 or status >= 500:
        return UpstreamError(
            "server_error",
            f"The upstream server failed (HTTP {status}).",
            status=500 if status >= 500 else 504,
            type=SERVER_ERROR,
            retryable=True,
            reason="status",
            headers=_retry_headers(headers),
            retry_after=retry_after_seconds(headers),
        )
    if status == 429:
        kept = _retry_headers(headers)
        return UpstreamError(
            code or "rate_limit_exceeded",
            message or "The upstream's rate limit was reached.",
            status=429,
            type=RATE_LIMIT,
            param=param,
            headers=kept,
            reason="status",
            retry_after=retry_after_seconds(headers),
        )
    return UpstreamError(
        code,
        message or f"The upstream rejected the request (HTTP {status}).",
        status=status if 400 <= status < 500 else 502,
        type=error_type or INVALID_REQUEST,
        param=param,
        reason="status",
    )


RETRY_AFTER_LIMIT = 2.0
"""The longest `Retry-After` warmsocket waits out itself before trying the replica
that asked for it again; a longer one goes to the client (whose SDK waits it out)."""
RETRY_BACKOFF = 0.25
"""The wait before the first retry on a replica that answered 5xx without
`Retry-After` (doubled for each further one, up to `RETRY_AFTER_LIMIT`)."""
MAX_RETRY_AFTER = 24 * 3600.0
"""A `Retry-After` past this is not believed (a date years away, a typo)."""


def _retry_headers(headers: Mapping[str, str]) -> dict[str, str] | None:
    """The wait the upstream asked for, as the client's `retry-after` (whole seconds)
    and `retry-after-ms` headers (rewritten: never the upstream's text as it came)."""
    seconds = retry_after_seconds(headers)
    if seconds is None:
        return None
    return {"retry-after": str(math.ceil(seconds)), "retry-after-ms": str(round(seconds * 1000))}


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """How long an answer's `retry-after-ms` or `Retry-After` (seconds, or an HTTP
    date) asks to wait; None when it says nothing usable."""
    millis = _number(headers.get("retry-after-ms"))
    if millis is not None:
        return min(millis / 1000.0, MAX_RETRY_AFTER)
    value = headers.get("retry-after")
    if value is None:
        return None
    seconds = _number(value)
    if seconds is None:
        try:
            when = parsedate_to_datetime(value.strip())
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when.tzinfo is None:  # not an HTTP date (which is always GMT)
            return None
        seconds = max(0.0, when.timestamp() - time.time())
    return min(seconds, MAX_RETRY_AFTER)


def _number(text: str | None) -> float | None:
    """A header's non-negative finite number, None for anything else."""
    if text is None:
        return None
    try:
        value = float(text.strip())
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


def retry_delay(error: UpstreamError, retries_made: int, *, same_replica: bool) -> float | None:
    """Seconds to wait before trying a failed request again (`retries_made` retries of
    it made so far), or None: not again, the client gets `error`. Another replica is
    tried at once; the replica that failed waits out its own `Retry-After` (up to
    `RETRY_AFTER_LIMIT`) or, after an HTTP 5xx, a short backoff (at most as long). A broken or
    timed-out connection is retried at once."""
    if not same_replica:
        return 0.0
    if error.retry_after is not None:
        return error.retry_after if error.retry_after <= RETRY_AFTER_LIMIT else None
    if error.reason == "status":
        return min(RETRY_BACKOFF * 2.0**retries_made, RETRY_AFTER_LIMIT)
    return 0.0


def _unexpected_status(status: int, headers: Mapping[str, str]) -> UpstreamError:
    """A non-200 answer below 400: a redirect (not followed: a POST with its body and
    key should not go where the upstream says unasked) or a success the streaming API
    never gives. Warmsocket's upstream URL is wrong, not the request."""
    if 300 <= status < 400:
        target = _origin(headers.get("location"))
        what = f"redirected the request (HTTP {status})"
        detail = f"{what}{f' to {target}' if target else ''}: a redirect is not followed"
    else:
        what = detail = f"answered HTTP {status} instead of a stream"
    return UpstreamError(
        "upstream_misconfigured",
        f"The upstream server {what}: warmsocket's upstream URL (--upstream) is "
        "misconfigured. This is a server error, not a problem with the request.",
        status=502,
        type=SERVER_ERROR,
        reason="status",
        detail=f"the upstream {detail}; fix --upstream",
        misconfigured=True,
    )


def _origin(url: str | None) -> str | None:
    """The scheme, host and port of a redirect's `Location` (no path, query or
    credentials: the log keeps only where the upstream lives)."""
    if not url:
        return None
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    if not parts.scheme or not parts.hostname:
        return None
    return f"{parts.scheme}://{parts.hostname}" + (f":{port}" if port else "")


def from_error_object(error: Any, *, status: int | None = None) -> UpstreamError:
    """An error reported inside a stream (SSE `error`, `response.failed`, WebSocket `error`)."""
    if not isinstance(error, dict):
        error = {}
    code = error.get("code") if isinstance(error.get("code"), str) else None
    mapped = _from_error_fields(error, code, status)
    mapped.upstream_code = code
    return mapped


def _from_error_fields(
    error: dict[str, Any], code: str | None, status: int | None
) -> UpstreamError:
    message = _text(error.get("message"))
    if status is None:  # a response.failed, or an error event without a status
        if code == "rate_limit_exceeded":
            status = 429
        elif code in {None, "server_error", "server_is_overloaded"} or (
            error.get("type") == SERVER_ERROR
        ):
            status = 500
        else:  # a code about the request (invalid_prompt, invalid_value, ...): not retried
            status = 400
    if status == 429:
        return UpstreamError(
            code or "rate_limit_exceeded",
            message or "The upstream's rate limit was reached.",
            status=429,
            type=RATE_LIMIT,
            reason="stream",
        )
    # Without a code, the status says whose fault it is (an error event with a 4xx
    # status is the request's: a prompt template the upstream does not have, say).
    if status >= 500 or code in {"server_error", "server_is_overloaded"}:
        return UpstreamError(
            "server_error",
            "The upstream failed while generating the response.",
            status=500,
            type=SERVER_ERROR,
            retryable=True,
            reason="stream",
        )
    error_type = error.get("type")
    return UpstreamError(
        code,
        message or "The upstream rejected the request.",
        status=status,
        type=error_type if isinstance(error_type, str) else INVALID_REQUEST,
        param=error.get("param") if isinstance(error.get("param"), str) else None,
        reason="stream",
    )


def transport_error(
    kind: Literal["connect", "timeout", "closed", "protocol", "out_of_step"],
    detail: str | None = None,
    *,
    retryable: bool = True,
) -> UpstreamError:
    """`retryable=False` for a failure that is the configuration's (trying again, or
    another replica with the same configuration, cannot help)."""
    messages = {
        "connect": "Cannot connect to the upstream server.",
        "timeout": "The upstream server did not answer in time.",
        "closed": "The upstream connection broke before the response was complete.",
        "protocol": "The upstream sent an invalid response.",
        "out_of_step": "The upstream sent events of another response.",
    }
    return UpstreamError(
        "server_error",
        messages[kind],
        status=504 if kind == "timeout" else 502,
        type=SERVER_ERROR,
        retryable=retryable,
        reason=kind,
        detail=detail,
        misconfigured=not retryable,
    )


_ROUTE_NOT_FOUND = re.compile(
    r"(?:file |page )?not found\.?|404 page not found|invalid url \(.*|no route for .*"
    r"|cannot (?:get|post) .*|unknown (?:request )?url.*|the requested url was not found.*",
    re.IGNORECASE | re.DOTALL,
)
"""Messages of servers' answers to a route they do not have: FastAPI (vLLM, SGLang)
'Not Found', llama.cpp 'File Not Found', Go (Ollama) '404 page not found', OpenAI
'Invalid URL (POST /v1/...)', warmsocket 'No route for ...', Express 'Cannot POST ...'."""


def unknown_route(body: bytes) -> bool:
    """Whether a 404's body says the route does not exist, rather than something the
    request named (a model): a body that is not an OpenAI error object (HTML, text,
    FastAPI's `{"detail": "Not Found"}`), unless it names a model, or an error
    object whose message is a server's 'no such route'."""
    try:
        data = json.loads(body) if body else None
    except ValueError:
        data = None
    if isinstance(data, dict):
        error = data.get("error")
        if not isinstance(error, dict) and data.get("object") == "error":
            error = data  # vLLM's older shape: the error object at the top
        if isinstance(error, dict):
            message = error.get("message")
            return isinstance(message, str) and bool(_ROUTE_NOT_FOUND.fullmatch(message.strip()))
    _code, message, _param, _type = _error_fields(body)
    text = message if message is not None else body[:MAX_ERROR_MESSAGE].decode("utf-8", "replace")
    return "model" not in text.lower()


def _error_fields(body: bytes) -> tuple[str | None, str | None, str | None, str | None]:
    """(code, message, param, type) from an OpenAI, vLLM, llama.cpp or FastAPI error body."""
    try:
        data = json.loads(body) if body else None
    except ValueError:
        return None, None, None, None
    if not isinstance(data, dict):
        return None, None, None, None
    error = data.get("error", data)
    if isinstance(error, str):
        return None, _text(error), None, None
    if not isinstance(error, dict):
        return None, None, None, None
    message = _text(error.get("message")) or _text(data.get("detail"))
    code = error.get("code")
    param = error.get("param")
    error_type = error.get("type")
    return (
        code if isinstance(code, str) else None,
        message,
        param if isinstance(param, str) else None,
        error_type if isinstance(error_type, str) and error_type.endswith("_error") else None,
    )


def _text(value: Any) -> str | None:
    if isinstance(value, str) and value:
        return value[:MAX_ERROR_MESSAGE]
    return None


# -- request settings -----------------------------------------------------------------------

# Settings forwarded to a Responses upstream when they differ from the API default;
# `metadata` is not (it needs `store`), the others are warmsocket's own.
RESPONSES_FORWARDED = (
    "instructions",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "temperature",
    "top_p",
    "top_logprobs",
    "max_output_tokens",
    "max_tool_calls",
    "text",
    "reasoning",
    "truncation",
    "service_tier",
    "user",
    "safety_identifier",
    "prompt_cache_key",
    "prompt_cache_retention",
)


ENCRYPTED_REASONING = "reasoning.encrypted_content"


def upstream_include(include: tuple[str, ...]) -> list[str]:
    """`include` for a Responses upstream: what the client asked for, and always
    `reasoning.encrypted_content`. Requests go with `store: false`, so the upstream
    keeps no reasoning item: a reasoning model's item comes back in the next turns'
    context, and without its `encrypted_content` (which OpenAI sends only when asked)
    the upstream looks up its id and answers 404 ("Items are not persisted when
    `store` is set to false")."""
    if ENCRYPTED_REASONING in include:
        return list(include)
    return [*include, ENCRYPTED_REASONING]


COMPACT_OPTIONS = ("image", "prompt_cache_options")
"""The options only an upstream acts on that `POST /responses/compact` takes too (no
`prompt`, `moderation` or `access_programs`)."""


def upstream_options(request: CreateRequest, *, compact: bool = False) -> dict[str, Any]:
    """`CreateRequest.upstream_options_json` decoded; with `compact`, only the
    `COMPACT_OPTIONS` (a compact body's others are ignored, as the endpoint's are)."""
    options_json = request.upstream_options_json
    options: dict[str, Any] = json.loads(options_json) if options_json is not None else {}
    if compact:
        return {name: value for name, value in options.items() if name in COMPACT_OPTIONS}
    return options


def explicit_settings(
    settings: Mapping[str, Any], names: tuple[str, ...], given_defaults: Collection[str] = ()
) -> dict[str, Any]:
    """The settings among `names` the client set: those that differ from the API's
    defaults, and those of `given_defaults` (`CreateRequest.given_defaults`: given at
    the default, which an upstream need not share)."""
    out: dict[str, Any] = {}
    for name in names:
        if name not in settings:
            continue
        value = settings[name]
        default = ECHOED_DEFAULTS.get(name)
        if value is None or (value == default and name not in given_defaults):
            continue
        if name == "text" and value.get("format", {"type": "text"}) == {"type": "text"}:
            extra = {k: v for k, v in value.items() if k not in {"format", "verbosity"}}
            if value.get("verbosity", "medium") == "medium" and not extra:
                continue
        out[name] = value
    return out
