"""Command-line pieces for upstreams: `serve --upstream ...` and `simulate-upstream`.

`serve` flags take their defaults from `WARMSOCKET_<FLAG>`; `simulate-upstream` flags
from `WARMSOCKET_SIM_<FLAG>` (so the two never share a variable).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from warmsocket.backends.base import Backend
    from warmsocket.metrics import Metrics
    from warmsocket.upstream import UpstreamConfig


def add_serve_flags(serve: argparse.ArgumentParser) -> None:
    from warmsocket.cli import (
        _EnvDefaults,
        _non_negative_float,
        _non_negative_int,
        _positive_float,
        _positive_int,
    )

    group = serve.add_argument_group(
        "upstream",
        "Without --upstream the built-in model answers. With it, every turn goes to an "
        "OpenAI-compatible server (vLLM, SGLang, llama.cpp, Ollama, OpenAI, xAI, another "
        "warmsocket) as one full request; see docs/upstreams.md. The other flags here "
        "need --upstream.",
    )
    opt = _EnvDefaults(group)
    opt.add(
        "--upstream",
        default=[],
        action="append",
        env_split=True,
        metavar="URL",
        help="base URL of an OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1 "
        "(repeat it for replicas of one model; the env var takes a comma-separated list)",
    )
    # The rest mean nothing without --upstream: given on the command line without
    # one, they are a usage error (not silently ignored). Their environment variables
    # are still checked, but allowed without one.
    opt.requires = "--upstream"
    opt.add(
        "--upstream-api",
        default="chat",
        choices=["chat", "responses", "responses-ws"],
        help="how turns are sent: 'chat' (POST /chat/completions), 'responses' (POST "
        "/responses with store=false) or 'responses-ws' (WebSocket mode on /responses, "
        "chained with the upstream's own previous_response_id)",
    )
    opt.add(
        "--upstream-api-key",
        default=None,
        metavar="KEY",
        help="sent upstream as 'Authorization: Bearer KEY' (the clients' own keys are "
        "not, unless --upstream-forward-key)",
    )
    opt.add(
        "--upstream-forward-key",
        default=False,
        action="store_true",
        help="send each client's own bearer token upstream in place of --upstream-api-key "
        "(which then serves requests without one), so the upstream bills and limits each "
        "client on its own key and answers a key it refuses with its own 401 (responses-ws: "
        "each upstream connection carries one key's turns)",
    )
    opt.add(
        "--upstream-model-map",
        default=[],
        action="append",
        env_split=True,
        metavar="CLIENT=UPSTREAM",
        help="rename models on the way up, e.g. gpt-4o=Qwen/Qwen3-8B; '*=NAME' renames "
        "every other model (repeatable; responses keep the client's name)",
    )
    opt.add(
        "--upstream-connect-timeout",
        default=10.0,
        type=_positive_float,
        help="seconds to open a connection to an upstream",
    )
    opt.add(
        "--upstream-timeout",
        default=600.0,
        type=_positive_float,
        help="seconds to wait for an upstream's answer to start, and between its pieces; "
        "then the turn is retried or fails",
    )
    opt.add(
        "--upstream-retries",
        default=2,
        type=_non_negative_int,
        help="extra attempts after an upstream 5xx, timeout or broken connection, only "
        "while nothing has reached the client yet (on another replica at once; on the "
        "same one after its Retry-After up to 2 s, else 0.25 s doubling up to 2 s; a "
        "longer Retry-After goes to the client instead)",
    )
    opt.add(
        "--upstream-context-window",
        default=0,
        type=_non_negative_int,
        metavar="TOKENS",
        help="the upstream model's context window, for requests with 'truncation: "
        "auto' (chat API: the oldest turns are left out to fit it); 0 = the "
        "max_model_len its GET /models lists (vLLM, SGLang), else no truncation",
    )
    opt.add(
        "--upstream-max-idle",
        default=64,
        type=_positive_int,
        help="idle keep-alive connections kept per upstream replica",
    )
    opt.add(
        "--upstream-ws-lifetime",
        default=3300.0,
        type=_positive_float,
        help="responses-ws: seconds after which an upstream connection gets no new turn "
        "and is replaced at a turn boundary (OpenAI closes them at 60 minutes)",
    )
    opt.add(
        "--upstream-ws-warm",
        default=1,
        type=_non_negative_int,
        help="responses-ws: idle upstream connections kept open per replica",
    )
    opt.add(
        "--affinity-prefix-blocks",
        default=4,
        type=_positive_int,
        help="replicas: new chains are placed by a hash of this many leading token blocks",
    )
    opt.add(
        "--affinity-block-tokens",
        default=16,
        type=_positive_int,
        help="replicas: tokens per block (match the engine's KV cache block size)",
    )
    opt.add(
        "--affinity-busy-ratio",
        default=2.0,
        type=_positive_float,
        help="replicas: leave a chain's replica when its requests in flight exceed this "
        "many times the least busy replica's (plus one)",
    )
    opt.add(
        "--affinity-busy-min",
        default=4,
        type=_positive_int,
        help="replicas: ... and it has at least this many requests in flight",
    )
    opt.add(
        "--affinity-fail-threshold",
        default=2,
        type=_positive_int,
        help="replicas: consecutive failures that take a replica out of rotation",
    )
    opt.add(
        "--affinity-cooldown",
        default=10.0,
        type=_non_negative_float,
        help="replicas: seconds a failing replica stays out of rotation",
    )


def config_from_args(args: argparse.Namespace) -> UpstreamConfig:
    from warmsocket.upstream import parse_model_map

    try:
        model_map = parse_model_map(list(args.upstream_model_map or ()))
    except ValueError as exc:
        raise SystemExit(f"warmsocket: --upstream-model-map: {exc}") from None
    from warmsocket.httpclient import Origin

    for url in args.upstream:
        try:
            Origin.parse(url)
        except ValueError as exc:
            raise SystemExit(f"warmsocket: --upstream: {exc}") from None
    try:
        return _upstream_config(args, model_map)
    except ValueError as exc:
        raise SystemExit(f"warmsocket: {exc}") from None


def _upstream_config(args: argparse.Namespace, model_map: dict[str, str]) -> UpstreamConfig:
    from warmsocket.router import RouterConfig
    from warmsocket.upstream import UpstreamConfig

    return UpstreamConfig(
        urls=tuple(args.upstream),
        api=args.upstream_api,
        api_key=args.upstream_api_key,
        forward_key=args.upstream_forward_key,
        connect_timeout=args.upstream_connect_timeout,
        timeout=args.upstream_timeout,
        retries=args.upstream_retries,
        model_map=model_map,
        max_idle_connections=args.upstream_max_idle,
        context_window=args.upstream_context_window or None,
        ws_lifetime=args.upstream_ws_lifetime,
        ws_warm_connections=args.upstream_ws_warm,
        router=RouterConfig(
            block_tokens=args.affinity_block_tokens,
            prefix_blocks=args.affinity_prefix_blocks,
            busy_ratio=args.affinity_busy_ratio,
            busy_min=args.affinity_busy_min,
            fail_threshold=args.affinity_fail_threshold,
            cooldown=args.affinity_cooldown,
        ),
    )


def client_models(args: argparse.Namespace) -> tuple[str, ...]:
    """What GET /v1/models lists in front of an upstream: the names a client can send
    that warmsocket knows the upstream serves. Any name is accepted in a request and
    sent upstream (renamed by --upstream-model-map), so the list is what the operator
    said: the --model names when given (the built-in model's default name is not
    listed: it does not answer here), each CLIENT name of --upstream-model-map, and
    for '*=NAME' the NAME every other client name is sent as. Empty when none is
    given: warmsocket does not know the upstream's own names then."""
    from warmsocket.upstream import parse_model_map

    names = [] if args.model in (None, ["warmsocket-mock"]) else list(args.model)
    try:
        model_map = parse_model_map(list(args.upstream_model_map or ()))
    except ValueError as exc:
        raise SystemExit(f"warmsocket: --upstream-model-map: {exc}") from None
    names += [target if name == "*" else name for name, target in model_map.items()]
    return tuple(dict.fromkeys(names))


