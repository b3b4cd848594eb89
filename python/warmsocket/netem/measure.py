"""Measuring what a link actually achieves: RTT and throughput.

A `MeasureServer` runs next to the real server (root namespace, loopback) and
speaks a tiny protocol; the client side connects through the link's proxy from
the client namespace and measures:

- `connect_rtt_ms`: TCP connect + first 1-byte echo on a fresh connection (with
  handshake emulation this is about 2 RTT, like connect + request on a real path);
- `rtt_ms`: median of small echoes on an established connection (1 RTT);
- `down_mbit` / `up_mbit`: a bounded bulk transfer each way, timed by the
  receiver from its first to its last byte (so the one-way delay drops out);
  None if the whole transfer arrived in one read, which leaves nothing to time.

Protocol (one command per connection): b"E" echo until EOF; b"D"+u64 n: the
server sends n bytes; b"U"+u64 n: the server answers b"R" (ready), the client
sends n bytes, and the server answers with f64 seconds (first to last byte) and
u64 bytes received after its first read.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from types import TracebackType
from typing import Self

from warmsocket.netem.link import EmulatedLink
from warmsocket.netem.profiles import NetworkProfile

Connector = Callable[[str, int], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]

_U64 = struct.Struct(">Q")
_RESULT = struct.Struct(">dQ")
_BLOCK = bytes(64 * 1024)
_READ = 256 * 1024
_SERVER_TIMEOUT = 60.0
MAX_BULK_BYTES = 256 * 1024 * 1024


async def _direct(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(host, port)


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError, TimeoutError):
        async with asyncio.timeout(2):
            await writer.wait_closed()


class MeasureServer:
    """The measurement peer; bind it where the real server would be."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self._port = port
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("measure server is not running")
        return self._port

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self._port)
        self._port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        # Abort rather than cancel: on Python 3.11 a cancelled stream handler
        # task makes asyncio log a spurious "Exception in callback".
        for writer in list(self._writers):
            writer.transport.abort()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await server.wait_closed()

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

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        try:
            async with asyncio.timeout(_SERVER_TIMEOUT):
                await self._serve(reader, writer)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            self._tasks.discard(task)
            self._writers.discard(writer)
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        cmd = await reader.readexactly(1)
        if cmd == b"E":
            while data := await reader.read(_READ):
                writer.write(data)
                await writer.drain()
            return
        (n,) = _U64.unpack(await reader.readexactly(_U64.size))
        if n > MAX_BULK_BYTES:
            raise ValueError("bulk transfer too large")
        if cmd == b"D":
            remaining = n
            while remaining > 0:
                block = _BLOCK if remaining >= len(_BLOCK) else _BLOCK[:remaining]
                writer.write(block)
                remaining -= len(block)
                await writer.drain()
            writer.write_eof()
            await reader.read()  # wait for the client to finish
        elif cmd == b"U":
            writer.write(b"R")  # ready: the client starts timing-relevant data now
            await writer.drain()
            first = await reader.read(_READ)
            t_first = time.monotonic()
            got, after_first = len(first), 0
            t_last = t_first
            while got < n:
                data = await reader.read(_READ)
                if not data:
                    raise asyncio.IncompleteReadError(b"", n - got)
                got += len(data)
                after_first += len(data)
                t_last = time.monotonic()
            writer.write(_RESULT.pack(t_last - t_first, after_first))
            await writer.drain()


@dataclass(frozen=True, slots=True)
class RttResult:
    connect_ms: float
    samples_ms: tuple[float, ...]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)


async def measure_rtt(
    host: str,
    port: int,
    *,
    connect: Connector = _direct,
    samples: int = 10,
    payload: int = 64,
) -> RttResult:
    """Connect + first echo, then `samples` sequential echoes of `payload` bytes."""
    if samples < 1:
        raise ValueError("samples must be >= 1")
    t0 = time.monotonic()
    reader, writer = await connect(host, port)
    try:
        writer.write(b"E\x00")
        await reader.readexactly(1)
        connect_ms = (time.monotonic() - t0) * 1000
        message = bytes(payload)
        out = []
        for _ in range(samples):
            t = time.monotonic()
            writer.write(message)
            await reader.readexactly(payload)
            out.append((time.monotonic() - t) * 1000)
        writer.write_eof()
    finally:
        await _close(writer)
    return RttResult(connect_ms=connect_ms, samples_ms=tuple(out))


async def measure_download(
    host: str, port: int, nbytes: int, *, connect: Connector = _direct
) -> float | None:
    """Mbit/s from server to client over `nbytes`, timed first-to-last byte."""
    reader, writer = await connect(host, port)
    try:
        writer.write(b"D" + _U64.pack(nbytes))
        first = await reader.read(_READ)
        t_first = t_last = time.monotonic()
        got, after_first = len(first), 0
        while got < nbytes:
            data = await reader.read(_READ)
            if not data:
                raise asyncio.IncompleteReadError(b"", nbytes - got)
            got += len(data)
            after_first += len(data)
            t_last = time.monotonic()
        writer.write_eof()
    finally:
        await _close(writer)
    return _mbit(after_first, t_last - t_first)


