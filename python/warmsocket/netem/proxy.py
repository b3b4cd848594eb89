"""A TCP forwarding proxy that adds one-way delay (and optionally a rate limit).

The kernel here has no `netem` qdisc, so delay is emulated in user space: every
chunk read from one side is written to the other side `delay` seconds later.
Each direction of each connection is a `_Pipe` with a FIFO of
`(deliver_at, chunk)` and at most one armed timer (for the head of the FIFO), so
chunks are pipelined: a chunk read at t leaves at t + delay while later chunks
keep arriving, and the total cost is one timer per wake-up, not one sleep per
chunk.  Order is preserved (deadlines are made monotonic), EOF (half-close) and
close/reset travel through the same FIFO so they keep their place in the stream.

Backpressure: a pipe stops reading its source once the bytes it holds (FIFO
plus the destination transport's write buffer) reach `max_buffer_bytes` and
resumes below half of that, so a slow reader cannot make the proxy buffer
without bound.  That limit behaves like a TCP window: at most
`max_buffer_bytes / delay` bytes per second can be in flight per direction.
A source that is not being read reports no reset, so while paused it is
polled for one every `_PAUSED_PROBE_S` (which leaves the error pending). A
source found reset will send nothing more, so it is read out, unpaused: the
data its socket still holds goes through the FIFO, then the reset that the
event loop reports after it, as for a source being read. So the connection and
its buffers do not stay held until the other side reads again.

Connection set-up: the client's `connect()` to the proxy completes at once (the
kernel accepts it), which would make a new connection one round trip cheaper
than on a real path.  With `emulate_handshake=True` (the default) the proxy
connects upstream one delay after accepting (the SYN's trip) and holds the
client's first bytes until one full round trip after the accept (the SYN-ACK's
trip back), so connect + first request + response costs 2 RTT end to end, as
over a real TCP path.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
import select
import socket
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Self, cast

from warmsocket.netem.profiles import NetworkProfile
from warmsocket.netem.timers import Scheduler, TimerHandle, make_scheduler

log = logging.getLogger("warmsocket.netem")

DEFAULT_MAX_BUFFER_BYTES = 4 * 1024 * 1024
# With a rate limit, chunks are split into pieces of about 1 ms of line rate
# (at least this many bytes) so delivery is smooth rather than 256 KiB lumps.
_MIN_PIECE_BYTES = 16 * 1024
# While a source is paused, how often to look for a reset the event loop cannot
# report (it does not watch a paused socket).
_PAUSED_PROBE_S = 0.5


class _Marker(enum.Enum):
    EOF = "eof"  # source half-closed: write_eof() on the destination
    CLOSE = "close"  # source closed cleanly: close() the destination
    ABORT = "abort"  # source reset / failed: abort() the destination


@dataclass(slots=True)
class ProxyStats:
    """Counters for one proxy (all connections, both directions)."""

    connections_total: int = 0
    connections_open: int = 0
    connect_failures: int = 0
    bytes_up: int = 0  # delivered client -> server
    bytes_down: int = 0  # delivered server -> client
    peak_buffered_bytes: int = 0  # largest amount one direction ever held


class _Pipe:
    """One direction of one proxied connection."""

    __slots__ = (
        "_closed",
        "_conn",
        "_delay",
        "_jitter",
        "_last_deliver",
        "_limit",
        "_piece",
        "_probe_timer",
        "_proxy",
        "_queue",
        "_queue_s",
        "_queued_bytes",
        "_rate",
        "_resume_timer",
        "_serial_free",
        "_timer",
        "dst",
        "dst_write_paused",
        "eof_delivered",
        "not_before",
        "reading_paused",
        "src",
        "src_ended",
        "src_eof",
        "upstream",
    )

    def __init__(self, conn: _Connection, proxy: DelayProxy, *, upstream: bool) -> None:
        self._conn = conn
        self._proxy = proxy
        self.upstream = upstream  # True: client -> server
        self._delay = proxy.delay_s
        self._jitter = proxy.jitter_s
        self._rate = proxy.rate_bytes_per_s
        self._queue_s = proxy.queue_s
        self._piece = 0 if self._rate is None else max(_MIN_PIECE_BYTES, int(self._rate / 1000))
        self._resume_timer: TimerHandle | None = None
        self._probe_timer: TimerHandle | None = None
        self._limit = proxy.max_buffer_bytes
        self._queue: deque[tuple[float, bytes | _Marker]] = deque()
        self._queued_bytes = 0
        self._timer: TimerHandle | None = None
        self._last_deliver = 0.0
        self._serial_free = 0.0
        self._closed = False
        self.src: asyncio.Transport | None = None
        self.dst: asyncio.Transport | None = None
        self.not_before = 0.0
        self.reading_paused = False
        self.dst_write_paused = False
        self.eof_delivered = False
        self.src_eof = False
        self.src_ended = False  # found reset while paused: being read out, never paused

    # -- input side ---------------------------------------------------------

    def _deadline(self, nbytes: int) -> float:
        sched = self._proxy.scheduler
        t = max(sched.now(), self.not_before)
        if self._rate is not None:
            # Serialise behind earlier bytes at the bottleneck rate.
            start = max(t, self._serial_free)
            self._serial_free = start + nbytes / self._rate
            t = self._serial_free
        t += self._delay
        if self._jitter:
            t += self._proxy.rng.uniform(0.0, self._jitter)
        t = max(t, self._last_deliver)  # never reorder
        self._last_deliver = t
        return t

    def feed(self, data: bytes) -> None:
        if self._closed or not data:
            return
        piece = self._piece
        if piece and len(data) > piece:
            view = memoryview(data)
            for i in range(0, len(data), piece):  # bounded by len(data) / piece
                chunk = bytes(view[i : i + piece])
                self._queue.append((self._deadline(len(chunk)), chunk))
                self._queued_bytes += len(chunk)
            self._arm()
            self._update_pause()
            return
        deliver_at = self._deadline(len(data))
        if not self._queue and self.dst is not None and deliver_at <= self._proxy.scheduler.now():
            self._write(data)  # zero delay: no queueing at all
        else:
            self._queue.append((deliver_at, data))
            self._queued_bytes += len(data)
            self._arm()
        self._update_pause()

    def feed_marker(self, marker: _Marker) -> None:
        if self._closed:
            return
        # After EOF the source is no longer read; never pause/resume it again
        # (resuming a transport at EOF would read the EOF a second time).
        self.src_eof = True
        deliver_at = self._deadline(0)
        self._queue.append((deliver_at, marker))
        self._arm()

    # -- output side --------------------------------------------------------

    def attach_dst(self, transport: asyncio.Transport) -> None:
        self.dst = transport
        self._arm()

    def _arm(self) -> None:
        if self._timer is not None or not self._queue or self.dst is None or self._closed:
            return
        self._timer = self._proxy.scheduler.call_at(self._queue[0][0], self._flush)

    def _flush(self) -> None:
        self._timer = None
        if self._closed or self.dst is None:
            return
        now = self._proxy.scheduler.now()
        queue = self._queue
        chunks: list[bytes] = []
        marker: _Marker | None = None
        # Bounded by the queue length; stops at the first marker.
        for _ in range(len(queue)):
            if queue[0][0] > now:
                break
            _, item = queue.popleft()
            if isinstance(item, _Marker):
                marker = item
                break
            chunks.append(item)
        if chunks:
            data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            self._queued_bytes -= len(data)
            self._write(data)
        if marker is not None:
            self._deliver_marker(marker)
            if self._closed:
                return
        self._arm()
        self._update_pause()

    def _write(self, data: bytes) -> None:
        dst = self.dst
        assert dst is not None
        if dst.is_closing():
            return
        proxy = self._proxy
        if proxy.on_write is not None:  # before the write: the peer cannot see it earlier
            proxy.on_write(self.upstream, len(data))
        dst.write(data)
        stats = proxy.stats
        if self.upstream:
            stats.bytes_up += len(data)
        else:
            stats.bytes_down += len(data)

    def _deliver_marker(self, marker: _Marker) -> None:
        dst = self.dst
        assert dst is not None
        if marker is _Marker.EOF:
            self.eof_delivered = True
            if not dst.is_closing():
                if dst.can_write_eof():
                    dst.write_eof()
                else:
                    dst.close()
            self._conn.maybe_finished()
        elif marker is _Marker.CLOSE:
            self._conn.close(abort=False)
        else:
            self._conn.close(abort=True)

    # -- backpressure -------------------------------------------------------

    def buffered(self) -> int:
        wbuf = 0
        if self.dst is not None and not self._closed:
            wbuf = self.dst.get_write_buffer_size()
        return self._queued_bytes + wbuf

    def _backlog_s(self) -> float:
        """Seconds of data still waiting for the (emulated) bottleneck."""
        if self._rate is None:
            return 0.0
        return max(0.0, self._serial_free - self._proxy.scheduler.now())

    def _on_resume_timer(self) -> None:
        self._resume_timer = None
        self._update_pause()

    def _update_pause(self) -> None:
        src = self.src
        if src is None or self._closed or self.src_eof or self.src_ended:
            return
        held = self.buffered()
        stats = self._proxy.stats
        if held > stats.peak_buffered_bytes:
            stats.peak_buffered_bytes = held
        # Memory bound (like a TCP window), and with a rate limit also the
        # bottleneck's queue: at most queue_s of backlog, like a router buffer.
        backlog = self._backlog_s()
        if not self.reading_paused:
            if held >= self._limit or self.dst_write_paused or backlog > self._queue_s:
                self.reading_paused = True
                if not src.is_closing():
                    src.pause_reading()
                self._arm_probe()
        elif (
            held <= self._limit // 2 and not self.dst_write_paused and backlog <= self._queue_s / 2
        ):
            self.reading_paused = False
            if not src.is_closing():
                src.resume_reading()
            return
        if self.reading_paused and backlog > self._queue_s / 2 and self._resume_timer is None:
            # The backlog shrinks with time, not with events: check again then.
            when = self._serial_free - self._queue_s / 2
            self._resume_timer = self._proxy.scheduler.call_at(when, self._on_resume_timer)

    def _arm_probe(self) -> None:
        if self._probe_timer is None:
            when = self._proxy.scheduler.now() + _PAUSED_PROBE_S
            self._probe_timer = self._proxy.scheduler.call_at(when, self._probe_paused_src)

    def _probe_paused_src(self) -> None:
        """A paused source is not read, so its reset would go unnoticed: look."""
        self._probe_timer = None
        src = self.src
        if self._closed or self.src_eof or not self.reading_paused or src is None:
            return
        if src.is_closing() or not _socket_ended(src):
            self._arm_probe()
            return
        # It sends nothing more, so reading it is bounded by what its socket holds:
        # that data, then the reset, are passed on as for a source being read.
        self.src_ended = True
        self.reading_paused = False
        self._conn.source_ended(self)
        src.resume_reading()

    def on_dst_pause_writing(self) -> None:
        self.dst_write_paused = True
        self._update_pause()

    def on_dst_resume_writing(self) -> None:
        self.dst_write_paused = False
        self._update_pause()

    def close(self) -> None:
        self._closed = True
        for timer in (self._timer, self._resume_timer, self._probe_timer):
            if timer is not None:
                timer.cancel()
        self._timer = self._resume_timer = self._probe_timer = None
        self._queue.clear()
        self._queued_bytes = 0


def _socket_ended(transport: asyncio.Transport) -> bool:
    """True if the transport's socket was reset (a pending error) or closed both ways.

    poll() leaves the error pending; reading SO_ERROR would clear it, and reading
    the socket would then end in a clean EOF after its data instead of the reset.
    """
    sock = transport.get_extra_info("socket")
    if sock is None or sock.fileno() < 0:
        return False  # nothing to look at: the transport reports its own end
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)  # POLLERR and POLLHUP always count
    return any(events & (select.POLLERR | select.POLLHUP) for _fd, events in poller.poll(0))


class _Connection:
    """A proxied connection: the accepted client side plus the upstream side."""

    def __init__(self, proxy: DelayProxy, client: asyncio.Transport) -> None:
        self.proxy = proxy
        self.client = client
        self.server: asyncio.Transport | None = None
        self.up = _Pipe(self, proxy, upstream=True)
        self.down = _Pipe(self, proxy, upstream=False)
        self.up.src = client
        self.down.dst = client
        self.closed = False
        self.connect_task: asyncio.Task[None] | None = None
        self._connect_timer: TimerHandle | None = None
        client.set_write_buffer_limits(high=proxy.write_high_water)
        now = proxy.scheduler.now()
        if proxy.emulate_handshake and proxy.delay_s > 0:
            # SYN reaches the server after one delay; the client may send its
            # first byte only after the SYN-ACK is back (one RTT).
            self.up.not_before = now + 2 * proxy.delay_s
            self._connect_timer = proxy.scheduler.call_at(now + proxy.delay_s, self._start_connect)
        else:
            self._start_connect()

    def _start_connect(self) -> None:
        self._connect_timer = None
        if self.closed:
            return
        self.connect_task = asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        proxy = self.proxy
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(proxy.connect_timeout):
                await loop.create_connection(
                    lambda: _ServerSide(self), proxy.target_host, proxy.target_port
                )
        except (OSError, TimeoutError) as exc:
            proxy.stats.connect_failures += 1
            log.warning(
                "delay proxy: cannot connect to %s:%s: %s",
                proxy.target_host,
                proxy.target_port,
                exc or type(exc).__name__,
            )
            self.close(abort=True)

    def server_connected(self, transport: asyncio.Transport) -> None:
        if self.closed:
            transport.abort()
            return
        self.server = transport
        transport.set_write_buffer_limits(high=self.proxy.write_high_water)
        self.down.src = transport
        self.up.attach_dst(transport)

    def source_ended(self, pipe: _Pipe) -> None:
        """`pipe`'s source was found reset: nothing can be delivered to it any more
        (writing to it would also take its pending error before its reader does)."""
        (self.down if pipe is self.up else self.up).close()

    def maybe_finished(self) -> None:
        if self.up.eof_delivered and self.down.eof_delivered:
            self.close(abort=False)

    def close(self, *, abort: bool) -> None:
        if self.closed:
            return
        self.closed = True
        self.up.close()
        self.down.close()
        if self._connect_timer is not None:
            self._connect_timer.cancel()
        if self.connect_task is not None and not self.connect_task.done():
            self.connect_task.cancel()
        for transport in (self.client, self.server):
            if transport is None or transport.is_closing():
                continue
            if abort:
                transport.abort()
            else:
                transport.close()
        self.proxy.connection_done(self)


class _ClientSide(asyncio.Protocol):
    def __init__(self, proxy: DelayProxy) -> None:
        self.proxy = proxy
        self.conn: _Connection | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport.
        tcp = cast(asyncio.Transport, transport)
        if not self.proxy.running:  # accepted while the proxy was closing
            tcp.abort()
            return
        self.conn = self.proxy.connection_new(tcp)

    def data_received(self, data: bytes) -> None:
        if self.conn is not None:
            self.conn.up.feed(data)

    def eof_received(self) -> bool:
        if self.conn is not None:
            self.conn.up.feed_marker(_Marker.EOF)
        return True  # keep the other direction open (half-close)

    def connection_lost(self, exc: Exception | None) -> None:
        conn = self.conn
        if conn is None or conn.closed:
            return
        # The client is gone: nothing can be delivered to it any more.
        conn.down.close()
        conn.up.feed_marker(_Marker.ABORT if exc is not None else _Marker.CLOSE)

    def pause_writing(self) -> None:
        if self.conn is not None:
            self.conn.down.on_dst_pause_writing()

    def resume_writing(self) -> None:
        if self.conn is not None:
            self.conn.down.on_dst_resume_writing()


class _ServerSide(asyncio.Protocol):
    def __init__(self, conn: _Connection) -> None:
        self.conn = conn

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.conn.server_connected(cast(asyncio.Transport, transport))

    def data_received(self, data: bytes) -> None:
        self.conn.down.feed(data)

    def eof_received(self) -> bool:
        self.conn.down.feed_marker(_Marker.EOF)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        conn = self.conn
        if conn.closed:
            return
        conn.up.close()
        conn.down.feed_marker(_Marker.ABORT if exc is not None else _Marker.CLOSE)

    def pause_writing(self) -> None:
        self.conn.up.on_dst_pause_writing()

    def resume_writing(self) -> None:
        self.conn.up.on_dst_resume_writing()


class DelayProxy:
    """Forward TCP from `listen_host:listen_port` to `target_host:target_port`.

    Adds `delay_s` (plus up to `jitter_s`) one way, in each direction; with
    `rate_bytes_per_s` it also serialises each direction at that rate (used when
    no kernel rate limiter is available).  Use `async with` or start()/close().
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        delay_s: float = 0.0,
        jitter_s: float = 0.0,
        rate_bytes_per_s: float | None = None,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        emulate_handshake: bool = True,
        max_buffer_bytes: int = DEFAULT_MAX_BUFFER_BYTES,
        queue_s: float = 0.05,
        precise_timers: bool | None = None,
        connect_timeout: float = 10.0,
        seed: int | None = None,
        on_write: Callable[[bool, int], None] | None = None,
    ) -> None:
        if delay_s < 0 or jitter_s < 0:
            raise ValueError("delay_s and jitter_s must be >= 0")
        if rate_bytes_per_s is not None and rate_bytes_per_s <= 0:
            raise ValueError("rate_bytes_per_s must be > 0 or None")
        if max_buffer_bytes < 4096:
            raise ValueError("max_buffer_bytes must be >= 4096")
        self.target_host = target_host
        self.target_port = target_port
        self.delay_s = delay_s
        self.jitter_s = jitter_s
        self.rate_bytes_per_s = rate_bytes_per_s
        self.listen_host = listen_host
        self.listen_port = listen_port
        self.emulate_handshake = emulate_handshake
        self.queue_s = queue_s
        if rate_bytes_per_s is not None and queue_s <= 0:
            # With a rate limit the source is paused once more than queue_s of
            # data waits for the bottleneck, like a full router queue.
            raise ValueError("queue_s must be > 0 with a rate limit")
        self.max_buffer_bytes = max_buffer_bytes
        # Keep transport write buffers well under the pipe limit so a draining
        # write buffer always either reports resume_writing() or is small
        # enough that the next flush re-checks the pause state.
        self.write_high_water = max(1024, min(256 * 1024, max_buffer_bytes // 4))
        self.precise_timers = precise_timers
        self.connect_timeout = connect_timeout
        self.rng = random.Random(seed)
        self.stats = ProxyStats()
        self.on_write = on_write
        """Called with (upstream, nbytes) just before each delivery is written to its
        destination (benchmarks timestamp it: when a request's last byte reached the
        server)."""
        self._scheduler: Scheduler | None = None
        self._server: asyncio.Server | None = None
        self._conns: set[_Connection] = set()

    @classmethod
    def from_profile(
        cls,
        profile: NetworkProfile,
        target_host: str,
        target_port: int,
        *,
        rate_limit: bool = False,
        **kwargs: object,
    ) -> DelayProxy:
        """A proxy adding `profile`'s delay/jitter; its rate too if `rate_limit`."""
        return cls(
            target_host,
            target_port,
            delay_s=profile.delay_s,
            jitter_s=profile.jitter_s,
            rate_bytes_per_s=profile.rate_bytes_per_s if rate_limit else None,
            queue_s=profile.queue_ms / 1000,
            **kwargs,  # type: ignore[arg-type]
        )

    # -- lifecycle ----------------------------------------------------------

    @property
    def scheduler(self) -> Scheduler:
        if self._scheduler is None:
            raise RuntimeError("proxy is not running")
        return self._scheduler

    @property
    def running(self) -> bool:
        return self._server is not None

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("proxy already started")
        loop = asyncio.get_running_loop()
        self._scheduler = make_scheduler(loop, precise=self.precise_timers)
        try:
            self._server = await loop.create_server(
                lambda: _ClientSide(self),
                self.listen_host,
                self.listen_port,
                family=socket.AF_INET6 if ":" in self.listen_host else socket.AF_INET,
                reuse_address=True,
            )
        except BaseException:
            self._scheduler.close()
            self._scheduler = None
            raise
        sock = self._server.sockets[0]
        self.listen_port = sock.getsockname()[1]
        log.debug(
            "delay proxy %s:%s -> %s:%s, %.3f ms one way",
            self.listen_host,
            self.listen_port,
            self.target_host,
            self.target_port,
            self.delay_s * 1000,
        )

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        conns = list(self._conns)
        tasks = [c.connect_task for c in conns if c.connect_task is not None]
        # Bounded: every close() removes the connection from the set.
        for conn in conns:
            conn.close(abort=True)
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await server.wait_closed()
        # Let transports run their connection_lost callbacks before the
        # scheduler they might reference goes away.
        await asyncio.sleep(0)
        if self._scheduler is not None:
            self._scheduler.close()
            self._scheduler = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- introspection ------------------------------------------------------

    @property
    def host(self) -> str:
        return self.listen_host

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("proxy is not running")
        return self.listen_port

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def buffered_bytes(self) -> int:
        """Bytes currently held (delay queues plus write buffers), all connections."""
        return sum(c.up.buffered() + c.down.buffered() for c in self._conns)

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    # -- connection bookkeeping (called by _Connection / _ClientSide) -------

    def connection_new(self, transport: asyncio.Transport) -> _Connection:
        conn = _Connection(self, transport)
        self._conns.add(conn)
        self.stats.connections_total += 1
        self.stats.connections_open = len(self._conns)
        return conn

    def connection_done(self, conn: _Connection) -> None:
        self._conns.discard(conn)
        self.stats.connections_open = len(self._conns)
