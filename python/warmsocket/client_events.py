"""Validation of client requests: `response.create` (WebSocket and HTTP) and `response.steer`.

This is the readable reference of the Rust parser (`warmsocket._core.parse_client_message`,
`rust/framing/request.rs`), which the server runs: property tests check that both reach
the same verdict (code, param, message, stage) on random messages, and the parse
benchmark uses this module as its baseline. The server does not call it.

`parse_client_event` is the first step of spec §2.1's processing order (JSON, type,
stream_id); `validate_create` checks the body. Both raise `APIError` with the code the
spec gives, and never echo conversation content in messages. `parse_message` composes
them (plus the conversion of the input to `Items`) into the Rust parser's result shape.

`decode_json` accepts strict JSON only. Where `json.loads` accepts more, it rejects
with position-free details: `NaN` / `Infinity` / `-Infinity`, floats that overflow,
integers beyond Python's 4,300-digit limit, strings holding a lone surrogate
(`"\\ud800"`), bytes that are not UTF-8 (UTF-16, a BOM), and nesting deeper than
`MAX_NESTING` (checked once the message decoded, so a deep message that also has a
syntax error later on gets the syntax error here but "nested too deeply" from Rust).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import msgpack  # type: ignore[import-untyped]

from warmsocket import errors
from warmsocket._core import InvalidItems, Items
from warmsocket.errors import APIError

STREAM_ID_RE = re.compile(r"[A-Za-z0-9_.\-]{1,256}")

# Fields of a create body that are echoed on the Response object, with their defaults.
ECHOED_DEFAULTS: dict[str, Any] = {
    "instructions": None,
    "tools": [],
    "tool_choice": "auto",
    "parallel_tool_calls": True,
    "temperature": 1.0,
    "top_p": 1.0,
    "top_logprobs": 0,
    "max_output_tokens": None,
    "max_tool_calls": None,
    "metadata": {},
    "text": {"format": {"type": "text"}, "verbosity": "medium"},
    "reasoning": {"effort": None, "summary": None},
    "truncation": "disabled",
    "service_tier": "default",
    "user": None,
    "safety_identifier": None,
    "prompt_cache_key": None,
    "prompt_cache_retention": None,
}

# Every body field the API knows; others are ignored (spec Q10) and counted.
KNOWN_CREATE_FIELDS = frozenset(
    {
        *ECHOED_DEFAULTS,
        "type",
        "model",
        "input",
        "previous_response_id",
        "store",
        "stream",
        "stream_options",
        "stream_id",
        "generate",
        "background",
        "background_options",
        "conversation",
        "include",
        "prompt",
        "prompt_cache_options",
        "context_management",
        "moderation",
        "image",
        "access_programs",
    }
)
WEBSOCKET_ONLY_FIELDS = ("stream_id", "generate")

MESSAGE_ROLES = frozenset({"user", "assistant", "system", "developer"})
CONTENT_PART_TYPES = frozenset(
    {
        "input_text",
        "input_image",
        "input_file",
        "input_audio",
        "output_text",
        "refusal",
        "summary_text",
        "reasoning_text",
    }
)
ITEM_TYPES = frozenset(
    {
        "message",
        "function_call",
        "function_call_output",
        "reasoning",
        "custom_tool_call",
        "custom_tool_call_output",
        "compaction",
        "web_search_call",
        "file_search_call",
        "computer_call",
        "computer_call_output",
        "code_interpreter_call",
        "image_generation_call",
        "local_shell_call",
        "local_shell_call_output",
        "shell_call",
        "shell_call_output",
        "apply_patch_call",
        "apply_patch_call_output",
        "mcp_call",
        "mcp_list_tools",
        "mcp_approval_request",
        "mcp_approval_response",
        "tool_search_call",
        "tool_search_output",
        "additional_tools",
        "program",
        "program_output",
        "compaction_trigger",
    }
)
COMPACTION_TRIGGER = "compaction_trigger"
"""The item that asks for a compaction of the context: the input's last item only."""
_TEXT_PARTS = frozenset({"input_text", "output_text", "summary_text", "reasoning_text"})
MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512
"""The longest `metadata` key and value, in characters (the API's documentation)."""
MAX_SAFETY_IDENTIFIER_CHARS = 64
"""The longest `safety_identifier`, in characters (the API's schema)."""
_CHOICES = frozenset({"auto", "none", "required"})
# Deepest nesting of arrays and objects in a message (`rust/framing/json.rs`).
MAX_NESTING = 512
# Python's limit on converting integer text (`sys.get_int_max_str_digits()`).
MAX_INT_DIGITS = 4300


