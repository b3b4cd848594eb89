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
from collections.abc import Iterator
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


@contextmanager
def redis_server(*options: str) -> Iterator[str]:
    """Start redis-server (with `options` besides ours) and yield its URL.
    scripts/test.sh installs redis-server."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError(
            "redis-server is not installed: run ./scripts/test.sh (it installs it), "
            "or apt-get install redis-server"
        )
    port = _free_cluster_port() if "--cluster-enabled" in options else _free_port()
    with tempfile.TemporaryDirectory() as workdir:
        process = subprocess.Popen(
            [
                binary,
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
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    if time.monotonic() > deadline or process.poll() is not None:
                        raise RuntimeError("redis-server did not start") from None
                    time.sleep(0.02)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            process.terminate()
            process.wait(timeout=10)


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
    and the client, told nothing, times out (an answer lost on the way)."""

    def __init__(self, redis_url: str) -> None:
        self.target = redis_url.removeprefix("redis://").split("/")[0].split(":")
        self.dropping = False
        self.server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"redis://127.0.0.1:{port}/0"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
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
