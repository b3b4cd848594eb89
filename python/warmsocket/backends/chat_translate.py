"""Responses API <-> Chat Completions translation (pure functions, no I/O).

Request side, in order:

* `instructions` -> the first message, role `system`;
* `message` items -> messages of the same role (`developer` becomes `system`, which
  every chat template knows); text-only content becomes a string, other content
  parts their chat forms (`input_image` -> `image_url`, `input_file` -> `file`,
  `input_audio` -> `input_audio`);
* `function_call` items -> `tool_calls` of an assistant message: merged into the
  assistant message right before them (text then calls, or parallel calls), else a
  new assistant message with `content: null`;
* `function_call_output` items -> `tool` messages (`tool_call_id` = `call_id`);
* a compaction item made by warmsocket -> the messages of what it stands for, its
  summary as a `user` message (`warmsocket.compaction_items`); one another server
  made cannot be read: 400;
* other items (reasoning, hosted tools, programmatic tool calling's `program` and
  `program_output`) have no chat form and are left out; so is an `additional_tools`
  item of hosted tools alone (hosted tools are left out), and one with function
  tools, which a chat request can only take in its one list of tools, is a 400;
* function tools -> `{"type": "function", "function": {...}}`; other tools are left
  out; `tool_choice` and `parallel_tool_calls` follow, only when tools remain;
* `max_output_tokens` -> `max_tokens` (OpenAI: `max_completion_tokens`, and its own
  `safety_identifier`, `prompt_cache_key`, `prompt_cache_retention`, `service_tier`);
  `text.format` -> `response_format`; `reasoning.effort` -> `reasoning_effort`;
  sampling fields only when the client set them; always `stream: true` with
  `stream_options.include_usage`.

Response side: `ChatChunkDecoder` turns the SSE stream of chat completion chunks
(choice 0) into model events: content deltas, tool calls by `index` (a call starts
when its index first appears, with the upstream's `id` as `call_id`), argument
deltas, and the usage chunk (`prompt_tokens_details.cached_tokens` when given).
Reasoning deltas (`reasoning_content`, or `reasoning`: DeepSeek's, vLLM's and
OpenRouter's names) stream as the `reasoning_text` part of one reasoning item, which
the content or tool call after them closes.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import Any, NoReturn

from warmsocket import errors, ids, small_json
from warmsocket._core import MAX_UPSTREAM_EVENT_BYTES
from warmsocket.backends.base import (
    ModelEvent,
    ReasoningDelta,
    RefusalDelta,
    ResponseFields,
    TextDelta,
    TextLogprobs,
    ToolArgumentsDelta,
    ToolCallStart,
    TurnIncomplete,
    UsageReport,
)
from warmsocket.compaction_items import expanded_items, foreign_compaction
from warmsocket.errors import SERVER_ERROR
from warmsocket.response_stream import dumps
from warmsocket.sse import SSEDecoder
from warmsocket.upstream import (
    UpstreamError,
    explicit_settings,
    from_error_object,
    transport_error,
)

_TEXT_PARTS = frozenset({"input_text", "output_text", "text", "summary_text", "reasoning_text"})


# -- request --------------------------------------------------------------------------------


def chat_messages(items: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Responses items -> chat messages, in order."""
    out: list[dict[str, Any]] = []
    for item in items:
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role == "developer":
                role = "system"
            out.append({"role": role, "content": message_content(item.get("content"), role)})
        elif kind == "function_call":
            call = {
                "id": item.get("call_id"),
                "type": "function",
                "function": {"name": item.get("name"), "arguments": item.get("arguments", "")},
            }
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            out.append(
                {
                    "role": "tool",
                    "tool_call_id": item.get("call_id"),
                    "content": _plain_text(item.get("output")),
                }
            )
        elif kind == "compaction":
            expansion = expanded_items(item)
            if expansion is None:
                raise foreign_compaction()
            out += chat_messages(expansion)
        elif kind == "additional_tools" and chat_tools(_listed(item.get("tools"))):
            raise _not_expressible(
                "an additional_tools item with function tools",
                "a chat request has one list of tools; put them in the request's 'tools'",
            )
    return out


def render_messages(items: Iterable[Mapping[str, Any]]) -> list[bytes]:
    """`chat_messages` encoded, one compact JSON object per message."""
    return [dumps(message) for message in chat_messages(items)]