@dataclass(slots=True)
class CreateRequest:
    """A validated `response.create` (or HTTP create body)."""

    model: str
    input_items: list[dict[str, Any]]
    settings: dict[str, Any]
    """The echoed fields of the Response object (instructions, tools, sampling, ...)."""
    previous_response_id: str | None = None
    stream_id: str | None = None
    generate: bool = True
    store: bool = True
    stream: bool = False
    background: bool = False
    ignored_fields: tuple[str, ...] = ()
    compact_threshold: int | None = None
    """Server-side compaction's threshold in tokens (`context_management`); None
    without it."""
    include: tuple[str, ...] = ()
    """`include` as sent (an array of strings, or null: empty)."""
    upstream_options: dict[str, Any] | None = None
    """The body fields only an upstream acts on (`_upstream_options`); None without any."""
    given_defaults: tuple[str, ...] = ()
    """The settings of `UPSTREAM_DEFAULTS` the client gave at the API's default value
    (`_given_defaults`)."""
    responses_only: tuple[str, ...] = ()
    """The fields of `RESPONSES_ONLY` the body has (in `upstream_options`)."""
    model_from_prompt: bool = False
    """The body gave no `model` (`model` is "default"; the template names one)."""
    conversation: str | None = None
    """The `conversation`'s id (given as it, or as an object's `id`)."""
    items: Items | None = None
    """`input_items` as `Items` (set by `parse_message`)."""

    @property
    def instructions(self) -> str | None:
        value = self.settings.get("instructions")
        return value if isinstance(value, str) else None

    @property
    def function_names(self) -> frozenset[str]:
        return frozenset(
            tool["name"]
            for tool in self.settings.get("tools", ())
            if isinstance(tool, dict) and tool.get("type") == "function" and "name" in tool
        )


@dataclass(slots=True)
class SteerRequest:
    """A validated `response.steer`."""

    previous_response_id: str
    input_items: list[dict[str, Any]]
    raw_input: Any = field(default=None)
    items: Items | None = None
    """`input_items` as `Items` (set by `parse_message`)."""


@dataclass(slots=True)
class ClientEvent:
    """The result of the first validation step of one WebSocket message."""

    type: str
    body: dict[str, Any]
    stream_id: str | None = None


@dataclass(slots=True)
class Rejected:
    """A refused message: the error and the step it belongs to (see `parse_message`)."""

    error: APIError
    stage: Literal["message", "create", "steer"]
    stream_id: str | None = None
    previous_response_id: str | None = None


class _NotJson(ValueError):
    """What json.loads accepts but JSON does not (a position-free detail)."""


def _reject_constant(name: str) -> Any:
    raise _NotJson(f"{name} is not a JSON value")


def _parse_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise _NotJson("a number is out of range")
    return value


def _parse_int(text: str) -> int:
    if len(text) - text.startswith("-") > MAX_INT_DIGITS:
        raise _NotJson("a number is out of range")
    return int(text)


def decode_json(data: bytes | str) -> Any:
    """Strict JSON (see the module docs); raises `APIError` (`invalid_json`)."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    try:
        text = data.decode("utf-8")
        value = json.loads(
            text,
            parse_constant=_reject_constant,
            parse_float=_parse_float,
            parse_int=_parse_int,
        )
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise errors.invalid_json(_json_error_detail(exc)) from None
    except _NotJson as exc:
        raise errors.invalid_json(str(exc)) from None
    except RecursionError:
        raise errors.invalid_json("nested too deeply") from None
    if _nesting(value) > MAX_NESTING:
        raise errors.invalid_json("nested too deeply")
    if ("\\ud" in text or "\\uD" in text) and _has_lone_surrogate(value):
        raise errors.invalid_json("a string holds a lone surrogate")
    return value


def decode_msgpack(data: bytes) -> Any:
    """A message of the `warmsocket.msgpack` subprotocol: msgpack of what JSON can say."""
    try:
        value = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception:
        raise errors.invalid_msgpack() from None
    if _nesting(value) > MAX_NESTING or not _json_like(value):
        raise errors.invalid_msgpack()
    return value


def _nesting(value: Any) -> int:
    """Depth of nested arrays and objects (0 for a scalar), without recursion."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children)
    return deepest


