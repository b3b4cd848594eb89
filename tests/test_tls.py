"""Serving https:// and wss:// (`--tls-cert`, `--tls-key`), with a throwaway CA
(`trustme`) that the clients trust as a deployment's private CA would be trusted."""

from __future__ import annotations

import json
import logging
import os
import resource
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai
import pytest
import trustme

from tests.support import RunningServer, WSClient, output_text, running_server
from tests.test_cli import WARMSOCKET, _start, _stop, run, start_serve
from tests.test_framing_server import _masked
from tests.test_http_connection import (
    IDLE,
    UPGRADE,
    Firehose,
    dropped_after,
    read_head,
    read_until_closed,
    small_window_connection,
    split_response,
    stall_records,
)
from warmsocket.tls import CertificateFiles, TLSConfigError, server_context


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def pems(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    where = tmp_path_factory.mktemp("tls")
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    files = {
        "cert": where / "cert.pem",
        "key": where / "key.pem",
        "both": where / "both.pem",
        "ca": where / "ca.pem",
        "other_key": where / "other-key.pem",
    }
    files["cert"].write_bytes(b"".join(pem.bytes() for pem in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(files["key"]))
    leaf.private_key_and_cert_chain_pem.write_to_path(str(files["both"]))
    ca.cert_pem.write_to_path(str(files["ca"]))
    ca.issue_cert("localhost").private_key_pem.write_to_path(str(files["other_key"]))
    return files


@pytest.fixture
def secure(pems: dict[str, Path]) -> Iterator[RunningServer]:
    with running_server(tls=server_context(pems["cert"], pems["key"])) as srv:
        yield srv


def client_context(pems: dict[str, Path]) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(pems["ca"]))


def test_https_and_wss_on_one_port(secure: RunningServer, pems: dict[str, Path]) -> None:
    base = f"https://127.0.0.1:{secure.port}/v1"
    with httpx.Client(base_url=base, verify=client_context(pems), timeout=10) as http:
        reply = http.post("/responses", json={"model": "m", "input": "sealed"})
        assert reply.json()["output"][0]["content"][0]["text"] == "You said: sealed"
        assert http.get("/healthz").json() == {"status": "ok"}
    url = f"wss://127.0.0.1:{secure.port}/v1/responses"
    with WSClient(url, ssl=client_context(pems)) as ws:
        first = ws.turn(model="m", input="one", store=False)
        previous = first[-1]["response"]["id"]
        again = ws.turn(model="m", input="two", previous_response_id=previous)
        assert output_text(again) == "You said: two"


def test_sync_wss_clients_never_hang_at_open(secure: RunningServer, pems: dict[str, Path]) -> None:
    """The websockets sync client (the openai SDK's sync `responses.connect()`) reads
    on a thread while it writes: a TLS 1.3 session ticket arriving meanwhile hung
    about 1 connection in 70 before the upgrade's answer. The server sends none."""
    assert server_context(pems["cert"], pems["key"]).num_tickets == 0
    url = f"wss://127.0.0.1:{secure.port}/v1/responses"
    for n in range(150):
        with WSClient(url, ssl=client_context(pems)) as ws:
            assert output_text(ws.turn(model="m", input=f"n{n}")) == f"You said: n{n}"


def test_a_plain_http_client_on_the_tls_port_is_told_to_use_https(
    secure: RunningServer, pems: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    for request in (
        b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        b"GET /v1/responses HTTP/1.1\r\n" + UPGRADE + b"\r\n",  # ws:// for wss://
    ):
        with socket.create_connection(("127.0.0.1", secure.port), timeout=5) as raw:
            raw.sendall(request)
            status, headers, body = split_response(read_until_closed(raw))
        assert status == 400 and "x-request-id" in headers
        error = json.loads(body)["error"]
        assert error["code"] == "plain_http_on_tls_port"
        assert "https://" in error["message"] and "wss://" in error["message"]
    # The openai SDK with an http:// base URL: the error says what to change.
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{secure.port}/v1", api_key="k")
    with pytest.raises(openai.BadRequestError, match="Use https://"):
        client.responses.create(model="m", input="in the clear")
    client.close()
    with httpx.Client(verify=client_context(pems), timeout=10) as http:
        assert http.get(f"https://127.0.0.1:{secure.port}/healthz").status_code == 200
    metrics = secure.server.metrics.render()
    assert "warmsocket_plain_http_on_tls_port_total 3" in metrics
    assert 'warmsocket_errors_total{code="plain_http_on_tls_port"} 3' in metrics
    warned = [r for r in caplog.records if r.getMessage().startswith("plain HTTP on the TLS port")]
    assert len(warned) == 1  # at most one line every 10 s
    assert "in the clear" not in caplog.text


def test_a_tls_client_on_the_plain_port_is_closed_and_logged(
    pems: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="warmsocket.server")
    with running_server() as srv:
        for _ in range(2):
            with (
                socket.create_connection(("127.0.0.1", srv.port), timeout=5) as raw,
                pytest.raises((ssl.SSLError, ConnectionError)),
            ):
                client_context(pems).wrap_socket(raw, server_hostname="127.0.0.1")
        with httpx.Client(base_url=srv.base_url, timeout=10) as http:
            assert http.get("/healthz").status_code == 200
        metrics = srv.server.metrics.render()
        assert "warmsocket_tls_on_plain_http_port_total 2" in metrics
        assert 'warmsocket_errors_total{code="tls_on_plain_http_port"} 2' in metrics
        assert srv.call(lambda: srv.server.admission.admitted) <= 1  # (httpx's, if open)
    (warned,) = [r for r in caplog.records if "TLS handshake on the plain-HTTP port" in r.msg]
    assert "--tls-cert" in warned.getMessage()


def test_no_file_is_left_behind_by_any_way_a_tls_port_connection_ends(
    pems: dict[str, Path],
) -> None:
    def open_files() -> int:
        return len(os.listdir("/proc/self/fd"))

    context = server_context(pems["cert"], pems["key"])
    with running_server(tls=context, http_head_timeout=0.5) as srv:
        address = ("127.0.0.1", srv.port)
        with httpx.Client(verify=client_context(pems), timeout=10) as http:
            assert http.get(f"https://127.0.0.1:{srv.port}/healthz").status_code == 200
        time.sleep(0.2)
        baseline = open_files()
        untrusting = ssl.create_default_context()
        for round_ in range(20):
            socket.create_connection(address, timeout=5).close()  # nothing sent
            with socket.create_connection(address, timeout=5) as raw:  # plain HTTP
                raw.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                assert read_until_closed(raw).startswith(b"HTTP/1.1 400 ")
            with socket.create_connection(address, timeout=5) as raw:  # reset mid-handshake
                raw.sendall(b"\x16\x03\x01\x00\x05")
                raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00" * 2)
            with (  # a client that does not trust the certificate
                socket.create_connection(address, timeout=5) as raw,
                pytest.raises(ssl.SSLError),
            ):
                untrusting.wrap_socket(raw, server_hostname="127.0.0.1")
            if round_ % 5 == 0:  # silent until --http-head-timeout
                socket.create_connection(address, timeout=5).close()
                silent = socket.create_connection(address, timeout=5)
                assert silent.recv(1) == b""
                silent.close()
        deadline = time.monotonic() + 5
        while open_files() > baseline or srv.call(lambda: srv.server.admission.admitted):
            assert time.monotonic() < deadline, (open_files(), baseline)
            time.sleep(0.05)
        with httpx.Client(verify=client_context(pems), timeout=10) as http:
            assert http.get(f"https://127.0.0.1:{srv.port}/healthz").status_code == 200
    assert srv.server.port == 0  # closed: no socket left (the configured port, 0, again)


def _few_files() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (100, 100))


def test_the_tls_port_out_of_files_pauses_accepting_and_recovers(pems: dict[str, Path]) -> None:
    # --max-connections above what the open-file limit allows: accept() fails (EMFILE).
    proc, listening = start_serve(
        "--tls-cert", str(pems["both"]), "--max-connections", "1000", preexec_fn=_few_files
    )
    try:
        port = int(listening["url"].rsplit(":", 1)[1].split("/")[0])
        stat = Path(f"/proc/{proc.pid}/stat")

        def cpu_seconds() -> float:
            fields = stat.read_text().rpartition(")")[2].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

        with ExitStack() as stack:
            for _ in range(150):  # more than the server has files for
                stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=5))
            time.sleep(0.5)
            before = cpu_seconds()
            time.sleep(2)
            assert cpu_seconds() - before < 0.5  # paused, not spinning on accept()
        time.sleep(1.5)  # accepting resumes within a second
        with httpx.Client(verify=client_context(pems), timeout=10) as http:
            assert http.get(f"https://127.0.0.1:{port}/healthz").status_code == 200
    finally:
        rest = _stop(proc)
    errors = [json.loads(line) for line in rest.splitlines() if "cannot accept" in line]
    assert len(errors) == 1 and errors[0]["errno"] == 24  # one line per 10 s
    assert "--max-connections" in errors[0]["message"]


