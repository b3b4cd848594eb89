"""`warmsocket serve`: configuration from flags, logging, signals, snapshot, run."""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import os
import signal
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from warmsocket import admission, hosts, logs, tls, upstream_cli, write_retry
from warmsocket._core import SessionCache, SnapshotError, Tokenizer, TokenizerError
from warmsocket.backends.base import Backend
from warmsocket.backends.mock import MockBackend
from warmsocket.cli import run_async
from warmsocket.engine import (
    BUILTIN_TOKENIZERS,
    Limits,
    SharedResponses,
    new_cache,
    tokenizer_for,
)
from warmsocket.metrics import Metrics
from warmsocket.server import (
    MIN_SHUTDOWN_WRITE_SECONDS,
    SHUTDOWN_WRITE_SECONDS,
    MetricsPortError,
    Server,
    ServerConfig,
)

if TYPE_CHECKING:
    from warmsocket.upstream import UpstreamConfig

log = logging.getLogger("warmsocket")


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The server's configuration. `--max-connections 0` follows the open-file limit in
    force now (`serve_command` raises it first)."""
    limits = Limits(
        max_message_bytes=args.max_message_bytes,
        connection_lifetime=args.connection_lifetime,
        max_named_lanes=args.max_lanes,
        max_active_responses=args.max_active_responses,
        max_queued_requests=args.max_queued_requests,
        max_queued_bytes=args.max_queued_bytes,
        close_grace=args.close_grace,
    )
    return ServerConfig(
        host=args.host,
        port=args.port,
        api_keys=frozenset(args.api_key or ()),
        allowed_origins=tuple(args.allowed_origin or ()),
        allowed_hosts=tuple(args.allowed_host or ()),
        reuse_port=args.reuse_port,
        access_log=not args.no_access_log,
        metrics_port=args.metrics_port,
        limits=limits,
        memory_budget=args.memory_budget,
        max_item_bytes=args.max_item_bytes,
        models=tuple(args.model or ("warmsocket-mock",)),
        listed_models=upstream_cli.client_models(args) if getattr(args, "upstream", None) else None,
        ws_ping_interval=args.ws_ping_interval or None,
        http_idle_timeout=args.http_idle_timeout or None,
        http_head_timeout=args.http_head_timeout or None,
        http_body_timeout=args.http_body_timeout or None,
        tokenizer=args.tokenizer,
        prefix_diffing=not args.no_prefix_diffing,
        shutdown_timeout=args.shutdown_timeout,
        conversation_budget=args.conversation_budget,
        max_connections_per_key=args.max_connections_per_key or None,
        requests_per_minute_per_key=args.requests_per_minute_per_key or None,
        tokens_per_minute_per_key=args.tokens_per_minute_per_key or None,
        owner_by_client_certificate=args.owner_by_client_certificate,
        max_connections=args.max_connections
        or admission.auto_max_connections(
            admission.open_file_limit(),
            upstream=bool(getattr(args, "upstream", None)),
            redis=bool(getattr(args, "redis_url", None)),
        ),
    )


@dataclass(frozen=True, slots=True)
class SharedOptions:
    """`--redis-url`, `--redis-ttl`, `--redis-prefix`, `--redis-write-retry`."""

    url: str
    ttl: int
    prefix: str
    write_retry: float | None = None
    """Seconds a write is tried again; None: until Redis answers."""


def shared_options(args: argparse.Namespace) -> SharedOptions | None:
    if not args.redis_url:
        return None
    return SharedOptions(
        args.redis_url, args.redis_ttl, args.redis_prefix, args.redis_write_retry or None
    )


def shared_store(options: SharedOptions | None) -> SharedResponses | None:
    """The shared store `--redis-url` asks for (imports redis only then). Raises
    RuntimeError with advice when it cannot be made."""
    if options is None:
        return None
    try:
        from warmsocket.shared_store import SharedStore
    except ImportError:
        raise RuntimeError(
            "--redis-url needs the Redis client: pip install 'redis>=5.0.1' (the redis extra)"
        ) from None
    # For every writer behind the turn of this process (stored responses, background
    # responses, conversations), which all write to this Redis.
    write_retry.WRITE_RETRY_SECONDS = options.write_retry
    try:
        return SharedStore.from_url(options.url, ttl_seconds=options.ttl, prefix=options.prefix)
    except ValueError:
        # Not the URL itself in the message: it may carry a password.
        raise RuntimeError(
            "--redis-url is not a Redis URL (redis://host:port/db, rediss://, unix://)"
        ) from None


def backend_from_args(args: argparse.Namespace, metrics: Metrics | None = None) -> Backend:
    if getattr(args, "upstream", None):
        return upstream_cli.backend_from_args(args, metrics)
    # Upstream settings from the environment are allowed without an upstream (shared
    # configurations), but one set while WARMSOCKET_UPSTREAM is not (a typo, a variable
    # not passed on) would leave the built-in model answering real clients unnoticed.
    stray = sorted(name for name in os.environ if name.startswith(UPSTREAM_VARIABLES))
    if stray:
        log.warning(
            "upstream settings without an upstream: the built-in model answers",
            extra={
                "variables": stray,
                "advice": "set --upstream (WARMSOCKET_UPSTREAM) to the upstream's URL",
            },
        )
    return MockBackend(ttft_ms=args.mock_ttft_ms, tokens_per_second=args.mock_tokens_per_second)


UPSTREAM_VARIABLES = ("WARMSOCKET_UPSTREAM_", "WARMSOCKET_AFFINITY_")
"""The prefixes of the environment variables of the upstream flags."""


def flags_fit_together(args: argparse.Namespace, open_files: int) -> bool:
    """Log what is wrong with a combination of flags; False when serve cannot start."""
    if args.tls_key and not args.tls_cert:
        log.error("--tls-key needs --tls-cert (the certificate the key belongs to)")
        return False
    if args.tls_client_ca and not args.tls_cert:
        log.error("--tls-client-ca needs --tls-cert (client certificates are asked for in TLS)")
        return False
    if args.owner_by_client_certificate and not args.tls_client_ca:
        log.error(
            "--owner-by-client-certificate needs --tls-client-ca (and --tls-cert): only "
            "certificates the server verified can say whose a response is"
        )
        return False
    unusable = hosts.not_host_names(args.allowed_host or ())
    if unusable:
        log.error(
            "--allowed-host takes host names (api.example.com, .example.com for a domain and "
            "the names under it, '*' for any), not URLs or addresses with paths",
            extra={"allowed_host": unusable},
        )
        return False
    if args.reuse_port and args.snapshot:
        log.error(
            "--snapshot cannot be used with --reuse-port: each process would overwrite the "
            "others' file at shutdown; share stored responses with --redis-url instead"
        )
        return False
    if args.reuse_port and not args.redis_url:
        log.warning(
            "--reuse-port without --redis-url: a response stored on one process is not "
            "found by the others (HTTP previous_response_id, GET /v1/responses/{id}, "
            "conversations); give every process the same --redis-url"
        )
    reserved = admission.reserved_files(redis=bool(getattr(args, "redis_url", None)))
    if args.max_connections and args.max_connections > open_files - reserved:
        log.warning(
            "--max-connections is more than the open-file limit leaves room for: past that, "
            "connections are closed unanswered and upstream connections fail. Raise the "
            "limit (ulimit -n, LimitNOFILE=) or lower --max-connections",
            extra={"max_connections": args.max_connections, "open_files": open_files},
        )
    return True


def _nothing_to_reload() -> None:
    log.info("SIGHUP: nothing to read again (no --tls-cert); SIGTERM stops the server")


def serve_command(args: argparse.Namespace) -> int:
    logs.configure(args.log_level, args.log_format)
    open_files = admission.raise_open_file_limit()
    config = config_from_args(args)
    if not flags_fit_together(args, open_files):
        return 1
    certificates = None
    if args.tls_cert:
        cert, key = Path(args.tls_cert), Path(args.tls_key) if args.tls_key else None
        client_ca = Path(args.tls_client_ca) if args.tls_client_ca else None
        try:
            context = tls.server_context(cert, key, client_ca)
        except tls.TLSConfigError as exc:
            log.error(str(exc))
            return 1
        config = replace(config, tls=context)
        certificates = tls.CertificateFiles(context, cert, key, client_ca)
    snapshot = Path(args.snapshot) if args.snapshot else None
    try:
        metrics = Metrics()
        try:
            backend = backend_from_args(args, metrics)
        except ValueError as exc:  # e.g. an HTTPS_PROXY this client cannot use
            log.error("cannot set up the upstream connection", extra={"reason": str(exc)})
            return 1
        sharing = shared_options(args)
        upstream = getattr(args, "upstream", None)
        described = upstream_cli.describe(args) if upstream else {}
        probed = upstream_cli.config_from_args(args) if upstream else None
        return int(
            run_async(
                _serve(config, backend, snapshot, metrics, sharing, described, probed, certificates)
            )
        )
    except KeyboardInterrupt:
        return 0


async def _serve(
    config: ServerConfig,
    backend: Backend,
    snapshot: Path | None,
    metrics: Metrics | None = None,
    sharing: SharedOptions | None = None,
    described: Mapping[str, object] | None = None,
    probed: UpstreamConfig | None = None,
    certificates: tls.CertificateFiles | None = None,
) -> int:
    """`described`: more fields for the `listening` line (the upstream's); `probed`:
    the upstream to probe once listening (`upstream_probe`); `certificates`: the TLS
    files to read again on SIGHUP and when they change."""
    if snapshot is not None:
        try:
            check_writable(snapshot)
            check_writable(conversations_file(snapshot))
            check_writable(background_file(snapshot))
        except OSError as exc:
            # Found now, not at shutdown when the stored responses would be lost.
            log.error(
                "cannot write the snapshot there; --snapshot needs a file in an existing, "
                "writable directory",
                extra={"path": str(snapshot), "reason": exc.strerror, "errno": exc.errno},
            )
            return 1
    try:
        shared = shared_store(sharing)
    except RuntimeError as exc:
        log.error(str(exc))
        return 1
    try:
        tokenizer = load_tokenizer(config.tokenizer, config.models[0])
    except OSError as exc:
        log.error(
            "cannot read the tokenizer file; fix --tokenizer",
            extra={"tokenizer": config.tokenizer, "reason": exc.strerror, "errno": exc.errno},
        )
        return 1
    except TokenizerError as exc:
        # Not the message: the file's content could be quoted in it.
        log.error(
            "cannot load the tokenizer; --tokenizer takes o200k_base, cl100k_base, none, "
            "or the path of a Hugging Face tokenizer.json",
            extra={"tokenizer": config.tokenizer, "error_type": type(exc).__name__},
        )
        return 1
    cache: SessionCache = new_cache(
        config.memory_budget,
        config.max_item_bytes,
        tokenizer=tokenizer,
        prefix_diffing=config.prefix_diffing,
    )
    if snapshot is not None and snapshot.exists():
        try:
            restored = cache.restore(snapshot.read_bytes())
        except (OSError, SnapshotError) as exc:
            log.error(
                "cannot restore the snapshot; fix or move the file, or start without --snapshot",
                extra={
                    "path": str(snapshot),
                    "error_type": type(exc).__name__,
                    # (Its messages name sizes, counts and positions, never content.)
                    "reason": str(exc) if isinstance(exc, SnapshotError) else exc.strerror,
                },
            )
            return 1
        evicted = cache.stats().evictions
        if evicted:
            # Serving on would save the smaller cache over the file at shutdown: the
            # responses the budget let go of would be gone for good.
            log.error(
                "the snapshot holds more than --memory-budget keeps: raise --memory-budget, "
                "or move the file to start without its responses",
                extra={
                    "path": str(snapshot),
                    "responses": restored,
                    "dropped": evicted,
                    "memory_budget": config.memory_budget,
                },
            )
            return 1
        log.info("snapshot restored", extra={"path": str(snapshot), "responses": restored})
    server = Server(config, backend, cache=cache, metrics=metrics, shared=shared)
    kept = conversations_file(snapshot) if snapshot is not None and shared is None else None
    if kept is not None and kept.exists():
        count = _restored(kept, server.engine.conversations.restore, "conversations")
        if count is None:
            return 1
        conversations = server.engine.conversations
        if conversations.nbytes > conversations.budget_bytes:
            # Served on, every new conversation and addition would be refused (503)
            # until enough were deleted: --conversation-budget would not hold.
            log.error(
                "the conversations snapshot holds more than --conversation-budget keeps: "
                "raise --conversation-budget, or move the file to start without its "
                "conversations",
                extra={
                    "path": str(kept),
                    "conversations": count,
                    "bytes": conversations.nbytes,
                    "conversation_budget": config.conversation_budget,
                },
            )
            return 1
        log.info("conversations restored", extra={"path": str(kept), "conversations": count})
    ended = background_file(snapshot) if snapshot is not None and shared is None else None
    if ended is not None and ended.exists():
        what = "failed and cancelled background responses"
        count = _restored(ended, server.http.background.restore, what)
        if count is None:
            return 1
        log.info("background responses restored", extra={"path": str(ended), "responses": count})
    try:
        await server.start()
    except ConnectionError as exc:
        # The shared store's `RedisUnreachable` or `RedisClusterUnsupported`: `advice`
        # says what to do, `address` where Redis was looked for (host:port, never the
        # password), `reason` the OS's, e.g. 'Connection refused'.
        log.error(
            getattr(exc, "advice", "cannot reach Redis; check --redis-url, or start without it"),
            extra={
                "error": str(exc),
                "redis": getattr(exc, "address", None),
                "reason": getattr(exc, "reason", None),
            },
        )
        await server.close()
        return 1
    except OSError as exc:
        if isinstance(exc, MetricsPortError) and config.metrics_port is not None:
            logs.cannot_listen(log, config.host, config.metrics_port, exc, "--metrics-port")
        else:
            logs.cannot_listen(log, config.host, config.port, exc)
        await server.close()
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    http, ws = ("https", "wss") if config.tls is not None else ("http", "ws")
    log.info(
        "listening",
        extra={
            "url": logs.listening_url(http, config.host, server.port, "/v1"),
            "websocket": logs.listening_url(ws, config.host, server.port, "/v1/responses"),
            "metrics": logs.listening_url("http", config.host, server.metrics_port, "/metrics")
            if server.metrics_port is not None
            else None,
            "backend": backend.name,
            **(described or {}),
            "models": list(config.models if config.listed_models is None else config.listed_models),
            "tokenizer": tokenizer.name if tokenizer is not None else "none",
            "memory_budget": config.memory_budget,
            "max_connections": config.max_connections,
            "max_connections_per_key": config.max_connections_per_key,
            "requests_per_minute_per_key": config.requests_per_minute_per_key,
            "tokens_per_minute_per_key": config.tokens_per_minute_per_key,
            "auth": bool(config.api_keys),
            "client_certificates": config.tls is not None
            and config.tls.verify_mode == ssl.CERT_REQUIRED,
            "owner_by_client_certificate": config.owner_by_client_certificate,
            "allowed_origins": list(config.allowed_origins),
            "allowed_hosts": (list(config.allowed_hosts) if server.hosts.checked else ["*"]),
            "shared_store": sharing is not None,
        },
    )
    probing = None
    if probed is not None:
        from warmsocket.backends.chat import ChatBackend
        from warmsocket.upstream_probe import probe_upstreams

        learn = backend.windows.learn if isinstance(backend, ChatBackend) else None
        probing = asyncio.create_task(probe_upstreams(probed, learn=learn))
    watching = None
    if certificates is not None:
        loop.add_signal_handler(signal.SIGHUP, certificates.reload, "SIGHUP")
        watching = asyncio.create_task(_watch_certificates(certificates))
    else:
        # SIGHUP means "read your files again" here: without TLS there are none. Its
        # default action would end the process at once, without the drain or the
        # snapshot (every stored response since the start lost).
        loop.add_signal_handler(signal.SIGHUP, _nothing_to_reload)
    await stop.wait()
    if probing is not None:
        probing.cancel()
    if watching is not None:
        watching.cancel()
    drain_started = time.monotonic()
    await drain(server, stop, config.shutdown_timeout)
    log.info("shutting down")
    # What the drain left of the timeout (a Redis that does not answer must not keep
    # the process past the orchestrator's grace period), yet a moment at least.
    left = config.shutdown_timeout - (time.monotonic() - drain_started)
    await server.close(min(SHUTDOWN_WRITE_SECONDS, max(MIN_SHUTDOWN_WRITE_SECONDS, left)))
    if snapshot is not None:
        # The cache may be over its budget (a parent is never evicted for its child,
        # nor a lane's head while its connection lives, and releasing them evicts
        # nothing): the next write would have evicted that much, and the restart with
        # the same --memory-budget would refuse the snapshot. Evicted now instead.
        over = cache.apply_budget()
        if over:
            log.warning(
                "responses over --memory-budget evicted before the snapshot",
                extra={"evicted": over, "memory_budget": config.memory_budget},
            )
        entries = cache.stats().stored_entries
        if not _saved(snapshot, cache.snapshot(), "snapshot", entries=entries):
            return 1
    if kept is not None:
        conversations = server.engine.conversations
        if not _saved(
            kept, conversations.snapshot(), "conversations", conversations=len(conversations)
        ):
            return 1
    if ended is not None:
        # (After `close`: the background responses still running were cancelled.)
        background = server.http.background
        responses = len(background.unstored())
        if not _saved(ended, background.snapshot(), "background responses", responses=responses):
            return 1
    return 0


_SAVE_FAILED = {
    "snapshot": "cannot save the snapshot; the stored responses are not kept",
    "conversations": "cannot save the conversations; they are not kept",
    "background responses": "cannot save the failed and cancelled background responses; "
    "they are not kept",
}


async def _watch_certificates(certificates: tls.CertificateFiles) -> None:
    """Read the TLS files again whenever they change (`tls.CertificateFiles`)."""
    while True:
        await asyncio.sleep(tls.RELOAD_CHECK_SECONDS)
        certificates.reload_if_changed()


def _restored(path: Path, restore: Callable[[bytes], int], what: str) -> int | None:
    """`restore` of a file of `--snapshot` (the `conversations` or the background
    responses): how many it held, or None, logged with what to do, when it cannot be
    read (the server then does not start)."""
    try:
        return restore(path.read_bytes())
    except (OSError, ValueError) as exc:
        log.error(
            f"cannot restore the {what}; fix or move the file, or start without --snapshot",
            extra={"path": str(path), "error_type": type(exc).__name__},
        )
        return None


def _saved(path: Path, data: bytes, what: str, **counts: int) -> bool:
    """Write a file of `--snapshot` (`write_atomically`: the `snapshot`, the
    `conversations` or the `background responses`) and log it; False, logged with
    the reason, when it could not be written."""
    try:
        write_atomically(path, data)
    except OSError as exc:
        log.error(
            _SAVE_FAILED[what],
            extra={"path": str(path), "reason": exc.strerror, "errno": exc.errno},
        )
        return False
    log.info(f"{what} saved", extra={"path": str(path), **counts})
    return True


def conversations_file(snapshot: Path) -> Path:
    """Where `--snapshot PATH` keeps the conversations (without Redis): `PATH.conversations`."""
    return snapshot.with_name(snapshot.name + ".conversations")


def background_file(snapshot: Path) -> Path:
    """Where `--snapshot PATH` keeps the background responses that failed or were
    cancelled, shutdown's cancels too (without Redis; the completed ones are stored
    responses): `PATH.background`."""
    return snapshot.with_name(snapshot.name + ".background")


async def drain(server: Server, stop: asyncio.Event, grace: float) -> None:
    """Let what is under way finish (`Server.drain`) for at most `grace` seconds, or
    until `stop` is set again (a second signal)."""
    if grace <= 0:
        return
    log.info(
        "draining",
        extra={
            "connections": len(server.connections),
            "background_responses": server.http.background.running,
            "grace_seconds": grace,
        },
    )
    stop.clear()
    started = time.monotonic()
    draining = asyncio.ensure_future(server.drain(grace))
    again = asyncio.ensure_future(stop.wait())
    await asyncio.wait({draining, again}, return_when=asyncio.FIRST_COMPLETED)
    if draining.done():
        # Counted when the grace period ended, before what was left was failed and
        # its connections closed.
        connections, background = draining.result()
        cut_short = "shutdown timeout reached"
    else:
        connections, background = len(server.connections), server.http.background.running
        cut_short = "drain cut short by a second signal"
    for task in (draining, again):
        task.cancel()
    log.info(
        cut_short if connections or background else "drained",
        extra={
            "seconds": round(time.monotonic() - started, 3),
            "connections_left": connections,
            "background_responses_left": background,
        },
    )


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def check_writable(path: Path) -> None:
    """Raise OSError unless `write_atomically(path, ...)` can work: it creates (and
    removes) the temporary file the save writes beside `path`, and refuses a directory."""
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    temporary = _temporary(path)
    with open(temporary, "wb"):
        pass
    temporary.unlink()


def load_tokenizer(spec: str | None, model: str) -> Tokenizer | None:
    """`tokenizer_for`, after reading a tokenizer.json path once: an unreadable file
    raises a plain OSError with the OS's reason (errno, strerror), never its content."""
    if spec is not None and spec not in BUILTIN_TOKENIZERS and spec not in ("none", "auto"):
        with open(spec, "rb"):
            pass
    return tokenizer_for(spec, model)


def write_atomically(path: Path, data: bytes) -> None:
    """Write a file so that a crash leaves either the old or the new content, never half."""
    temporary = _temporary(path)
    try:
        with open(temporary, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