def _has_lone_surrogate(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            texts = [item]
        elif isinstance(item, dict):
            texts = list(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            texts = []
            stack.extend(item)
        else:
            continue
        for text in texts:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                return True
    return False


def _json_like(value: Any) -> bool:
    """Only None, bool, int, finite float, str, list and dicts of str keys."""
    stack = [value]
    while stack:
        item = stack.pop()
        if item is None or isinstance(item, bool | int | str):
            continue
        if isinstance(item, float):
            if not math.isfinite(item):
                return False
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            if not all(isinstance(k, str) for k in item):
                return False
            stack.extend(item.values())
        else:
            return False
    return True


def parse_message(
    data: bytes,
    *,
    websocket: bool = True,
    max_item_bytes: int = 33554432,
    format: Literal["json", "msgpack"] = "json",
) -> CreateRequest | SteerRequest | Rejected | None:
    """The reference of `_core.parse_client_message`: the same verdicts, in Python."""
    try:
        body = decode_msgpack(data) if format == "msgpack" else decode_json(data)
        if not websocket:
            if not isinstance(body, dict):
                raise errors.invalid_type("body", "a JSON object")
            event = ClientEvent("response.create", body)
        else:
            event = parse_client_event_body(body)
    except APIError as error:
        return Rejected(error, "message")
    body = event.body
    previous = body.get("previous_response_id")
    previous = previous if isinstance(previous, str) else None
    if event.type == "response.processed":
        return None
    if event.type == "response.steer":
        try:
            steer = validate_steer(body)
            steer.items = _items(steer.input_items, max_item_bytes, steer=True)
        except APIError as error:
            return Rejected(error, "steer", None, previous)
        return steer
    try:
        request = validate_create(body, websocket=websocket)
        request.items = _items(request.input_items, max_item_bytes, steer=False)
    except APIError as error:
        return Rejected(error, "create", event.stream_id, previous)
    return request


def _items(items: list[dict[str, Any]], max_item_bytes: int, *, steer: bool) -> Items:
    """`Items.from_objects`, as `Engine.prepare` converted a request's input."""
    try:
        return Items.from_objects(items, max_item_bytes=max_item_bytes)
    except InvalidItems as exc:
        message = f"Invalid 'input': {exc}"
        if steer:
            raise errors.steer_error("invalid_input", message) from None
        raise errors.invalid_value("input", message) from None


def parse_client_event(data: bytes | str) -> ClientEvent:
    """Step 1 of a WebSocket message: JSON, `type` and `stream_id` syntax.

    Raises `APIError`; an error carrying a valid `stream_id` is reported by the caller
    on that lane.
    """
    return parse_client_event_body(decode_json(data))


def parse_client_event_body(body: Any) -> ClientEvent:
    """`parse_client_event` after decoding (JSON or msgpack)."""
    if not isinstance(body, dict):
        raise errors.invalid_type("event", "a JSON object")
    event_type = body.get("type")
    if event_type == "response.create":
        stream_id = body.get("stream_id")
        if stream_id is not None and not (
            isinstance(stream_id, str) and STREAM_ID_RE.fullmatch(stream_id)
        ):
            raise errors.invalid_stream_id()
        return ClientEvent("response.create", body, stream_id)
    if event_type == "response.steer":
        return ClientEvent("response.steer", body)
    if event_type == "response.processed":
        # Sent by Codex after each turn; not part of the API: ignored (spec §2.3).
        return ClientEvent("response.processed", body)
    if event_type is None:
        raise errors.missing_parameter("type")
    raise errors.unknown_event_type(event_type)


def validate_create(body: dict[str, Any], *, websocket: bool) -> CreateRequest:
    """Validate a create body (the WebSocket `response.create` or the HTTP POST body)."""
    if not websocket:
        for name in WEBSOCKET_ONLY_FIELDS:
            if name in body:
                raise errors.unknown_parameter(name)
        if "type" in body:
            raise errors.unknown_parameter("type")

    model = body.get("model")
    if model is None:
        if body.get("prompt") is None:
            raise errors.missing_parameter("model")
        model = "default"
    if not isinstance(model, str) or not model:
        raise errors.invalid_type("model", "a non-empty string")

    previous = body.get("previous_response_id")
    if previous is not None and (not isinstance(previous, str) or not previous):
        raise errors.invalid_type("previous_response_id", "a non-empty string or null")
    if previous is not None and body.get("conversation") is not None:
        raise errors.invalid_value(
            "conversation",
            "'previous_response_id' and 'conversation' cannot be used together.",
        )
    conversation = body.get("conversation")
    if isinstance(conversation, dict):
        conversation = conversation.get("id")
        if not isinstance(conversation, str) or not conversation:
            raise errors.invalid_type("conversation.id", "a non-empty string")
    elif conversation is not None and (not isinstance(conversation, str) or not conversation):
        raise errors.invalid_type("conversation", "a conversation id, or an object with its id")
    background = _bool(body, "background", False)
    if background and websocket:
        raise errors.unsupported_parameter(
            "background",
            "background is not supported in WebSocket mode; create background "
            "responses over HTTP (POST /v1/responses).",
        )

    store = _bool(body, "store", True)
    if background and not store:
        raise errors.invalid_value(
            "store", "Background responses are stored: send 'store': true with 'background': true."
        )
    stream = _bool(body, "stream", False)
    generate = _bool(body, "generate", True) if websocket else True
    prewarm, upstream_options = _upstream_options(body)
    if prewarm:
        generate = False

    settings = _settings(body)
    compact_threshold = _compact_threshold(body.get("context_management"))
    include = _include(body.get("include"))
    input_items = normalize_input(body.get("input"), param="input")
    if not input_items and generate and previous is None and conversation is None:
        raise errors.invalid_value("input", "Input must not be empty.")
    if input_items and input_items[-1]["type"] == COMPACTION_TRIGGER and not generate:
        raise errors.invalid_value(
            "input",
            "Invalid 'input': a compaction_trigger asks for a compaction, which a warm-up "
            "(generate: false, or prompt_cache_options.prewarm) does not run; send it in a "
            "create that generates.",
        )

    return CreateRequest(
        model=model,
        input_items=input_items,
        settings=settings,
        previous_response_id=previous,
        stream_id=body.get("stream_id") if websocket else None,
        generate=generate,
        store=store,
        stream=stream,
        background=background,
        ignored_fields=tuple(sorted(k for k in body if k not in KNOWN_CREATE_FIELDS)),
        compact_threshold=compact_threshold,
        include=include,
        upstream_options=upstream_options,
        given_defaults=_given_defaults(body),
        responses_only=tuple(name for name in RESPONSES_ONLY if body.get(name) is not None),
        model_from_prompt=body.get("model") is None,
        conversation=conversation,
    )


UPSTREAM_DEFAULTS = ("temperature", "top_p", "service_tier")
"""Settings whose API default an upstream need not share, so one the client gives,
even at that default, is forwarded: a vLLM or SGLang model's own sampling defaults
(its `generation_config`) apply to a request that leaves `temperature` and `top_p`
out, and OpenAI takes a missing `service_tier` as `auto`, not the `default` the
Response echoes."""


def _given_defaults(body: dict[str, Any]) -> tuple[str, ...]:
    """The settings of `UPSTREAM_DEFAULTS` the body gives at the API's default (1, 1,
    `"default"`), which the echoed settings cannot tell from leaving them out; its
    types already checked."""
    return tuple(
        name
        for name in UPSTREAM_DEFAULTS
        if body.get(name) is not None
        and body[name] == ECHOED_DEFAULTS[name]
        and isinstance(body[name], str) == (name == "service_tier")
    )


INTEGER_BOUNDS: tuple[tuple[str, int, int | None], ...] = (
    ("max_output_tokens", 16, None),
    ("max_tool_calls", 0, None),
    ("top_logprobs", 0, 20),
)
"""The API's bounds of the create's integer fields (its schema's `minimum`, `maximum`)."""


def validate_metadata(metadata: Any) -> None:
    """`metadata` as the API takes it (a response's, a conversation's): at most
    `MAX_METADATA_PAIRS` string values, keys and values of bounded length. Raises
    APIError."""
    if not isinstance(metadata, dict):
        raise errors.invalid_type("metadata", "an object")
    if len(metadata) > MAX_METADATA_PAIRS:
        raise errors.invalid_value(
            "metadata", f"Invalid 'metadata': at most {MAX_METADATA_PAIRS} key-value pairs."
        )
    if not all(isinstance(v, str) for v in metadata.values()):
        raise errors.invalid_type("metadata", "an object of string values")
    for key, value in metadata.items():
        for what, text, most in (
            ("key", key, MAX_METADATA_KEY_CHARS),
            ("value", value, MAX_METADATA_VALUE_CHARS),
        ):
            if len(text) > most:
                raise errors.invalid_value(
                    "metadata",
                    f"Invalid 'metadata': string too long. Expected each {what} to have at "
                    f"most {most} characters, but got a {what} with length {len(text)} instead.",
                )


def _in_range(param: str, value: int, minimum: int, maximum: int | None) -> int:
    """`value` within the bounds the API's schema gives the field, saturated to
    2**64 - 1; else raises the API's APIError."""
    if value < minimum:
        bound, relation, limit = "below minimum", ">=", minimum
    elif maximum is not None and value > maximum:
        bound, relation, limit = "above maximum", "<=", maximum
    else:
        return min(value, 2**64 - 1)
    raise errors.invalid_value(
        param,
        f"Invalid '{param}': integer {bound} value. Expected a value {relation} {limit}, "
        f"but got {value} instead.",
    )


MIN_COMPACT_THRESHOLD = 1000
"""The smallest `compact_threshold` the API accepts (its OpenAPI schema's `minimum`)."""
DEFAULT_COMPACT_THRESHOLD = 100_000
"""The threshold of a compaction entry without one."""


def _compact_threshold(value: Any) -> int | None:
    """`context_management` as the API's schema has it: null, or a non-empty array of
    objects whose `type` is `compaction` with an optional integer `compact_threshold`
    of at least `MIN_COMPACT_THRESHOLD`. The first entry's threshold (by default
    `DEFAULT_COMPACT_THRESHOLD`; at most 2**64 - 1); None without compaction. Raises
    APIError."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise errors.invalid_type("context_management", "an array or null")
    if not value:
        raise errors.invalid_value(
            "context_management",
            "Invalid 'context_management': empty array. Expected at least one entry, or null.",
        )
    thresholds: list[int] = []
    for index, entry in enumerate(value):
        if not isinstance(entry, dict):
            raise errors.invalid_type(f"context_management[{index}]", "an object")
        param = f"context_management[{index}].type"
        if "type" not in entry:
            raise errors.missing_parameter(param)
        kind = entry["type"]
        if not isinstance(kind, str):
            raise errors.invalid_type(param, "a string")
        if kind != "compaction":
            raise errors.invalid_value(
                param, f"Invalid value for '{param}': only 'compaction' is supported."
            )
        threshold = entry.get("compact_threshold")
        param = f"context_management[{index}].compact_threshold"
        if threshold is None:
            thresholds.append(DEFAULT_COMPACT_THRESHOLD)
            continue
        if isinstance(threshold, bool) or not isinstance(threshold, int):
            raise errors.invalid_type(param, "an integer or null")
        thresholds.append(_in_range(param, threshold, MIN_COMPACT_THRESHOLD, None))
    return thresholds[0]


_UPSTREAM_OPTIONS: tuple[tuple[str, tuple[tuple[str, type, str], ...]], ...] = (
    (
        "prompt_cache_options",
        (
            ("prewarm", bool, "a boolean or null"),
            ("mode", str, "a string"),
            ("ttl", str, "a string"),
            ("comparison_response_id", str, "a string or null"),
        ),
    ),
    ("image", (("context_compression", str, "a string"),)),
    (
        "prompt",
        (
            ("id", str, "a string"),
            ("version", str, "a string or null"),
            ("variables", dict, "an object or null"),
        ),
    ),
    ("moderation", (("model", str, "a string"), ("policy", dict, "an object or null"))),
    ("access_programs", (("cyber", str, "a string"),)),
)
_REQUIRED_MEMBERS = {"prompt": "id", "moderation": "model"}
RESPONSES_ONLY = ("prompt", "moderation")
"""Fields only a Responses upstream (OpenAI) can honour: `prompt`, a template stored
there, and `moderation` (its `block` policy must not be dropped)."""
_LOCAL_CACHE_OPTIONS = frozenset({"prewarm", "comparison_response_id"})


def _upstream_options(body: dict[str, Any]) -> tuple[bool, dict[str, Any] | None]:
    """`prompt_cache_options`, `image`, `prompt`, `moderation` and `access_programs`
    as the API's schema has them (null, or an object whose known members have their
    types, a `prompt` its `id`, a `moderation` its `model`; values not checked
    against a list): whether `prewarm` is true, and the members an upstream gets
    (`image`, `prompt`, `moderation`, `access_programs`, and `prompt_cache_options` less
    `prewarm` and `comparison_response_id`, null members left out), None without
    any. Raises APIError."""
    prewarm = False
    kept: dict[str, Any] = {}
    for field_name, typed in _UPSTREAM_OPTIONS:
        options = body.get(field_name)
        if options is None:
            continue
        if not isinstance(options, dict):
            raise errors.invalid_type(field_name, "an object or null")
        for member, kind, expected in typed:
            value = options.get(member)
            if value is not None and not isinstance(value, kind):
                raise errors.invalid_type(f"{field_name}.{member}", expected)
        required = _REQUIRED_MEMBERS.get(field_name)
        if required is not None and options.get(required) is None:
            raise errors.missing_parameter(f"{field_name}.{required}")
        if field_name == "prompt_cache_options":
            prewarm = options.get("prewarm") is True
        entries = {
            key: value
            for key, value in options.items()
            if value is not None
            and not (field_name == "prompt_cache_options" and key in _LOCAL_CACHE_OPTIONS)
        }
        if entries:
            kept[field_name] = entries
    return prewarm, kept or None


def _include(value: Any) -> tuple[str, ...]:
    """`include` as the API's schema has it: null, or an array of strings (any
    strings: new values keep working). Raises APIError."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise errors.invalid_type("include", "an array of strings or null")
    for index, entry in enumerate(value):
        if not isinstance(entry, str):
            raise errors.invalid_type(f"include[{index}]", "a string")
    return tuple(value)


