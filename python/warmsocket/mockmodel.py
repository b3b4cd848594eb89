"""The built-in deterministic model's decisions, as a pure function of the context.

It answers only from the context the server rebuilt, so its replies show whether
state handling is right. Read from the newest user message:

* default: ``You said: <text of the newest user message>``
* ``/call NAME JSON``: calls function NAME (one of the request's function tools) with
  arguments JSON; once a matching ``function_call_output`` has come back, replies
  ``NAME returned: <output>``
* several ``/call`` lines: parallel tool calls, all in one response, in the order
  written; once every call has its output, replies ``NAME returned: <output>`` for
  each call in order, joined by ``; ``
* ``/custom NAME TEXT``: calls custom (freeform) tool NAME (one of the request's
  ``custom`` tools) with TEXT, the rest of the line, as its input; once the matching
  ``custom_tool_call_output`` has come back, replies ``NAME returned: <output>``
  (combines with ``/call`` lines: parallel calls)
* ``/repeat N NAME JSON``: calls NAME once per turn until N outputs for it have come back
  after that user message, then replies ``done after N calls`` (N: up to nine ASCII
  digits; any other line is not the directive)
* ``/transcript``: one line per item of the full context, in order:
  ``instructions: <text>`` when set, ``<role>: <text>`` for messages,
  ``function_call <name> <call_id>``, ``function_call_output <call_id> <output>``
  (custom tools: ``custom_tool_call``, ``custom_tool_call_output``),
  ``reasoning <summary>``, ``web_search_call <query>``; other items by their type
* ``/fail``: the response fails with ``server_error``
* ``/sleep MS``: waits MS milliseconds before answering (combines with the others)
* ``/reply TEXT``: the answer is TEXT, the rest of the line as written, instead of
  ``You said: ...``, ``NAME returned: ...`` or ``done after N calls`` (combines with
  ``/call`` and ``/repeat``: the calls come first). With a JSON TEXT, an agent that
  asks for structured output (``text.format``) gets it: ``/reply {"city": "Lima"}``.
  An empty TEXT is ignored.
* ``/think TEXT``: the response starts with a reasoning item whose summary is TEXT
  (combines with the others), as a reasoning model's does
* ``/search QUERY``: the response starts (after the reasoning) with a web search
  call for QUERY, streamed as OpenAI's hosted web search is (the call added, its
  ``response.web_search_call.in_progress``, ``searching`` and ``completed`` events,
  the call done), when the request has a ``web_search`` tool (of any version, or
  the preview); without one the reply is ``Cannot search: ...``. Combines with the
  others; the answer after it is theirs (``/reply`` to choose it), and a text answer
  cites the search: one ``url_citation`` annotation over the whole text
* the compaction prompt (``warmsocket.compaction_items.PROMPT``, the whole message):
  the transcript of the context before it, without instructions, as the summary
  (a compaction item made by warmsocket shows in a transcript as
  ``compaction: <its summary>``; a summary given as a user message is not what the
  user asks: the newest user message is the one before it)

Within the request's `tool_choice` and `parallel_tool_calls` (`ToolChoice`): `none`
answers in text; `required` calls what the directives ask, else the first tool; a
named tool is called alone (a call no directive asked for gets the simplest
arguments its `parameters` schema accepts: `schema_example`; when those are too
large to make, the answer is ``Cannot call NAME: ...``); without parallel calls,
several ``/call`` lines come one call a response. Calls made without a directive, once
answered, are reported as ``NAME returned: ...``.

The simulated upstream (`warmsocket simulate-upstream`) answers with the same rules.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from warmsocket.compaction_items import PROMPT, SUMMARY_HEADER, summary_of
from warmsocket.schema_example import ExampleTooLarge, example_arguments

_WORD_RE = re.compile(r"\s*\S+")
MAX_SLEEP_MS = 600_000


@dataclass(frozen=True, slots=True)
class Call:
    """One tool call of a reply: a function call, or with `custom` a custom tool call
    whose `arguments` are its free-form input."""

    name: str
    arguments: str
    custom: bool = False


@dataclass(frozen=True, slots=True)
class ToolChoice:
    """What a request's `tool_choice` and `parallel_tool_calls` let the model do."""

    mode: Literal["auto", "none", "required"] = "auto"
    name: str | None = None
    """The tool it must call (`tool_choice` naming a function or custom tool)."""
    custom: bool = False
    parallel: bool = True


