"""A lean WebSocket client for load generation (RFC 6455, text frames, no extensions).

The load generator must cost less than the servers it measures: with the `websockets`
asyncio client, receiving a 12-event turn cost the client about as much CPU as the
server spent producing it, so the client, not the server, set the rate. This client
is an `asyncio.Protocol` that frames and unframes messages itself and wakes its
caller once per exchange, not once per message: `exchange(message, until)` sends one
message and resolves when a received message satisfies `until`, with that message
and how many came in. Client frames are masked with a random key, as the RFC
requires. Pings are answered; a close frame closes the connection.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import struct
from collections.abc import Callable
from urllib.parse import urlsplit

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_OP_CONT, _OP_TEXT, _OP_BINARY, _OP_CLOSE, _OP_PING, _OP_PONG = 0, 1, 2, 8, 9, 10


class HandshakeFailed(ConnectionError):
    pass


def _mask(payload: bytes, key: bytes) -> bytes:
    size = len(payload)
    if not size:
        return payload
    repeated = (key * (size // 4 + 1))[:size]
    masked = int.from_bytes(payload, "little") ^ int.from_bytes(repeated, "little")
    return masked.to_bytes(size, "little")


def encode_frame(opcode: int, payload: bytes) -> bytes:
    """One final, masked client frame."""
    size = len(payload)
    if size < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | size)
    elif size < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, size)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, size)
    key = os.urandom(4)
    return head + key + _mask(payload, key)


class LeanWebSocket(asyncio.Protocol):
    """One client connection. Use `await connect(url)`."""

    def __init__(self, host_header: str, path: str) -> None:
        self._request_key = base64.b64encode(os.urandom(16))
        self._handshake = (
            f"GET {path} HTTP/1.1\r\nHost: {host_header}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {self._request_key.decode()}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._open: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._upgraded = False
        self._fragments: list[bytes] = []
        self._until: Callable[[bytes], bool] | None = None
        self._waiter: asyncio.Future[tuple[bytes, int]] | None = None
        self._count = 0
        self.closed = False

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        assert self.transport is not None
        self.transport.write(self._handshake)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if not self._upgraded and not self._read_handshake():
            return
        self._read_frames()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        error = ConnectionError("the connection was closed")
        if not self._open.done():
            self._open.set_exception(error)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(error)

    # -- API ----------------------------------------------------------------------------

    async def wait_open(self) -> None:
        await self._open

    def exchange(
        self, message: bytes, until: Callable[[bytes], bool]
    ) -> asyncio.Future[tuple[bytes, int]]:
        """Send a text message; the future resolves with the first received message for
        which `until` is true and the number of messages received up to it."""
        if self._waiter is not None and not self._waiter.done():
            raise RuntimeError("one exchange at a time")
        if self.closed or self.transport is None:
            raise ConnectionError("the connection is closed")
        waiter: asyncio.Future[tuple[bytes, int]] = asyncio.get_running_loop().create_future()
        self._waiter, self._until, self._count = waiter, until, 0
        self.transport.write(encode_frame(_OP_TEXT, message))
        return waiter

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(encode_frame(_OP_CLOSE, struct.pack("!H", 1000)))
            self.transport.close()
        self.closed = True

    # -- internals ----------------------------------------------------------------------

    def _read_handshake(self) -> bool:
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            return False
        head = bytes(self._buffer[:end]).decode("latin-1")
        del self._buffer[: end + 4]
        expected = base64.b64encode(hashlib.sha1(self._request_key + _GUID).digest()).decode()
        lines = head.split("\r\n")
        headers = {
            k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])
        }
        if " 101 " not in lines[0] + " " or headers.get("sec-websocket-accept") != expected:
            self._open.set_exception(HandshakeFailed(lines[0]))
            if self.transport is not None:
                self.transport.abort()
            return False
        self._upgraded = True
        self._open.set_result(None)
        return True

    def _read_frames(self) -> None:
        buffer = self._buffer
        position = 0
        size = len(buffer)
        while size - position >= 2:
            first, second = buffer[position], buffer[position + 1]
            length = second & 0x7F
            offset = position + 2
            if length == 126:
                if size - offset < 2:
                    break
                (length,) = struct.unpack_from("!H", buffer, offset)
                offset += 2
            elif length == 127:
                if size - offset < 8:
                    break
                (length,) = struct.unpack_from("!Q", buffer, offset)
                offset += 8
            if second & 0x80:
                offset += 4  # servers do not mask; skip a key if one is there
            if size - offset < length:
                break
            payload = bytes(buffer[offset : offset + length])
            position = offset + length
            self._frame(first & 0x0F, bool(first & 0x80), payload)
        if position:
            del buffer[:position]

    def _frame(self, opcode: int, fin: bool, payload: bytes) -> None:
        if opcode in (_OP_TEXT, _OP_BINARY, _OP_CONT):
            if not fin or self._fragments:
                self._fragments.append(payload)
                if not fin:
                    return
                payload = b"".join(self._fragments)
                self._fragments = []
            self._message(payload)
        elif opcode == _OP_PING and self.transport is not None:
            self.transport.write(encode_frame(_OP_PONG, payload))
        elif opcode == _OP_CLOSE and self.transport is not None:
            self.closed = True
            self.transport.close()

    def _message(self, payload: bytes) -> None:
        self._count += 1
        waiter, until = self._waiter, self._until
        if waiter is not None and until is not None and not waiter.done() and until(payload):
            self._waiter = self._until = None
            waiter.set_result((payload, self._count))


async def connect(url: str, *, timeout: float = 60.0) -> LeanWebSocket:
    """Open a WebSocket to a `ws://host:port/path` URL."""
    parts = urlsplit(url)
    if parts.scheme != "ws" or parts.hostname is None:
        raise ValueError(f"only ws:// URLs: {url!r}")
    port = parts.port or 80
    host_header = parts.hostname if port == 80 else f"{parts.hostname}:{port}"
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        _transport, protocol = await loop.create_connection(
            lambda: LeanWebSocket(host_header, parts.path or "/"), parts.hostname, port
        )
        await protocol.wait_open()
    return protocol