def validate_steer(body: dict[str, Any]) -> SteerRequest:
    """Validate a `response.steer` (spec §2.2): only user messages, no other fields."""
    target = body.get("previous_response_id")
    if not isinstance(target, str) or not target:
        raise errors.steer_error(
            "invalid_input", "'previous_response_id' must name the response to steer."
        )
    extra = sorted(k for k in body if k not in {"type", "previous_response_id", "input"})
    if extra:
        raise errors.steer_error(
            "invalid_input", f"Unknown field '{extra[0][:64]}' in response.steer."
        )
    raw = body.get("input")
    if isinstance(raw, str):
        if not raw:
            raise errors.steer_error("invalid_input", "Steering input must not be empty.")
        return SteerRequest(target, [{"type": "message", "role": "user", "content": raw}], raw)
    if not isinstance(raw, list) or not raw:
        raise errors.steer_error(
            "invalid_input", "Steering input must be a string or a non-empty array of messages."
        )
    items: list[dict[str, Any]] = []
    for index, item in enumerate(raw):
        if not isinstance(item, dict):
            raise errors.steer_error("invalid_input", f"input[{index}] must be an object.")
        unknown = sorted(k for k in item if k not in {"type", "role", "content"})
        if unknown or item.get("type", "message") != "message" or item.get("role") != "user":
            raise errors.steer_error(
                "invalid_input",
                f"input[{index}] must be a user message: only 'type', 'role' and 'content'.",
            )
        try:
            _check_content(item.get("content"), f"input[{index}].content", user=True)
        except APIError as exc:
            raise errors.steer_error("invalid_input", exc.message) from None
        items.append({"type": "message", "role": "user", "content": item["content"]})
    return SteerRequest(target, items, raw)


