"""The `warmsocket` command line.

Every `serve` flag can also be set with an environment variable: `--max-lanes 8` is
`WARMSOCKET_MAX_LANES=8`. A flag given on the command line wins; a variable's value is
converted and checked exactly as the flag's would be.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from warmsocket import __version__

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


MAX_SIZE = 1 << 50
"""The largest size a flag takes (1 PiB): past it no machine has the memory, and the
Rust core's counters would overflow (a traceback, not a usage error)."""


def parse_size(text: str) -> int:
    """Bytes from '1048576', '512k', '64MiB', '1G' (binary units)."""
    match = _SIZE_RE.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 1048576, 512K, 64M, 1G)")
    number, unit = match.groups()
    factor = _SIZE_UNITS[(unit or "")[:1].lower()]
    value = float(number) * factor
    if not value <= MAX_SIZE:  # (also an overflow to infinity)
        raise argparse.ArgumentTypeError(f"too large: {text!r} (at most 1024T)")
    return int(value)


def _size_at_least(minimum: str) -> Callable[[str], int]:
    """`parse_size`, refusing sizes under `minimum` (e.g. '--memory-budget 512', meant
    as megabytes, is 512 bytes: nothing would fit)."""
    floor = parse_size(minimum)

    def size(text: str) -> int:
        value = parse_size(text)
        if value < floor:
            hint = ""
            if value > 0 and text.strip().isdigit():
                hint = f"; did you mean {text.strip()}{minimum[-1]}?"  # the minimum's unit
            raise argparse.ArgumentTypeError(
                f"too small: {text!r} is {value} bytes, under the minimum of {minimum}{hint} "
                "(a size is bytes unless it has a unit: K, M, G = KiB, MiB, GiB)"
            )
        return value

    return size


_TOKENIZER_NAMES = ("o200k_base", "cl100k_base", "none")  # engine.tokenizer_for


def _tokenizer(text: str) -> str:
    """--tokenizer: an encoding name, 'none', 'auto' (by model name), or a file that
    exists (whether it can be read is checked at start, with the OS's reason)."""
    if text in _TOKENIZER_NAMES or text == "auto" or os.path.exists(text):
        return text
    names = ", ".join(map(repr, (*_TOKENIZER_NAMES, "auto")))
    raise argparse.ArgumentTypeError(
        f"{text!r} is neither a tokenizer name nor an existing file "
        f"(choose from {names}, or the path of a Hugging Face tokenizer.json)"
    )


def _api_key(text: str) -> str:
    """--api-key: a key, not empty and without spaces around it (a request's token is
    stripped, so such a key could never match; an empty one would let requests
    without a key in, with auth shown as on)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(
            "an empty key (is the variable it was given from set?); leave --api-key out "
            "to serve without keys"
        )
    if text != text.strip():
        raise argparse.ArgumentTypeError("a key with spaces around it could never match")
    return text


def _not_empty(what: str, hint: str) -> Callable[[str], str]:
    """A value that may not be empty: given from an unset variable (`--host "$HOST"`),
    it would otherwise change what the server does without a word (`hint`)."""

    def parse(text: str) -> str:
        if not text:
            raise argparse.ArgumentTypeError(f"an empty {what}; {hint}")
        return text

    return parse


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if math.isnan(value):
        raise argparse.ArgumentTypeError(f"not a number: {text!r}")
    if math.isinf(value):
        # ('inf', '1e999': no timer takes it, and the JSON log would write Infinity,
        # which strict JSON readers refuse.)
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def _positive_float(text: str) -> float:
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0: {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0: {text}")
    return value


def _positive_int(text: str) -> int:
    value = _int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {text}")
    return value


def _port(text: str) -> int:
    """A TCP port to listen on: 0 to 65535 (0: the system picks a free one)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"not a port: {text!r} (0 to 65535; 0 picks a free one)")
    return value


