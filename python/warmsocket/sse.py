"""A Sans-I/O decoder of Server-Sent Events (the `text/event-stream` format).

Feed bytes as they arrive; get complete events back as `(event_name, data)` pairs,
where `data` is the event's `data:` lines joined with newlines. Comments (lines
starting with `:`) and `id:`/`retry:` fields are ignored. Lines may end with LF, CRLF
or a lone CR, and one UTF-8 byte order mark at the start of the stream is skipped, as
the format's specification (WHATWG HTML, "Interpreting an event stream") says. With
`max_event_bytes`, an event (or a line) that grows past it raises ValueError: what a
broken server's stream can make the decoder hold is bounded. With `error_field`, a line
`error: X` (llama.cpp's server reports a failure in a stream so, a field the format
does not have) is taken as the event `error` with data `X`.
"""

from __future__ import annotations

_BOM = b"\xef\xbb\xbf"


class SSEDecoder:
    __slots__ = (
        "_after_cr",
        "_data",
        "_data_bytes",
        "_event",
        "_partial",
        "_partial_bytes",
        "_started",
        "error_field",
        "max_event_bytes",
    )

    def __init__(self, max_event_bytes: int | None = None, *, error_field: bool = False) -> None:
        self.max_event_bytes = max_event_bytes
        self.error_field = error_field
        self._partial: list[bytes] = []
        """The pieces of a line not ended yet (joined once, when it ends)."""
        self._partial_bytes = 0
        self._event = b""
        self._data: list[bytes] = []
        self._data_bytes = 0
        self._started = False
        """Whether the stream's first bytes were looked at for a byte order mark."""
        self._after_cr = False
        """Whether the last chunk ended with a CR (a LF starting the next one ends no
        line: the pair is one line end)."""

    def feed(self, chunk: bytes) -> list[tuple[bytes, bytes]]:
        """The events completed by `chunk`, in order."""
        if not self._started:
            if not chunk:
                return []
            head = b"".join(self._partial) + chunk
            if len(head) < len(_BOM) and _BOM.startswith(head):
                self._partial = [head]  # (at most two bytes)
                self._partial_bytes = len(head)
                return []
            self._started = True
            self._partial.clear()
            self._partial_bytes = 0
            chunk = head.removeprefix(_BOM)
        if self._after_cr and chunk:
            self._after_cr = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        if b"\r" in chunk:
            self._after_cr = chunk[-1:] == b"\r"
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
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
            elif line[:6] == b"error:" and self.error_field:
                value = line[6:]
                data.append(value[1:] if value[:1] == b" " else value)
                self._data_bytes += len(value)
                self._event = b"error"
            # comments (':') and other fields are ignored
        self._check()
        return events

    def finish(self) -> list[tuple[bytes, bytes]]:
        """Events left when the stream ends without a final blank line."""
        self._started = True  # (a partial byte order mark is a line of its own)
        events = self.feed(b"\n\n") if self._partial or self._data else []
        self._partial.clear()
        self._partial_bytes = self._data_bytes = 0
        self._after_cr = False
        return events

    def _check(self) -> None:
        limit = self.max_event_bytes
        if limit is not None and self._partial_bytes + self._data_bytes > limit:
            raise ValueError(f"a server-sent event over {limit} bytes")