def normalize_input(value: Any, *, param: str) -> list[dict[str, Any]]:
    """The input items of a create: strings and "easy" messages become typed messages."""
    if value is None:
        return []
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    if not isinstance(value, list):
        raise errors.invalid_type(param, "a string or an array of input items")
    items: list[dict[str, Any]] = []
    for index, item in enumerate(value):
        where = f"{param}[{index}]"
        if not isinstance(item, dict):
            raise errors.invalid_type(where, "an object")
        if "type" not in item:
            if "role" not in item:
                raise errors.missing_parameter(f"{where}.type")
            item = {"type": "message", **item}
        item_type = item["type"]
        # An explicit null is no easy message: refused like any other non-string (kept,
        # it was stored with type null, which no model, upstream or SDK reads).
        if not isinstance(item_type, str):
            raise errors.invalid_type(f"{where}.type", "a string")
        _check_item(item, item_type, where)
        if item_type == COMPACTION_TRIGGER and index + 1 < len(value):
            raise errors.invalid_value(
                f"{where}.type",
                f"Invalid value for '{where}.type': a compaction_trigger must be the final "
                "input item (re-sending a history, leave out the triggers of earlier turns).",
            )
        items.append(item)
    return items


def _check_item(item: dict[str, Any], item_type: str, where: str) -> None:
    if item_type == "message":
        role = item.get("role")
        if not (isinstance(role, str) and role in MESSAGE_ROLES):
            raise errors.invalid_value(
                f"{where}.role",
                f"Invalid value for '{where}.role': expected one of 'user', 'assistant', "
                "'system', 'developer'.",
            )
        _check_content(item.get("content"), f"{where}.content", user=role != "assistant")
    elif item_type == "function_call":
        for name in ("call_id", "name", "arguments"):
            _require_str(item, name, where)
    elif item_type == "function_call_output":
        _require_str(item, "call_id", where)
        output = item.get("output")
        if not isinstance(output, str | list):
            raise errors.invalid_type(f"{where}.output", "a string or an array")
    elif item_type == "item_reference":
        _require_str(item, "id", where)
    elif item_type not in ITEM_TYPES:
        raise errors.invalid_value(
            f"{where}.type", f"Invalid value for '{where}.type': unknown item type."
        )