def system_message(instructions: str) -> bytes:
    return dumps({"role": "system", "content": instructions})


def message_content(content: Any, role: str | None) -> Any:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    parts: list[dict[str, Any]] = []
    text_only = True
    for part in content:
        if not isinstance(part, dict):
            continue
        kind = part.get("type")
        if kind in _TEXT_PARTS:
            parts.append({"type": "text", "text": part.get("text", "")})
        elif kind == "refusal":
            parts.append({"type": "text", "text": part.get("refusal", "")})
        elif kind == "input_image":
            if not isinstance(part.get("image_url"), str):
                raise _not_expressible(
                    "an input_image given by file_id",
                    "give its image_url (a URL or a data: URL)",
                )
            text_only = False
            parts.append(
                {
                    "type": "image_url",
                    "image_url": {"url": part["image_url"], "detail": part.get("detail", "auto")},
                }
            )
        elif kind == "input_file":
            if "file_data" not in part and "file_id" not in part:
                raise _not_expressible(
                    "an input_file given by file_url", "give its file_data (base64) or file_id"
                )
            text_only = False
            file = {k: part[k] for k in ("file_data", "file_id", "filename") if k in part}
            parts.append({"type": "file", "file": file})
        elif kind == "input_audio":
            text_only = False
            parts.append({"type": "input_audio", "input_audio": part.get("input_audio")})
    if text_only and (len(parts) <= 1 or role != "user"):
        return "".join(p["text"] for p in parts)
    return parts


def _not_expressible(what: str, instead: str) -> errors.APIError:
    """Content a Chat Completions upstream cannot take (left out, the model would
    answer without it and nobody would know)."""
    return errors.invalid_value(
        "input",
        f"Invalid 'input': {what} cannot be sent to this server's upstream (a Chat "
        f"Completions API): {instead}.",
    )


