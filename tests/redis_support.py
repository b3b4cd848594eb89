"""A real redis-server for tests, on a free loopback port, with nothing persisted."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import redis


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _free_cluster_port() -> int:
    """A free port whose cluster bus port (10000 above it) is free too."""
    for _ in range(100):
        port = _free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a Redis cluster node")


def _redis_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError(
            "redis-server is not installed: run ./scripts/test.sh (it installs it), "
            "or apt-get install redis-server"
        )
    return binary


def _start_redis(port: int, workdir: str, options: tuple[str, ...]) -> subprocess.Popen[bytes]:
    """redis-server on `port`, its files in `workdir`, once it takes connections."""
    process = subprocess.Popen(
        [
            _redis_binary(),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            workdir,
            *options,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return process
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise RuntimeError("redis-server did not start") from None
            time.sleep(0.02)


@contextmanager
def redis_server(*options: str) -> Iterator[str]:
    """Start redis-server (with `options` besides ours) and yield its URL.
    scripts/test.sh installs redis-server."""
    with restartable_redis_server(*options) as (url, _restart):
        yield url


@contextmanager
def restartable_redis_server(*options: str) -> Iterator[tuple[str, Callable[[], None]]]:
    """`redis_server`, and a function that restarts it on the same port with its data
    (saved at shutdown, loaded at start), as a Redis with persistence restarts."""
    _redis_binary()
    port = _free_cluster_port() if "--cluster-enabled" in options else _free_port()
    with tempfile.TemporaryDirectory() as workdir:
        processes = [_start_redis(port, workdir, options)]

        def restart() -> None:
            with redis.Redis(port=port) as client, contextlib.suppress(redis.ConnectionError):
                client.shutdown(save=True)
            processes[-1].wait(timeout=10)
            processes.append(_start_redis(port, workdir, options))

        try:
            yield f"redis://127.0.0.1:{port}/0", restart
        finally:
            processes[-1].terminate()
            processes[-1].wait(timeout=10)


@contextmanager
def paused(url: str) -> Iterator[None]:
    """Stop the redis-server at `url` (one `redis_server` started) with SIGSTOP, and
    resume it on exit. Meanwhile it answers nothing, as a hung or overloaded Redis: the
    kernel still accepts connections, so clients time out (SharedStore's
    SOCKET_TIMEOUT; lower it in the test)."""
    with redis.Redis.from_url(url) as client:
        pid = int(client.info("server")["process_id"])
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


class AnswerDropper:
    """A TCP proxy to Redis that can drop Redis' answers: what it is sent is done,
    and the client, told nothing, times out (an answer lost on the way). It can also
    cut its clients off (`cut`, `mend`)."""

    def __init__(self, redis_url: str) -> None:
        self.target = redis_url.removeprefix("redis://").split("/")[0].split(":")
        self.dropping = False
        self.refusing = False
        self.server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"redis://127.0.0.1:{port}/0"

    def cut(self) -> None:
        """End every connection, and every new one at once, until `mend` (a network
        partition between the proxy's clients and Redis)."""
        self.refusing = True
        for writer in self._writers:
            writer.close()

    def mend(self) -> None:
        self.refusing = False

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            writer.close()
            return
        host, port = self.target
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
        self._writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, up: bool) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    if up or not self.dropping:
                        dst.write(data)
            dst.close()

        await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False))

    async def aclose(self) -> None:
        """Stop, and end the connections (their pipes see the end and return)."""
        if self.server is not None:
            self.server.close()
        for writer in self._writers:
            writer.close()
        await asyncio.sleep(0.05)
