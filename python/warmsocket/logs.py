"""Structured logging: one JSON object (or one key=value line) per record.

Only fields the code passes in `extra` are emitted besides time, level, logger and
message, and the code never passes conversation content: ids, codes, counts, sizes
and durations only. Other libraries' records are not written by this code and may
quote what passes through them (the `websockets` library traces every frame at
debug level, the Authorization header included; asyncio's report of a failed task
carries the exception's repr), so `ForeignRecords` keeps only their warnings and
errors, and only the first line of each.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from typing import Any, Literal

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


FIRST_LINE_LIMIT = 200


class Throttle:
    """Says when a log line that could repeat without end (a refusal per connection, a
    failure per handshake) is due: at most once every `seconds`. The line then says
    how many times it happened since the last one; the metrics count every time."""

    def __init__(self, seconds: float = 10.0) -> None:
        self.seconds = seconds
        self._last: float | None = None

    def due(self) -> bool:
        now = time.monotonic()
        if self._last is not None and now - self._last < self.seconds:
            return False
        self._last = now
        return True


class Tally:
    """Counts what happens and says when a log line about it is due (`Throttle`), with
    how many times it happened since the last line."""

    def __init__(self, seconds: float = 10.0) -> None:
        self._throttle = Throttle(seconds)
        self._since = 0

    def count(self) -> int | None:
        """Count one; when a line is due, the count it reports (this one included)."""
        self._since += 1
        if not self._throttle.due():
            return None
        since, self._since = self._since, 0
        return since


def written_here(logger: str) -> bool:
    """Whether this package's code writes the records of `logger`. The server's
    `websockets` protocol objects log under "warmsocket.websockets": not ours."""
    if logger == "warmsocket.websockets" or logger.startswith("warmsocket.websockets."):
        return False
    return logger == "warmsocket" or logger.startswith("warmsocket.")


class ForeignRecords(logging.Filter):
    """Drops other libraries' records below WARNING and cuts the rest to the first
    line of their message (at most `FIRST_LINE_LIMIT` characters): that line is a
    fixed description ("Task exception was never retrieved", "opening handshake
    failed"); what follows it is data."""

    def filter(self, record: logging.LogRecord) -> bool:
        if written_here(record.name):
            return True
        if record.levelno < logging.WARNING:
            return False
        try:
            message = record.getMessage()
        except Exception:  # a library's bad format string: say only that
            message = "(unformattable message)"
        record.msg = message.split("\n", 1)[0][:FIRST_LINE_LIMIT]
        record.args = None
        return True


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **_fields(record),
        }
        if record.exc_info and record.exc_info[0] is not None:
            # The exception type and where it happened, never its arguments (they may
            # carry request data).
            entry["error_type"] = record.exc_info[0].__name__
        return json.dumps(entry, default=str, separators=(",", ":"))


_CONTROL_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)} | {
    ord("\n"): "\\n",
    ord("\r"): "\\r",
    ord("\t"): "\\t",
}
"""Control characters as escapes: a field a client chose (a path, a host) must not
start a line of its own, forged to look like the server's."""


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        extras = " ".join(f"{k}={v}" for k, v in _fields(record).items())
        line = f"{stamp} {record.levelname.lower():<7} {record.name}: {record.getMessage()}"
        if record.exc_info and record.exc_info[0] is not None:
            extras = f"{extras} error_type={record.exc_info[0].__name__}".strip()
        return f"{line} {extras}".rstrip().translate(_CONTROL_ESCAPES)


def configure(level: str = "info", fmt: Literal["json", "text"] = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(ForeignRecords())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # The websockets library traces frames and handshakes at debug level (the server's
    # connections log as "warmsocket.websockets", upstream ones as "websockets"):
    # ForeignRecords would drop those records; not making them saves the work.
    for name in ("warmsocket.websockets", "websockets"):
        logging.getLogger(name).setLevel(max(root.level, logging.WARNING))


def listening_url(scheme: str, host: str, port: int, path: str) -> str:
    """The URL a server listening on `host` and `port` answers at, for its `listening`
    line (an IPv6 address in brackets)."""
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}{path}"


def cannot_listen(
    log: logging.Logger, host: str, port: int, error: OSError, flag: str = "--port"
) -> None:
    """The error a server logs when it cannot listen on `port` (set by `flag`), saying
    what to do."""
    log.error(
        f"cannot listen; pick another {flag} or --host",
        extra={
            "host": host,
            "port": port,
            "errno": error.errno,
            # (A name that does not resolve is a gaierror: its errno is negative, its
            # own text says what it is, os.strerror does not know it.)
            "reason": error.strerror
            if isinstance(error, socket.gaierror) or not error.errno
            else os.strerror(error.errno),
        },
    )
