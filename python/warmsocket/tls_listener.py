"""The TLS port's listener: it accepts connections itself, looks at each one's first
byte, and starts the TLS handshake or answers plain HTTP.

The event loop's own TLS server (`create_server(ssl=...)`) hands a connection over only
once its handshake is done, and a failed handshake goes unseen: a client that speaks
plain HTTP to the TLS port (an `http://` base URL, a common slip) gets its connection
closed without a word, and nothing is logged; connections in their handshake are not
counted by `--max-connections`. So this listener accepts, counts the connection, and
peeks (`MSG_PEEK`, nothing is consumed) at the first byte the client sends: a TLS
record starts with 22 (handshake), which the loop's TLS layer is then given the socket
for (`connect_accepted_socket`); anything else is plain HTTP, which the server answers
with a 400 that says to use `https://` (as nginx does). Failed handshakes are counted
(`warmsocket_tls_handshakes_failed_total`) and logged at most every `LOG_INTERVAL`,
with OpenSSL's reason (a client that does not trust the certificate says so), as are
plain-HTTP clients (`TLSEvents`; and TLS clients on a plain-HTTP port, which
`Connection` tells by the same first byte and closes).

Peeking needs the socket before the loop reads from it, hence the listener's own accept
loop (the loop's TCP transports start reading before their protocol could stop them).
A plain-HTTP server uses the loop's `create_server` as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import ssl
from collections import Counter
from collections.abc import Callable, Iterable

from warmsocket.admission import Admission, Verdict
from warmsocket.logs import Throttle

log = logging.getLogger("warmsocket.server")

TLS_HANDSHAKE_RECORD = 0x16
"""The first byte of a TLS client's first record (content type 22: handshake)."""
ACCEPTS_PER_WAKEUP = 64
"""Connections accepted in one go before the loop runs other work."""
ACCEPT_PAUSE = 1.0
"""Seconds accepting pauses when the process is out of files or memory."""
LOG_INTERVAL = 10.0
"""Seconds between two log lines about failed handshakes (the metrics count all)."""

# Out of files or memory: accepting again at once would spin.
_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


Accepted = Callable[[socket.socket, int, Verdict], None]
"""What takes a connection over: its connected, non-blocking socket, its first byte
(still unread) and its verdict from `Admission.admit` ("admitted" or "refused"); it
owns both from then on (`Admission.release` once the connection closes)."""


class TLSListener:
    """Listening sockets whose connections are counted by `admission` as they are
    accepted ("dropped" ones closed at once) and go to `accepted` once their first byte
    has arrived, within `deadline` seconds; with `asyncio.Server`'s `sockets`, `close`,
    `wait_closed` and `serve_forever`."""

    def __init__(
        self,
        sockets: list[socket.socket],
        accepted: Accepted,
        *,
        admission: Admission,
        deadline: float,
    ) -> None:
        self.sockets = sockets
        self._accepted = accepted
        self._admission = admission
        self._deadline = deadline
        self._loop = asyncio.get_running_loop()
        self._waiting: dict[socket.socket, tuple[asyncio.TimerHandle, Verdict]] = {}
        self._closed = asyncio.Event()
        self._paused: asyncio.TimerHandle | None = None
        self._pauses = 0
        """Times accepting paused for want of files or memory."""
        self._pause_log = Throttle(LOG_INTERVAL)
        for listening in sockets:
            self._loop.add_reader(listening.fileno(), self._accept, listening)

    @classmethod
    async def open(
        cls,
        host: str | None,
        port: int,
        accepted: Accepted,
        *,
        admission: Admission,
        deadline: float,
        backlog: int = 1024,
        reuse_port: bool = False,
    ) -> TLSListener:
        """Bind and listen on every address `host` resolves to, as `create_server`
        does (raises OSError naming the address)."""
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        sockets: list[socket.socket] = []
        try:
            for family, kind, proto, _name, address in dict.fromkeys(infos):
                listening = socket.socket(family, kind, proto)
                sockets.append(listening)
                listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if reuse_port:
                    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    listening.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                try:
                    listening.bind(address)
                except OSError as exc:
                    raise OSError(
                        exc.errno,
                        f"error while attempting to bind on address {address!r}: "
                        f"{(exc.strerror or '').lower()}",
                    ) from None
                listening.listen(backlog)
                listening.setblocking(False)
        except BaseException:
            for listening in sockets:
                listening.close()
            raise
        return cls(sockets, accepted, admission=admission, deadline=deadline)

    # -- accepting ----------------------------------------------------------------------

    def _accept(self, listening: socket.socket) -> None:
        for _ in range(ACCEPTS_PER_WAKEUP):
            try:
                sock, _address = listening.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _RESOURCE_ERRORS:
                    self._pauses += 1
                    if self._pause_log.due():
                        log.error(
                            "cannot accept connections: out of files or memory; accepting "
                            "pauses a second at a time. Lower --max-connections or raise "
                            "the open-file limit",
                            extra={"errno": exc.errno, "pauses": self._pauses},
                        )
                    self._pause()
                    return
                continue  # (ECONNABORTED and the like: that client is gone)
            sock.setblocking(False)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            verdict = self._admission.admit()
            if verdict == "dropped":
                sock.close()
                continue
            timer = self._loop.call_later(self._deadline, self._gave_up, sock)
            self._waiting[sock] = (timer, verdict)
            self._loop.add_reader(sock.fileno(), self._first_byte, sock)

    def _pause(self) -> None:
        for listening in self.sockets:
            self._loop.remove_reader(listening.fileno())
        self._paused = self._loop.call_later(ACCEPT_PAUSE, self._resume)

    def _resume(self) -> None:
        self._paused = None
        for listening in self.sockets:
            self._loop.add_reader(listening.fileno(), self._accept, listening)

    def _first_byte(self, sock: socket.socket) -> None:
        try:
            first = sock.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            first = b""  # reset: as good as closed
        verdict = self._stop_waiting(sock)
        if not first:  # closed before sending anything (a port check, a probe's connect)
            sock.close()
            self._admission.release(verdict)
            return
        self._accepted(sock, first[0], verdict)

    def _gave_up(self, sock: socket.socket) -> None:
        """Nothing arrived in time (`--http-head-timeout`)."""
        self._admission.release(self._stop_waiting(sock))
        sock.close()

    def _stop_waiting(self, sock: socket.socket) -> Verdict:
        timer, verdict = self._waiting.pop(sock)
        timer.cancel()
        self._loop.remove_reader(sock.fileno())
        return verdict

    # -- asyncio.Server's interface -----------------------------------------------------

    def close(self) -> None:
        """Stop accepting; connections still waiting for their first byte close."""
        if self._closed.is_set():
            return
        if self._paused is not None:
            self._paused.cancel()
        for listening in self.sockets:
            if self._paused is None:
                self._loop.remove_reader(listening.fileno())
            listening.close()
        self.sockets = []  # (as `asyncio.Server.sockets` once closed)
        for sock in list(self._waiting):
            self._admission.release(self._stop_waiting(sock))
            sock.close()
        self._closed.set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def serve_forever(self) -> None:
        await self._closed.wait()