def describe(args: argparse.Namespace) -> dict[str, object]:
    """The upstream's fields of `serve`'s `listening` line: its URLs as warmsocket
    uses them (scheme, host, port, path: never the credentials or query a URL may
    hold) and its API."""
    from warmsocket.httpclient import Origin

    return {
        "upstream": [str(Origin.parse(url)) for url in args.upstream],
        "upstream_api": args.upstream_api,
    }


def build_backend(config: UpstreamConfig, metrics: Metrics | None = None) -> Backend:
    """The upstream backend for `config` (sharing `metrics` with the server)."""
    if config.api == "chat":
        from warmsocket.backends.chat import ChatBackend

        return ChatBackend(config, metrics=metrics)
    if config.api == "responses":
        from warmsocket.backends.responses_http import ResponsesHTTPBackend

        return ResponsesHTTPBackend(config, metrics=metrics)
    from warmsocket.backends.responses_ws import ResponsesWSBackend

    return ResponsesWSBackend(config, metrics=metrics)


def backend_from_args(args: argparse.Namespace, metrics: Metrics | None = None) -> Backend:
    from warmsocket.malloc_tuning import keep_freed_memory

    config = config_from_args(args)
    keep_freed_memory()  # every turn now builds context-sized buffers (malloc_tuning.py)
    return build_backend(config, metrics)


