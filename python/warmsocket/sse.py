"""A Sans-I/O decoder of Server-Sent Events (the `text/event-stream` format).

Feed bytes as they arrive; get complete events back as `(event_name, data)` pairs,
where `data` is the event's `data:` lines joined with newlines. Comments (lines
starting with `:`) and `id:`/`retry:` fields are ignored. Lines may end with LF or
CRLF. With `max_event_bytes`, an event (or a line) that grows past it raises
ValueError: what a broken server's stream can make the decoder hold is bounded.
"""

from __future__ import annotations


class SSEDecoder:
    __slots__ = ("_data", "_data_bytes", "_event", "_partial", "_partial_bytes", "max_event_bytes")

    def __init__(self, max_event_bytes: int | None = None) -> None:
        self.max_event_bytes = max_event_bytes
        self._partial: list[bytes] = []
        """The pieces of a line not ended yet (joined once, when it ends)."""
        self._partial_bytes = 0
        self._event = b""
        self._data: list[bytes] = []
        self._data_bytes = 0

    def feed(self, chunk: bytes) -> list[tuple[bytes, bytes]]:
        """The events completed by `chunk`, in order."""
        if b"\n" not in chunk:
            if chunk:
                self._partial.append(chunk)
                self._partial_bytes += len(chunk)
                self._check()
            return []
        if self._partial:
            chunk = b"".join(self._partial) + chunk
            self._partial.clear()
        lines = chunk.split(b"\n")
        rest = lines.pop()
        if rest:
            self._partial.append(rest)
        self._partial_bytes = len(rest)
        events: list[tuple[bytes, bytes]] = []
        data = self._data
        for line in lines:
            if line[-1:] == b"\r":
                line = line[:-1]
            if not line:
                if data:
                    events.append((self._event, data[0] if len(data) == 1 else b"\n".join(data)))
                    self._data = data = []
                    self._data_bytes = 0
                self._event = b""
                continue
            if line[:5] == b"data:":
                value = line[5:]
                data.append(value[1:] if value[:1] == b" " else value)
                self._data_bytes += len(value)
            elif line[:6] == b"event:":
                value = line[6:]
                self._event = value[1:] if value[:1] == b" " else value
            # comments (':') and other fields are ignored
        self._check()
        return events

    def finish(self) -> list[tuple[bytes, bytes]]:
        """Events left when the stream ends without a final blank line."""
        events = self.feed(b"\n\n") if self._partial or self._data else []
        self._partial.clear()
        self._partial_bytes = self._data_bytes = 0
        return events

    def _check(self) -> None:
        limit = self.max_event_bytes
        if limit is not None and self._partial_bytes + self._data_bytes > limit:
            raise ValueError(f"a server-sent event over {limit} bytes")
