"""The Sans-I/O HTTP/1.1 parser."""

from __future__ import annotations

import pytest

from warmsocket.http11 import HTTPError, RequestParser, chunk, encode_response


def parse(data: bytes, max_body: int = 1 << 20) -> list[object]:
    parser = RequestParser(max_body_bytes=max_body)
    out: list[object] = []
    for i in range(len(data)):  # byte by byte: requests must survive any split
        parser.feed(data[i : i + 1])
        while (request := parser.next_request()) is not None:
            out.append(request)
    return out


def test_keep_alive_requests_with_bodies() -> None:
    data = (
        b"POST /v1/responses?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n{}"
        b"GET /v1/responses/resp_1/input_items?limit=2&order=asc HTTP/1.1\r\nHost: a\r\n\r\n"
        b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\n\r\n"
    )
    first, second, third = parse(data)
    assert (first.method, first.path, first.body, first.query) == (  # type: ignore[attr-defined]
        "POST",
        "/v1/responses",
        b"{}",
        {"x": ["1"]},
    )
    assert second.query_value("limit") == "2"  # type: ignore[attr-defined]
    assert third.body == b"abcde"  # type: ignore[attr-defined]


def test_upgrade_detection_and_connection_close() -> None:
    (request,) = parse(
        b"GET /v1/responses HTTP/1.1\r\nUpgrade: WebSocket\r\nConnection: keep-alive, Upgrade\r\n"
        b"Sec-WebSocket-Key: x\r\n\r\n"
    )
    assert request.is_websocket_upgrade  # type: ignore[attr-defined]
    (closing,) = parse(b"GET / HTTP/1.0\r\n\r\n")
    assert not closing.keep_alive  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"NOT HTTP\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nbad header\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n", 413),
        (b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 200 + b"\r\n", 431),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
    ],
)
def test_bad_requests(data: bytes, status: int) -> None:
    parser = RequestParser(max_body_bytes=1000)
    parser.feed(data)
    with pytest.raises(HTTPError) as info:
        parser.next_request()
    assert info.value.status == status


def test_expect_continue_once() -> None:
    parser = RequestParser(max_body_bytes=100)
    parser.feed(b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
    assert parser.next_request() is None
    assert parser.wants_continue() and not parser.wants_continue()
    parser.feed(b"abc")
    assert parser.next_request() is not None


def test_encoding() -> None:
    raw = encode_response(404, b"{}", headers=[("x-request-id", "req_1")], keep_alive=False)
    assert raw.startswith(b"HTTP/1.1 404 Not Found\r\n")
    assert b"content-length: 2\r\n" in raw and b"connection: close" in raw
    assert chunk(b"hello") == b"5\r\nhello\r\n"
