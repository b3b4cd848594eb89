"""Deadline schedulers for the delay proxy.

Both schedulers run callbacks on the event loop's thread at (or just after) an
absolute `time.monotonic()`-style deadline.

`LoopScheduler` is plain `loop.call_at`.  Its precision is bounded by the event
loop's poll timeout: the stdlib selector loop rounds epoll timeouts *up* to whole
milliseconds (a 0.25 ms timer fires after ~1.2 ms) and uvloop's libuv timers
round to milliseconds too (and may fire early).  That is fine for a 20 ms WAN
delay but ruins a 0.25 ms LAN delay.

`TimerfdScheduler` arms one Linux `timerfd` (CLOCK_MONOTONIC, absolute,
nanosecond resolution) for the earliest deadline and watches it with
`loop.add_reader`, so a deadline wakes epoll at the right instant whatever the
loop implementation.  It is used automatically where available.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import heapq
import itertools
import os
import sys
import time
from collections.abc import Callable
from typing import Protocol

_CLOCK_MONOTONIC = 1
_TFD_TIMER_ABSTIME = 1


class TimerHandle(Protocol):
    def cancel(self) -> None: ...


class Scheduler(Protocol):
    """Runs callbacks at absolute deadlines on the event loop's thread."""

    def now(self) -> float: ...

    def call_at(self, when: float, callback: Callable[[], None]) -> TimerHandle: ...

    def close(self) -> None: ...


class LoopScheduler:
    """`loop.call_at`, millisecond precision."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def now(self) -> float:
        return self._loop.time()

    def call_at(self, when: float, callback: Callable[[], None]) -> TimerHandle:
        return self._loop.call_at(when, callback)

    def close(self) -> None:
        pass


class _Timespec(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))


class _Itimerspec(ctypes.Structure):
    _fields_ = (("it_interval", _Timespec), ("it_value", _Timespec))


class _Libc:
    """The two libc calls we need, loaded once."""

    _instance: _Libc | None = None
    _error: str | None = None

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)  # the running process: has libc
        self.timerfd_create = libc.timerfd_create
        self.timerfd_create.argtypes = (ctypes.c_int, ctypes.c_int)
        self.timerfd_create.restype = ctypes.c_int
        self.timerfd_settime = libc.timerfd_settime
        self.timerfd_settime.argtypes = (
            ctypes.c_int,
            ctypes.c_int,
            ctypes.POINTER(_Itimerspec),
            ctypes.POINTER(_Itimerspec),
        )
        self.timerfd_settime.restype = ctypes.c_int

    @classmethod
    def get(cls) -> _Libc:
        if cls._instance is None:
            if cls._error is not None:
                raise OSError(cls._error)
            if not sys.platform.startswith("linux"):
                cls._error = "timerfd is Linux-only"
                raise OSError(cls._error)
            try:
                cls._instance = cls()
            except (OSError, AttributeError) as exc:
                cls._error = f"timerfd unavailable: {exc}"
                raise OSError(cls._error) from exc
        return cls._instance


class _Entry:
    __slots__ = ("callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class TimerfdScheduler:
    """Nanosecond-resolution deadlines through one timerfd watched by the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._libc = _Libc.get()
        fd = self._libc.timerfd_create(_CLOCK_MONOTONIC, os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"timerfd_create: {os.strerror(err)}")
        self._fd = fd
        self._loop = loop
        self._heap: list[tuple[float, int, _Entry]] = []
        self._seq = itertools.count()
        self._armed_for: float | None = None
        self._closed = False
        loop.add_reader(fd, self._on_ready)

    def now(self) -> float:
        return time.monotonic()

    def call_at(self, when: float, callback: Callable[[], None]) -> TimerHandle:
        if self._closed:
            raise RuntimeError("scheduler is closed")
        entry = _Entry(when, callback)
        heapq.heappush(self._heap, (when, next(self._seq), entry))
        if self._armed_for is None or when < self._armed_for:
            self._arm(when)
        return entry

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._heap.clear()
        self._loop.remove_reader(self._fd)
        os.close(self._fd)

    def _arm(self, when: float | None) -> None:
        spec = _Itimerspec()
        if when is not None:
            # it_value == 0 would disarm; a deadline in the past fires at once.
            ns = max(int(when * 1e9), 1)
            spec.it_value.tv_sec, spec.it_value.tv_nsec = divmod(ns, 1_000_000_000)
        if self._libc.timerfd_settime(self._fd, _TFD_TIMER_ABSTIME, ctypes.byref(spec), None):
            err = ctypes.get_errno()
            raise OSError(err, f"timerfd_settime: {os.strerror(err)}")
        self._armed_for = when

    def _on_ready(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self._fd, 8)
        self._armed_for = None
        now = time.monotonic()
        heap = self._heap
        # Bounded: only entries already queued when we started can run here;
        # callbacks that schedule new work for "now" are picked up next wakeup.
        for _ in range(len(heap)):
            if not heap or heap[0][0] > now:
                break
            _, _, entry = heapq.heappop(heap)
            if not entry.cancelled:
                try:
                    entry.callback()
                except Exception as exc:  # like loop.call_at: report, keep going
                    self._loop.call_exception_handler(
                        {"message": "exception in netem timer callback", "exception": exc}
                    )
            if self._closed:
                return
        while heap and heap[0][2].cancelled:
            heapq.heappop(heap)
        if heap:
            self._arm(heap[0][0])


def make_scheduler(loop: asyncio.AbstractEventLoop, *, precise: bool | None = None) -> Scheduler:
    """A timerfd scheduler if `precise` is True/None and it works, else `loop.call_at`.

    precise=True raises OSError if timerfd is unavailable; None falls back quietly.
    """
    if precise is False:
        return LoopScheduler(loop)
    try:
        return TimerfdScheduler(loop)
    except OSError:
        if precise:
            raise
        return LoopScheduler(loop)