class TLSEvents:
    """What goes wrong with TLS before a request: failed handshakes (by reason),
    plain-HTTP clients on the TLS port, TLS clients on the plain-HTTP port; counted,
    and logged at most every `LOG_INTERVAL` each."""

    def __init__(self) -> None:
        self.handshakes_failed = Counter[str]()
        self.plain_http = 0
        self.tls_on_plain = 0
        self._unlogged = Counter[str]()
        self._handshake_log = Throttle(LOG_INTERVAL)
        self._plain_log = Throttle(LOG_INTERVAL)
        self._tls_log = Throttle(LOG_INTERVAL)

    def handshake_failed(self, exc: BaseException) -> None:
        reason = handshake_failure_reason(exc)
        self.handshakes_failed[reason] += 1
        self._unlogged[reason] += 1
        if self._handshake_log.due():
            log.info(
                "TLS handshakes failed (by reason: a client that does not trust the "
                "certificate, sends no certificate of its own under --tls-client-ca, or "
                "shares no TLS version or cipher with the server)",
                extra={"reasons": dict(self._unlogged)},
            )
            self._unlogged.clear()

    def plain_http_request(self) -> None:
        self.plain_http += 1
        if self._plain_log.due():
            log.warning(
                "plain HTTP on the TLS port: answered 400; clients must use https:// and "
                "wss:// URLs for this server",
                extra={"plain_http_requests": self.plain_http},
            )

    def tls_on_plain_port(self) -> None:
        self.tls_on_plain += 1
        if self._tls_log.due():
            log.warning(
                "a TLS handshake on the plain-HTTP port: closed; clients must use http:// "
                "and ws:// URLs for this server, or start it with --tls-cert",
                extra={"tls_handshakes": self.tls_on_plain},
            )

    def collect(self) -> Iterable[str]:
        yield (
            "# HELP warmsocket_tls_handshakes_failed_total TLS handshakes that failed, by "
            "OpenSSL's reason (timeout: not finished within --http-head-timeout)."
        )
        yield "# TYPE warmsocket_tls_handshakes_failed_total counter"
        for reason, count in sorted(self.handshakes_failed.items()):
            yield f'warmsocket_tls_handshakes_failed_total{{reason="{reason}"}} {count}'
        yield (
            "# HELP warmsocket_plain_http_on_tls_port_total Plain-HTTP requests the TLS "
            "port answered 400."
        )
        yield "# TYPE warmsocket_plain_http_on_tls_port_total counter"
        yield f"warmsocket_plain_http_on_tls_port_total {self.plain_http}"
        yield (
            "# HELP warmsocket_tls_on_plain_http_port_total TLS handshakes the plain-HTTP "
            "port closed."
        )
        yield "# TYPE warmsocket_tls_on_plain_http_port_total counter"
        yield f"warmsocket_tls_on_plain_http_port_total {self.tls_on_plain}"


def handshake_failure_reason(exc: BaseException) -> str:
    """A short, bounded label: OpenSSL's reason in lower case, `timeout`, `reset`."""
    if isinstance(exc, ssl.SSLError) and exc.reason:
        reason = exc.reason.lower()
        return reason if len(reason) <= 64 and reason.replace("_", "").isalnum() else "other"
    if isinstance(exc, TimeoutError) or "taking longer" in str(exc):
        return "timeout"  # (uvloop's is a ConnectionAbortedError saying so)
    if isinstance(exc, ConnectionError | EOFError):
        return "reset"
    return "other"