def test_failed_handshakes_are_counted_and_logged_with_their_reason(
    secure: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="warmsocket.server")
    untrusting = ssl.create_default_context()  # does not know the private CA
    for _ in range(2):
        with (
            socket.create_connection(("127.0.0.1", secure.port), timeout=5) as raw,
            pytest.raises(ssl.SSLCertVerificationError),
        ):
            untrusting.wrap_socket(raw, server_hostname="127.0.0.1")

    def failures() -> str:
        lines = secure.server.metrics.render().splitlines()
        return "".join(line for line in lines if line.startswith("warmsocket_tls_handshakes_f"))

    deadline = time.monotonic() + 5
    while "} 2" not in failures():
        assert time.monotonic() < deadline, failures()
        time.sleep(0.02)
    assert 'reason="tlsv1_alert_unknown_ca"} 2' in failures()
    (logged,) = [r for r in caplog.records if r.getMessage().startswith("TLS handshakes failed")]
    assert logged.__dict__["reasons"] == {"tlsv1_alert_unknown_ca": 1}
    assert secure.call(lambda: secure.server.admission.admitted) == 0


def test_connections_in_their_handshake_count_against_the_limit(pems: dict[str, Path]) -> None:
    context = server_context(pems["cert"], pems["key"])
    with running_server(tls=context, max_connections=2, http_head_timeout=1.0) as srv:
        base = f"https://127.0.0.1:{srv.port}"

        def admitted() -> int:
            count: int = srv.call(lambda: srv.server.admission.admitted)
            return count

        with ExitStack() as stack:
            silent = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
            stack.enter_context(silent)
            halfway = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
            stack.enter_context(halfway)
            halfway.sendall(b"\x16\x03\x01")  # a handshake's first bytes, then nothing
            deadline = time.monotonic() + 5
            while admitted() < 2:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            with httpx.Client(verify=client_context(pems), timeout=10) as http:
                refused = http.get(f"{base}/v1/models")
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "server_is_overloaded"
            # Both are dropped at --http-head-timeout: one waiting for its first byte,
            # one in its handshake; then their places are free.
            started = time.monotonic()
            assert silent.recv(1) == b"" and halfway.recv(1) == b""
            assert time.monotonic() - started < 3
        assert admitted() == 0
        with httpx.Client(verify=client_context(pems), timeout=10) as http:
            assert http.get(f"{base}/v1/models").status_code == 200
        # One that connects and closes at once (a port check) is uncounted too.
        socket.create_connection(("127.0.0.1", srv.port), timeout=5).close()
        deadline = time.monotonic() + 5
        while admitted() != 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        failures = srv.server.metrics.render()
        assert 'warmsocket_tls_handshakes_failed_total{reason="timeout"} 1' in failures


