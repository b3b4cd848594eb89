"""An upstream over TLS (`https://`, `wss://`), as OpenAI and most hosted gateways are,
directly and through an HTTP proxy named by the environment (`HTTPS_PROXY`).

The simulated upstream sits behind a TLS-terminating proxy whose certificate comes
from a test CA (`trustme`); warmsocket trusts that CA through `SSL_CERT_FILE`, which
OpenSSL reads whenever a default context is made, as a deployment with a private CA
would.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import openai
import pytest
import trustme
from openai import OpenAI

from tests.support import WSClient, output_text
from tests.upstream_support import running_sim, warmsocket_upstream

APIS = ["chat", "responses", "responses-ws"]


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        writer.close()


@contextmanager
def serving(
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    context: ssl.SSLContext | None = None,
) -> Iterator[int]:
    """`handler` serving loopback connections on its own thread. Yields the port."""
    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(asyncio.start_server(handler, "127.0.0.1", 0, ssl=context))
    port: int = server.sockets[0].getsockname()[1]
    thread = threading.Thread(target=loop.run_forever, name="test-server", daemon=True)
    thread.start()
    try:
        yield port
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        server.close()
        for task in asyncio.all_tasks(loop):
            task.cancel()
        loop.run_until_complete(asyncio.sleep(0))
        loop.run_until_complete(server.wait_closed())
        loop.close()


@contextmanager
def tls_front(target_port: int, cert: trustme.LeafCert) -> Iterator[int]:
    """A TLS listener that forwards each connection's bytes to `target_port`."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)

    async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target_port)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    with serving(forward, context) as port:
        yield port


def chain_two_turns(client: WSClient) -> None:
    """A turn and its continuation (`previous_response_id`), both answered right."""
    first = client.turn(input="hello", store=False)
    assert output_text(first) == "You said: hello"
    previous = first[-1]["response"]["id"]
    again = client.turn(input="again", store=False, previous_response_id=previous)
    assert output_text(again) == "You said: again"


@pytest.fixture
def ca(tmp_path: Path) -> Iterator[tuple[trustme.CA, Path]]:
    authority = trustme.CA()
    pem = tmp_path / "ca.pem"
    authority.cert_pem.write_to_path(str(pem))
    yield authority, pem


