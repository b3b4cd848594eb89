"""`--allowed-host`: a server on loopback serves requests for localhost, IP addresses and
the names listed, and refuses others (DNS rebinding: a page's same-origin GET carries
the attacker's name in `Host`, and no `Origin`)."""

from __future__ import annotations

import json
import logging
import socket

import httpx2 as httpx
import pytest

from tests.support import WSClient, output_text, running_server
from tests.test_http_connection import read_until_closed, split_response
from warmsocket import errors
from warmsocket.cli import build_parser
from warmsocket.hosts import HostPolicy, listens_on_loopback_only, not_host_names
from warmsocket.serve import config_from_args, flags_fit_together

REBOUND = "rebind.attacker.example"


def upgrade_status(port: int, host: str) -> tuple[int, dict[str, str], bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        raw.sendall(
            b"GET /v1/responses HTTP/1.1\r\nHost: %b\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n" % host.encode()
        )
        data = b""
        while b"\r\n\r\n" not in data and (chunk := raw.recv(65536)):
            data += chunk
        if not data.startswith(b"HTTP/1.1 101"):
            data += read_until_closed(raw)
    return split_response(data)


def test_a_rebound_name_cannot_read_a_stored_response(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="warmsocket.server")
    with running_server() as srv, httpx.Client(base_url=srv.base_url, timeout=10) as http:
        created = http.post("/responses", json={"model": "m", "input": "a secret plan"})
        response_id = created.json()["id"]
        # The page's own origin, rebound to 127.0.0.1: a same-origin GET, no Origin.
        for host in (f"{REBOUND}:{srv.port}", REBOUND, f"127.0.0.1.{REBOUND}"):
            stolen = http.get(f"/responses/{response_id}", headers={"Host": host})
            assert stolen.status_code == 403, host
            error = stolen.json()["error"]
            assert error["code"] == "host_not_allowed"
            assert "--allowed-host" in error["message"] and "DNS rebinding" in error["message"]
            assert "secret" not in stolen.text
            assert "x-request-id" in stolen.headers
        # What local clients send is served.
        for host in (f"127.0.0.1:{srv.port}", f"localhost:{srv.port}", "LocalHost", "a.localhost"):
            got = http.get(f"/responses/{response_id}", headers={"Host": host})
            assert got.status_code == 200, host
        status, _, body = upgrade_status(srv.port, REBOUND)
        assert status == 403 and json.loads(body)["error"]["code"] == "host_not_allowed"
        assert upgrade_status(srv.port, f"[::1]:{srv.port}")[0] == 101
        with WSClient(srv.ws_url) as ws:
            assert output_text(ws.turn(model="m", input="sdk")) == "You said: sdk"
        metrics = srv.server.metrics.render()
        assert 'warmsocket_errors_total{code="host_not_allowed"} 4' in metrics
    refused = [r for r in caplog.records if r.getMessage().startswith("request refused: its host")]
    assert [r.__dict__["host"] for r in refused][:2] == [f"{REBOUND}:{srv.port}", REBOUND]
    assert {r.__dict__["route"] for r in refused} == {"responses"}
    assert "secret" not in caplog.text


def test_listed_names_are_served_on_loopback() -> None:
    listed = ("api.example.com", "API.example.com:443", "corp.example", "x.corp.example")
    others = ("www.example.com", "xcorp.example", "api.example.com.attacker.example")
    names = ("api.example.com", ".corp.example")
    with running_server(allowed_hosts=names) as srv, httpx.Client(base_url=srv.base_url) as http:
        for host in listed:
            assert http.get("/models", headers={"Host": host}).status_code == 200, host
        for host in others:
            assert http.get("/models", headers={"Host": host}).status_code == 403, host
    with running_server(allowed_hosts=("*",)) as srv:
        assert upgrade_status(srv.port, REBOUND)[0] == 101


def test_a_wildcard_name_is_the_domain_and_the_names_under_it() -> None:
    """`--allowed-host '*.corp.example'`, as other servers write it, means what
    `.corp.example` does (it was accepted and matched nothing)."""
    policy = HostPolicy(["*.corp.example"], loopback_only=True)
    for host in ("corp.example", "x.corp.example", "a.b.corp.example:8443"):
        assert policy.allows(host), host
    for host in ("xcorp.example", "corp.example.attacker.example", "example.com"):
        assert not policy.allows(host), host


def test_the_default_follows_where_the_server_listens() -> None:
    on_loopback = HostPolicy(loopback_only=True)
    assert on_loopback.checked
    for host in (None, "127.0.0.1:8080", "127.0.0.2", "[::1]:8080", "198.18.0.1", "localhost."):
        assert on_loopback.allows(host), host
    for host in ("example.com", "localhost.example.com", "a, b", "", "[::1", "x/y", "::1"):
        assert not on_loopback.allows(host), host
    everywhere = HostPolicy(loopback_only=False)
    assert not everywhere.checked and everywhere.allows("whatever.example:1")
    listed = HostPolicy(["api.example.com"], loopback_only=False)
    assert listed.checked and listed.allows("api.example.com:8080")
    assert listed.allows("10.0.0.5:8080") and not listed.allows("other.example.com")
    assert "DNS rebinding" not in errors.host_not_allowed("x", loopback_only=False).message
    for host in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost", "LOCALHOST"):
        assert listens_on_loopback_only(host), host
    for host in ("0.0.0.0", "::", "198.18.0.1", "example.com", ""):
        assert not listens_on_loopback_only(host), host


def test_a_memo_of_verdicts_stays_bounded() -> None:
    policy = HostPolicy(loopback_only=True)
    for index in range(1000):
        assert not policy.allows(f"n{index}.example")
    assert len(policy._memo) <= 256
    assert policy.allows("localhost") and not policy.allows("n1.example")


def test_allowed_hosts_from_flags_and_environment(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    args = build_parser().parse_args(
        ["serve", "--allowed-host", "a.example", "--allowed-host", "*"]
    )
    assert config_from_args(args).allowed_hosts == ("a.example", "*")
    monkeypatch.setenv("WARMSOCKET_ALLOWED_HOST", "a.example,.b.example")
    args = build_parser().parse_args(["serve"])
    assert config_from_args(args).allowed_hosts == ("a.example", ".b.example")
    assert flags_fit_together(args, 1024)
    assert not_host_names(["https://a.example", "a.example/v1", "a.example", "*", "[::1]:80"]) == [
        "https://a.example",
        "a.example/v1",
    ]
    monkeypatch.setenv("WARMSOCKET_ALLOWED_HOST", "https://a.example")
    assert not flags_fit_together(build_parser().parse_args(["serve"]), 1024)
    assert "--allowed-host takes host names" in caplog.text