AUTO = ToolChoice()


def tool_choice(value: Any, parallel_tool_calls: Any = True) -> ToolChoice:
    """A Responses or Chat Completions request's `tool_choice` (`"none"`,
    `"required"`, `{"type": "function", "name": ...}`, Chat's `{"type": "function",
    "function": {"name": ...}}`, `{"type": "custom", "name": ...}`; anything else is
    `auto`) and `parallel_tool_calls`."""
    parallel = parallel_tool_calls is not False
    if value in ("none", "required"):
        return ToolChoice(value, parallel=parallel)
    if isinstance(value, dict) and value.get("type") in ("function", "custom"):
        name = value.get("name")
        function = value.get("function")
        if name is None and isinstance(function, dict):
            name = function.get("name")
        if isinstance(name, str):
            return ToolChoice("required", name, value["type"] == "custom", parallel)
    return ToolChoice(parallel=parallel)


@dataclass(frozen=True, slots=True)
class Reply:
    """What the model does this turn: text, one or more function calls, or a failure."""

    kind: Literal["text", "call", "fail"]
    text: str = ""
    calls: tuple[Call, ...] = ()
    sleep_ms: int = 0
    reasoning: str | None = None
    """With ``/think``: the response starts with a reasoning item with this summary."""
    search: str | None = None
    """With ``/search``: a web search call for this query comes first (after the
    reasoning)."""


@dataclass(frozen=True, slots=True)
class _Directive:
    kind: Literal["call", "repeat", "transcript", "fail"]
    calls: tuple[Call, ...] = ()
    times: int = 0


def plan_reply(
    tail: Sequence[dict[str, Any]],
    *,
    function_names: Iterable[str],
    instructions: str | None,
    full_context: Callable[[], Sequence[dict[str, Any]]],
    custom_names: Callable[[], Iterable[str]] = tuple,
    tool_types: Callable[[], Iterable[str]] = tuple,
    choice: ToolChoice = AUTO,
    parameters: Callable[[str], Any] = lambda name: None,
) -> Reply:
    """Decide the reply, within what `choice` (the request's `tool_choice` and
    `parallel_tool_calls`) allows.

    `tail` is the context from the newest user message (inclusive) to the end; the
    whole context when there is no user message. `full_context` is called only for
    ``/transcript``, so a normal turn never reads the whole history; `custom_names`
    (the request's custom tools) only for ``/custom``, `tool_types` (the types of
    its tools) only for ``/search``, `parameters` (a function tool's schema, by name)
    only for a call `choice` forces without a directive.
    """
    user_index = last_user_message(tail)
    if user_index is None:
        return Reply("text", "Nothing to answer: the context has no user message.")
    text = message_text(tail[user_index])
    after = tail[user_index + 1 :]
    if text == PROMPT and not after:
        return Reply("text", transcript(full_context()[:-1], None))

    sleep_ms = 0
    reply: str | None = None
    reasoning: str | None = None
    search: str | None = None
    directive: _Directive | None = None
    for line in text.splitlines():
        words = line.strip().split(maxsplit=1)
        if not words or not words[0].startswith("/"):
            continue
        command, rest = words[0], words[1] if len(words) > 1 else ""
        if command == "/sleep":
            sleep_ms = _parse_sleep(rest)
        elif command == "/reply":
            reply = rest
        elif command == "/think":
            reasoning = rest
        elif command == "/search":
            search = rest
        elif directive is None:
            directive = _parse_directive(command, rest)
        elif directive.kind == "call" and command in ("/call", "/custom"):
            more = _parse_directive(command, rest)
            if more is not None:
                directive = _Directive("call", directive.calls + more.calls)

    decided = _decide(
        directive,
        text=text,
        after=after,
        reply=reply,
        function_names=function_names,
        custom_names=custom_names,
        instructions=instructions,
        full_context=full_context,
        choice=choice,
        parameters=parameters,
    )
    if search and not any(kind.startswith("web_search") for kind in tool_types()):
        decided = Reply("text", "Cannot search: this request has no web_search tool.")
        search = None
    if sleep_ms or reasoning or search:
        return replace(
            decided, sleep_ms=sleep_ms, reasoning=reasoning or None, search=search or None
        )
    return decided


