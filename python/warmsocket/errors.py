"""The protocol's error vocabulary, shared by the WebSocket and HTTP paths.

Every error a client can see is an `APIError` built by one of the constructors
below, so codes, statuses, params and messages are defined once. Messages never
contain conversation content.

Exception tree of the package::

    Exception
     ├── APIError                         a request-scoped protocol error (code, status, param)
     └── WarmsocketError                  raised by the Rust core (warmsocket._core)
          └── CacheError
               ├── ResponseNotFound (LookupError)
               │    └── OwnerMismatch
               ├── DuplicateResponseId (ValueError)
               ├── InvalidItems (ValueError)
               │    ├── ItemNotJson
               │    ├── ItemNotObject
               │    └── ItemTooLarge
               ├── CacheFull (MemoryError)
               └── SnapshotError (ValueError)
          └── TokenizerError
               ├── UnknownEncoding (LookupError)
               ├── TokenizerFileUnreadable (OSError)
               ├── InvalidTokenizerFile (ValueError)
               ├── InvalidItemJson (ValueError)
               └── TokenizationFailed (ValueError)

Wire shapes (spec §4.1, §6.2, §6.7):

* WebSocket `error` event (nested): ``{"type": "error", "status": 400, "stream_id"?,
  "error": {"type", "code", "message", "param"}}``
* HTTP error body: ``{"error": {"message", "type", "param", "code"}}``
* SSE `error` event (flat): ``{"type": "error", "code", "message", "param", "sequence_number"}``
"""

from __future__ import annotations

import math
import re
from typing import Any

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"
# `ResponseErrorCode` of the OpenAPI spec: the codes a failed Response's `error` may
# carry (the SDK's `ResponseError` refuses any other).
RESPONSE_ERROR_CODES = frozenset(
    {
        "server_error", "rate_limit_exceeded", "invalid_prompt", "data_residency_mismatch",
        "bio_policy", "vector_store_timeout", "invalid_image", "invalid_image_format",
        "invalid_base64_image", "invalid_image_url", "image_too_large", "image_too_small",
        "image_parse_error", "image_content_policy_violation", "invalid_image_mode",
        "image_file_too_large", "unsupported_image_media_type", "empty_image_file",
        "failed_to_download_image", "image_file_not_found",
    }
)  # fmt: skip
_LABEL = re.compile(r"[A-Za-z0-9_.\[\]]{1,64}")
OTHER_LABEL = "other"


def log_label(value: object) -> str | None:
    """An error's code, type or param as logs and metrics may show it: the value if it
    looks like an identifier (`context_length_exceeded`, `BadRequestError`,
    `input[3].content`), else "other". An upstream's errors pass through to the client
    that caused them, but a server that put request text into a code or param would
    otherwise write conversation content into the log and the /metrics labels."""
    if value is None:
        return None
    return value if isinstance(value, str) and _LABEL.fullmatch(value) else OTHER_LABEL


AUTHENTICATION = "authentication_error"
NOT_FOUND = "not_found_error"
RATE_LIMIT = "rate_limit_error"

STEER_ERROR_CODES = frozenset(
    {
        "response_not_found",
        "invalid_input",
        "steering_not_supported",
        "too_many_pending_steers",
        "response_already_completed",
        "response_not_active",
        "successor_creation_failed",
    }
)


