"""Creating sockets inside another network namespace, in-process.

A socket belongs to the network namespace of the thread that created it, for
its whole life, whichever thread later uses it.  So a dedicated helper thread
`setns(CLONE_NEWNET)`s itself into the namespace once and then only creates
sockets on request and hands them back; the rest of the process is never
moved.  Changing the network namespace of one thread is allowed in
multi-threaded processes (unlike the mount or user namespace).  The thread
exits when the factory is closed (its namespace membership dies with it).
Requires CAP_SYS_ADMIN (root).

The primary way to run client code in the namespace is still a subprocess
(`EmulatedLink.run_in_client_ns`); this is for in-process measurement and for
asyncio clients that want `sock=`.
"""

from __future__ import annotations

import ctypes
import os
import queue
import socket
import threading
from concurrent.futures import Future

_CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/run/netns"

_Request = tuple[socket.AddressFamily, socket.SocketKind, "Future[socket.socket]"]


def netns_path(name: str) -> str:
    return os.path.join(NETNS_RUN_DIR, name)


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)  # the running process: has libc
    setns = libc.setns
    setns.argtypes = (ctypes.c_int, ctypes.c_int)
    setns.restype = ctypes.c_int
    if setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns(CLONE_NEWNET): {os.strerror(err)}")


class NetnsSocketFactory:
    """Creates sockets in network namespace `name` from a helper thread."""

    def __init__(self, name: str, *, timeout: float = 5.0) -> None:
        self.name = name
        self.timeout = timeout
        self._requests: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._ready: Future[None] = Future()
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"netns-{name}", daemon=True)
        self._thread.start()
        try:
            self._ready.result(timeout)
        except BaseException:
            self.close()
            raise

    def _run(self) -> None:
        try:
            fd = os.open(netns_path(self.name), os.O_RDONLY | os.O_CLOEXEC)
            try:
                _setns(fd)
            finally:
                os.close(fd)
        except BaseException as exc:  # reported to the constructor
            self._ready.set_exception(exc)
            return
        self._ready.set_result(None)
        # Runs until close() sends None; each request is answered at once.
        while (request := self._requests.get()) is not None:
            family, kind, result = request
            try:
                result.set_result(socket.socket(family, kind))
            except BaseException as exc:
                result.set_exception(exc)

    def socket(
        self,
        family: socket.AddressFamily = socket.AF_INET,
        type: socket.SocketKind = socket.SOCK_STREAM,
    ) -> socket.socket:
        """A new, unconnected socket living in the namespace."""
        result: Future[socket.socket] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError(f"socket factory for {self.name!r} is closed")
            self._requests.put((family, type, result))
        return result.result(self.timeout)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._requests.put(None)
        self._thread.join(self.timeout)


def socket_in_netns(
    name: str,
    family: socket.AddressFamily = socket.AF_INET,
    type: socket.SocketKind = socket.SOCK_STREAM,
    *,
    timeout: float = 5.0,
) -> socket.socket:
    """One socket in namespace `name` (starts and stops a helper thread)."""
    factory = NetnsSocketFactory(name, timeout=timeout)
    try:
        return factory.socket(family, type)
    finally:
        factory.close()