class _AppendReplacing(argparse.Action):
    """Like action='append', but values given on the command line replace the default."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        marker = f"_{self.dest}_given"
        current = getattr(namespace, self.dest) if getattr(namespace, marker, False) else []
        setattr(namespace, self.dest, [*current, values])
        setattr(namespace, marker, True)


DEFAULT_REDIS_TTL = 30 * 24 * 3600
"""`--redis-ttl`: as `shared_store.DEFAULT_TTL` (not imported: that imports redis)."""

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


def _env_flag(raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"invalid value: {raw!r} (expected 1/0, true/false, yes/no)")


def _checked(action: argparse.Action, text: str) -> Any:
    """`text` as the value of `action`, converted and checked as argparse does a flag's
    value (the same type, the same choices, the same messages)."""
    value: Any = text
    if callable(action.type):
        try:
            value = action.type(text)
        except argparse.ArgumentTypeError:
            raise
        except (TypeError, ValueError):
            name = getattr(action.type, "__name__", repr(action.type))
            raise argparse.ArgumentTypeError(f"invalid {name} value: {text!r}") from None
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(map(repr, action.choices))
        raise argparse.ArgumentTypeError(f"invalid choice: {value!r} (choose from {choices})")
    return value


class _EnvDefault:
    """The default of an `_EnvDefaults` option until the command line is parsed: the
    code's default, or the raw text of the option's environment variable."""

    def __init__(
        self,
        default: Any,
        env_name: str,
        raw: str | None,
        kind: str,
        requires: str | None,
        excludes: str | None = None,
    ) -> None:
        self.default = default
        self.env_name = env_name
        self.raw = raw
        self.kind = kind  # "flag" (store_true), "list" (comma-separated) or "value"
        self.requires = requires  # a flag this one means nothing without
        self.excludes = excludes  # a flag this one means nothing with

    def resolve(self, action: argparse.Action) -> Any:
        """The value; raises ArgumentTypeError when the variable's text is not one."""
        raw = self.raw
        if raw is None:
            if isinstance(self.default, str) and callable(action.type):
                return action.type(self.default)  # as argparse converts a string default
            return self.default
        if self.kind == "flag":
            return _env_flag(raw)
        if self.kind == "list":
            if action.type is _api_key:
                # Every entry is a key: an empty one ("$K1,$K2" with a variable unset,
                # or the whole variable empty) would leave the server without keys.
                return [_checked(action, part.strip()) for part in raw.split(",")]
            return [_checked(action, part.strip()) for part in raw.split(",") if part.strip()]
        return _checked(action, raw)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that resolves its `_EnvDefaults` options after parsing: one the
    command line did not give takes its environment variable, converted and checked
    exactly as the flag's value would be (a bad one is a usage error naming the
    variable, exit status 2), or else its default. Only the subcommand being run reads
    its variables, so a bad one never breaks another subcommand or --help.

    An option added with `requires` and given on the command line is a usage error
    when the option it requires has no value (from the command line or the
    environment), one added with `excludes` when the option it excludes has one: it
    would be silently ignored. From the environment it is allowed, as
    variables are often shared by several processes' configurations."""

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, rest = super().parse_known_args(args, namespace)
        given: list[tuple[argparse.Action, _EnvDefault]] = []
        for action in self._actions:
            spec = action.default
            if not isinstance(spec, _EnvDefault):
                continue
            on_command_line = getattr(parsed, action.dest, None) is not spec
            if on_command_line:
                given.append((action, spec))
                continue
            try:
                setattr(parsed, action.dest, spec.resolve(action))
            except argparse.ArgumentTypeError as exc:
                self.error(f"{spec.env_name}: {exc}")
        for action, spec in given:
            required, excluded = spec.requires, spec.excludes
            if required and not getattr(parsed, required.lstrip("-").replace("-", "_"), None):
                self.error(f"{action.option_strings[0]} needs {required}")
            if excluded and getattr(parsed, excluded.lstrip("-").replace("-", "_"), None):
                self.error(f"{action.option_strings[0]} has no effect with {excluded}")
        return parsed, rest