# -- simulate-upstream ----------------------------------------------------------------------


def add_simulate_command(commands: Any) -> None:
    from warmsocket.cli import (
        _EnvDefaults,
        _non_negative_float,
        _non_negative_int,
        _port,
        _positive_float,
        _positive_int,
    )

    sim = commands.add_parser(
        "simulate-upstream",
        help="run a simulated OpenAI-compatible inference server (for tests and benchmarks)",
        description="A real HTTP server speaking Chat Completions (POST /v1/chat/completions) "
        "and the Responses API (POST /v1/responses, and WebSocket mode on GET "
        "/v1/responses), streamed or not, answering with the built-in model's rules. "
        "Latency model: a fixed overhead, then prefill time for every prompt token not "
        "in its prefix cache (token blocks with chained hashes, LRU, like an inference "
        "engine), then decode time per output token. GET /stats reports every request "
        "it received (GET /stats?bodies=1 with the bodies); POST /control injects "
        "faults. See docs/upstreams.md.",
        epilog="Every flag can also be set with the environment variable shown.",
    )
    opt = _EnvDefaults(sim, prefix="WARMSOCKET_SIM_")
    opt.add("--host", default="127.0.0.1", help="address to listen on")
    opt.add("--port", default=8000, type=_port, help="port to listen on (0 picks a free one)")
    opt.add(
        "--model",
        default=["warmsocket-sim"],
        action="append",
        env_split=True,
        help="model name(s) listed by GET /v1/models (any name is accepted)",
    )
    opt.add(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' (HTTP 401 otherwise)",
    )
    opt.add(
        "--max-model-len",
        default=0,
        type=_non_negative_int,
        help="the model's context window in tokens, as vLLM's --max-model-len: listed "
        "in GET /v1/models, and a request whose prompt and output limit exceed it is "
        "refused with vLLM's 400 (0 = no limit)",
    )
    opt.add(
        "--overhead-ms",
        default=0.0,
        type=_non_negative_float,
        help="fixed milliseconds before every answer",
    )
    opt.add(
        "--prefill-tokens-per-second",
        default=0.0,
        type=_non_negative_float,
        help="prefill speed for prompt tokens not in the prefix cache (0 = instant)",
    )
    opt.add(
        "--decode-tokens-per-second",
        default=0.0,
        type=_non_negative_float,
        help="decode speed: pace of the streamed output (0 = instant)",
    )
    opt.add(
        "--block-tokens",
        default=16,
        type=_positive_int,
        help="tokens per prefix-cache block",
    )
    opt.add(
        "--cache-blocks",
        default=1 << 20,
        type=_positive_int,
        help="prefix-cache capacity in blocks (least recently used blocks are evicted)",
    )
    opt.add(
        "--ws-lifetime",
        default=3600.0,
        type=_positive_float,
        help="seconds a WebSocket-mode connection lives; then "
        "'websocket_connection_limit_reached' and a close",
    )
    opt.add(
        "--record-bodies",
        default=256,
        type=_non_negative_int,
        help="keep the bodies of the latest N requests for GET /stats?bodies=1",
    )
    opt.add(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log level",
    )
    opt.add(
        "--log-format",
        default="json",
        choices=["json", "text"],
        help="log format",
    )


def simulate_command(args: argparse.Namespace) -> int:
    import asyncio
    import logging
    import signal

    from warmsocket import logs
    from warmsocket.cli import run_async
    from warmsocket.malloc_tuning import keep_freed_memory
    from warmsocket.simulate.model import LatencyModel
    from warmsocket.simulate.server import SimConfig, SimServer

    logs.configure(args.log_level, args.log_format)
    keep_freed_memory()
    log = logging.getLogger("warmsocket.simulate")
    config = SimConfig(
        host=args.host,
        port=args.port,
        models=tuple(args.model or ("warmsocket-sim",)),
        latency=LatencyModel(
            overhead_ms=args.overhead_ms,
            prefill_tokens_per_second=args.prefill_tokens_per_second,
            decode_tokens_per_second=args.decode_tokens_per_second,
        ),
        block_tokens=args.block_tokens,
        cache_blocks=args.cache_blocks,
        ws_lifetime=args.ws_lifetime,
        record_bodies=args.record_bodies,
        api_key=args.api_key,
        max_model_len=args.max_model_len or None,
    )

    async def main() -> int:
        server = SimServer(config)
        try:
            await server.start()
        except OSError as exc:
            logs.cannot_listen(log, config.host, config.port, exc)
            return 1
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        log.info(
            "listening", extra={"url": logs.listening_url("http", config.host, server.port, "/v1")}
        )
        await stop.wait()
        await server.close()
        return 0

    try:
        return int(run_async(main()))
    except KeyboardInterrupt:
        return 0