@pytest.mark.parametrize("api", APIS)
def test_a_tls_upstream_with_a_trusted_certificate(
    api: str, ca: tuple[trustme.CA, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    authority, pem = ca
    monkeypatch.setenv("SSL_CERT_FILE", str(pem))
    with (
        running_sim() as sim,
        tls_front(sim.port, authority.issue_cert("127.0.0.1")) as port,
        warmsocket_upstream(f"https://127.0.0.1:{port}/v1", api, timeout=5.0) as (server, _),
        WSClient(server.ws_url, proxy=None) as client,
    ):
        chain_two_turns(client)
        assert len(sim.stats()["requests"]) == 2  # both went through the TLS front


@pytest.mark.parametrize("api", APIS)
def test_an_untrusted_upstream_certificate_fails_the_turn_and_says_why(
    api: str,
    ca: tuple[trustme.CA, Path],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    authority, _pem = ca
    other = trustme.CA()  # warmsocket trusts this one, not the upstream's
    other_pem = _pem.with_name("other.pem")
    other.cert_pem.write_to_path(str(other_pem))
    monkeypatch.setenv("SSL_CERT_FILE", str(other_pem))
    caplog.set_level(logging.WARNING, logger="warmsocket.upstream")
    with (
        running_sim() as sim,
        tls_front(sim.port, authority.issue_cert("127.0.0.1")) as port,
        warmsocket_upstream(f"https://127.0.0.1:{port}/v1", api, timeout=5.0) as (server, _),
        WSClient(server.ws_url, proxy=None) as client,
    ):
        terminal = client.turn(input="hello", store=False)[-1]
        assert terminal["type"] == "response.failed"
        assert terminal["response"]["error"]["code"] == "server_error"
        assert sim.stats()["requests"] == []
    failures = [r for r in caplog.records if r.getMessage() == "upstream request failed"]
    assert failures and all(r.outcome == "connect" for r in failures)  # type: ignore[attr-defined]
    detail = failures[-1].detail  # type: ignore[attr-defined]
    assert "SSLCertVerificationError: unable to get local issuer certificate" in detail


@pytest.mark.parametrize("api", APIS)
def test_an_https_url_for_a_plain_http_upstream_fails_at_once_and_says_so(
    api: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The simulated upstream (like uvicorn, nginx...) answers a ClientHello with a
    plain-HTTP 400: the turn fails within the second, not after three connect
    timeouts, and the log says what to check. Not retried: a configuration error."""
    caplog.set_level(logging.WARNING, logger="warmsocket.upstream")
    with (
        running_sim() as sim,
        warmsocket_upstream(f"https://127.0.0.1:{sim.port}/v1", api) as (server, metrics),
        WSClient(server.ws_url, proxy=None) as client,
    ):
        start = time.monotonic()
        terminal = client.turn(input="hello", store=False)[-1]
        assert time.monotonic() - start < 2
        assert terminal["type"] == "response.failed"
        assert terminal["response"]["error"]["code"] == "server_error"
        assert metrics.upstream.retries == 0
        # Without `stream`: the configuration error's 502 itself, which the SDK raises.
        with OpenAI(base_url=server.base_url, api_key="x", max_retries=0) as sdk:
            with pytest.raises(openai.InternalServerError) as info:
                sdk.responses.create(model="m", input="hello", store=False)
            assert info.value.status_code == 502
    failures = [r for r in caplog.records if r.getMessage() == "upstream request failed"]
    assert [(r.outcome, r.retry) for r in failures] == [("connect", False)] * 2  # type: ignore[attr-defined]
    detail = failures[0].detail  # type: ignore[attr-defined]
    assert detail.endswith("the server does not speak TLS; is the upstream plain http://?")


@contextmanager
def connect_proxy(*, refuse: int | None = None) -> Iterator[tuple[int, list[str]]]:
    """An HTTP proxy on loopback that tunnels `CONNECT` (or answers `refuse`), on its
    own thread. Yields its port and the request heads it received."""
    seen: list[str] = []

    async def tunnel(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        seen.append(head)
        method, target, _version = head.split("\r\n", 1)[0].split(" ")
        if refuse is not None or method != "CONNECT":
            writer.write(b"HTTP/1.1 %d No\r\nContent-Length: 0\r\n\r\n" % (refuse or 405))
            writer.close()
            return
        host, port = target.rsplit(":", 1)
        up_reader, up_writer = await asyncio.open_connection(host.strip("[]"), int(port))
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    with serving(tunnel) as port:
        yield port, seen


@pytest.mark.parametrize("api", APIS)
def test_an_https_upstream_through_the_environments_proxy(
    api: str, ca: tuple[trustme.CA, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    authority, pem = ca
    monkeypatch.setenv("SSL_CERT_FILE", str(pem))
    for name in ("NO_PROXY", "no_proxy", "HTTP_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    with (
        running_sim() as sim,
        tls_front(sim.port, authority.issue_cert("127.0.0.1")) as port,
        connect_proxy() as (proxy_port, seen),
    ):
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy_port}")
        with (
            warmsocket_upstream(f"https://127.0.0.1:{port}/v1", api, timeout=5.0) as (server, _),
            WSClient(server.ws_url, proxy=None) as client,
        ):
            chain_two_turns(client)
        assert seen and all(h.startswith(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\n") for h in seen)
        assert len(sim.stats()["requests"]) == 2
        # NO_PROXY: straight to the upstream.
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        seen.clear()
        with (
            warmsocket_upstream(f"https://127.0.0.1:{port}/v1", api, timeout=5.0) as (server, _),
            WSClient(server.ws_url, proxy=None) as client,
        ):
            assert output_text(client.turn(input="direct", store=False)) == "You said: direct"
        assert seen == []


@pytest.mark.parametrize("api", APIS)
def test_a_proxy_that_refuses_the_tunnel_fails_the_turn_and_says_so(
    api: str,
    ca: tuple[trustme.CA, Path],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _authority, pem = ca
    monkeypatch.setenv("SSL_CERT_FILE", str(pem))
    for name in ("NO_PROXY", "no_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    caplog.set_level(logging.WARNING, logger="warmsocket.upstream")
    # websockets 15 (responses-ws) sends a proxy URL's user and password as written,
    # without percent-decoding them: that arm gets credentials that need none.
    userinfo, basic = ("user:pass", "dXNlcjpwYXNz") if api == "responses-ws" else (
        "user:p%40ss", "dXNlcjpwQHNz"  # user:p@ss
    )  # fmt: skip
    with connect_proxy(refuse=407) as (proxy_port, seen):
        monkeypatch.setenv("HTTPS_PROXY", f"http://{userinfo}@127.0.0.1:{proxy_port}")
        with (
            warmsocket_upstream("https://127.0.0.1:9/v1", api, timeout=5.0) as (
                server,
                _,
            ),
            WSClient(server.ws_url, proxy=None) as client,
        ):
            terminal = client.turn(input="hello", store=False)[-1]
    assert terminal["type"] == "response.failed"
    assert seen and seen[0].startswith("CONNECT 127.0.0.1:9 HTTP/1.1\r\n")
    assert f"\r\nProxy-Authorization: Basic {basic}\r\n" in seen[0]
    failures = [r for r in caplog.records if r.getMessage() == "upstream request failed"]
    assert "answered CONNECT with 407" in failures[-1].detail  # type: ignore[attr-defined]


@pytest.mark.parametrize("api", APIS)
def test_a_plain_http_upstream_is_reached_directly_whatever_the_proxy_settings(
    api: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("NO_PROXY", "no_proxy", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    with connect_proxy(refuse=403) as (proxy_port, seen), running_sim() as sim:
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy_port}")
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy_port}")
        with (
            warmsocket_upstream(sim.base_url, api, timeout=5.0) as (server, _),
            WSClient(server.ws_url, proxy=None) as client,
        ):
            assert output_text(client.turn(input="hello", store=False)) == "You said: hello"
    assert seen == []


@pytest.mark.parametrize(
    ("proxy", "why"),
    [
        ("ftp://127.0.0.1:1", "scheme ftp isn't supported"),
        ("http://127.0.0.1:1/some/path", "path is meaningless"),
    ],
)
def test_a_proxy_websockets_cannot_use_is_refused_at_start(
    proxy: str, why: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from warmsocket.backends.responses_ws import ResponsesWSBackend
    from warmsocket.upstream import UpstreamConfig

    for name in ("NO_PROXY", "no_proxy", "https_proxy", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", proxy)
    with pytest.raises(ValueError, match=why) as info:
        ResponsesWSBackend(UpstreamConfig(urls=("https://127.0.0.1:9/v1",), api="responses-ws"))
    assert "NO_PROXY" in str(info.value) and "127.0.0.1:1" not in str(info.value)
    # A plain ws:// upstream never goes through a proxy: nothing to refuse.
    ResponsesWSBackend(UpstreamConfig(urls=("http://127.0.0.1:9/v1",), api="responses-ws"))