def test_a_wss_client_that_stops_reading_is_dropped(
    pems: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    # What the client acknowledged is counted in TLS records, what was written in
    # plaintext: the write-stall check still sees when nothing moves.
    backend = Firehose()
    with (
        caplog.at_level(logging.INFO),
        running_server(
            backend=backend, http_idle_timeout=IDLE, tls=server_context(pems["cert"], pems["key"])
        ) as srv,
    ):
        raw = small_window_connection(srv.port)
        with client_context(pems).wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(b"GET /v1/responses HTTP/1.1\r\n" + UPGRADE + b"\r\n")
            assert read_head(tls).startswith(b"HTTP/1.1 101 ")
            payload = json.dumps({"type": "response.create", "model": "m", "input": "go"})
            tls.sendall(_masked(payload.encode()))
            assert backend.started.wait(5)
            after = dropped_after(srv, time.monotonic())  # never reads again
            assert backend.closed.wait(1)
        assert after < IDLE + 3
    (record,) = stall_records(caplog)
    assert record.__dict__["kind"] == "websocket"


def test_the_sdk_over_https_and_wss_trusting_a_private_ca(pems: dict[str, Path]) -> None:
    proc, url = _start("--tls-cert", str(pems["both"]))  # the key in the certificate file
    try:
        assert url.startswith("https://127.0.0.1:")
        script = (
            "import openai, sys\n"
            "c = openai.OpenAI(base_url=sys.argv[1], api_key='k')\n"
            "print(c.responses.create(model='m', input='via https').output_text)\n"
            "with c.responses.connect() as conn:\n"
            "    conn.response.create(model='m', input='via wss')\n"
            "    for event in conn:\n"
            "        if event.type == 'response.completed':\n"
            "            print(event.response.output_text)\n"
            "            break\n"
        )
        env = {**os.environ, "SSL_CERT_FILE": str(pems["ca"])}
        done = subprocess.run(
            [sys.executable, "-c", script, url],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines() == ["You said: via https", "You said: via wss"]
    finally:
        _stop(proc)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tls-key", "KEY"], "--tls-key needs --tls-cert"),
        # The file that cannot be read is named (the SSL module's own error names none).
        (
            ["--tls-cert", "/nonexistent/cert.pem"],
            "cannot read /nonexistent/cert.pem: no such file",
        ),
        (["--tls-cert", "CERT", "--tls-key", "/nonexistent/key.pem"], "read /nonexistent/key.pem"),
        (["--tls-cert", "/"], "cannot read /: a directory; give --tls-cert a file"),
        (["--tls-cert", "CERT", "--tls-key", "OTHER_KEY"], "cannot load the TLS certificate"),
        (["--tls-cert", "CA_AS_KEY"], "cannot load the TLS certificate"),
        (["--tls-client-ca", "CA"], "--tls-client-ca needs --tls-cert"),
        (["--tls-cert", "BOTH", "--owner-by-client-certificate"], "needs --tls-client-ca"),
        (["--tls-cert", "BOTH", "--tls-client-ca", "/nonexistent/ca.pem"], "--tls-client-ca"),
        (["--tls-cert", "BOTH", "--tls-client-ca", "/"], "a directory; give --tls-client-ca"),
        (["--tls-cert", "BOTH", "--tls-client-ca", "KEY"], "cannot load --tls-client-ca"),
    ],
)
def test_unusable_tls_files_stop_the_server_with_advice(
    pems: dict[str, Path], args: list[str], message: str
) -> None:
    names = {
        "KEY": "key",
        "CERT": "cert",
        "OTHER_KEY": "other_key",
        "CA_AS_KEY": "ca",
        "CA": "ca",
        "BOTH": "both",
    }
    args = [str(pems[names[a]]) if a in names else a for a in args]
    result = run(WARMSOCKET, "serve", "--port", "0", "--log-format", "json", *args)
    assert result.returncode == 1
    (record,) = [json.loads(line) for line in result.stderr.splitlines()]
    assert message in record["message"] and record["level"] == "error"
    assert "PRIVATE KEY" not in result.stderr  # never the files' content


