"""EmulatedLink: a client network namespace joined to the root namespace by a veth.

    client ns (the agent)                     root ns (the server)
    ws-bench-XXXXXc 198.18.N.2/30  <--veth-->  ws-bench-XXXXXs 198.18.N.1/30
    egress: tbf rate R                         egress: tbf rate R
                                               DelayProxy on 198.18.N.1:P
                                                  -> real server 127.0.0.1:S

Rate limiting is done by the kernel (tbf on both veth ends); the one-way delay
by a `DelayProxy` in the root namespace (this kernel has no netem qdisc).
When namespaces cannot be created, the link falls back to loopback: the proxy
listens on 127.0.0.1 and applies both the delay and the rate itself.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import IO, Literal, Self

from warmsocket.netem.cleanup import cleanup, list_addresses
from warmsocket.netem.commands import (
    CommandError,
    CommandRunner,
    Tools,
    find_tools,
    run_command,
)
from warmsocket.netem.nsenter import NetnsSocketFactory
from warmsocket.netem.plan import (
    DEFAULT_PREFIX,
    LinkPlan,
    harness_lock,
    new_plan,
    owner_alias,
    validate_prefix,
)
from warmsocket.netem.profiles import NetworkProfile
from warmsocket.netem.proxy import DelayProxy

log = logging.getLogger("warmsocket.netem")

LOOPBACK_HOST = "127.0.0.1"
RateLimiter = Literal["tbf", "proxy", "none"]


class LinkUnavailable(RuntimeError):
    """Raised instead of falling back when the link was created with require=True."""


class _Registry:
    """Links that are up, torn down at interpreter exit if still up."""

    def __init__(self) -> None:
        self._links: set[EmulatedLink] = set()
        self._lock = threading.Lock()
        self._hooked = False

    def add(self, link: EmulatedLink) -> None:
        with self._lock:
            self._links.add(link)
            if not self._hooked:
                atexit.register(self.teardown_all)
                self._hooked = True

    def discard(self, link: EmulatedLink) -> None:
        with self._lock:
            self._links.discard(link)

    def teardown_all(self) -> None:
        with self._lock:
            links = list(self._links)
        for link in links:
            with contextlib.suppress(Exception):
                link.teardown()


_registry = _Registry()


def _preflight() -> Tools | str:
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return "not running as root (creating network namespaces needs CAP_SYS_ADMIN)"
    if not os.path.exists("/proc/self/ns/net"):
        return "kernel without network namespace support (/proc/self/ns/net missing)"
    return find_tools()


def _kernel_has_ipv6() -> bool:
    """False on kernels booted with ipv6.disable=1 (no addrgenmode to set there)."""
    return os.path.exists("/proc/sys/net/ipv6")


class EmulatedLink:
    """A client namespace behind a rate-limited veth, plus delay proxies.

    Use as `with EmulatedLink(WAN) as link:` (or `async with`, which also closes
    proxies started with `start_proxy`).  After setup:

    - `emulated`: True if the namespace + veth (+ tbf) are in place; False on
      the loopback fallback, with the reason in `fallback_reason`.
    - `server_host`: where a server-side listener (the proxy) must bind, and
      what the client connects to: 198.18.N.1 (or 127.0.0.1 on fallback).
    - `client_host`: the client's own address: 198.18.N.2 (or 127.0.0.1).
    - `netns`: the client namespace's name (None on fallback).
    - `rate_limiter`: "tbf" (kernel), "proxy" (fallback) or "none".
    """

    def __init__(
        self,
        profile: NetworkProfile,
        *,
        prefix: str = DEFAULT_PREFIX,
        require: bool = False,
        cleanup_stale: bool = True,
        runner: CommandRunner = run_command,
        command_timeout: float = 10.0,
    ) -> None:
        validate_prefix(prefix)
        self.profile = profile
        self.prefix = prefix
        self.require = require
        self.cleanup_stale = cleanup_stale
        self._runner = runner
        self._timeout = command_timeout
        self._tools: Tools | None = None
        self.plan: LinkPlan | None = None
        self.emulated = False
        self.fallback_reason: str | None = None
        self.rate_limiter: RateLimiter = "none"
        self._up = False
        self._procs: list[subprocess.Popen[bytes]] = []
        self._proxies: list[DelayProxy] = []
        self._sockets: NetnsSocketFactory | None = None
        self._sockets_lock = threading.Lock()

    # -- addresses ----------------------------------------------------------

    @property
    def server_host(self) -> str:
        return self.plan.server_host if self.emulated and self.plan else LOOPBACK_HOST

    @property
    def client_host(self) -> str:
        return self.plan.client_host if self.emulated and self.plan else LOOPBACK_HOST

    @property
    def netns(self) -> str | None:
        return self.plan.netns if self.emulated and self.plan else None

    def describe(self) -> str:
        if self.emulated and self.plan:
            return (
                f"{self.profile.describe()} -- namespace {self.plan.netns}, "
                f"client {self.client_host} -> server {self.server_host} "
                f"(veth {self.plan.veth_client}/{self.plan.veth_server}, "
                f"rate by {self.rate_limiter}, delay by proxy)"
            )
        return (
            f"{self.profile.describe()} -- loopback fallback ({self.fallback_reason}); "
            f"rate by {self.rate_limiter}, delay by proxy"
        )

    # -- setup / teardown ---------------------------------------------------

    def setup(self) -> Self:
        """Create the namespace, veth pair and tbf qdiscs, or fall back."""
        if self._up:
            raise RuntimeError("link already set up")
        self._up = True
        if self.profile.is_noop:
            self._fall_back(f"profile {self.profile.name} asks for no emulation", warn=False)
            return self
        tools = _preflight()
        if isinstance(tools, str):
            self._fall_back(tools)
            return self
        self._tools = tools
        try:
            if self.cleanup_stale:
                report = cleanup(
                    tools, runner=self._runner, prefix=self.prefix, lock_timeout=self._timeout
                )
                if report.errors:
                    log.warning("stale cleanup problems: %s", "; ".join(report.errors))
            with harness_lock(self._timeout):
                self._build(tools)
        except (CommandError, OSError, TimeoutError, ValueError) as exc:
            self._destroy()
            self._fall_back(str(exc))
            return self
        except BaseException:
            # Anything else (Ctrl-C, no free /30, odd `ip -j` output) is no reason
            # to fall back, but must not leave a half-built namespace and veth.
            self._destroy()
            self._up = False
            raise
        _registry.add(self)
        self.emulated = True
        self.rate_limiter = "tbf" if self.profile.rate_mbit is not None else "none"
        log.info("netem link up: %s", self.describe())
        return self

    def _run(self, *argv: str) -> str:
        return self._runner(list(argv), timeout=self._timeout).stdout

    def _build(self, tools: Tools) -> None:
        used = [a for info in list_addresses(self._runner, tools) for a in info.addresses]
        plan = new_plan(used, prefix=self.prefix)
        self.plan = plan
        ip, tc = tools.ip, tools.tc
        ns = plan.netns
        self._run(ip, "netns", "add", ns)
        self._run(ip, "link", "add", plan.veth_server, "type", "veth", "peer", "name",
                  plan.veth_client, "netns", ns)  # fmt: skip
        self._run(ip, "link", "set", "dev", plan.veth_server, "alias", owner_alias())
        if _kernel_has_ipv6():
            # IPv4 only: with link-local addresses the client could reach a
            # root-namespace server listening on "::" past the delay proxy, and
            # DAD/RS/MLD packets would cross the tbf.  Set before the ends go up.
            self._run(ip, "link", "set", "dev", plan.veth_server, "addrgenmode", "none")
            self._run(ip, "-n", ns, "link", "set", "dev", plan.veth_client, "addrgenmode", "none")
        self._run(ip, "addr", "add", plan.server_cidr, "dev", plan.veth_server)
        self._run(ip, "-n", ns, "addr", "add", plan.client_cidr, "dev", plan.veth_client)
        self._run(ip, "-n", ns, "link", "set", "dev", "lo", "up")
        self._run(ip, "-n", ns, "link", "set", "dev", plan.veth_client, "up")
        self._run(ip, "link", "set", "dev", plan.veth_server, "up")
        tbf = self.profile.tbf()
        if tbf is not None:
            args = tbf.tc_args()
            self._run(tc, "qdisc", "replace", "dev", plan.veth_server, "root", *args)
            self._run(tc, "-n", ns, "qdisc", "replace", "dev", plan.veth_client, "root", *args)

    def _fall_back(self, reason: str, *, warn: bool = True) -> None:
        if self.require:
            self._up = False
            raise LinkUnavailable(f"cannot emulate {self.profile.name} link: {reason}")
        self.emulated = False
        self.fallback_reason = reason
        self.rate_limiter = "proxy" if self.profile.rate_mbit is not None else "none"
        if warn:
            log.warning(
                "netem: falling back to loopback for profile %s: %s "
                "(delay%s emulated by the proxy only)",
                self.profile.name,
                reason,
                " and rate" if self.rate_limiter == "proxy" else "",
            )

    def _destroy(self) -> None:
        """Remove whatever of this link exists; never raises."""
        tools, plan = self._tools, self.plan
        if tools is None or plan is None:
            return
        # Deleting the root-side veth removes both ends at once, even if
        # sockets or processes still pin the namespace; then drop the namespace.
        for argv in (
            [tools.ip, "link", "del", "dev", plan.veth_server],
            [tools.ip, "netns", "del", plan.netns],
        ):
            try:
                self._runner(argv, check=False, timeout=self._timeout)
            except CommandError as exc:
                log.warning("netem teardown: %s", exc)

    def _stop_processes(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=3)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=3)
        self._procs.clear()

    def teardown(self) -> None:
        """Stop client processes started here and remove the namespace and veth."""
        if not self._up:
            return
        self._up = False
        self._stop_processes()
        with self._sockets_lock:
            factory, self._sockets = self._sockets, None
        if factory is not None:
            factory.close()
        if self.emulated:
            self._destroy()
            log.info("netem link down: %s", self.plan.netns if self.plan else "?")
        _registry.discard(self)

    def __enter__(self) -> Self:
        return self.setup()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.teardown()

    async def __aenter__(self) -> Self:
        await asyncio.to_thread(self.setup)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self.close_proxies()
        finally:
            await asyncio.to_thread(self.teardown)

    # -- server side: delay proxies -----------------------------------------

    async def start_proxy(
        self,
        target_host: str,
        target_port: int,
        *,
        listen_port: int = 0,
        emulate_handshake: bool = True,
        **kwargs: object,
    ) -> DelayProxy:
        """Start a DelayProxy on `server_host` forwarding to target_host:target_port.

        Clients (in the client namespace) connect to `proxy.address`.  The proxy
        applies the profile's delay; on the loopback fallback also its rate.
        Closed by `async with` exit / close_proxies(), or by the caller.
        """
        if not self._up:
            raise RuntimeError("link is not set up")
        proxy = DelayProxy.from_profile(
            self.profile,
            target_host,
            target_port,
            rate_limit=self.rate_limiter == "proxy",
            listen_host=self.server_host,
            listen_port=listen_port,
            emulate_handshake=emulate_handshake,
            **kwargs,
        )
        await proxy.start()
        self._proxies.append(proxy)
        return proxy

    async def close_proxies(self) -> None:
        proxies, self._proxies = self._proxies, []
        for proxy in proxies:
            await proxy.close()

    # -- client side --------------------------------------------------------

    def client_command(self, argv: Sequence[str]) -> list[str]:
        """argv prefixed so it runs in the client namespace (unchanged on fallback)."""
        if self.emulated and self.plan and self._tools:
            return [self._tools.ip, "netns", "exec", self.plan.netns, *argv]
        return list(argv)

    def run_in_client_ns(
        self,
        argv: Sequence[str],
        *,
        stdin: int | IO[bytes] | None = None,
        stdout: int | IO[bytes] | None = None,
        stderr: int | IO[bytes] | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start argv in the client namespace (`ip netns exec`); returns the Popen.

        Still-running processes are terminated (then killed) at teardown.
        On the loopback fallback the process simply runs in the root namespace.
        """
        if not self._up:
            raise RuntimeError("link is not set up")
        proc = subprocess.Popen(
            self.client_command(argv), stdin=stdin, stdout=stdout, stderr=stderr, env=env, cwd=cwd
        )
        self._procs.append(proc)
        return proc

    def client_socket(
        self,
        family: socket.AddressFamily = socket.AF_INET,
        type: socket.SocketKind = socket.SOCK_STREAM,
    ) -> socket.socket:
        """A new socket in the client namespace (a plain socket on fallback)."""
        if not self._up:
            raise RuntimeError("link is not set up")
        if not (self.emulated and self.plan):
            return socket.socket(family, type)
        with self._sockets_lock:
            if self._sockets is None:
                self._sockets = NetnsSocketFactory(self.plan.netns)
            factory = self._sockets
        return factory.socket(family, type)

    async def open_connection(
        self, host: str, port: int, **kwargs: object
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """asyncio.open_connection from the client namespace."""
        loop = asyncio.get_running_loop()
        sock = self.client_socket()
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, (host, port))
        except BaseException:
            sock.close()
            raise
        return await asyncio.open_connection(sock=sock, **kwargs)  # type: ignore[arg-type]