def _check_content(content: Any, where: str, *, user: bool) -> None:
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise errors.invalid_type(where, "a string or an array of content parts")
    for index, part in enumerate(content):
        if not isinstance(part, dict):
            raise errors.invalid_type(f"{where}[{index}]", "an object")
        part_type = part.get("type")
        if not (isinstance(part_type, str) and part_type in CONTENT_PART_TYPES):
            raise errors.invalid_value(
                f"{where}[{index}].type",
                f"Invalid value for '{where}[{index}].type': unknown content part type.",
            )
        if part_type in _TEXT_PARTS and not isinstance(part.get("text"), str):
            raise errors.invalid_type(f"{where}[{index}].text", "a string")


def _require_str(item: dict[str, Any], name: str, where: str) -> None:
    value = item.get(name)
    if value is None:
        raise errors.missing_parameter(f"{where}.{name}")
    if not isinstance(value, str):
        raise errors.invalid_type(f"{where}.{name}", "a string")


def _bool(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise errors.invalid_type(name, "a boolean")
    return value


def _settings(body: dict[str, Any]) -> dict[str, Any]:
    settings = {name: body.get(name, default) for name, default in ECHOED_DEFAULTS.items()}
    for name, default in ECHOED_DEFAULTS.items():
        if settings[name] is None and default is not None:
            settings[name] = default

    instructions = settings["instructions"]
    if instructions is not None and not isinstance(instructions, str):
        raise errors.invalid_type("instructions", "a string or null")
    tools = settings["tools"]
    if not isinstance(tools, list):
        raise errors.invalid_type("tools", "an array")
    for index, tool in enumerate(tools):
        if not isinstance(tool, dict) or not isinstance(tool.get("type"), str):
            raise errors.invalid_type(f"tools[{index}]", "an object with a 'type'")
        if tool["type"] != "function":
            continue
        if not isinstance(tool.get("name"), str):
            raise errors.missing_parameter(f"tools[{index}].name")
        # The echoed members the SDK's FunctionTool types.
        for member, kind, expected in (
            ("description", str, "a string or null"),
            ("parameters", dict, "an object or null"),
            ("strict", bool, "a boolean or null"),
        ):
            value = tool.get(member)
            if value is not None and not isinstance(value, kind):
                raise errors.invalid_type(f"tools[{index}].{member}", expected)
    choice = settings["tool_choice"]
    if isinstance(choice, dict):
        if not isinstance(choice.get("type"), str):
            raise errors.invalid_type(
                "tool_choice", "'auto', 'none', 'required' or an object with a 'type'"
            )
        if choice["type"] in ("function", "custom") and not isinstance(choice.get("name"), str):
            raise errors.missing_parameter("tool_choice.name")
    elif not (isinstance(choice, str) and choice in _CHOICES):
        raise errors.invalid_value(
            "tool_choice",
            "Invalid value for 'tool_choice': expected 'auto', 'none', 'required' or an object.",
        )
    if not isinstance(settings["parallel_tool_calls"], bool):
        raise errors.invalid_type("parallel_tool_calls", "a boolean")
    for name, maximum in (("temperature", 2), ("top_p", 1)):
        value = settings[name]
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise errors.invalid_type(name, "a number")
        if not 0 <= value <= maximum:
            raise errors.invalid_value(
                name, f"Invalid value for '{name}': must be between 0 and {maximum}."
            )
    for name, minimum, bound in INTEGER_BOUNDS:
        value = settings[name]
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            raise errors.invalid_type(name, "an integer")
        _in_range(name, value, minimum, bound)
    validate_metadata(settings["metadata"])
    for name in ("text", "reasoning"):
        if not isinstance(settings[name], dict):
            raise errors.invalid_type(name, "an object")
    # Their echoed members have the SDK's types (the values are the model's to judge:
    # new efforts and verbosities appear).
    for name, member in (("text", "verbosity"), ("reasoning", "effort"), ("reasoning", "summary")):
        value = settings[name].get(member)
        if value is not None and not isinstance(value, str):
            raise errors.invalid_type(f"{name}.{member}", "a string or null")
    text_format = settings["text"].get("format")
    if text_format is not None and not (
        isinstance(text_format, dict) and isinstance(text_format.get("type"), str)
    ):
        raise errors.invalid_type("text.format", "an object with a 'type'")
    if text_format is not None and text_format["type"] == "json_schema":
        for member, kind, expected in (("name", str, "a string"), ("schema", dict, "an object")):
            value = text_format.get(member)
            if value is None:
                raise errors.missing_parameter(f"text.format.{member}")
            if not isinstance(value, kind):
                raise errors.invalid_type(f"text.format.{member}", expected)
    truncation = settings["truncation"]
    if not (isinstance(truncation, str) and truncation in {"auto", "disabled"}):
        raise errors.invalid_value(
            "truncation", "Invalid value for 'truncation': expected 'auto' or 'disabled'."
        )
    # Echoed strings: anything else would make a Response object the SDK's types refuse.
    for name in (
        "service_tier",
        "user",
        "safety_identifier",
        "prompt_cache_key",
        "prompt_cache_retention",
    ):
        if settings[name] is not None and not isinstance(settings[name], str):
            raise errors.invalid_type(name, "a string or null")
    safety_identifier = settings["safety_identifier"]
    if isinstance(safety_identifier, str) and len(safety_identifier) > MAX_SAFETY_IDENTIFIER_CHARS:
        raise errors.invalid_value(
            "safety_identifier",
            "Invalid 'safety_identifier': string too long. Expected a string with maximum "
            f"length {MAX_SAFETY_IDENTIFIER_CHARS}, but got a string with length "
            f"{len(safety_identifier)} instead.",
        )
    if settings["prompt_cache_retention"] not in (None, "in_memory", "24h"):
        raise errors.invalid_value(
            "prompt_cache_retention",
            "Invalid value for 'prompt_cache_retention': expected 'in_memory', '24h' or null.",
        )
    return settings


def _json_error_detail(exc: Exception) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at line {exc.lineno} column {exc.colno}"
    return "not UTF-8"
