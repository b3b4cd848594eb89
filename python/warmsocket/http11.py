"""A small Sans-I/O HTTP/1.1 server-side parser and response encoder.

Why our own: one port serves WebSocket upgrades (handed to the `websockets` Sans-I/O
protocol) and ordinary requests including `POST /v1/responses`, which the
`websockets` server does not accept. It supports keep-alive, `Content-Length` and
chunked request bodies, `Expect: 100-continue`, and chunked responses for SSE.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import parse_qs, unquote, urlsplit

from warmsocket._core import ChunkedBody

MAX_HEAD_BYTES = 64 * 1024
MAX_HEADERS = 128

_FIELD_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
"""A header name: an RFC 9110 token."""
_NOT_IN_FIELD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
"""Control characters other than tab: never in a header value (RFC 9110, 5.5). A
bare CR or LF would end the line for another parser (a proxy in front, or an
upstream a forwarded key goes to) and not for this one: a header or a request
smuggled past one of them."""
_NOT_IN_TARGET = re.compile(r"[\x00-\x20\x7f]")


class HTTPError(Exception):
    """A request that cannot be parsed; answer with `status` and close."""

    def __init__(self, status: int, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


_HANDSHAKE_HEADERS = (
    "host",
    "upgrade",
    "connection",
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-extensions",
    "sec-websocket-protocol",
)
"""What of an upgrade request the websockets library reads to answer it."""


@dataclass(slots=True)
class Request:
    method: str
    target: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    """Header names lowercased; repeated headers joined with ', '."""
    body: bytes
    keep_alive: bool
    peer_identity: str | None = None
    """Its connection's verified client certificate's names, with
    `--owner-by-client-certificate` (`tls.client_identity`)."""
    http10: bool = False
    """Sent as HTTP/1.0: its answer may not be chunked (RFC 9112, 6.1)."""
    answer_headers: list[tuple[str, str]] = field(default_factory=list)
    """Headers for the answer to this request, besides those every answer carries
    (how many requests its key has left: `request_rate`)."""

    def header(self, name: str, default: str = "") -> str:
        return self.headers.get(name, default)

    def handshake_head(self) -> bytes:
        """The upgrade request as the websockets library is given it: the request line
        and the headers it reads (the parser here has taken the rest). As it came, a
        head this server takes could be refused there for the library's own limits: a
        header line over 8 KiB (a long Authorization or Cookie), a `Content-Length: 0`
        some clients and proxies add to a GET."""
        lines = ["GET /v1/responses HTTP/1.1"]
        for name in _HANDSHAKE_HEADERS:
            value = self.headers.get(name)
            if value is not None:
                lines.append(f"{name}: {value}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    @property
    def segments(self) -> list[str]:
        """The path's segments (empty ones left out), each percent-decoded on its own:
        an id may hold an encoded '/' (`%2F`), which `path`, decoded whole, cannot
        tell from a separator."""
        raw = self.target.partition("?")[0].partition("#")[0]
        if "://" in raw:  # absolute-form (RFC 9112, 3.2.2): the path after the authority
            raw = "/" + raw.split("://", 1)[1].partition("/")[2]
        return [unquote(part) for part in raw.split("/") if part]

    @property
    def is_websocket_upgrade(self) -> bool:
        return (
            self.method == "GET"
            and "websocket" in self.header("upgrade").lower()
            and "upgrade" in self.header("connection").lower()
        )

    def query_value(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else None


class RequestParser:
    """Feed bytes in, take complete requests out."""

    def __init__(self, *, max_body_bytes: int) -> None:
        self.max_body_bytes = max_body_bytes
        self._buffer = bytearray()
        self._head: tuple[str, str, dict[str, str], bytes] | None = None
        self._continue_sent = False
        self._chunked: ChunkedBody | None = None
        """The chunked body being read (decoded as it arrives, in Rust)."""
        self._chunks: list[bytes] = []
        self._chunked_bytes = 0

    def feed(self, data: bytes) -> None:
        self._buffer += data

    @property
    def buffered(self) -> int:
        """Bytes received and not yet parsed (what a pipelining client sent ahead)."""
        return len(self._buffer)

    @property
    def receiving(self) -> str | None:
        """What the buffered bytes are: None (nothing: between requests), "head" (part of
        a request head) or "body" (the head is complete, the body is not)."""
        if self._head is not None:
            return "body"
        return "head" if self._buffer else None

    def take_buffer(self) -> bytes:
        """Everything buffered and not parsed (after an upgrade, the first frames)."""
        data = bytes(self._buffer)
        self._buffer.clear()
        return data

    def head_of_body(self) -> Request | None:
        """The request whose body is being received, without its body (empty): its
        head can be refused before the body is all read. None between requests."""
        if self._head is None:
            return None
        method, target, headers, head = self._head
        return _request(method, target, headers, b"", head)

    def wants_continue(self) -> bool:
        """Whether a `100 Continue` should be sent now (once per request)."""
        if self._head is None or self._continue_sent:
            return False
        if self._head[2].get("expect", "").lower() != "100-continue":
            return False
        self._continue_sent = True
        return True

    def next_request(self) -> Request | None:
        """The next complete request, or None until more bytes arrive. Raises HTTPError."""
        if self._head is None:
            while self._buffer.startswith(b"\r\n"):
                # Empty lines before a request line are ignored (RFC 9112, 2.2): some
                # clients end a body with a CRLF its length does not count.
                del self._buffer[:2]
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buffer) > MAX_HEAD_BYTES:
                    raise HTTPError(431, "Request header fields too large.")
                if self._buffer and not self._buffer[:1].isalpha() and self._buffer != b"\r":
                    # Not a method: say so now, not when a head that never comes is
                    # complete. A TLS ClientHello sent to this plain-HTTP port gets
                    # its answer at once, as from other servers, and the client can
                    # tell that the scheme is wrong instead of timing out.
                    raise HTTPError(400, "Invalid request line.")
                return None
            if end > MAX_HEAD_BYTES:
                raise HTTPError(431, "Request header fields too large.")
            head = bytes(self._buffer[: end + 4])
            del self._buffer[: end + 4]
            method, target, headers = _parse_head(head)
            self._head = (method, target, headers, head)
            self._continue_sent = False
        method, target, headers, head = self._head
        body = self._take_body(headers)
        if body is None:
            return None
        self._head = None
        return _request(method, target, headers, body, head)

    def _take_body(self, headers: dict[str, str]) -> bytes | None:
        coding = headers.get("transfer-encoding")
        length_text = headers.get("content-length")
        if coding is not None:
            if length_text is not None:
                # Two framings: which one ends the body is ambiguous (RFC 9112, 6.3).
                raise HTTPError(400, "Both Transfer-Encoding and Content-Length were sent.")
            if coding.strip().lower() != "chunked":
                raise HTTPError(
                    501,
                    "Only Transfer-Encoding: chunked is supported; send the body chunked or "
                    "with Content-Length.",
                )
            return self._take_chunked()
        if length_text is None:
            return b""
        if not (length_text.isascii() and length_text.isdigit()):
            raise HTTPError(400, "Invalid Content-Length.")
        # Leading zeros are allowed; past 18 digits the length is beyond any limit
        # (and int() of thousands of digits is refused, or slow).
        digits = length_text.lstrip("0") or "0"
        length = int(digits) if len(digits) <= 18 else self.max_body_bytes + 1
        if length > self.max_body_bytes:
            raise HTTPError(
                413,
                f"The request body is {length} bytes, larger than this server's limit of "
                f"{self.max_body_bytes} bytes (--max-message-bytes).",
                code="message_too_large",
            )
        if len(self._buffer) < length:
            return None
        body = bytes(self._buffer[:length])
        del self._buffer[:length]
        return body

    def _take_chunked(self) -> bytes | None:
        """The chunked body, once complete; what follows it stays buffered."""
        chunked = self._chunked
        if chunked is None:
            chunked = self._chunked = ChunkedBody()
        data = bytes(self._buffer)
        self._buffer.clear()
        try:
            piece = chunked.feed(data)
        except ValueError as exc:
            raise HTTPError(400, f"Invalid chunked body: {exc}.") from None
        if piece:
            self._chunks.append(piece)
            self._chunked_bytes += len(piece)
        if self._chunked_bytes + chunked.chunk_left > self.max_body_bytes:
            raise HTTPError(
                413,
                "The request body is larger than this server's limit of "
                f"{self.max_body_bytes} bytes (--max-message-bytes).",
                code="message_too_large",
            )
        if not chunked.done:
            return None
        self._buffer += chunked.take_rest()
        body = b"".join(self._chunks)
        self._chunked, self._chunks, self._chunked_bytes = None, [], 0
        return body


def _request(
    method: str, target: str, headers: dict[str, str], body: bytes, head: bytes
) -> Request:
    try:
        split = urlsplit(target)
        query = parse_qs(split.query, keep_blank_values=True)
    except ValueError:  # e.g. "//[x": an unclosed IPv6 authority
        raise HTTPError(400, "Invalid request target.") from None
    connection = headers.get("connection", "").lower()
    return Request(
        method=method,
        target=target,
        path=unquote(split.path),
        query=query,
        headers=headers,
        body=body,
        keep_alive="close" not in connection,
        http10=head[: head.find(b"\r\n")].endswith(b" HTTP/1.0"),
    )


def _parse_head(head: bytes) -> tuple[str, str, dict[str, str]]:
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
        raise HTTPError(400, "Invalid request head.") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise HTTPError(400, "Invalid request line.")
    method, target = parts[0], parts[1]
    if not method.isalpha() or not target.startswith("/") or _NOT_IN_TARGET.search(target):
        raise HTTPError(400, "Invalid request line.")
    headers: dict[str, str] = {}
    count = 0
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not _FIELD_NAME.fullmatch(name):
            raise HTTPError(400, "Invalid header line.")
        if _NOT_IN_FIELD_VALUE.search(value):
            raise HTTPError(400, f"Invalid character in the value of header {name!r}.")
        count += 1
        if count > MAX_HEADERS:
            raise HTTPError(431, "Too many request headers.")
        key = name.lower()
        value = value.strip()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    if parts[2] == "HTTP/1.0" and "keep-alive" not in headers.get("connection", "").lower():
        headers["connection"] = "close"
    return method, target, headers


def response_head(status: int, headers: list[tuple[str, str]]) -> bytes:
    reason = _reason(status)
    lines = [f"HTTP/1.1 {status} {reason}"]
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def encode_response(
    status: int,
    body: bytes,
    *,
    content_type: str = "application/json",
    headers: list[tuple[str, str]] | None = None,
    keep_alive: bool = True,
) -> bytes:
    all_headers = [
        ("content-type", content_type),
        ("content-length", str(len(body))),
        *(headers or ()),
    ]
    if not keep_alive:
        all_headers.append(("connection", "close"))
    return response_head(status, all_headers) + body


MAX_WRITE_BUFFERS = 4096
"""Buffers passed to one `writelines` at most (`coalesced`)."""
_BLOCK_BYTES = 1 << 20


def coalesced(pieces: Sequence[bytes | bytearray]) -> Sequence[bytes | bytearray]:
    """`pieces` to write at once, joined into blocks of about 1 MiB when there are
    more than `MAX_WRITE_BUFFERS` of them: uvloop keeps the buffers it could not write
    yet in one list and fails a write of more than 2**20 of them (EINVAL), dropping
    the connection (an answer of a million small SSE events written at once)."""
    if len(pieces) <= MAX_WRITE_BUFFERS:
        return pieces
    blocks: list[bytes | bytearray] = []
    block: list[bytes | bytearray] = []
    size = 0
    for piece in pieces:
        block.append(piece)
        size += len(piece)
        if size >= _BLOCK_BYTES:
            blocks.append(b"".join(block))
            block, size = [], 0
    if block:
        blocks.append(b"".join(block))
    return blocks


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked response body."""
    return b"%x\r\n%b\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"