async def measure_upload(
    host: str, port: int, nbytes: int, *, connect: Connector = _direct
) -> float | None:
    """Mbit/s from client to server over `nbytes`, timed by the server."""
    reader, writer = await connect(host, port)
    try:
        writer.write(b"U" + _U64.pack(nbytes))
        # Wait for the server's go-ahead so no data piles up in front of it
        # (e.g. held by the proxy's handshake emulation) and inflates the rate.
        if await reader.readexactly(1) != b"R":
            raise ValueError("unexpected reply from measure server")
        remaining = nbytes
        while remaining > 0:
            block = _BLOCK if remaining >= len(_BLOCK) else _BLOCK[:remaining]
            writer.write(block)
            remaining -= len(block)
            await writer.drain()
        seconds, after_first = _RESULT.unpack(await reader.readexactly(_RESULT.size))
    finally:
        await _close(writer)
    return _mbit(after_first, seconds)


def _mbit(nbytes: int, seconds: float) -> float | None:
    """The rate, or None when nothing arrived after the first read.

    Not infinity: that is what a too-small transfer means, and it would be
    written as `Infinity`, which is not JSON.
    """
    if nbytes <= 0 or seconds <= 0:
        return None
    return nbytes * 8 / seconds / 1e6


@dataclass(frozen=True, slots=True)
class LinkMeasurement:
    """Nominal versus achieved characteristics of one link."""

    profile: str
    emulated: bool
    rate_limiter: str
    fallback_reason: str | None
    nominal_rtt_ms: float
    nominal_rate_mbit: float | None
    connect_rtt_ms: float
    rtt_ms: float
    rtt_min_ms: float
    rtt_max_ms: float
    down_mbit: float | None  # None: the transfer was too small to time
    up_mbit: float | None
    bulk_bytes: int

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    def summary(self) -> str:
        rate = "unlimited" if self.nominal_rate_mbit is None else f"{self.nominal_rate_mbit:g}"
        return (
            f"{self.profile}: RTT {self.rtt_ms:.2f} ms (nominal {self.nominal_rtt_ms:g}, "
            f"min {self.rtt_min_ms:.2f}, max {self.rtt_max_ms:.2f}), "
            f"connect+first echo {self.connect_rtt_ms:.2f} ms, "
            f"down {format_mbit(self.down_mbit)} / up {format_mbit(self.up_mbit)} "
            f"(nominal {rate} Mbit/s)"
        )


def format_mbit(mbit: float | None) -> str:
    """`47.9 Mbit/s`, or why there is no number."""
    return "not measured (too few bytes to time)" if mbit is None else f"{mbit:.1f} Mbit/s"


def default_bulk_bytes(profile: NetworkProfile) -> int:
    """About 0.6 s worth at the nominal rate, clamped to 2..16 MiB."""
    rate = profile.rate_bytes_per_s
    if rate is None:
        return 16 * 1024 * 1024
    return int(min(max(rate * 0.6, 2 * 1024 * 1024), 16 * 1024 * 1024))


async def measure_path(
    host: str,
    port: int,
    profile: NetworkProfile,
    *,
    connect: Connector = _direct,
    rtt_samples: int = 10,
    bulk_bytes: int | None = None,
    timeout: float | None = None,
    emulated: bool = False,
    rate_limiter: str = "none",
    fallback_reason: str | None = None,
) -> LinkMeasurement:
    """Measure through host:port (a proxy in front of a MeasureServer)."""
    nbytes = bulk_bytes or default_bulk_bytes(profile)
    if not 0 < nbytes <= MAX_BULK_BYTES:
        raise ValueError(f"bulk_bytes must be in 1..{MAX_BULK_BYTES}")
    if timeout is None:
        rate = profile.rate_bytes_per_s
        transfer = 2 * nbytes / rate if rate else 2.0
        timeout = 10.0 + 3 * transfer + 0.003 * profile.rtt_ms * (rtt_samples + 10)
    async with asyncio.timeout(timeout):
        rtt = await measure_rtt(host, port, connect=connect, samples=rtt_samples)
        down = await measure_download(host, port, nbytes, connect=connect)
        up = await measure_upload(host, port, nbytes, connect=connect)
    return LinkMeasurement(
        profile=profile.name,
        emulated=emulated,
        rate_limiter=rate_limiter,
        fallback_reason=fallback_reason,
        nominal_rtt_ms=profile.rtt_ms,
        nominal_rate_mbit=profile.rate_mbit,
        connect_rtt_ms=rtt.connect_ms,
        rtt_ms=rtt.median_ms,
        rtt_min_ms=min(rtt.samples_ms),
        rtt_max_ms=max(rtt.samples_ms),
        down_mbit=down,
        up_mbit=up,
        bulk_bytes=nbytes,
    )


async def measure_link(
    link: EmulatedLink,
    *,
    rtt_samples: int = 10,
    bulk_bytes: int | None = None,
    timeout: float | None = None,
) -> LinkMeasurement:
    """Measure a set-up link end to end: client namespace -> proxy -> loopback server."""
    # Start the in-process namespace socket helper before anything is timed.
    link.client_socket().close()
    async with MeasureServer("127.0.0.1") as server:
        proxy = await link.start_proxy("127.0.0.1", server.port)
        try:
            return await measure_path(
                proxy.host,
                proxy.port,
                link.profile,
                connect=link.open_connection,
                rtt_samples=rtt_samples,
                bulk_bytes=bulk_bytes,
                timeout=timeout,
                emulated=link.emulated,
                rate_limiter=link.rate_limiter,
                fallback_reason=link.fallback_reason,
            )
        finally:
            await proxy.close()
