"""Tests for the network-emulation harness (warmsocket.netem).

The delay-proxy tests run on loopback and need no privileges.  The namespace
tests need root, iproute2 and network-namespace support and skip otherwise.
Every test is bounded twice: an asyncio timeout inside and pytest-timeout outside.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import random
import signal
import socket
import statistics
import struct
import subprocess
import sys
import termios
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from warmsocket.netem import (
    LAN,
    LOOPBACK,
    WAN,
    CommandError,
    CommandResult,
    DelayProxy,
    EmulatedLink,
    LinkUnavailable,
    MeasureServer,
    NetworkProfile,
    Tools,
    cleanup,
    find_tools,
    inventory,
    measure_link,
    measure_path,
    run_command,
)
from warmsocket.netem import cli as netem_cli
from warmsocket.netem import link as link_module
from warmsocket.netem import plan as plan_module
from warmsocket.netem.plan import DEFAULT_PREFIX, new_plan, owner_alias, parse_owner

# Generous slack for a shared 2-core VM: timer wake-ups there cost ~0.3 ms,
# scheduling hiccups up to tens of ms.
SLACK = 0.040


def run(coro: Awaitable[Any], timeout: float = 30.0) -> Any:
    async def bounded() -> Any:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(bounded())


# -- tiny servers ------------------------------------------------------------


@contextlib.asynccontextmanager
async def tcp_server(
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[int]:
    """A loopback server running `handler` per connection; yields its port."""
    tasks: set[asyncio.Task[None]] = set()
    writers: set[asyncio.StreamWriter] = set()

    async def wrapped(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        writers.add(writer)
        try:
            await handler(reader, writer)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writers.discard(writer)
            writer.close()
            tasks.discard(task)

    server = await asyncio.start_server(wrapped, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for writer in list(writers):
            writer.transport.abort()
        if tasks:
            await asyncio.wait(list(tasks), timeout=5)
        await server.wait_closed()


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()


async def close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


async def round_trip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> float:
    t0 = time.monotonic()
    writer.write(b"x")
    await reader.readexactly(1)
    return time.monotonic() - t0


# -- DelayProxy on loopback (no privileges needed) ---------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("precise", [True, False], ids=["timerfd", "call_at"])
def test_proxy_round_trip_is_two_delays(precise: bool) -> None:
    delay = 0.030

    async def main() -> None:
        async with (
            tcp_server(echo) as port,
            DelayProxy(
                "127.0.0.1", port, delay_s=delay, emulate_handshake=False, precise_timers=precise
            ) as proxy,
        ):
            reader, writer = await asyncio.open_connection(*proxy.address)
            try:
                rtts = [await round_trip(reader, writer) for _ in range(5)]
            finally:
                await close_writer(writer)
        # Never early; typically on time (the median: one scheduling hiccup of a
        # loaded CI machine must not fail the test).
        assert all(rtt >= 2 * delay for rtt in rtts), rtts
        assert statistics.median(rtts) < 2 * delay + SLACK, rtts

    run(main())


@pytest.mark.timeout(30)
def test_proxy_emulates_tcp_handshake_on_new_connections() -> None:
    delay = 0.025

    async def main() -> None:
        async with tcp_server(echo) as port, DelayProxy("127.0.0.1", port, delay_s=delay) as proxy:
            t0 = time.monotonic()
            reader, writer = await asyncio.open_connection(*proxy.address)
            try:
                writer.write(b"x")
                await reader.readexactly(1)
                first = time.monotonic() - t0  # handshake RTT + request RTT
                second = await round_trip(reader, writer)
            finally:
                await close_writer(writer)
        assert 4 * delay <= first < 4 * delay + SLACK
        assert 2 * delay <= second < 2 * delay + SLACK

    run(main())


_STAMP = struct.Struct(">Qd")  # sequence number, send time


@pytest.mark.timeout(30)
def test_proxy_pipelines_chunks_instead_of_serialising_them() -> None:
    """N chunks sent 5 ms apart each arrive ~delay after being sent, not N x delay."""
    delay, gap, n = 0.050, 0.005, 20
    arrivals: list[tuple[int, float, float]] = []

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(n):
            seq, sent = _STAMP.unpack(await reader.readexactly(_STAMP.size))
            arrivals.append((seq, sent, time.monotonic()))

    async def main() -> float:
        async with (
            tcp_server(sink) as port,
            DelayProxy("127.0.0.1", port, delay_s=delay, emulate_handshake=False) as proxy,
        ):
            _reader, writer = await asyncio.open_connection(*proxy.address)
            try:
                t0 = time.monotonic()
                for seq in range(n):
                    writer.write(_STAMP.pack(seq, time.monotonic()))
                    await asyncio.sleep(gap)
                async with asyncio.timeout(10):
                    while len(arrivals) < n:
                        await asyncio.sleep(0.005)
                return time.monotonic() - t0
            finally:
                await close_writer(writer)

    elapsed = run(main())
    assert [a[0] for a in arrivals] == list(range(n))  # in order
    latencies = [received - sent for _, sent, received in arrivals]
    assert min(latencies) >= delay
    assert max(latencies) < delay + SLACK, latencies
    # Serialised chunks would need n * delay = 1 s; pipelined: sending span + delay.
    assert elapsed < n * gap + delay + 0.25, elapsed


@pytest.mark.timeout(60)
@pytest.mark.parametrize("jitter", [0.0, 0.004], ids=["no-jitter", "jitter"])
def test_proxy_large_transfer_is_intact_and_ordered(jitter: float) -> None:
    blob = random.Random(1).randbytes(8 * 1024 * 1024)

    async def main() -> bytes:
        async with (
            tcp_server(echo) as port,
            DelayProxy("127.0.0.1", port, delay_s=0.005, jitter_s=jitter, seed=7) as proxy,
        ):
            reader, writer = await asyncio.open_connection(*proxy.address)
            try:

                async def send() -> None:
                    for i in range(0, len(blob), 100_000):  # many differently sized chunks
                        writer.write(blob[i : i + 100_000])
                        await writer.drain()
                    writer.write_eof()

                sender = asyncio.create_task(send())
                received = await reader.read()  # until EOF: the echo server saw ours
                await sender
                return received
            finally:
                await close_writer(writer)

    received = run(main())
    assert len(received) == len(blob)
    assert hashlib.sha256(received).digest() == hashlib.sha256(blob).digest()


@pytest.mark.timeout(30)
def test_proxy_propagates_half_close_in_both_directions() -> None:
    delay = 0.020
    events: dict[str, float] = {}

    async def server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.read()  # until the client's EOF
        events["server_saw_eof"] = time.monotonic()
        writer.write(b"reply to " + request)  # the other direction still works
        await writer.drain()
        writer.write_eof()
        await reader.read()  # stays EOF

    async def main() -> bytes:
        async with (
            tcp_server(server) as port,
            DelayProxy("127.0.0.1", port, delay_s=delay, emulate_handshake=False) as proxy,
        ):
            reader, writer = await asyncio.open_connection(*proxy.address)
            try:
                writer.write(b"hello")
                events["client_eof"] = time.monotonic()
                writer.write_eof()
                reply = await reader.read()  # ends when the server's EOF arrives
                events["client_saw_eof"] = time.monotonic()
                # Both halves closed: the proxy drops the connection.
                async with asyncio.timeout(5):
                    while proxy.open_connections:
                        await asyncio.sleep(0.005)
                return reply
            finally:
                await close_writer(writer)

    assert run(main()) == b"reply to hello"
    assert events["server_saw_eof"] - events["client_eof"] >= delay
    assert events["client_saw_eof"] - events["server_saw_eof"] >= delay


@pytest.mark.timeout(30)
def test_proxy_propagates_server_close_and_client_reset() -> None:
    delay = 0.010
    server_result: list[bytes] = []

    async def closer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"bye")
        await writer.drain()
        writer.close()

    async def recorder(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            server_result.append(await reader.read())
        except ConnectionResetError:
            server_result.append(b"<reset>")

    async def main() -> None:
        async with tcp_server(closer) as port, DelayProxy("127.0.0.1", port, delay_s=delay) as p:
            reader, writer = await asyncio.open_connection(*p.address)
            try:
                assert await reader.read() == b"bye"  # data, then EOF
            finally:
                await close_writer(writer)

        async with tcp_server(recorder) as port, DelayProxy("127.0.0.1", port, delay_s=delay) as p:
            reader, writer = await asyncio.open_connection(*p.address)
            writer.write(b"partial")
            await asyncio.sleep(4 * delay)  # connected upstream, data delivered
            writer.transport.abort()  # RST
            async with asyncio.timeout(5):
                while not server_result:
                    await asyncio.sleep(0.005)
            assert server_result[0] in (b"partial", b"<reset>")
            async with asyncio.timeout(5):
                while p.open_connections:
                    await asyncio.sleep(0.005)

    run(main())


@pytest.mark.timeout(30)
def test_proxy_closes_client_when_upstream_refuses(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with tcp_server(echo) as port:
            pass  # the port is now closed
        async with DelayProxy("127.0.0.1", port, delay_s=0.005) as proxy:
            reader, writer = await asyncio.open_connection(*proxy.address)
            try:
                writer.write(b"anyone?")
                with contextlib.suppress(ConnectionResetError):
                    assert await reader.read() == b""
            finally:
                await close_writer(writer)
            assert proxy.stats.connect_failures == 1

    with caplog.at_level(logging.WARNING, logger="warmsocket.netem"):
        run(main())
    assert "cannot connect" in caplog.text


@pytest.mark.timeout(60)
def test_proxy_backpressure_bounds_buffering() -> None:
    """A reader that stops reading must stall the sender, not grow the proxy."""
    limit = 256 * 1024
    total = 32 * 1024 * 1024
    blob = random.Random(2).randbytes(total)
    samples: list[int] = []

    async def main() -> tuple[bytes, int, int]:
        go = asyncio.Event()
        received = bytearray()

        async def slow_reader(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await go.wait()
            while data := await reader.read(1 << 20):
                received.extend(data)

        async with (
            tcp_server(slow_reader) as port,
            DelayProxy("127.0.0.1", port, delay_s=0.005, max_buffer_bytes=limit) as proxy,
        ):
            _reader, writer = await asyncio.open_connection(*proxy.address)
            try:

                async def send() -> None:
                    for i in range(0, total, 1 << 20):
                        writer.write(blob[i : i + (1 << 20)])
                        await writer.drain()
                    writer.write_eof()

                sender = asyncio.create_task(send())
                # The server does not read for 1 s: kernel buffers fill, then the
                # proxy must stop reading instead of queueing 32 MiB.
                deadline = time.monotonic() + 1.0
                while time.monotonic() < deadline:
                    samples.append(proxy.buffered_bytes)
                    await asyncio.sleep(0.01)
                stalled = not sender.done()
                go.set()  # now drain everything
                await sender
                async with asyncio.timeout(20):
                    while len(received) < total:
                        await asyncio.sleep(0.01)
                return bytes(received), proxy.stats.peak_buffered_bytes, int(stalled)
            finally:
                await close_writer(writer)

    received, peak, stalled = run(main(), timeout=50)
    assert stalled, "the sender should have been blocked by backpressure"
    # One read (<= 256 KiB) may land on top of the limit before reading pauses.
    bound = limit + 256 * 1024
    assert max(samples) <= bound, max(samples)
    assert peak <= bound, peak
    assert hashlib.sha256(received).digest() == hashlib.sha256(blob).digest()


@pytest.mark.timeout(30)
def test_proxy_notices_a_client_reset_while_it_is_not_reading_the_client() -> None:
    """The server stopped reading, so the proxy stopped reading the client; the
    client then resets. The connection and its buffers must go, not wait (up to
    max_buffer_bytes held) until the server reads again."""

    async def main() -> tuple[bool, int, float]:
        connected, release = asyncio.Event(), asyncio.Event()

        async def not_reading(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            connected.set()
            await release.wait()

        async with (
            tcp_server(not_reading) as port,
            DelayProxy("127.0.0.1", port, delay_s=0.005, max_buffer_bytes=256 * 1024) as proxy,
        ):
            _reader, writer = await asyncio.open_connection(*proxy.address)
            await connected.wait()

            async def send() -> None:
                for _ in range(64):
                    writer.write(bytes(1 << 20))
                    await writer.drain()

            sender = asyncio.create_task(send())
            # The server does not read: kernel buffers fill, then the proxy must
            # stop reading the client (backpressure) and the sender stalls.
            await asyncio.sleep(0.5)
            stalled = not sender.done() and proxy.stats.peak_buffered_bytes >= 64 * 1024
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()  # with SO_LINGER 0: a real RST
            t0 = time.monotonic()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    while proxy.open_connections:
                        await asyncio.sleep(0.01)
            noticed = time.monotonic() - t0
            left = proxy.open_connections
            release.set()
            return stalled, left, noticed

    stalled, left, noticed = run(main())
    assert stalled, "the proxy should have stopped reading the client"
    assert left == 0, f"the reset client's connection was still open after {noticed:.1f} s"
    assert noticed < 2.0


def _unacked(sock: socket.socket) -> int:
    """Bytes sock has sent or queued that its peer has not acknowledged (SIOCOUTQ)."""
    queued: int = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
    return queued


@pytest.mark.timeout(30)
def test_proxy_passes_on_the_data_before_a_reset_on_a_side_it_is_not_reading() -> None:
    """The proxy stopped reading the server (its FIFO was full); the server sent more,
    which the proxy's socket took, then reset. Finding that reset consumed it and
    ended the stream after what the FIFO held: the rest never reached the client.
    Now the client gets every byte the server sent, then the end of the connection."""
    delay, limit = 1.0, 64 * 1024  # the delay outlasts one probe of the paused side
    first, rest = random.Random(3).randbytes(limit), random.Random(4).randbytes(limit // 4)

    async def main() -> tuple[bytes, str, int]:
        loop = asyncio.get_running_loop()
        with socket.create_server(("127.0.0.1", 0)) as listener:
            listener.setblocking(False)
            async with DelayProxy(
                "127.0.0.1", listener.getsockname()[1], delay_s=delay,
                max_buffer_bytes=limit, emulate_handshake=False,
            ) as proxy:  # fmt: skip
                reader, writer = await asyncio.open_connection(*proxy.address)
                received = bytearray()

                async def read_all() -> str:
                    try:
                        while data := await reader.read(1 << 16):
                            received.extend(data)
                    except ConnectionResetError:
                        return "reset"
                    return "EOF"

                reading = asyncio.create_task(read_all())
                server, _ = await loop.sock_accept(listener)
                with server:
                    await loop.sock_sendall(server, first)
                    while proxy.buffered_bytes < limit:  # then it stops reading the server
                        await asyncio.sleep(0.01)
                    await loop.sock_sendall(server, rest)  # taken by the proxy's socket
                    while _unacked(server):
                        await asyncio.sleep(0.01)
                    linger = struct.pack("ii", 1, 0)
                    server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                # (closed with SO_LINGER 0: a real RST)
                async with asyncio.timeout(10):
                    end = await reading
                    while proxy.open_connections:
                        await asyncio.sleep(0.01)
                await close_writer(writer)
                return bytes(received), end, proxy.open_connections

    received, end, left = run(main())
    arrived, sent = len(received), len(first) + len(rest)
    assert arrived == sent, f"{arrived} of the {sent} bytes sent before the reset arrived"
    assert received == first + rest
    assert end in ("EOF", "reset") and left == 0


@pytest.mark.timeout(30)
def test_proxy_rate_limit_when_no_kernel_shaping() -> None:
    """The fallback path: the proxy itself serialises at the profile's rate."""
    profile = NetworkProfile("test-20mbit", delay_ms=5.0, rate_mbit=20.0)

    async def main() -> Any:
        async with MeasureServer() as server:
            proxy = DelayProxy.from_profile(profile, "127.0.0.1", server.port, rate_limit=True)
            async with proxy:
                return await measure_path(
                    proxy.host, proxy.port, profile, bulk_bytes=2 * 1024 * 1024, rtt_samples=5
                )

    m = run(main())
    assert 0.7 * 20 <= m.down_mbit <= 1.3 * 20, m
    assert 0.7 * 20 <= m.up_mbit <= 1.3 * 20, m
    assert 10.0 <= m.rtt_ms < 10.0 + SLACK * 1000, m


