"""The processes a benchmark runs: servers on loopback, each in its own process.

* `simulated_upstream(...)`: `warmsocket simulate-upstream` on a free port;
* `warmsocket_server(...)`: `warmsocket serve` on a free port;
* `agentic_api(upstream_port)`: vLLM's agentic-api gateway (`pip install
  agentic-api==0.9.0`) pointed at the simulated upstream, offline, its SQLite store in
  a temporary home directory;
* `echo_server()`: a bare `websockets` echo server on uvloop (the throughput baseline).

Every start waits a bounded time; every process is terminated (then killed) on exit,
also when the body raises.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import IO, Any

START_TIMEOUT = 60.0

ECHO_SERVER = """
import asyncio, resource, sys, uvloop
from websockets.asyncio.server import serve

async def echo(ws):
    async for message in ws:
        await ws.send(message)

async def main():
    async with serve(echo, "127.0.0.1", 0, max_size=None, compression=None,
                     ping_interval=None) as server:
        print(server.sockets[0].getsockname()[1], flush=True)
        await asyncio.Future()

uvloop.run(main())
"""


@dataclass
class Process:
    """A server process and the loopback port it listens on."""

    process: subprocess.Popen[str]
    port: int
    name: str

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/responses"


def stop(process: subprocess.Popen[str], timeout: float = 10.0) -> None:
    """Terminate, then kill; close its pipes. Never raises for a process already gone."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout)
    for stream in (process.stdin, process.stdout, process.stderr):
        if stream is not None:
            stream.close()


def listening_port(line: str) -> int | None:
    """The port of a JSON log line with message 'listening' (warmsocket's servers)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict) or record.get("message") != "listening":
        return None
    return int(str(record["url"]).rsplit(":", 1)[1].split("/")[0])


def printed_port(line: str) -> int | None:
    """The port of a line that is only a number (the bare servers print theirs)."""
    text = line.strip()
    return int(text) if text.isdigit() else None


def wait_for_port(
    process: subprocess.Popen[str],
    stream: IO[str],
    what: str,
    parse: Callable[[str], int | None],
) -> int:
    """The port of the first line of `stream` that `parse` finds one in, waiting at most
    START_TIMEOUT seconds; the child is killed when it does not listen by then.

    The pipe is read by a thread (a blocking readline could wait forever on a child
    that prints nothing), which keeps draining it afterwards so that the child never
    blocks on a full pipe. Raises RuntimeError."""
    lines: queue.Queue[str | None] = queue.Queue()
    found = threading.Event()

    def read() -> None:
        with suppress(ValueError, OSError):  # (closed by `stop`)
            for line in stream:
                if not found.is_set():  # afterwards lines are only drained
                    lines.put(line)
        lines.put(None)

    threading.Thread(target=read, name=f"log-{what}", daemon=True).start()
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        remaining = deadline - time.monotonic()
        try:
            if remaining <= 0:  # (also for a child that logs much but never listens)
                raise queue.Empty
            line = lines.get(timeout=remaining)
        except queue.Empty:
            process.kill()
            raise RuntimeError(
                f"{what} did not start listening within {START_TIMEOUT:g} s (killed)"
            ) from None
        if line is None:
            raise RuntimeError(f"{what} exited before listening ({_how_it_ended(process)})")
        port = parse(line)
        if port is not None:
            found.set()
            return port


def _how_it_ended(process: subprocess.Popen[str]) -> str:
    try:
        return f"status {process.wait(timeout=5)}"
    except subprocess.TimeoutExpired:  # it closed its output and goes on running
        return "its output closed; still running"


ENV_PREFIX = "WARMSOCKET_"


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a process the benchmark starts: this one's without any
    WARMSOCKET_* variable, plus `extra` (what the harness sets on purpose).

    `warmsocket serve` and `simulate-upstream` take their flags' defaults from
    WARMSOCKET_* variables: inherited from the caller's shell they would change what
    is measured and nothing would say so (WARMSOCKET_MOCK_TTFT_MS=20 slows every turn
    of the throughput suite, WARMSOCKET_API_KEY fails its handshakes with 401)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    env.update(extra or {})
    return env


def ignored_environment() -> list[str]:
    """Names (never values) of the caller's WARMSOCKET_* variables the children do not
    get, for the result file."""
    return sorted(k for k in os.environ if k.startswith(ENV_PREFIX))


@contextmanager
def _json_logged(
    argv: Sequence[str], what: str, env: Mapping[str, str] | None = None
) -> Iterator[Process]:
    process = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env=child_env(env))
    try:
        assert process.stderr is not None
        port = wait_for_port(process, process.stderr, what, listening_port)
        yield Process(process, port, what)
    finally:
        stop(process)


def warmsocket_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "warmsocket", *args]


@contextmanager
def simulated_upstream(*args: str) -> Iterator[Process]:
    argv = warmsocket_command(
        "simulate-upstream", "--port", "0", "--record-bodies", "0", "--log-format", "json",
        *args,
    )  # fmt: skip
    with _json_logged(argv, "simulate-upstream") as process:
        yield process


@contextmanager
def warmsocket_server(*args: str, env: Mapping[str, str] | None = None) -> Iterator[Process]:
    """`warmsocket serve` with `args`; `env`: variables set on purpose (the caller's
    WARMSOCKET_* are not passed on, see `child_env`)."""
    argv = warmsocket_command(
        "serve", "--port", "0", "--log-format", "json", "--log-level", "info",
        "--ws-ping-interval", "0", *args,
    )  # fmt: skip
    with _json_logged(argv, "warmsocket serve", env) as process:
        yield process


def agentic_server_binary() -> str | None:
    """The agentic-api gateway binary, if the package is installed."""
    local = os.path.join(os.path.dirname(sys.executable), "agentic-server")
    if os.access(local, os.X_OK):
        return local
    return shutil.which("agentic-server")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextmanager
def agentic_api(upstream_port: int) -> Iterator[Process]:
    binary = agentic_server_binary()
    if binary is None:
        raise RuntimeError("agentic-api is not installed (pip install agentic-api==0.9.0)")
    home = tempfile.mkdtemp(prefix="agentic-home-")
    port = free_port()
    env = child_env({"HOME": home, "RUST_LOG": "warn", "NO_COLOR": "1"})
    env.pop("OPENAI_API_KEY", None)
    argv = [
        binary, "--llm-api-base", f"http://127.0.0.1:{upstream_port}",
        "--gateway-host", "127.0.0.1", "--gateway-port", str(port),
        "--llm-ready-interval-s", "1",
    ]  # fmt: skip
    process = subprocess.Popen(
        argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if process.poll() is not None:
                raise RuntimeError("agentic-server exited before listening")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("agentic-server did not start in time") from None
                time.sleep(0.2)
        yield Process(process, port, "agentic-api")
    finally:
        stop(process)
        shutil.rmtree(home, ignore_errors=True)


@contextmanager
def echo_server() -> Iterator[Process]:
    process = subprocess.Popen(
        [sys.executable, "-c", ECHO_SERVER], stdout=subprocess.PIPE, text=True, env=child_env()
    )
    try:
        assert process.stdout is not None
        port = wait_for_port(process, process.stdout, "the echo server", printed_port)
        yield Process(process, port, "echo")
    finally:
        stop(process)


def get_json(url: str, timeout: float = 30.0) -> Any:
    """GET a JSON document from a loopback server."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def get_text(url: str, timeout: float = 30.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        text: str = response.read().decode()
        return text


def post_json(url: str, body: Any, timeout: float = 30.0) -> Any:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc/<pid>/status (VmRSS)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")