class _EnvDefaults:
    """Adds options whose default comes from WARMSOCKET_<NAME>, and says so in --help.

    The variable is read when the parser is built and checked when its subcommand is
    parsed (`_Parser`), exactly as the flag's value would be."""

    def __init__(self, parser: argparse.ArgumentParser | Any, prefix: str = "WARMSOCKET_") -> None:
        self.parser = parser
        self.prefix = prefix
        self.requires: str | None = None  # see `_Parser`
        self.excludes: str | None = None  # see `_Parser`

    def add(
        self,
        flag: str,
        *,
        default: Any,
        help: str,
        type: Callable[[str], Any] | None = None,
        env_split: bool = False,
        min_size: str | None = None,
        **kwargs: Any,
    ) -> None:
        """`min_size`: the option is a size (`parse_size`) of at least this much."""
        if min_size is not None:
            type = _size_at_least(min_size)
            kwargs.setdefault("metavar", "SIZE")
            help += (
                "; in bytes, or with a binary unit (K = KiB, M = MiB, G = GiB), "
                f"at least {min_size}"
            )
        env_name = self.prefix + flag.lstrip("-").replace("-", "_").upper()
        if kwargs.get("action") == "store_true":
            kind = "flag"
        elif env_split:
            kind = "list"
        else:
            kind = "value"
        spec = _EnvDefault(
            default, env_name, os.environ.get(env_name), kind, self.requires, self.excludes
        )
        if kwargs.get("action") == "append":
            kwargs["action"] = _AppendReplacing
        if default is None or default == []:
            shown = ""
        elif isinstance(default, list):
            shown = f" (default: {', '.join(map(str, default))})"
        else:
            shown = f" (default: {default})"
        if type is not None:
            kwargs["type"] = type
        self.parser.add_argument(
            flag, default=spec, help=f"{help}{shown} [env: {env_name}]", **kwargs
        )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="warmsocket",
        description="OpenAI Responses API WebSocket mode (and HTTP mode) with a Rust "
        "session-state cache, in front of any OpenAI-compatible backend.",
        epilog="Run 'warmsocket COMMAND --help' for a command's flags. Every flag of serve "
        "can also be set with an environment variable (--max-lanes 8 is "
        "WARMSOCKET_MAX_LANES=8), every flag of simulate-upstream with a WARMSOCKET_SIM_ "
        "one; a flag given on the command line wins.",
    )
    parser.add_argument("--version", action="version", version=f"warmsocket {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run the server (WebSocket mode and HTTP mode on one port)",
        description="Serve the Responses API on one port: GET /v1/responses upgraded to a "
        "WebSocket (WebSocket mode), POST /v1/responses (JSON or SSE; background: true "
        "too), GET/DELETE /v1/responses/{id} (?stream=true&starting_after=N for a "
        "background one), POST /v1/responses/{id}/cancel, GET /v1/responses/{id}/"
        "input_items, POST /v1/responses/compact, POST /v1/responses/input_tokens, "
        "/v1/conversations (and their items), GET /v1/models, GET /healthz and GET "
        "/metrics (Prometheus). README.md has the table.",
        epilog="Every flag can also be set with the environment variable shown.",
    )
    opt = _EnvDefaults(serve)
    net = serve.add_argument_group("network")
    opt.parser = net
    opt.add(
        "--host",
        default="127.0.0.1",
        type=_not_empty("address", "give 0.0.0.0 (or ::) to listen on every interface"),
        help="address to listen on",
    )
    opt.add("--port", default=8080, type=_port, help="port to listen on (0 picks a free one)")
    opt.add(
        "--api-key",
        default=[],
        action="append",
        env_split=True,
        type=_api_key,
        help="accept this API key (repeatable; the env var takes a comma-separated list). "
        "When any is given, 'Authorization: Bearer <key>' is required and a bad key gets "
        "HTTP 401 before the WebSocket upgrade. Each key's responses are private to it",
    )
    opt.add(
        "--reuse-port",
        default=False,
        action="store_true",
        help="let several serve processes listen on the same --host and --port (Linux "
        "SO_REUSEPORT; each must say it): the kernel spreads new connections over them, "
        "one core each. A WebSocket stays with its process; give them --redis-url so "
        "that stored responses, background responses and conversations are shared",
    )
    opt.add(
        "--metrics-port",
        default=None,
        type=_port,
        help="also listen on this port (same --host, plain HTTP even with --tls-cert), for "
        "GET /healthz and GET /metrics only: for probes and scrapes that should not share "
        "the API's port, and for one process among several on one --reuse-port port. It "
        "stays open while the server drains, so /healthz can say 'draining'",
    )
    opt.add(
        "--tls-cert",
        default=None,
        metavar="PATH",
        type=_not_empty("path", "leave the flag out to serve without it"),
        help="serve https:// and wss:// with this PEM certificate chain (the server's "
        "certificate first); without it, plain HTTP (end TLS in front of the server, or "
        "keep it on loopback)",
    )
    opt.add(
        "--tls-key",
        default=None,
        metavar="PATH",
        type=_not_empty("path", "leave the flag out to serve without it"),
        help="the PEM private key of --tls-cert, without a password (default: in the "
        "certificate file)",
    )
    opt.add(
        "--tls-client-ca",
        default=None,
        metavar="PATH",
        type=_not_empty("path", "leave the flag out to serve without it"),
        help="require clients to present a certificate signed by a CA in this PEM bundle "
        "(mutual TLS; only these CAs are trusted for it). The openai SDK sends one with "
        "http_client=httpx.Client(verify=context) and, for responses.connect(), "
        "websocket_connection_options={'ssl': context}, where context has the client's "
        "certificate loaded. Read again when --tls-cert is (SIGHUP, or its files change)",
    )
    opt.add(
        "--owner-by-client-certificate",
        default=False,
        action="store_true",
        help="with --tls-client-ca: each client certificate's issuer and names (its "
        "subject and subject alternative names, e.g. a SPIFFE ID) are part of who owns a response, "
        "besides the API key, so that clients with different certificates never see or "
        "continue each other's responses, conversations or background runs, even on one "
        "key or none. A renewed certificate with the same names from the same CA keeps "
        "its owner. Without it the certificate only admits a client",
    )
    opt.add(
        "--allowed-origin",
        default=[],
        action="append",
        env_split=True,
        metavar="ORIGIN",
        help="a web page origin whose requests are served, e.g. https://app.example.com "
        "(repeatable; the env var takes a comma-separated list; '*' for any). Browsers "
        "send an Origin header, SDKs and agents do not; a request with one that is not "
        "listed gets HTTP 403, so that a web site a user visits cannot use this server "
        "through their browser (a WebSocket is not protected by CORS). Allowed pages get "
        "CORS headers",
    )
    opt.add(
        "--allowed-host",
        default=[],
        action="append",
        env_split=True,
        metavar="NAME",
        help="a host name requests may be addressed to, e.g. api.example.com or "
        ".example.com (or *.example.com) for the names under it (repeatable; the env "
        "var takes a comma-separated list; '*' for any). With --host on loopback, a request for a "
        "name other than localhost, an IP address or these gets HTTP 403 (a web site "
        "could otherwise reach the server through DNS rebinding); on other interfaces "
        "any name is served unless some are listed",
    )
    limits = serve.add_argument_group("limits")
    opt.parser = limits
    opt.add(
        "--max-message-bytes",
        default="32M",
        min_size="1K",
        help="largest client message (WebSocket message or HTTP body); larger ones get a "
        "'message_too_large' error: on a WebSocket on their lane, and the connection stays "
        "usable; over HTTP a 413, and the connection closes",
    )
    opt.add(
        "--max-item-bytes",
        default="32M",
        min_size="1K",
        help="largest single input or output item",
    )
    opt.add(
        "--connection-lifetime",
        default=3600.0,
        type=_positive_float,
        help="seconds a WebSocket may live; then 'websocket_connection_limit_reached' and "
        "a clean close once in-flight responses finish",
    )
    opt.add(
        "--close-grace",
        default=30.0,
        type=_non_negative_float,
        help="seconds in-flight responses get to finish after the lifetime ends",
    )
    opt.add(
        "--shutdown-timeout",
        default=25.0,
        type=_non_negative_float,
        help="on SIGTERM or Ctrl-C: seconds the responses under way (streams, background "
        "responses) get to finish while no new connections are taken (/healthz on "
        "--metrics-port says 'draining'; the API port refuses connections); then "
        "everything closes (a second signal closes at once; 0: at once), "
        "and what is still to be written to Redis gets what is left of it (2 to 10 s). "
        "Keep it 2 s under your orchestrator's grace period (Kubernetes: 30 s)",
    )
    opt.add(
        "--max-connections",
        default=0,
        type=_non_negative_int,
        help="connections (HTTP and WebSocket) kept open at once. Past it an idle HTTP "
        "keep-alive connection is closed to make room, else the new connection is "
        "answered 503 'server_is_overloaded' with Retry-After (GET /healthz and /metrics "
        "are still answered). 0: as many as the open-file limit allows (raised to its "
        "hard limit at start), less 64; half that with --upstream, whose turns hold "
        "upstream connections too",
    )
    opt.add(
        "--max-connections-per-key",
        default=0,
        type=_non_negative_int,
        help="what one API key (bearer token; requests without one count as one key) "
        "holds at once: open WebSockets, HTTP creates and compactions being answered, "
        "background responses running. Past it its new ones get 429 "
        "'rate_limit_exceeded' with Retry-After, so that one client cannot take the "
        "connections or model turns of all; requests that run no model (retrieve, "
        "cancel, delete, lists) are not limited. 0: no limit but --max-connections",
    )
    opt.add(
        "--requests-per-minute-per-key",
        default=0,
        metavar="N",
        type=_non_negative_int,
        help="model requests (creates over HTTP and WebSocket, warm-ups, compactions) one "
        "API key may make per minute. A key may make a minute's worth at once, then one "
        "every 60/N seconds; past it a request gets 429 'rate_limit_exceeded' with "
        "Retry-After, retry-after-ms and x-ratelimit-*-requests headers (on a WebSocket "
        "an error event on the create's lane; the connection and the chain go on). With "
        "--redis-url the count is shared by all processes on that Redis (one Redis round "
        "trip per request; while Redis does not answer each process counts its own). "
        "0: no limit",
    )
    opt.add(
        "--tokens-per-minute-per-key",
        default=0,
        metavar="N",
        type=_non_negative_int,
        help="input plus output tokens (the responses' usage, compactions' too) one API "
        "key's responses may use per minute. Each response's tokens are counted when it "
        "ends, from a bucket of a minute's tokens refilled at N/60 a second; while a "
        "key's bucket is empty its creates and compactions get 429 'rate_limit_exceeded' "
        "with Retry-After and x-ratelimit-*-tokens headers, as for "
        "--requests-per-minute-per-key (and shared through --redis-url the same way). "
        "0: no limit",
    )
    opt.add(
        "--max-lanes", default=32, type=_positive_int, help="named stream_id lanes per connection"
    )
    opt.add(
        "--max-active-responses",
        default=16,
        type=_positive_int,
        help="responses running at once per connection; more are queued, not rejected",
    )
    opt.add(
        "--max-queued-requests",
        default=1024,
        type=_positive_int,
        help="requests a connection may have waiting before 'server_is_overloaded'",
    )
    opt.add(
        "--max-queued-bytes",
        default="64M",
        min_size="1K",
        help="bytes (input items and settings) the requests a connection has waiting may "
        "hold before 'server_is_overloaded'",
    )
    opt.add(
        "--memory-budget",
        default="1G",
        min_size="1M",
        help="session cache budget (LRU eviction; live lanes are never evicted)",
    )
    opt.add(
        "--conversation-budget",
        default="256M",
        min_size="1K",
        help="item bytes the Conversations API's conversations may hold in all; past it "
        "adding items is refused (503) and nothing kept is dropped",
    )
    opt.add(
        "--ws-ping-interval",
        default=20.0,
        type=_non_negative_float,
        help="seconds between server pings to detect dead peers (0 disables)",
    )
    opt.add(
        "--http-idle-timeout",
        default=75.0,
        type=_non_negative_float,
        help="seconds an HTTP connection with no request being answered waits for the "
        "client: a keep-alive connection is then closed, a request body with no bytes "
        "for that long gets 408 (0 disables). Longer than the 60 s idle timeout of common "
        "load balancers, so that they, not this server, close idle connections. Also how "
        "long any connection (HTTP or WebSocket) may leave what it was sent unread while "
        "the server waits to send more or to close: then it is reset",
    )
    opt.add(
        "--http-head-timeout",
        default=30.0,
        type=_non_negative_float,
        help="seconds from a request head's first byte to its end; a slower head gets 408 "
        "and the connection is closed (0 disables)",
    )
    opt.add(
        "--http-body-timeout",
        default=300.0,
        type=_non_negative_float,
        help="seconds from the end of a request head to the end of its body; a slower body "
        "gets 408 and the connection is closed (0 disables). Bounds how long a client that "
        "trickles its body can hold a connection and its buffer; 300 s (as Node.js's "
        "requestTimeout) lets a --max-message-bytes body of 32M in at about 110 KiB/s",
    )
    state = serve.add_argument_group("state")
    opt.parser = state
    opt.add(
        "--snapshot",
        default=None,
        metavar="PATH",
        help="file to restore stored (store=true) responses from at start and save them "
        "to at shutdown (without --redis-url, conversations too, in PATH.conversations, "
        "and the background responses that failed or were cancelled, shutdown's cancels "
        "included, in PATH.background); store=false state is never written. Its "
        "directory must exist and be writable (checked at start)",
    )
    sharing = serve.add_argument_group(
        "several processes",
        "Replicas of one API share their stored (store=true) responses through Redis: "
        "a response made on one process can be continued by previous_response_id, "
        "retrieved or deleted on any other, and a background response is polled, "
        "cancelled or deleted on any of them. Needs the redis client: "
        "pip install 'redis>=5.0.1' (the redis extra).",
    )
    opt.parser = sharing
    opt.add(
        "--redis-url",
        default=None,
        help="Redis to share stored responses through, e.g. redis://host:6379/0 "
        "(rediss:// for TLS). Every store=true response is written there behind the "
        "turn, and a response not cached here is looked up there; store=false state is "
        "never written. The server does not start when Redis cannot be reached; later "
        "outages are logged and counted, and the server goes on from local state",
    )
    opt.add(
        "--redis-ttl",
        default=DEFAULT_REDIS_TTL,
        type=_positive_int,
        help="seconds a shared response is kept in Redis after it was written (30 days, "
        "as OpenAI keeps stored responses); the ancestors of a response are kept as long "
        "as it is, so a conversation that goes on stays loadable (a chain that stops is "
        "gone at most twice this long after its last walk)",
    )
    opt.add(
        "--redis-prefix",
        default="warmsocket",
        help="prefix of every Redis key and channel (separates deployments sharing one Redis)",
    )
    opt.add(
        "--redis-write-retry",
        default=0.0,
        type=_non_negative_float,
        metavar="SECONDS",
        help="how long a write Redis does not answer (a stored response, a background "
        "response's state, a conversation's new items) is tried again before it is given "
        "up (logged, counted; the process keeps what it wrote). 0: until Redis answers, "
        "so a restart or failover of any length loses nothing while what waits fits the "
        "queues (10,000 stored responses, 100,000 background writes and conversation "
        "additions, and 256 MiB each; past them new writes are dropped and logged)",
    )
    tokens = serve.add_argument_group("token caching and prefix diffing")
    opt.parser = tokens
    opt.add(
        "--tokenizer",
        default=None,
        type=_tokenizer,
        help="how tokens are counted for usage and block-hashed: o200k_base, cl100k_base, "
        "the path of a Hugging Face tokenizer.json, 'none' (estimate from bytes), or "
        "'auto': the encoding of the first --model name (o200k_base when unknown), the "
        "default",
    )
    opt.add(
        "--no-prefix-diffing",
        default=False,
        action="store_true",
        help="do not match full-history requests against cached chains and do not cache "
        "tokens per item (every turn re-validates, re-stores and re-tokenises its whole "
        "context: the naive baseline for benchmarks)",
    )
    model = serve.add_argument_group("model backend")
    opt.parser = model
    opt.add(
        "--model-backend",
        default="mock",
        choices=["mock"],
        help="what answers: 'mock' is the built-in deterministic model (see README)",
    )
    opt.add(
        "--model",
        default=["warmsocket-mock"],
        action="append",
        env_split=True,
        help="model name(s) listed by GET /v1/models (any name is accepted in requests); "
        "with --upstream, the names given here and in --upstream-model-map are listed",
    )
    # The built-in model's knobs mean nothing with an upstream: given on the command
    # line with --upstream, they are a usage error (not silently ignored).
    opt.excludes = "--upstream"
    opt.add(
        "--mock-ttft-ms",
        default=0.0,
        type=_non_negative_float,
        help="built-in model: milliseconds before its first output (not with --upstream)",
    )
    opt.add(
        "--mock-tokens-per-second",
        default=0.0,
        type=_non_negative_float,
        help="built-in model: pace of output deltas, 0 = as fast as possible (not with --upstream)",
    )
    opt.excludes = None
    from warmsocket import upstream_cli  # upstream flags and simulate-upstream live there

    upstream_cli.add_serve_flags(serve)
    logs = serve.add_argument_group("logging")
    opt.parser = logs
    opt.add(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log level",
    )
    opt.add(
        "--no-access-log",
        default=False,
        action="store_true",
        help="no log line per HTTP request (by default one at info level: the request id "
        "the client got in x-request-id, method, path, status, error type and code, "
        "seconds; never a body or query; successful GET /healthz and /metrics are not "
        "logged)",
    )
    opt.add(
        "--log-format",
        default="json",
        choices=["json", "text"],
        help="log format (logs never contain conversation content)",
    )
    upstream_cli.add_simulate_command(commands)
    from warmsocket.bench import cli as bench_cli  # `warmsocket bench` lives there

    bench_cli.add_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        from warmsocket.serve import serve_command

        return serve_command(args)
    if args.command == "simulate-upstream":
        from warmsocket.upstream_cli import simulate_command

        return simulate_command(args)
    if args.command == "bench":
        from warmsocket.bench.cli import bench_command

        return bench_command(args)
    parser.print_help(sys.stderr)
    return 2


def run_async(main_coro: Any) -> Any:
    """Run a coroutine on uvloop when available."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux/macOS
        return asyncio.run(main_coro)
    return uvloop.run(main_coro)