@pytest.mark.timeout(30)
def test_proxy_zero_delay_passes_through() -> None:
    async def main() -> float:
        async with tcp_server(echo) as port, DelayProxy("127.0.0.1", port) as proxy:
            reader, writer = await asyncio.open_connection(*proxy.address)
            try:
                await round_trip(reader, writer)
                return min([await round_trip(reader, writer) for _ in range(5)])
            finally:
                await close_writer(writer)

    assert run(main()) < 0.010


@pytest.mark.timeout(30)
def test_proxy_reports_each_delivery_before_writing_it() -> None:
    """`on_write` sees every delivered piece, with its direction, before the peer can."""
    seen: list[tuple[bool, int, float]] = []
    arrived: list[float] = []

    async def first_byte_time(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read(5)
        arrived.append(time.monotonic())
        writer.write(data)
        await writer.drain()
        await reader.read()
        writer.close()

    def record(upstream: bool, nbytes: int) -> None:
        seen.append((upstream, nbytes, time.monotonic()))

    async def main() -> None:
        async with (
            tcp_server(first_byte_time) as port,
            DelayProxy("127.0.0.1", port, delay_s=0.005, on_write=record) as proxy,
        ):
            reader, writer = await asyncio.open_connection(*proxy.address)
            writer.write(b"hello")
            assert await reader.readexactly(5) == b"hello"
            await close_writer(writer)

    run(main())
    ups = [(n, t) for up, n, t in seen if up]
    downs = [n for up, n, _t in seen if not up]
    assert sum(n for n, _t in ups) == 5 and sum(downs) == 5
    assert ups[-1][1] <= arrived[0]


def test_profiles() -> None:
    assert WAN.rtt_ms == 40 and WAN.rate_mbit == 50
    assert LAN.rtt_ms == 0.5
    assert LOOPBACK.is_noop and LOOPBACK.tbf() is None
    tbf = WAN.tbf()
    assert tbf is not None
    # Several full frames, and between 1 and 10 ms worth of line rate.
    assert tbf.burst_bytes >= 8 * 1514
    assert 50e6 / 8 * 0.001 <= tbf.burst_bytes <= 50e6 / 8 * 0.010
    assert tbf.tc_args()[:3] == ["tbf", "rate", "50000000bit"]
    with pytest.raises(ValueError):
        NetworkProfile("bad", delay_ms=-1, rate_mbit=None)
    with pytest.raises(ValueError):
        NetworkProfile("bad", delay_ms=1, rate_mbit=0)


def test_address_plan_uses_benchmarking_range() -> None:
    plan = new_plan(["198.18.0.1", "198.18.0.2", "10.0.0.1"])
    assert plan.subnet_index == 1
    assert (plan.server_host, plan.client_host) == ("198.18.0.5", "198.18.0.6")
    assert plan.netns.startswith(DEFAULT_PREFIX)
    assert len(plan.veth_server) <= 15 and len(plan.veth_client) <= 15
    owner = parse_owner(owner_alias())
    assert owner is not None and owner.pid == os.getpid()


# -- fallback (no privileges needed: the command runner is simulated) --------


class FakeRunner:
    """Records commands; fails the first one containing `fail_on`."""

    def __init__(self, fail_on: str | None) -> None:
        self.fail_on = fail_on
        self.calls: list[list[str]] = []

    def __call__(
        self, argv: Sequence[str], *, check: bool = True, timeout: float = 10.0
    ) -> CommandResult:
        argv = list(argv)
        self.calls.append(argv)
        if self.fail_on is not None and self.fail_on in " ".join(argv):
            raise CommandError(argv, 1, "Error: simulated failure (Operation not permitted)")
        out = "[]" if "-j" in argv else ""
        return CommandResult(tuple(argv), 0, out, "")


@pytest.fixture
def fake_tools(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Pretend root + iproute2 are there (the runner is fake anyway)."""
    monkeypatch.setattr(link_module, "_preflight", lambda: Tools(ip="ip", tc="tc"))
    monkeypatch.setattr(plan_module, "_lock_path", lambda: tmp_path / "netem.lock")


@pytest.mark.timeout(30)
@pytest.mark.usefixtures("fake_tools")
def test_fallback_when_namespace_creation_fails(caplog: pytest.LogCaptureFixture) -> None:
    runner = FakeRunner(fail_on="netns add")
    profile = NetworkProfile("fast-wan", delay_ms=10.0, rate_mbit=50.0)
    with caplog.at_level(logging.WARNING, logger="warmsocket.netem"):
        link = EmulatedLink(profile, runner=runner).setup()
    try:
        assert not link.emulated
        assert link.fallback_reason is not None
        assert "simulated failure" in link.fallback_reason
        assert "netns add" in link.fallback_reason
        assert (link.server_host, link.client_host, link.netns) == ("127.0.0.1", "127.0.0.1", None)
        assert link.rate_limiter == "proxy"
        assert "falling back to loopback" in caplog.text
        assert link.client_command(["true"]) == ["true"]

        async def main() -> Any:
            async with MeasureServer() as server:
                proxy = await link.start_proxy("127.0.0.1", server.port)
                try:
                    assert proxy.host == "127.0.0.1"
                    return await measure_path(
                        proxy.host, proxy.port, profile, bulk_bytes=1 << 20, rtt_samples=5
                    )
                finally:
                    await link.close_proxies()

        m = run(main())
        assert 20.0 <= m.rtt_ms < 20.0 + SLACK * 1000  # the delay still applies
    finally:
        link.teardown()


@pytest.mark.timeout(30)
@pytest.mark.usefixtures("fake_tools")
def test_fallback_after_partial_setup_removes_what_was_created() -> None:
    runner = FakeRunner(fail_on="qdisc replace")
    link = EmulatedLink(WAN, runner=runner).setup()
    link.teardown()
    assert not link.emulated
    assert link.fallback_reason is not None and "qdisc replace" in link.fallback_reason
    joined = [" ".join(c) for c in runner.calls]
    assert any(c.startswith("ip netns add ws-bench-") for c in joined)
    assert any(c.startswith("ip link del dev ws-bench-") for c in joined)
    assert any(c.startswith("ip netns del ws-bench-") for c in joined)


class InterruptingRunner(FakeRunner):
    """A FakeRunner that raises `exc` (not a CommandError) at the `fail_on` step."""

    def __init__(self, fail_on: str, exc: BaseException) -> None:
        super().__init__(fail_on=None)
        self.interrupt_on = fail_on
        self.exc = exc

    def __call__(
        self, argv: Sequence[str], *, check: bool = True, timeout: float = 10.0
    ) -> CommandResult:
        if self.interrupt_on in " ".join(argv):
            self.calls.append(list(argv))
            raise self.exc
        return super().__call__(argv, check=check, timeout=timeout)


@pytest.mark.timeout(30)
@pytest.mark.usefixtures("fake_tools")
@pytest.mark.parametrize(
    "exc",
    [KeyboardInterrupt(), RuntimeError("unexpected"), KeyError("ifname")],
    ids=["ctrl-c", "runtime-error", "odd-ip-output"],
)
def test_setup_interrupted_midway_removes_what_was_created(exc: BaseException) -> None:
    """Ctrl-C or an unexpected error during setup is raised, not turned into a
    fallback, but the namespace and veth created so far are removed first."""
    runner = InterruptingRunner("qdisc replace", exc)
    link = EmulatedLink(WAN, runner=runner)
    with pytest.raises(type(exc)):
        link.setup()
    joined = [" ".join(c) for c in runner.calls]
    assert any(c.startswith("ip netns add ws-bench-") for c in joined)
    assert any(c.startswith("ip link del dev ws-bench-") for c in joined)
    assert any(c.startswith("ip netns del ws-bench-") for c in joined)
    assert not link.emulated


@pytest.mark.timeout(30)
@pytest.mark.usefixtures("fake_tools")
def test_require_raises_instead_of_falling_back() -> None:
    with pytest.raises(LinkUnavailable, match="simulated failure"):
        EmulatedLink(WAN, runner=FakeRunner(fail_on="netns add"), require=True).setup()


@pytest.mark.timeout(30)
def test_fallback_reasons_for_missing_root_and_tools(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    link = EmulatedLink(WAN, runner=FakeRunner(fail_on=None)).setup()
    assert not link.emulated and "not running as root" in (link.fallback_reason or "")
    link.teardown()

    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(link_module, "find_tools", lambda: "`tc` not found: install iproute2")
    link = EmulatedLink(WAN, runner=FakeRunner(fail_on=None)).setup()
    assert not link.emulated and "iproute2" in (link.fallback_reason or "")
    link.teardown()

    link = EmulatedLink(LOOPBACK).setup()
    assert not link.emulated and "no emulation" in (link.fallback_reason or "")
    assert link.rate_limiter == "none"
    link.teardown()


class ListingRunner(FakeRunner):
    """A FakeRunner whose `ip -j ...` listings show the given links and namespaces."""

    def __init__(self, links: Sequence[dict[str, object]], netns: Sequence[str]) -> None:
        super().__init__(fail_on=None)
        self.links = json.dumps(links)
        self.netns = json.dumps([{"name": n} for n in netns])

    def __call__(
        self, argv: Sequence[str], *, check: bool = True, timeout: float = 10.0
    ) -> CommandResult:
        result = super().__call__(argv, check=check, timeout=timeout)
        if "-j" not in argv:
            return result
        out = self.netns if "netns" in argv else self.links
        return CommandResult(tuple(argv), 0, out, "")

    def deleted(self) -> list[str]:
        return [c[-1] for c in self.calls if "del" in c]


@pytest.mark.timeout(30)
@pytest.mark.usefixtures("fake_tools")
def test_cleanup_touches_only_objects_named_like_the_harness() -> None:
    """Stale cleanup runs on every setup: it must never delete someone else's
    interface or namespace just because its name starts with the prefix."""
    dead = "warmsocket-netem pid=999999999 start=1"
    runner = ListingRunner(
        links=[
            {"ifname": "zz-1a2b3s", "ifalias": dead},  # ours, owner gone
            {"ifname": "zz-4c5d6s"},  # ours, crashed before its alias was set
            {"ifname": "zz-br0"},  # another program's bridge
            {"ifname": "zz-7e8f9s", "ifalias": "docker veth"},  # our name, not our alias
            {"ifname": "zz-0a0b0sx", "ifalias": dead},  # one character too many
        ],
        netns=["zz-1a2b3", "zz-4c5d6", "zz-unrelated", "zz-0a0b0x", "zz-ABCDE"],
    )
    report = cleanup(Tools(ip="ip", tc="tc"), runner=runner, prefix="zz-")
    assert sorted(report.removed_links) == ["zz-1a2b3s", "zz-4c5d6s"]
    assert sorted(report.removed_netns) == ["zz-1a2b3", "zz-4c5d6"]
    assert sorted(runner.deleted()) == ["zz-1a2b3", "zz-1a2b3s", "zz-4c5d6", "zz-4c5d6s"]
    assert not report.errors
    inv = inventory(runner, Tools(ip="ip", tc="tc"), "zz-")  # what `list` shows
    assert [link.name for link in inv.links] == ["zz-1a2b3s", "zz-4c5d6s"]


# -- real namespaces (root only) ---------------------------------------------


def _netns_unavailable() -> str | None:
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    tools = find_tools()
    if isinstance(tools, str):
        return tools
    try:
        with EmulatedLink(LAN, require=True):
            pass
    except LinkUnavailable as exc:
        return str(exc)
    return None


@pytest.fixture(scope="session")
def netns_support() -> None:
    reason = _netns_unavailable()
    if reason is not None:
        pytest.skip(f"network namespaces unavailable: {reason}")


needs_netns = pytest.mark.usefixtures("netns_support")


def _tools() -> Tools:
    tools = find_tools()
    assert not isinstance(tools, str)
    return tools


def _assert_gone(netns: str, prefix: str = DEFAULT_PREFIX) -> None:
    inv = inventory(run_command, _tools(), prefix)
    assert netns not in inv.netns
    assert not [link.name for link in inv.links if link.name.startswith(netns)]
    mine = [
        link.name for link in inv.links if (o := parse_owner(link.alias)) and o.pid == os.getpid()
    ]
    assert not mine, f"links owned by this test process survived: {mine}"


@needs_netns
@pytest.mark.timeout(60)
def test_wan_link_achieves_nominal_rtt_and_rate() -> None:
    async def main() -> tuple[Any, str]:
        async with EmulatedLink(WAN, require=True) as link:
            assert link.emulated and link.rate_limiter == "tbf"
            assert link.server_host.startswith("198.1") and link.client_host.startswith("198.1")
            netns = link.netns
            assert netns is not None and netns.startswith(DEFAULT_PREFIX)
            assert netns in inventory(run_command, _tools()).netns
            return await measure_link(link, rtt_samples=10), netns

    m, netns = run(main(), timeout=50)
    assert 40.0 <= m.rtt_ms < 40.0 + 10.0, m
    assert 80.0 <= m.connect_rtt_ms < 80.0 + 20.0, m
    assert 0.7 * 50 <= m.down_mbit <= 1.3 * 50, m
    assert 0.7 * 50 <= m.up_mbit <= 1.3 * 50, m
    _assert_gone(netns)


@needs_netns
@pytest.mark.timeout(60)
def test_lan_link_is_fast() -> None:
    async def main() -> Any:
        async with EmulatedLink(LAN, require=True) as link:
            return await measure_link(link, rtt_samples=20)

    m = run(main(), timeout=50)
    assert 0.5 <= m.rtt_ms < 0.5 + 5.0, m
    # A user-space proxy on a 2-core VM: accept a wide band around 1 Gbit/s.
    assert m.down_mbit >= 300 and m.up_mbit >= 300, m
    assert m.down_mbit <= 1300 and m.up_mbit <= 1300, m


_CLIENT = textwrap.dedent(
    """
    import json, socket, sys
    host, port, direct_port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    s = socket.create_connection((host, port), timeout=10)
    s.sendall(b"ping")
    s.shutdown(socket.SHUT_WR)
    reply = b""
    while chunk := s.recv(4096):
        reply += chunk
    local = s.getsockname()[0]
    s.close()
    try:  # the root namespace's loopback must not be reachable from here
        socket.create_connection(("127.0.0.1", direct_port), timeout=2).close()
        direct = "reachable"
    except OSError as exc:
        direct = type(exc).__name__
    print(json.dumps({"reply": reply.decode(), "local": local, "direct": direct}))
    """
)


@needs_netns
@pytest.mark.timeout(60)
def test_subprocess_in_client_namespace_reaches_root_server() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()
        writer.write(b"pong:" + data)
        await writer.drain()

    async def main() -> tuple[dict[str, str], str, str, float]:
        async with tcp_server(handler) as port, EmulatedLink(WAN, require=True) as link:
            proxy = await link.start_proxy("127.0.0.1", port)
            argv = [sys.executable, "-c", _CLIENT, proxy.host, str(proxy.port), str(port)]
            t0 = time.monotonic()
            proc = link.run_in_client_ns(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            out, err = await asyncio.to_thread(proc.communicate, timeout=30)
            elapsed = time.monotonic() - t0
            assert proc.returncode == 0, err.decode()
            assert link.netns is not None
            return json.loads(out), link.client_host, link.netns, elapsed

    result, client_host, netns, elapsed = run(main(), timeout=50)
    assert result["reply"] == "pong:ping"
    assert result["local"] == client_host  # it really ran in the client namespace
    assert result["direct"] != "reachable"
    assert elapsed >= 0.080  # connect + request/response: 2 RTT of the WAN profile
    _assert_gone(netns)


def _inet6_addresses(argv: list[str]) -> list[str]:
    rows = json.loads(run_command(argv).stdout)
    return [a["local"] for row in rows for a in row["addr_info"] if a["family"] == "inet6"]


@needs_netns
@pytest.mark.timeout(60)
def test_link_is_ipv4_only() -> None:
    """No IPv6 on either veth end: an IPv6 link-local address would let the client
    reach a root-namespace server listening on "::" directly, without the delay."""
    tools = _tools()
    with EmulatedLink(LAN, require=True) as link:
        assert link.plan is not None and link.netns is not None
        time.sleep(0.2)  # the kernel adds link-local addresses as the ends come up
        server_end = [tools.ip, "-j", "addr", "show", "dev", link.plan.veth_server]
        client_end = [tools.ip, "-n", link.netns, "-j", "addr", "show", "dev",
                      link.plan.veth_client]  # fmt: skip
        assert _inet6_addresses(server_end) == []
        assert _inet6_addresses(client_end) == []


def _make_debris(tools: Tools, owner: str, prefix: str) -> str:
    """A namespace + veth looking like a harness link owned by `owner`."""
    ns = new_plan([], prefix=prefix).netns
    for argv in (
        [tools.ip, "netns", "add", ns],
        [tools.ip, "link", "add", f"{ns}s", "type", "veth", "peer", "name", f"{ns}c", "netns", ns],
        [tools.ip, "link", "set", "dev", f"{ns}s", "alias", owner],
    ):
        run_command(argv)
    return ns


@needs_netns
@pytest.mark.timeout(60)
def test_cleanup_removes_debris_of_dead_owners_only() -> None:
    tools = _tools()
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)  # fmt: skip
    dead_pid = int(finished.stdout)
    # Own prefix, so include_live below cannot touch a benchmark running meanwhile.
    prefix = "ws-btest-"
    live = EmulatedLink(LAN, require=True, prefix=prefix).setup()  # also cleans: debris after
    dead = _make_debris(tools, f"warmsocket-netem pid={dead_pid} start=1", prefix)
    reused = _make_debris(tools, f"warmsocket-netem pid={os.getpid()} start=1", prefix)
    try:
        assert live.netns is not None
        # From another process, through the command line.
        argv = [sys.executable, "-m", "warmsocket.netem", "--prefix", prefix, "cleanup"]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "Traceback" not in proc.stderr
        removed = proc.stdout.split("removed links:")[1].split(";")[0]
        assert f"{dead}s" in removed and f"{reused}s" in removed
        assert f"{live.netns}s" not in removed
        assert f"kept (owner still running): {live.netns}s" in proc.stdout
        assert live.netns in inventory(run_command, tools, prefix).netns
        # In-process, with include_live: the live link goes too.
        report = cleanup(tools, include_live=True, prefix=prefix)
        assert f"{live.netns}s" in report.removed_links and live.netns in report.removed_netns
    finally:
        live.teardown()
        for ns in (dead, reused):
            run_command([tools.ip, "link", "del", "dev", f"{ns}s"], check=False)
            run_command([tools.ip, "netns", "del", ns], check=False)
    for ns in (dead, reused, live.netns or ""):
        _assert_gone(ns, prefix)


_CRASHER = textwrap.dedent(
    """
    import sys, time
    from warmsocket.netem import LAN, EmulatedLink
    link = EmulatedLink(LAN, require=True).setup()
    print(link.netns, flush=True)
    if sys.argv[1] == "exit":
        sys.exit(0)  # no teardown: atexit must clean up
    time.sleep(60)  # killed by the test
    """
)


@needs_netns
@pytest.mark.timeout(60)
def test_atexit_and_crash_recovery() -> None:
    tools = _tools()
    # Normal exit without teardown: the atexit hook removes the link.
    done = subprocess.run([sys.executable, "-c", _CRASHER, "exit"],
                          capture_output=True, text=True, timeout=30, check=True)  # fmt: skip
    _assert_gone(done.stdout.strip())

    # SIGKILL: nothing runs; the next harness start removes the debris.
    proc = subprocess.Popen([sys.executable, "-c", _CRASHER, "kill"],
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout is not None
        netns = proc.stdout.readline().strip()
        assert netns in inventory(run_command, tools).netns
    finally:
        proc.kill()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
    assert netns in inventory(run_command, tools).netns  # left behind by the crash
    with EmulatedLink(LAN, require=True):  # cleanup_stale=True by default
        assert netns not in inventory(run_command, tools).netns
    _assert_gone(netns)


# -- command line --------------------------------------------------------------

_CLI = [sys.executable, "-m", "warmsocket.netem"]


def test_cli_run_refuses_a_listen_port_out_of_range() -> None:
    argv = [*_CLI, "run", "--target", "127.0.0.1:1", "--listen-port", "70000", "--", "true"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=50)
    assert proc.returncode == 2
    assert "argument --listen-port: not a port: '70000'" in proc.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["--prefix", "ws-btest-", "-v", "check"],
        ["check", "--prefix", "ws-btest-", "-v"],
        ["-v", "check", "--prefix", "ws-btest-"],
    ],
    ids=["before", "after", "both"],
)
def test_cli_common_options_before_or_after_the_subcommand(argv: list[str]) -> None:
    """`check -v` (as the docs show it) works as well as `-v check`."""
    args = netem_cli.build_parser().parse_args(argv)
    assert (args.command, args.prefix, args.verbose) == ("check", "ws-btest-", True)


def test_cli_run_require_without_root_says_why_without_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    argv = ["run", "--require", "--target", "127.0.0.1:9", "--", "true"]
    assert netem_cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "cannot emulate WAN link: not running as root" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("option", "value"),
    [("--samples", "0"), ("--bulk-bytes", "0"), ("--timeout", "0")],
)
def test_cli_check_refuses_values_it_cannot_measure_with(option: str, value: str) -> None:
    """A usage message naming the option, not a traceback from inside the measurement."""
    argv = [*_CLI, "check", "--profile", "loopback", option, value]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=50)
    assert "Traceback" not in proc.stderr
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"argument {option}: expected" in proc.stderr


@pytest.mark.timeout(60)
def test_cli_check_json_on_loopback() -> None:
    argv = [*_CLI, "check", "--profile", "loopback", "--json", "--samples", "3"]
    proc = subprocess.run(
        [*argv, "--bulk-bytes", "1000000"], capture_output=True, text=True, timeout=50
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    report = json.loads(proc.stdout)
    (row,) = report["profiles"]
    assert row["profile"] == "LOOPBACK" and row["emulated"] is False
    assert row["measurement"]["rtt_ms"] < 10


def _no_json_constants(name: str) -> object:
    raise AssertionError(f"{name} is not JSON")


@pytest.mark.timeout(60)
def test_cli_check_json_stays_json_when_a_transfer_is_too_small_to_time() -> None:
    """100 bytes arrive in one read, so there is no rate to report: that is null,
    not `Infinity`, which JSON parsers other than Python's reject."""
    argv = [*_CLI, "check", "--profile", "loopback", "--json", "--samples", "3"]
    proc = subprocess.run(
        [*argv, "--bulk-bytes", "100"], capture_output=True, text=True, timeout=50
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout, parse_constant=_no_json_constants)
    (row,) = report["profiles"]
    assert row["measurement"]["down_mbit"] is None
    assert row["measurement"]["up_mbit"] is None or row["measurement"]["up_mbit"] > 0


@needs_netns
@pytest.mark.timeout(60)
def test_cli_check_reports_every_profile() -> None:
    proc = subprocess.run([*_CLI, "check"], capture_output=True, text=True, timeout=50)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    for name in ("WAN", "LAN", "LOOPBACK"):
        assert f"\n{name}: RTT" in proc.stdout
    assert "netem" in proc.stdout and "namespace ws-bench-" in proc.stdout


@pytest.mark.timeout(60)
def test_cli_proxy_serves_until_sigterm() -> None:
    async def main() -> tuple[float, int]:
        async with tcp_server(echo) as port:
            argv = [*_CLI, "proxy", "--profile", "wan", "--target", f"127.0.0.1:{port}"]
            proc = await asyncio.create_subprocess_exec(
                *argv, "--duration", "30", stdout=subprocess.PIPE
            )
            try:
                assert proc.stdout is not None
                line = (await proc.stdout.readline()).decode()
                listen = line.split()[2]  # "netem proxy HOST:PORT -> ..."
                host, _, proxy_port = listen.rpartition(":")
                reader, writer = await asyncio.open_connection(host, int(proxy_port))
                try:
                    await round_trip(reader, writer)  # includes the handshake
                    rtt = await round_trip(reader, writer)
                finally:
                    await close_writer(writer)
                proc.terminate()
                return rtt, await proc.wait()
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()

    rtt, rc = run(main(), timeout=50)
    assert 0.040 <= rtt < 0.040 + SLACK
    assert rc == 0


_RUN_CLIENT = textwrap.dedent(
    """
    import os, socket, sys
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
    s.sendall(b"ping")
    s.shutdown(socket.SHUT_WR)
    print(s.recv(100).decode(), s.getsockname()[0], os.environ["NETEM_PROFILE"])
    sys.exit(3)
    """
)


@needs_netns
@pytest.mark.timeout(60)
def test_cli_run_wraps_a_command_in_the_client_namespace() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"pong:" + await reader.read())
        await writer.drain()

    async def main() -> tuple[int, str, str]:
        async with tcp_server(handler) as port:
            argv = [*_CLI, "run", "--profile", "lan", "--require", "--target", f"127.0.0.1:{port}"]
            proc = await asyncio.create_subprocess_exec(
                *argv, "--", sys.executable, "-c", _RUN_CLIENT, "{host}", "{port}",
                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )  # fmt: skip
            out, err = await proc.communicate()
            assert proc.returncode is not None
            return proc.returncode, out.decode(), err.decode()

    rc, out, err = run(main(), timeout=50)
    assert rc == 3, err  # the command's exit status
    reply, local, profile = out.split()
    assert reply == "pong:ping" and profile == "LAN"
    assert local.startswith("198.18.")
    assert "netem: LAN" in err and "Traceback" not in err


def _alive(pid: int) -> bool:
    """True if pid runs (a zombie waiting for its parent counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _kill_survivors(pids: list[int]) -> list[int]:
    """The pids still running, killed so that a failing test leaves none behind."""
    survivors = [pid for pid in pids if _alive(pid)]
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
    return survivors


@contextlib.contextmanager
def _netem_run(
    log_path: Path, *args: str
) -> Iterator[tuple[subprocess.Popen[bytes], str, list[int]]]:
    """`netem run --profile lan --require --target 127.0.0.1:9 ARGS`, its stderr in
    log_path; yields it once its command runs, with the namespace and the command's
    pids. Killed if it is still running at the end."""
    argv = [*_CLI, "run", "--profile", "lan", "--require", "--target", "127.0.0.1:9", *args]
    # stderr goes to a file: a pipe would stay open as long as a surviving command.
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(argv, stderr=log_file)
    netns, pids = "", []
    try:
        deadline = time.monotonic() + 20
        while not pids and time.monotonic() < deadline and proc.poll() is None:
            err = log_path.read_text()  # "netem: LAN ... -- namespace X, client ..."
            if "netem: proxy" in err:  # the command is started right after this line
                netns = err.split("namespace ", 1)[1].split(",", 1)[0]
                listed = run_command([_tools().ip, "netns", "pids", netns]).stdout
                pids = [int(p) for p in listed.split()]  # `ip netns exec` execs: same pid
            time.sleep(0.05)
        assert pids, log_path.read_text()
        yield proc, netns, pids
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


@needs_netns
@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=["SIGINT", "SIGTERM", "SIGHUP"]
)
def test_cli_run_stopped_by_signal_removes_link_and_command(signum: int, tmp_path: Path) -> None:
    """Ctrl-C, `kill` or a closed terminal on `netem run` stops the wrapped command
    and removes the namespace and veth instead of leaving them."""
    log_path = tmp_path / "stderr"
    with _netem_run(log_path, "--", "sleep", "30") as (proc, netns, pids):
        proc.send_signal(signum)
        rc = proc.wait(timeout=20)
    err = log_path.read_text()
    assert not _kill_survivors(pids), f"the wrapped command survived: {err}"
    _assert_gone(netns)
    assert rc == 128 + signum, err  # the shell's convention for "ended by a signal"
    assert "Traceback" not in err


# Ignored signals stay ignored across exec: `sleep` itself ignores SIGTERM and SIGINT.
_IGNORES_TERM = ["sh", "-c", "trap '' TERM INT; exec sleep 30"]


@needs_netns
@pytest.mark.timeout(60)
@pytest.mark.parametrize("second", ["SIGTERM after --timeout", "Ctrl-C after SIGTERM"])
def test_cli_run_a_signal_while_stopping_the_command_still_kills_it(
    second: str, tmp_path: Path
) -> None:
    """A command that ignores SIGTERM gets 5 s, then SIGKILL. A signal during those
    5 s (a `kill` after --timeout began the stop, Ctrl-C after a `kill`) cut them
    short: `run` exited 143 with the command still running, outside any namespace."""
    log_path = tmp_path / "stderr"
    timed_out = second == "SIGTERM after --timeout"
    options = ["--timeout", "1"] if timed_out else []
    with _netem_run(log_path, *options, "--", *_IGNORES_TERM) as (proc, netns, pids):
        if timed_out:
            deadline = time.monotonic() + 10
            while "stopping it" not in log_path.read_text() and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)  # well inside the 5 s grace
            proc.send_signal(signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGTERM)
            time.sleep(1.0)
            proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=20)
    err = log_path.read_text()
    assert not _kill_survivors(pids), f"the wrapped command survived: {err}"
    _assert_gone(netns)
    # The first cause decides the exit status: the timeout, or the SIGTERM.
    assert rc == (124 if timed_out else 128 + signal.SIGTERM), err
    assert "already stopping" in err and "Traceback" not in err


@contextlib.contextmanager
def _ignoring(signum: int) -> Iterator[None]:
    """Processes started inside have `signum` ignored, as `nohup` does for SIGHUP."""
    previous = signal.signal(signum, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signum, previous)


@needs_netns
@pytest.mark.timeout(60)
def test_cli_run_under_nohup_keeps_running_when_the_terminal_closes(tmp_path: Path) -> None:
    """`nohup netem run ...`: the terminal closing (SIGHUP) stopped the run all the
    same, exit 129, because run handled SIGHUP whether it was ignored or not. An
    ignored SIGHUP now stays ignored; SIGTERM still stops the run cleanly."""
    log_path = tmp_path / "stderr"
    with (
        _ignoring(signal.SIGHUP),
        _netem_run(log_path, "--", "sleep", "30") as (proc, netns, pids),
    ):
        proc.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        kept_running = proc.poll() is None and all(_alive(pid) for pid in pids)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=20)
    err = log_path.read_text()
    assert kept_running, err
    assert not _kill_survivors(pids), f"the wrapped command survived: {err}"
    _assert_gone(netns)
    assert rc == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