def _decide(
    directive: _Directive | None,
    *,
    text: str,
    after: Sequence[dict[str, Any]],
    reply: str | None,
    function_names: Iterable[str],
    custom_names: Callable[[], Iterable[str]],
    instructions: str | None,
    full_context: Callable[[], Sequence[dict[str, Any]]],
    choice: ToolChoice = AUTO,
    parameters: Callable[[str], Any] = lambda name: None,
) -> Reply:
    """The reply a directive asks for, before the modifiers (`/sleep`, `/think`)."""
    calls_asked = directive is not None and directive.kind in ("call", "repeat")
    if choice.mode == "none" and calls_asked:
        directive = None  # no tool may be called: the answer is text
    elif choice.mode == "required":
        function_names = tuple(function_names)  # read twice
        forced = _forced(directive, choice, function_names, custom_names, parameters)
        if isinstance(forced, Reply):
            return forced  # the call cannot be made
        directive = forced
    if directive is None:
        # Calls made without a directive (a forced `tool_choice`) and answered since:
        # the answer reports their outputs, as a directive's would.
        answered = _answered_calls(after, {str(i.get("name")) for i in after}) if after else []
        if answered:
            return Reply("text", reply or _returned(answered))
        return Reply("text", reply or f"You said: {text}")
    if directive.kind == "fail":
        return Reply("fail")
    if directive.kind == "transcript":
        return Reply("text", transcript(full_context(), instructions))

    names = set(function_names)
    customs = set(custom_names()) if any(c.custom for c in directive.calls) else set()
    for wanted in directive.calls:
        if wanted.custom:
            if wanted.name not in customs:
                return Reply(
                    "text",
                    f"Cannot call {wanted.name}: it is not one of this request's custom tools.",
                )
            continue
        if wanted.name not in names:
            return Reply(
                "text",
                f"Cannot call {wanted.name}: it is not one of this request's function tools.",
            )
        try:
            json.loads(wanted.arguments)
        except ValueError:
            return Reply("text", f"Cannot call {wanted.name}: the arguments are not valid JSON.")
    if directive.kind == "repeat":
        if len(_outputs_for(after, {directive.calls[0].name})) >= directive.times:
            return Reply("text", reply or f"done after {directive.times} calls")
        return Reply("call", calls=directive.calls)
    answered = _answered_calls(after, {wanted.name for wanted in directive.calls})
    if len(answered) < len(directive.calls):
        if not choice.parallel:  # one call a response, in order
            return Reply("call", calls=(directive.calls[len(answered)],))
        return Reply("call", calls=directive.calls)
    return Reply("text", reply or _returned(answered[-len(directive.calls) :]))


def _returned(answered: Sequence[tuple[str, str]]) -> str:
    return "; ".join(f"{name} returned: {output}" for name, output in answered)


def _forced(
    directive: _Directive | None,
    choice: ToolChoice,
    function_names: Iterable[str],
    custom_names: Callable[[], Iterable[str]],
    parameters: Callable[[str], Any],
) -> _Directive | Reply | None:
    """The directive under `tool_choice: required` or a named tool: the calls asked
    for (to the named tool only), else one call to the named tool, or to the first
    tool, with the simplest arguments its `parameters` accept (a custom tool's input
    empty). None when the request has no tool to call; a text reply saying why when
    those arguments are too large to make (`ExampleTooLarge`)."""
    if directive is not None and directive.kind not in ("call", "repeat"):
        return directive  # /fail and /transcript are not calls
    if directive is not None:
        calls = tuple(c for c in directive.calls if choice.name in (None, c.name))
        if calls:
            return replace(directive, calls=calls)
    name, custom = choice.name, choice.custom
    if name is None:
        first = next(iter(function_names), None)
        if first is not None:
            name, custom = first, False
        else:
            name, custom = next(iter(custom_names()), None), True
    if name is None:
        return None
    try:
        arguments = "" if custom else example_arguments(parameters(name))
    except ExampleTooLarge as too_large:
        # As for any other call it cannot make: the answer says why, in text.
        return Reply("text", f"Cannot call {name}: {too_large}.")
    return _Directive("call", (Call(name, arguments, custom),))


