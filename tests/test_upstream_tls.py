"""An upstream over TLS (`https://`, `wss://`), as OpenAI and most hosted gateways are.

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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trustme

from tests.support import WSClient, output_text
from tests.upstream_support import running_sim, warmsocket_upstream

APIS = ["chat", "responses", "responses-ws"]


@contextmanager
def tls_front(target_port: int, cert: trustme.LeafCert) -> Iterator[int]:
    """A TLS listener on loopback that forwards each connection's bytes to
    `target_port`, on its own thread. Yields its port."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    loop = asyncio.new_event_loop()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target_port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = loop.run_until_complete(asyncio.start_server(forward, "127.0.0.1", 0, ssl=context))
    port: int = server.sockets[0].getsockname()[1]
    thread = threading.Thread(target=loop.run_forever, name="tls-front", daemon=True)
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
        WSClient(server.ws_url) as client,
    ):
        first = client.turn(input="hello", store=False)
        assert output_text(first) == "You said: hello"
        previous = first[-1]["response"]["id"]
        again = client.turn(input="again", store=False, previous_response_id=previous)
        assert output_text(again) == "You said: again"
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
        WSClient(server.ws_url) as client,
    ):
        terminal = client.turn(input="hello", store=False)[-1]
        assert terminal["type"] == "response.failed"
        assert terminal["response"]["error"]["code"] == "server_error"
        assert sim.stats()["requests"] == []
    failures = [r for r in caplog.records if r.getMessage() == "upstream request failed"]
    assert failures and all(r.outcome == "connect" for r in failures)  # type: ignore[attr-defined]
    detail = failures[-1].detail  # type: ignore[attr-defined]
    assert "SSLCertVerificationError: unable to get local issuer certificate" in detail