def test_mutual_tls_takes_only_clients_with_a_certificate_from_the_client_ca(
    pems: dict[str, Path], ca: trustme.CA, tmp_path: Path
) -> None:
    client_ca = trustme.CA()  # the clients' CA: another than the server's
    (tmp_path / "client-ca.pem").write_bytes(client_ca.cert_pem.bytes())
    context = server_context(pems["cert"], pems["key"], client_ca=tmp_path / "client-ca.pem")
    assert context.cert_store_stats()["x509_ca"] == 1  # that CA only, never the system's

    def client(issuer: trustme.CA | None) -> ssl.SSLContext:
        own = client_context(pems)
        if issuer is not None:
            issuer.issue_cert("agent-7@example.com").configure_cert(own)
        return own

    with running_server(tls=context) as srv:
        base = f"https://127.0.0.1:{srv.port}/v1"
        # The openai SDK, HTTP and WebSocket mode, with the client's certificate.
        agent = client(client_ca)
        with httpx.Client(verify=agent, timeout=10) as http:
            sdk = openai.OpenAI(base_url=base, api_key="k", http_client=http, max_retries=0)
            assert sdk.responses.create(model="m", input="mine").output_text == "You said: mine"
            options: Any = {"ssl": agent}
            with sdk.responses.connect(websocket_connection_options=options) as conn:
                conn.response.create(model="m", input="over wss")
                for event in conn:
                    if event.type == "response.completed":
                        assert event.response.output_text == "You said: over wss"
                        break
        # Without a certificate, or with one the client CA did not sign: no handshake.
        for without in (client(None), client(ca)):
            with (
                httpx.Client(verify=without, timeout=10) as http,
                pytest.raises(httpx.TransportError),
            ):
                http.get(f"{base}/models")
        expected = [
            'warmsocket_tls_handshakes_failed_total{reason="certificate_verify_failed"} 1',
            'warmsocket_tls_handshakes_failed_total{reason="peer_did_not_return_a_certificate"} 1',
        ]

        def failed() -> list[str]:
            lines = srv.server.metrics.render().splitlines()
            return sorted(line for line in lines if line.startswith("warmsocket_tls_handshakes_f"))

        # (The client may see the alert before the server has counted its failure.)
        deadline = time.monotonic() + 5
        while failed() != expected:
            assert time.monotonic() < deadline, failed()
            time.sleep(0.02)
    # The bundle is one of the files read again when they change.
    files = CertificateFiles(context, pems["cert"], pems["key"], tmp_path / "client-ca.pem")
    assert not files.changed()
    (tmp_path / "client-ca.pem").write_bytes(client_ca.cert_pem.bytes() + ca.cert_pem.bytes())
    assert files.changed() and files.reload("test")