def transcript(items: Sequence[dict[str, Any]], instructions: str | None) -> str:
    lines = [] if instructions is None else [f"instructions: {instructions}"]
    for item in items:
        kind = item.get("type", "message")
        if kind == "message":
            lines.append(f"{item.get('role')}: {message_text(item)}")
        elif kind == "function_call":
            lines.append(f"function_call {item.get('name')} {item.get('call_id')}")
        elif kind in ("function_call_output", "custom_tool_call_output"):
            lines.append(f"{kind} {item.get('call_id')} {output_text(item)}")
        elif kind == "custom_tool_call":
            lines.append(f"custom_tool_call {item.get('name')} {item.get('call_id')}")
        elif kind == "reasoning":
            summary = item.get("summary")
            parts = summary if isinstance(summary, list) else []
            text = " ".join(p.get("text", "") for p in parts if isinstance(p, dict))
            lines.append(f"reasoning {text}".rstrip())
        elif kind == "compaction" and (summary := summary_of(item)) is not None:
            lines.append(f"compaction: {summary}")
        elif kind == "web_search_call":
            action = item.get("action")
            query = action.get("query") if isinstance(action, dict) else None
            lines.append(f"web_search_call {query if isinstance(query, str) else ''}".rstrip())
        else:
            lines.append(str(kind))
    return "\n".join(lines)


def custom_tool_names(tools: Any) -> list[str]:
    """The names of a request's custom (freeform) tools."""
    return [
        tool["name"]
        for tool in (tools if isinstance(tools, list) else ())
        if isinstance(tool, dict)
        and tool.get("type") == "custom"
        and isinstance(tool.get("name"), str)
    ]


def function_parameters(tools: Any, name: str) -> Any:
    """The `parameters` schema of the request's function tool `name` (a Responses
    tool, or a Chat Completions one under `function`); None when it has none."""
    for tool in tools if isinstance(tools, list) else ():
        if not isinstance(tool, dict) or tool.get("type") != "function":
            continue
        function = tool.get("function")
        spec = function if isinstance(function, dict) and "name" not in tool else tool
        if spec.get("name") == name:
            return spec.get("parameters")
    return None


def tool_types(tools: Any) -> list[str]:
    """The types of a request's tools (``function``, ``custom``, ``web_search``...)."""
    return [
        tool["type"]
        for tool in (tools if isinstance(tools, list) else ())
        if isinstance(tool, dict) and isinstance(tool.get("type"), str)
    ]


SEARCH_PHASES = ("in_progress", "searching", "completed")
"""The events of a web search call between its added and done, in order."""


def web_search_call(item_id: str, query: str, status: str) -> dict[str, Any]:
    """The web search call item of ``/search QUERY`` (``in_progress`` when it starts,
    ``completed`` when done)."""
    return {
        "id": item_id,
        "type": "web_search_call",
        "status": status,
        "action": {"type": "search", "query": query},
    }


def search_citation(query: str, text: str) -> dict[str, Any]:
    """The ``url_citation`` annotation of a text answer after ``/search QUERY``: the
    whole text cites the search's (made-up, never fetched) result page."""
    return {
        "type": "url_citation",
        "url": "https://search.invalid/?q=" + urllib.parse.quote(query),
        "title": f"Results for {query}",
        "start_index": 0,
        "end_index": len(text),
    }


def reasoning_item(summary: str, encrypted_content: str | None = None) -> bytes:
    """The reasoning item of ``/think SUMMARY`` as JSON (no id: the encoder gives one)."""
    item: dict[str, Any] = {
        "type": "reasoning",
        "summary": [{"type": "summary_text", "text": summary}],
    }
    if encrypted_content is not None:
        item["encrypted_content"] = encrypted_content
    return json.dumps(item).encode()


def message_text(item: dict[str, Any]) -> str:
    content = item.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part.get("text", "") if isinstance(part, dict) else ""
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def output_text(item: dict[str, Any]) -> str:
    output = item.get("output")
    if isinstance(output, str):
        return output
    if isinstance(output, list):
        return message_text({"content": output})
    return ""


