"""Structured logging: one JSON object (or one key=value line) per record.

Only fields the code passes in `extra` are emitted besides time, level, logger and
message, and the code never passes conversation content: ids, codes, counts, sizes
and durations only.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, Literal

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


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


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        extras = " ".join(f"{k}={v}" for k, v in _fields(record).items())
        line = f"{stamp} {record.levelname.lower():<7} {record.name}: {record.getMessage()}"
        if record.exc_info and record.exc_info[0] is not None:
            extras = f"{extras} error_type={record.exc_info[0].__name__}".strip()
        return f"{line} {extras}".rstrip()


def configure(level: str = "info", fmt: Literal["json", "text"] = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # The websockets library logs handshake details at debug level; keep it quiet.
    logging.getLogger("warmsocket.websockets").setLevel(max(root.level, logging.WARNING))