def _listed(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _plain_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(
            p.get("text", "") for p in value if isinstance(p, dict) and p.get("type") in _TEXT_PARTS
        )
    return ""


def chat_tools(tools: Iterable[Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for tool in tools:
        if not isinstance(tool, dict) or tool.get("type") != "function":
            continue
        function = {
            k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool
        }
        out.append({"type": "function", "function": function})
    return out


def chat_tool_choice(choice: Any) -> Any:
    if isinstance(choice, str):
        return choice
    if isinstance(choice, dict):
        if choice.get("type") == "function" and isinstance(choice.get("name"), str):
            return {"type": "function", "function": {"name": choice["name"]}}
        if choice.get("type") == "allowed_tools":
            tools = [
                {"type": "function", "function": {"name": t["name"]}}
                for t in choice.get("tools", ())
                if isinstance(t, dict) and t.get("type") == "function" and "name" in t
            ]
            return {
                "type": "allowed_tools",
                "allowed_tools": {"mode": choice.get("mode", "auto"), "tools": tools},
            }
    return "auto"


LOGPROBS = "message.output_text.logprobs"

OPENAI_CHAT_FIELDS = (
    "safety_identifier",
    "prompt_cache_key",
    "prompt_cache_retention",
    "service_tier",
)
"""Fields OpenAI's Chat Completions takes as the Responses API does, sent only to it:
other servers do not know them (`UpstreamConfig.at_openai`). `prompt_cache_key`
steers OpenAI's prompt cache, as the client meant it to."""
"""The `include` value that asks for the text's log probabilities."""


def chat_request_fields(
    settings: Mapping[str, Any],
    model: str,
    *,
    logprobs: bool = False,
    given_defaults: Collection[str] = (),
    openai: bool = False,
) -> dict[str, Any]:
    """Every field of the chat request except `messages`; with `logprobs` (the
    client's `include` asked for them), `logprobs: true` and its `top_logprobs`.
    `given_defaults` (`CreateRequest.given_defaults`) are sent even at the API's
    default: a model's own sampling defaults may differ. With `openai` (the
    upstream is OpenAI's: `UpstreamConfig.at_openai`), `max_output_tokens` goes as
    `max_completion_tokens` (its reasoning models refuse `max_tokens`) and OpenAI's
    own fields (`OPENAI_CHAT_FIELDS`, and `text.verbosity` as `verbosity`) go too."""
    fields: dict[str, Any] = {"model": model}
    tools = chat_tools(settings.get("tools") or ())
    if tools:
        fields["tools"] = tools
        choice = settings.get("tool_choice", "auto")
        if choice != "auto":
            fields["tool_choice"] = chat_tool_choice(choice)
        if settings.get("parallel_tool_calls") is False:
            fields["parallel_tool_calls"] = False
    explicit = explicit_settings(
        settings,
        ("temperature", "top_p", "max_output_tokens", "text", "reasoning", "user")
        + (OPENAI_CHAT_FIELDS if openai else ()),
        given_defaults,
    )
    for name in ("temperature", "top_p", "user", *(OPENAI_CHAT_FIELDS if openai else ())):
        if name in explicit:
            fields[name] = explicit[name]
    if "max_output_tokens" in explicit:
        limit = "max_completion_tokens" if openai else "max_tokens"
        fields[limit] = explicit["max_output_tokens"]
    text_format = (explicit.get("text") or {}).get("format")
    if isinstance(text_format, dict):
        if text_format.get("type") == "json_schema":
            keys = ("name", "description", "schema", "strict")
            schema = {k: text_format[k] for k in keys if k in text_format}
            fields["response_format"] = {"type": "json_schema", "json_schema": schema}
        elif text_format.get("type") == "json_object":
            fields["response_format"] = {"type": "json_object"}
        elif text_format.get("type") != "text":  # (left out, the format would be lost)
            raise errors.invalid_value(
                "text.format.type",
                "Invalid 'text.format.type': this server's upstream (a Chat Completions "
                "API) takes 'text', 'json_object' or 'json_schema'.",
            )
    effort = (explicit.get("reasoning") or {}).get("effort")
    if isinstance(effort, str):
        fields["reasoning_effort"] = effort
    verbosity = (explicit.get("text") or {}).get("verbosity")
    if openai and isinstance(verbosity, str) and verbosity != "medium":
        fields["verbosity"] = verbosity  # OpenAI's chat field for `text.verbosity`
    if logprobs:
        fields["logprobs"] = True
        top = settings.get("top_logprobs")
        if isinstance(top, int) and top > 0:
            fields["top_logprobs"] = top
    fields["stream"] = True
    fields["stream_options"] = {"include_usage": True}
    return fields


def request_head(
    settings: Mapping[str, Any],
    model: str,
    *,
    logprobs: bool = False,
    given_defaults: Collection[str] = (),
    openai: bool = False,
) -> bytes:
    """The request body up to the opening bracket of `messages` (messages come last)."""
    fields = chat_request_fields(
        settings, model, logprobs=logprobs, given_defaults=given_defaults, openai=openai
    )
    return dumps(fields)[:-1] + b',"messages":['


# -- response -------------------------------------------------------------------------------


class _Call:
    __slots__ = ("call_id", "given_id", "name", "pending", "started")

    def __init__(self, call_id: str, *, given_id: bool) -> None:
        self.call_id = call_id
        self.given_id = given_id
        """The upstream named the call (`call_id` is its `id`, not one made here)."""
        self.name = ""
        self.started = False
        self.pending: list[str] = []


_CUT_SHORT = {"length": "max_output_tokens", "content_filter": "content_filter"}
"""`finish_reason`s of an answer cut short -> the Response's `incomplete_details.reason`."""

_STOPPED_BY_SERVER = frozenset({"abort", "error"})
"""`finish_reason`s of an answer the server gave up on (vLLM and SGLang `abort`, as
when the engine drops the request): a failure, not the answer's end."""


def _content_logprobs(value: Any) -> list[dict[str, Any]]:
    """A chunk's `logprobs.content` as the Responses API's delta has them: `token`,
    `logprob`, `bytes` (kept: exact where a token is part of a character) and
    `top_logprobs` alike; [] without any."""
    content = value.get("content") if isinstance(value, dict) else None
    if not isinstance(content, list):
        return []

    def entry(item: Any) -> dict[str, Any] | None:
        if not isinstance(item, dict) or not isinstance(item.get("token"), str):
            return None
        return {key: item[key] for key in ("token", "logprob", "bytes") if key in item}

    logprobs = []
    for item in content:
        head = entry(item)
        if head is None:
            continue
        top = item.get("top_logprobs")
        alternatives = [entry(t) for t in top] if isinstance(top, list) else []
        head["top_logprobs"] = [t for t in alternatives if t is not None]
        logprobs.append(head)
    return logprobs


def _stream_error(error: Any) -> NoReturn:
    """Raise the upstream's error reported in its stream (its `code`, when a number,
    is the HTTP status it would have answered with)."""
    if isinstance(error, dict) and isinstance(error.get("error"), dict):
        error = error["error"]  # (`{"error": {...}}` as an `error` event's data)
    status = error.get("code") if isinstance(error, dict) else None
    if type(status) is not int or not 400 <= status <= 599:
        status = None
    raise from_error_object(error, status=status)


class ChatChunkDecoder:
    """Chat completion chunks (SSE) -> model events."""

    def __init__(self) -> None:
        self._sse = SSEDecoder(MAX_UPSTREAM_EVENT_BYTES, error_field=True)
        self._calls: dict[int, _Call] = {}
        self._current: int | None = None
        self._usage: dict[str, Any] | None = None
        self._service_tier: str | None = None
        self.finished = False
        """A `finish_reason` or `[DONE]` arrived."""
        self.ended = False
        """`[DONE]` arrived: the stream is over (the usage chunk comes before it, after
        the `finish_reason`), whether or not the HTTP body ends with it."""
        self.cut_short: str | None = None
        """Why the answer stopped short (`incomplete_details.reason`), from its
        `finish_reason`: `length` is `max_output_tokens`, `content_filter` itself."""
        self.events_seen = 0

    def feed(self, data: bytes) -> list[ModelEvent]:
        """Events of the chunks completed by `data`. Raises UpstreamError."""
        try:
            pairs = self._sse.feed(data)
        except ValueError:  # an event over MAX_UPSTREAM_EVENT_BYTES
            raise transport_error("protocol") from None
        return self._decode(pairs)

    def finish(self) -> list[ModelEvent]:
        """Events at the end of the stream. Raises UpstreamError if it ended early."""
        events = self._decode(self._sse.finish())
        if not self.finished:
            raise transport_error("closed")
        if any(not call.started for call in self._calls.values()):
            error = transport_error("protocol")
            error.message = "The upstream sent a tool call without a name."
            raise error
        if self.cut_short is not None:
            events.append(TurnIncomplete(self.cut_short))
        if self._service_tier is not None:  # OpenAI's: the tier that served the request
            events.append(ResponseFields(dumps({"service_tier": self._service_tier})))
        usage = self._usage
        if usage:
            details = usage.get("prompt_tokens_details")
            cached = details.get("cached_tokens") if isinstance(details, dict) else None
            output = usage.get("completion_tokens_details")
            reasoning = output.get("reasoning_tokens") if isinstance(output, dict) else None
            events.append(
                UsageReport(
                    input_tokens=_int(usage.get("prompt_tokens")),
                    cached_tokens=_int(cached),
                    output_tokens=_int(usage.get("completion_tokens")),
                    reasoning_tokens=_int(reasoning),
                )
            )
        return events

    def _decode(self, pairs: list[tuple[bytes, bytes]]) -> list[ModelEvent]:
        events: list[ModelEvent] = []
        for name, payload in pairs:
            if self.ended:
                break  # nothing after `[DONE]` is the stream's
            self.events_seen += 1
            if payload == b"[DONE]":
                self.finished = self.ended = True
                continue
            try:
                chunk = small_json.loads(payload)
            except ValueError:
                raise transport_error("protocol") from None
            if not isinstance(chunk, dict):
                raise transport_error("protocol")
            if name == b"error":  # llama.cpp's `error: {...}` (then `[DONE]`)
                _stream_error(chunk)
            self._chunk(chunk, events)
        return events

    def _chunk(self, chunk: dict[str, Any], events: list[ModelEvent]) -> None:
        error = chunk.get("error")
        if error is not None and not chunk.get("choices"):
            _stream_error(error)
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self._usage = usage
        service_tier = chunk.get("service_tier")
        if isinstance(service_tier, str):
            self._service_tier = service_tier
        for choice in _choices(chunk):
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta")
            if isinstance(delta, dict):
                thought = delta.get("reasoning_content")
                if not isinstance(thought, str):
                    thought = delta.get("reasoning")
                if isinstance(thought, str) and thought:
                    events.append(ReasoningDelta(thought))
                content = delta.get("content")
                if isinstance(content, str) and content:
                    logprobs = _content_logprobs(choice.get("logprobs"))
                    if logprobs:
                        events.append(TextLogprobs(dumps(logprobs)))
                    events.append(TextDelta(content))
                refusal = delta.get("refusal")
                if isinstance(refusal, str) and refusal:
                    events.append(RefusalDelta(refusal))
                tool_calls = delta.get("tool_calls")
                if isinstance(tool_calls, list):
                    for position, call in enumerate(tool_calls):
                        if isinstance(call, dict):
                            self._tool_delta(call, position, events)
                legacy = delta.get("function_call")
                if isinstance(legacy, dict) and not tool_calls:
                    # The deprecated single call (`functions`), from older servers.
                    self._tool_delta({"index": 0, "function": legacy}, 0, events)
            finish_reason = choice.get("finish_reason")
            if finish_reason is not None and not isinstance(finish_reason, str):
                raise transport_error("protocol")
            if finish_reason in _STOPPED_BY_SERVER:
                raise UpstreamError(
                    "server_error",
                    "The upstream stopped generating the response "
                    f"(finish_reason '{finish_reason}').",
                    status=500,
                    type=SERVER_ERROR,
                    retryable=True,
                    reason="stream",
                )
            if finish_reason:
                self.finished = True
                self.cut_short = _CUT_SHORT.get(finish_reason)

    def _tool_delta(self, delta: dict[str, Any], position: int, events: list[ModelEvent]) -> None:
        index = delta.get("index")
        call_id = delta.get("id")
        if not isinstance(index, int):
            # Servers that omit `index`: a new id starts a new call, else continue the last.
            current = self._calls.get(self._current) if self._current is not None else None
            if current is None or (isinstance(call_id, str) and call_id != current.call_id):
                index = len(self._calls)
            else:
                index = self._current if self._current is not None else position
        call = self._calls.get(index)
        if call is not None and _another_call(call, call_id, delta.get("function")):
            # Ollama numbers every parallel call `index: 0`, each whole with its own id
            # and name: a new id with a name at a taken index starts a new call. (OpenAI
            # and vLLM send the id only on a call's first chunk; some servers repeat
            # it; others, such as Poolside, send another id on a call's later chunks,
            # which carry no name: those continue the call.)
            call = None
        if call is None:
            if self._current is not None and index < self._current:
                raise _interleaved()
            given = call_id if isinstance(call_id, str) and call_id else None
            call = _Call(given or ids.call_id(), given_id=given is not None)
            self._calls[index] = call
            self._current = index
        elif index != self._current:
            raise _interleaved()
        function = delta.get("function")
        if not isinstance(function, dict):
            return
        name = function.get("name")
        if isinstance(name, str) and name and not call.started:
            call.name += name
        arguments = function.get("arguments")
        if not call.started and call.name:
            call.started = True
            events.append(ToolCallStart(call.call_id, call.name))
            events.extend(ToolArgumentsDelta(piece) for piece in call.pending if piece)
            call.pending.clear()
        if isinstance(arguments, str) and arguments:
            if call.started:
                events.append(ToolArgumentsDelta(arguments))
            else:
                call.pending.append(arguments)


def _another_call(call: _Call, call_id: Any, function: Any) -> bool:
    """A delta with this `id` and `function` starts a call other than `call` (one the
    upstream named too): another id, and a name of its own."""
    named = isinstance(function, dict) and isinstance(function.get("name"), str)
    return (
        call.given_id
        and named
        and isinstance(call_id, str)
        and bool(call_id)
        and call_id != call.call_id
    )


def _choices(chunk: dict[str, Any]) -> list[Any]:
    """A chunk's `choices` ([] when absent or null). Raises UpstreamError (a protocol
    error, as for any malformed chunk) when it is not a list."""
    choices = chunk.get("choices")
    if choices is None:
        return []
    if not isinstance(choices, list):
        raise transport_error("protocol")
    return choices


def _interleaved() -> UpstreamError:
    error = transport_error("protocol")
    error.message = "The upstream interleaved the argument deltas of parallel tool calls."
    return error


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