def test_server_context_errors() -> None:
    with pytest.raises(TLSConfigError, match="no such file"):
        server_context(Path("/nonexistent.pem"))


def _write_leaf(ca: trustme.CA, cert: Path, key: Path) -> None:
    """Replace the files as a rotation does: each written aside, then renamed over."""
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    for path, data in (
        (cert, b"".join(pem.bytes() for pem in leaf.cert_chain_pems)),
        (key, leaf.private_key_pem.bytes()),
    ):
        aside = path.with_suffix(".new")
        aside.write_bytes(data)
        aside.replace(path)


def _trusts(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def test_a_rotated_certificate_is_served_after_sighup_and_open_sockets_stay(
    tmp_path: Path,
) -> None:
    old_ca, new_ca = trustme.CA(), trustme.CA()
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    _write_leaf(old_ca, cert, key)
    proc, listening = start_serve("--tls-cert", str(cert), "--tls-key", str(key))
    health = listening["url"].removesuffix("/v1") + "/healthz"
    try:
        with WSClient(listening["websocket"], ssl=_trusts(old_ca)) as warm:
            first = warm.turn(model="m", input="before", store=False)[-1]["response"]["id"]
            _write_leaf(new_ca, cert, key)
            proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 5
            while True:
                try:
                    assert httpx.get(health, verify=_trusts(new_ca)).status_code == 200
                    break
                except httpx.ConnectError:
                    assert time.monotonic() < deadline, "the new certificate was not served"
                    time.sleep(0.05)
            with pytest.raises(httpx.ConnectError):  # the old one is not served any more
                httpx.get(health, verify=_trusts(old_ca))
            # The warm WebSocket and its store=false chain are still there.
            after = warm.turn(model="m", input="/transcript", previous_response_id=first)
            assert output_text(after).startswith("user: before\n")
            # A broken key is not applied: the certificate in use stays.
            key.write_bytes(b"not a key")
            proc.send_signal(signal.SIGHUP)
            time.sleep(0.3)
            assert httpx.get(health, verify=_trusts(new_ca)).status_code == 200
    finally:
        rest = _stop(proc)
    messages = [json.loads(line)["message"] for line in rest.splitlines()]
    assert "TLS certificate reloaded" in messages
    assert "cannot reload the TLS certificate; the one in use stays" in messages
    assert "PRIVATE KEY" not in rest


def test_certificate_files_notice_a_change(tmp_path: Path, ca: trustme.CA) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    _write_leaf(ca, cert, key)
    files = CertificateFiles(server_context(cert, key), cert, key)
    assert not files.changed() and not files.reload_if_changed()
    _write_leaf(ca, cert, key)
    assert files.changed()
    assert files.reload_if_changed()
    assert not files.changed()