class APIError(Exception):
    """A request-scoped error: becomes an `error` event, an HTTP error or a failed steer."""

    def __init__(
        self,
        code: str | None,
        message: str,
        *,
        param: str | None = None,
        status: int = 400,
        type: str = INVALID_REQUEST,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        self.status = status
        self.type = type
        self.headers = headers
        self.counted = False
        """Counted in warmsocket_errors_total already (a response failed with it, and
        the request is then answered with it too): not counted again."""

    def __repr__(self) -> str:
        return f"APIError(code={self.code!r}, status={self.status}, param={self.param!r})"

    # -- wire shapes -------------------------------------------------------------------

    def ws_event(
        self, stream_id: str | None = None, sequence_number: int | None = None
    ) -> dict[str, Any]:
        error: dict[str, Any] = {
            "type": self.type,
            "code": self.code,
            "message": self.message,
            "param": self.param,
        }
        event: dict[str, Any] = {"type": "error", "status": self.status, "error": error}
        if self.headers:
            error["headers"] = self.headers
            event["headers"] = self.headers
        if stream_id is not None:
            event["stream_id"] = stream_id
        if sequence_number is not None:
            event["sequence_number"] = sequence_number
        return event

    def http_body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def sse_event(self, sequence_number: int) -> dict[str, Any]:
        return {
            "type": "error",
            "code": self.code,
            "message": self.message,
            "param": self.param,
            "sequence_number": sequence_number,
        }

    def response_error(self) -> dict[str, Any]:
        """The `error` object of a failed Response: its code is one the Response
        object allows (`RESPONSE_ERROR_CODES`), else `server_error`."""
        code = self.code if self.code in RESPONSE_ERROR_CODES else SERVER_ERROR
        return {"code": code, "message": self.message}


# -- constructors: one per error the protocol defines ------------------------------------


def invalid_json(detail: str) -> APIError:
    return APIError(
        "invalid_json",
        f"The message is not valid JSON ({detail}). Send one JSON object per message.",
    )


def invalid_msgpack() -> APIError:
    return APIError(
        "invalid_msgpack",
        "The message is not valid msgpack of a JSON-like value. Send one msgpack map per message.",
    )


def invalid_type(param: str, expected: str) -> APIError:
    return APIError(
        "invalid_type",
        f"Invalid type for '{param}': expected {expected}.",
        param=param,
    )


def invalid_value(param: str, message: str) -> APIError:
    return APIError("invalid_value", message, param=param)


def missing_parameter(param: str) -> APIError:
    return APIError(
        "missing_required_parameter",
        f"Missing required parameter: '{param}'.",
        param=param,
    )


def unknown_parameter(param: str) -> APIError:
    return APIError("unknown_parameter", f"Unknown parameter: '{param}'.", param=param)


def unsupported_parameter(param: str, message: str) -> APIError:
    return APIError("unsupported_parameter", message, param=param)


_RESPONSES_ONLY_ADVICE = {
    "prompt": "Prompt templates ('prompt') are stored at OpenAI, and this server's model "
    "cannot read them: send the template's text as 'instructions' and 'input'",
    "moderation": "This server's model runs no moderation ('moderation'), and would not "
    "block what the policy blocks: leave 'moderation' out",
}


def needs_responses_upstream(param: str) -> APIError:
    """A field only a Responses upstream (OpenAI) honours (`CreateRequest.responses_only`),
    refused by any other backend rather than dropped."""
    advice = _RESPONSES_ONLY_ADVICE.get(param, f"'{param}' is not supported here")
    return unsupported_parameter(
        param,
        f"{advice}, or serve with --upstream-api responses (or responses-ws) in front of "
        "OpenAI, which honours it.",
    )


def unknown_event_type(event_type: object) -> APIError:
    shown = event_type if isinstance(event_type, str) and len(event_type) <= 64 else "..."
    return APIError(
        "invalid_value",
        f"Unknown event type '{shown}'. Supported client events: 'response.create', "
        "'response.steer'.",
        param="type",
    )


def message_too_large(size: int, limit: int) -> APIError:
    return APIError(
        "message_too_large",
        f"The message is {size} bytes, larger than this server's limit of {limit} bytes. "
        "Send fewer items per message, or raise --max-message-bytes.",
        status=413,
    )


def input_over_memory_budget(size: int, budget: int) -> APIError:
    return APIError(
        "input_too_large",
        f"The input is {size} bytes, more than this server's whole session cache holds "
        f"({budget} bytes), so its response could not be kept. Send less, or raise "
        "--memory-budget.",
        param="input",
        status=413,
    )


def previous_response_not_found(response_id: str) -> APIError:
    return APIError(
        "previous_response_not_found",
        f"Previous response with id '{_id(response_id)}' not found.",
        param="previous_response_id",
    )


def previous_response_running(response_id: str) -> APIError:
    """`previous_response_not_found` for a background response still running (it is
    stored, and can be continued, once it has ended)."""
    return APIError(
        "previous_response_not_found",
        f"Previous response with id '{_id(response_id)}' is still in progress (a "
        "background response): continue from it once it has ended (poll it with "
        "GET /v1/responses/{id}, or stream it).",
        param="previous_response_id",
    )


def shared_store_unavailable(
    response_id: str | None, *, param: str | None = "previous_response_id"
) -> APIError:
    """Redis (the store of responses shared between replicas) did not answer while
    `response_id` was loaded (None: while something was created): a retriable 503,
    never 'not found' (the response may well exist; a client told 'not found' drops
    its conversation)."""
    what = "" if response_id is None else f" while loading '{_id(response_id)}'"
    return APIError(
        "server_error",
        f"The shared response store (Redis) did not answer{what}. This is temporary "
        "and nothing was lost: retry the request.",
        param=param,
        status=503,
        type=SERVER_ERROR,
    )


def item_not_found(item_id: str) -> APIError:
    """An `item_reference` to no item the owner has (the API's 404)."""
    return APIError(
        None,
        f"Item with id '{_id(item_id)}' not found. An item_reference names an item of a "
        "response stored with store: true (or of this connection); send the item itself "
        "otherwise.",
        param="input",
        status=404,
        type=INVALID_REQUEST,
    )


def duplicate_item(item_id: str, param: str) -> APIError:
    """An item id a request gives twice, or one the conversation it adds to holds
    already (OpenAI's 400, in its words): the list would hold the id twice."""
    return APIError(
        None,
        f"Duplicate item found with id {_id(item_id)}. Remove duplicate items from your "
        f"{param} and try again.",
        param=param,
    )


def response_not_found(response_id: str) -> APIError:
    return APIError(
        None,
        f"Response with id '{_id(response_id)}' not found.",
        param="response_id",
        status=404,
        type=INVALID_REQUEST,
    )


def invalid_stream_id() -> APIError:
    return APIError(
        "invalid_stream_id",
        "Invalid 'stream_id': it must be 1 to 256 characters of A-Z, a-z, 0-9, '_', '.' or '-'.",
        param="stream_id",
    )


def stream_limit_reached(limit: int) -> APIError:
    return APIError(
        "websocket_stream_limit_reached",
        f"This connection already uses {limit} stream_id values, the limit per connection. "
        "Reuse an existing stream_id or open a new connection.",
        param="stream_id",
    )


def connection_limit_reached(minutes: float) -> APIError:
    return APIError(
        "websocket_connection_limit_reached",
        f"Responses websocket connection limit reached ({_minutes(minutes)} minutes). "
        "Create a new websocket connection to continue.",
    )


def draining_connection() -> APIError:
    """A create on a WebSocket of a server that is draining (spec §1.7, §5.6): the code
    of a connection that takes no more creates, which says what to do."""
    return APIError(
        "websocket_connection_limit_reached",
        "This server is shutting down: it finishes the responses under way and takes no "
        "new ones. Create a new websocket connection to continue.",
        status=503,
        type=SERVER_ERROR,
    )


def draining_server() -> APIError:
    """A new WebSocket, or any request, a draining server will not take."""
    return APIError(
        "server_is_overloaded",
        "This server is shutting down and takes no new connections; connect again.",
        status=503,
        type=SERVER_ERROR,
    )


def shut_down_first() -> APIError:
    """An HTTP request still under way when the server's shutdown timeout ended."""
    return APIError(
        "server_error",
        "The server shut down before this request was answered; retry it.",
        status=503,
        type=SERVER_ERROR,
    )


SHUT_DOWN_FIRST = "The server shut down first."
"""Why a response still under way when the shutdown timeout ended failed."""


def too_many_connections(limit: int) -> APIError:
    return APIError(
        "server_is_overloaded",
        f"This server has {limit} connections open, the most it takes "
        "(--max-connections). Retry shortly, or connect to another replica.",
        status=503,
        type=SERVER_ERROR,
        headers={"retry-after": "1"},
    )


def origin_not_allowed(origin: str) -> APIError:
    shown = origin if len(origin) <= 200 else origin[:200] + "..."
    return APIError(
        "origin_not_allowed",
        f"Requests from web pages are refused unless their origin is allowed; to serve "
        f"pages from {shown!r}, start warmsocket with --allowed-origin {shown}.",
        status=403,
    )


def too_many_for_key(limit: int) -> APIError:
    return APIError(
        "rate_limit_exceeded",
        f"This API key holds {limit} WebSockets, responses being created and background "
        "responses on this server (and the servers sharing its Redis, if any), the most "
        "it takes per key (--max-connections-per-key). "
        "Close some (one WebSocket runs up to 16 responses at once, on up to 32 named "
        "lanes), or retry when some have ended.",
        status=429,
        type="rate_limit_error",
        headers={"retry-after": "1"},
    )


def rate_exceeded(unit: str, per_minute: int, wait: float, full_in: float) -> APIError:
    """`--requests-per-minute-per-key` (`unit` 'requests') or
    `--tokens-per-minute-per-key` ('tokens'): `wait` seconds until the key may make its
    next request, `full_in` until its bucket is full again (`request_rate`)."""
    wait_ms = max(1, math.ceil(wait * 1000))
    if unit == "tokens":
        what = (
            f"this API key may use {per_minute} tokens per minute on this server "
            "(--tokens-per-minute-per-key), and its responses have used them"
        )
    else:
        what = (
            f"this API key may make {per_minute} requests per minute on this server "
            "(--requests-per-minute-per-key)"
        )
    return APIError(
        "rate_limit_exceeded",
        f"Rate limit reached for {unit}: {what}. Please try again in "
        f"{reset_duration(wait_ms / 1000)}.",
        status=429,
        type=RATE_LIMIT,
        headers={
            "retry-after": str(math.ceil(wait_ms / 1000)),
            "retry-after-ms": str(wait_ms),
            f"x-ratelimit-limit-{unit}": str(per_minute),
            f"x-ratelimit-remaining-{unit}": "0",
            f"x-ratelimit-reset-{unit}": reset_duration(full_in),
        },
    )


def conversation_locked(conv_id: str) -> APIError:
    return APIError(
        "conversation_locked",
        f"Another process is currently operating on conversation '{_id(conv_id)}': a "
        "response to it is still being generated. Please try again once it has ended.",
        param="conversation",
        status=400,
    )


def conversation_incomplete(conv_id: str) -> APIError:
    return APIError(
        "conversation_incomplete",
        f"Conversation '{conv_id}' lost items: a server could not save them while Redis "
        "was unavailable, and the conversation changed elsewhere before it could. It "
        "cannot be continued without them; its items can still be listed: start a new "
        "conversation from them.",
        param="conversation",
        status=409,
    )


def reset_duration(seconds: float) -> str:
    """A duration as OpenAI's rate limit headers write it: '0s', '20ms', '1.5s', '6m0s'."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{max(1, math.ceil(seconds * 1000))}ms"
    if seconds < 60:
        return f"{math.ceil(seconds * 1000) / 1000:g}s"
    minutes, rest = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{rest}s"


def plain_http_on_tls_port() -> APIError:
    return APIError(
        "plain_http_on_tls_port",
        "This port speaks TLS: a plain-HTTP request was sent to it. Use https:// (and "
        "wss:// for WebSocket mode) in this server's URLs.",
        status=400,
    )


def host_not_allowed(host: str, *, loopback_only: bool) -> APIError:
    shown = host if len(host) <= 200 else host[:200] + "..."
    why = (
        "this server listens on loopback and serves requests for localhost, IP addresses "
        "and the names --allowed-host lists only (the defence against DNS rebinding)"
        if loopback_only
        else "it is not among the names --allowed-host lists"
    )
    return APIError(
        "host_not_allowed",
        f"Requests for host {shown!r} are refused: {why}. To serve this name (behind a "
        "reverse proxy that passes on its own Host, say), start warmsocket with "
        "--allowed-host NAME.",
        status=403,
    )


def too_many_queued(limit: int) -> APIError:
    return APIError(
        "server_is_overloaded",
        f"This connection has {limit} requests waiting, the most it queues. "
        "Wait for responses to finish before sending more.",
        status=503,
        type=SERVER_ERROR,
    )


def queued_bytes_exceeded(limit: int) -> APIError:
    return server_overloaded(
        f"This connection's waiting requests would hold more than {limit} bytes, the most "
        "it queues (--max-queued-bytes). Wait for responses to finish before sending more."
    )


def server_overloaded(reason: str) -> APIError:
    return APIError("server_is_overloaded", reason, status=503, type=SERVER_ERROR)


def server_error(
    message: str = "The server had an error while processing your request.",
) -> APIError:
    return APIError("server_error", message, status=500, type=SERVER_ERROR)


def model_failed(message: str = "The model failed to generate a response.") -> APIError:
    return APIError("server_error", message, status=500, type=SERVER_ERROR)


def invalid_api_key() -> APIError:
    return APIError(
        "invalid_api_key",
        "Incorrect or missing API key. Send 'Authorization: Bearer <key>' with a key this "
        "server was started with (--api-key).",
        status=401,
        type=AUTHENTICATION,
    )


def not_found_route(method: str, path: str) -> APIError:
    return APIError(
        "not_found",
        f"No route for {method} {_path(path)}.",
        status=404,
        type=INVALID_REQUEST,
    )


_HANDSHAKE_FIXES = {
    "Sec-WebSocket-Key": "Send it once, with 16 random bytes in base64 (as WebSocket client "
    "libraries do).",
    "Sec-WebSocket-Version": "This server speaks WebSocket version 13 (RFC 6455): send "
    "'Sec-WebSocket-Version: 13'.",
    "Sec-WebSocket-Extensions": "Offer 'permessage-deflate' with valid parameters, or no "
    "extension.",
    "Sec-WebSocket-Protocol": "Offer 'warmsocket.msgpack', or no subprotocol (JSON text frames).",
}


def invalid_websocket_handshake(
    header: str | None, *, missing: bool = False, status: int = 400
) -> APIError:
    """A WebSocket upgrade refused for its `header` (a request header's name, never
    its value): missing, or not valid."""
    if header is None:
        message = "Invalid WebSocket handshake. Connect with a WebSocket client library."
        return APIError(None, message, status=status)
    problem = "is missing" if missing else "is not valid"
    fix = _HANDSHAKE_FIXES.get(header, f"Send one valid {header} header.")
    # RFC 6455, 4.4: a refused version is answered with the versions the server speaks.
    headers = {"Sec-WebSocket-Version": "13"} if header == "Sec-WebSocket-Version" else None
    return APIError(
        None,
        f"Invalid WebSocket handshake: the {header} header {problem}. {fix}",
        status=status,
        headers=headers,
    )


def websocket_upgrade_required(header: str, *, missing: bool = False) -> APIError:
    """An upgrade request to the WebSocket endpoint whose `header` (Upgrade or
    Connection) does not ask for a WebSocket."""
    problem = "is missing" if missing else "does not ask for a WebSocket"
    return APIError(
        "websocket_upgrade_required",
        f"Invalid WebSocket upgrade: the {header} header {problem}. Send 'Upgrade: "
        "websocket' and 'Connection: Upgrade' (as WebSocket client libraries do), or POST "
        "/v1/responses to use HTTP mode.",
        status=426,
        headers={"Upgrade": "websocket"},
    )


def method_not_allowed(method: str, path: str) -> APIError:
    return APIError(
        "method_not_allowed",
        f"Method {method} is not allowed for {_path(path)}.",
        status=405,
    )


def steer_error(code: str, message: str) -> APIError:
    assert code in STEER_ERROR_CODES, code
    return APIError(code, message)


def _id(value: str) -> str:
    # Ids are echoed in messages; bound their length so a hostile id cannot bloat logs.
    return value if len(value) <= 128 else value[:128] + "..."


def _path(value: str) -> str:
    return value if len(value) <= 128 else value[:128] + "..."


def _minutes(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"