def text_deltas(text: str) -> list[str]:
    """Split a reply into streamed deltas: one per word, with its leading whitespace."""
    return list(iter_text_deltas(text))


def iter_text_deltas(text: str) -> Iterator[str]:
    """`text_deltas` one at a time (a reply of millions of words is never a list)."""
    previous: str | None = None
    end = 0
    for match in _WORD_RE.finditer(text):
        if previous is not None:
            yield previous
        previous, end = match.group(), match.end()
    if previous is None:
        if text:
            yield text
        return
    yield previous + text[end:]  # trailing whitespace goes with the last word


LOGPROBS = "message.output_text.logprobs"
"""The `include` value that asks for the text's log probabilities."""


def text_logprobs(piece: str, top: int) -> list[dict[str, Any]]:
    """A text delta's log probabilities as the Responses API gives them: one entry
    for the delta, with a deterministic `logprob` from its length and `top` made-up
    alternatives (the delta in upper case). The built-in model's and the simulated
    upstream's (which gives them in Chat's shape too)."""
    alternatives = [{"token": piece.upper(), "logprob": -2.5}] * top
    return [{"token": piece, "logprob": -len(piece) / 100, "top_logprobs": alternatives}]


def argument_deltas(arguments: str, parts: int = 3) -> list[str]:
    """Split function-call arguments into a few deltas."""
    if len(arguments) < parts:
        return [arguments] if arguments else []
    size = -(-len(arguments) // parts)
    return [arguments[i : i + size] for i in range(0, len(arguments), size)]


def last_user_message(items: Sequence[dict[str, Any]]) -> int | None:
    """The index of the newest user message that is not a compaction's summary (read
    as context, not as what the user asks)."""
    for index in range(len(items) - 1, -1, -1):
        item = items[index]
        if (
            item.get("type", "message") == "message"
            and item.get("role") == "user"
            and not message_text(item).startswith(SUMMARY_HEADER)
        ):
            return index
    return None


def _answered_calls(items: Sequence[dict[str, Any]], names: set[str]) -> list[tuple[str, str]]:
    """(name, output) of each call to one of `names` in `items` that has its output,
    in the calls' order (a call's newest output when it has several)."""
    outputs = {
        item.get("call_id"): output_text(item)
        for item in items
        if item.get("type") in ("function_call_output", "custom_tool_call_output")
    }
    return [
        (str(item.get("name")), outputs[item.get("call_id")])
        for item in items
        if item.get("type") in ("function_call", "custom_tool_call")
        and item.get("name") in names
        and item.get("call_id") in outputs
    ]


def _outputs_for(items: Sequence[dict[str, Any]], names: set[str]) -> list[str]:
    return [output for _name, output in _answered_calls(items, names)]


def _parse_sleep(rest: str) -> int:
    try:
        value = int(rest.split()[0]) if rest else 0
    except ValueError:
        return 0
    return max(0, min(value, MAX_SLEEP_MS))


MAX_COUNT_DIGITS = 9
"""The longest `/repeat` count: far more calls than any conversation makes."""


def _is_count(word: str) -> bool:
    """ASCII digits only (`str.isdigit` also takes '²', which `int` refuses), and few
    enough that `int` takes them (it refuses more than 4,300)."""
    return word.isascii() and word.isdigit() and len(word) <= MAX_COUNT_DIGITS


def _parse_directive(command: str, rest: str) -> _Directive | None:
    if command == "/fail":
        return _Directive("fail")
    if command == "/transcript":
        return _Directive("transcript")
    if command == "/call":
        parts = rest.split(maxsplit=1)
        if parts:
            return _Directive("call", (Call(parts[0], parts[1] if len(parts) > 1 else "{}"),))
    if command == "/custom":
        parts = rest.split(maxsplit=1)
        if parts:
            custom = Call(parts[0], parts[1] if len(parts) > 1 else "", custom=True)
            return _Directive("call", (custom,))
    if command == "/repeat":
        parts = rest.split(maxsplit=2)
        if len(parts) >= 2 and _is_count(parts[0]):
            wanted = Call(parts[1], parts[2] if len(parts) > 2 else "{}")
            return _Directive("repeat", (wanted,), int(parts[0]))
    return None
