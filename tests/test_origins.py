"""`--allowed-origin`: a web page's requests (they carry `Origin`) are refused unless
its origin is allowed; an allowed page gets CORS. Clients without `Origin` (the SDKs,
agents) are unaffected."""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Iterator

import httpx2 as httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.support import RunningServer, WSClient, output_text, running_server
from tests.test_http_connection import read_responses, read_until_closed, split_response
from warmsocket.cli import build_parser
from warmsocket.origins import OriginPolicy
from warmsocket.serve import config_from_args

PAGE = "https://app.example.com"
OTHER = "https://evil.example.net"
CREATE = {"model": "m", "input": "from a page"}


@pytest.fixture
def guarded() -> Iterator[RunningServer]:
    with running_server(allowed_origins=(PAGE,)) as srv:
        yield srv


def test_a_websocket_from_a_page_not_allowed_is_refused_before_the_upgrade(
    guarded: RunningServer,
) -> None:
    for origin in (OTHER, "null", f"{PAGE}.evil.net", f"{PAGE}, {OTHER}"):
        with pytest.raises(InvalidStatus) as refused:
            connect(guarded.ws_url, origin=origin, open_timeout=5)  # type: ignore[arg-type]
        response = refused.value.response
        assert response.status_code == 403
        error = json.loads(response.body)["error"]
        assert error["code"] == "origin_not_allowed"
        assert "--allowed-origin" in error["message"]
        assert "access-control-allow-origin" not in response.headers
    # The SDKs send no Origin: served as ever.
    with WSClient(guarded.ws_url) as ws:
        assert output_text(ws.turn(model="m", input="sdk")) == "You said: sdk"
    metrics = guarded.server.metrics.render()
    assert 'warmsocket_http_requests_total{route="responses",status="403"} 4' in metrics
    assert 'warmsocket_errors_total{code="origin_not_allowed"} 4' in metrics


def test_a_post_from_a_page_not_allowed_runs_no_turn(
    guarded: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="warmsocket.server")
    # A "simple" cross-site request (text/plain: no preflight) a page could send.
    body = json.dumps(CREATE).encode()
    with socket.create_connection(("127.0.0.1", guarded.port), timeout=5) as raw:
        raw.sendall(
            b"POST /v1/responses HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/plain\r\n"
            b"Origin: " + OTHER.encode() + b"\r\n"
            b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
        )
        status, headers, answer = split_response(read_until_closed(raw))
    assert status == 403 and json.loads(answer)["error"]["code"] == "origin_not_allowed"
    assert "access-control-allow-origin" not in headers
    assert "warmsocket_turns_total" in guarded.server.metrics.render()
    assert guarded.server.metrics.turns.total() == 0
    assert guarded.server.cache.stats().entries == 0
    (record,) = [r for r in caplog.records if r.getMessage().startswith("web page refused")]
    assert (record.__dict__["origin"], record.__dict__["route"]) == (OTHER, "responses")
    assert "from a page" not in caplog.text  # never the request's content


def test_an_allowed_page_gets_cors_on_every_answer(guarded: RunningServer) -> None:
    with httpx.Client(base_url=guarded.base_url, timeout=10) as http:
        preflight = http.options(
            "/responses",
            headers={
                "Origin": PAGE,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os",
            },
        )
        assert preflight.status_code == 204 and preflight.content == b""
        assert "content-length" not in preflight.headers
        assert preflight.headers["access-control-allow-origin"] == PAGE
        assert "POST" in preflight.headers["access-control-allow-methods"]
        assert "DELETE" in preflight.headers["access-control-allow-methods"]
        assert preflight.headers["access-control-allow-headers"] == (
            "authorization, content-type, x-stainless-os"
        )
        assert preflight.headers["vary"] == "Origin"
        created = http.post("/responses", json=CREATE, headers={"Origin": PAGE})
        assert created.status_code == 200
        assert created.json()["output"][0]["content"][0]["text"] == "You said: from a page"
        for answer in (
            created,
            http.get(f"/responses/{created.json()['id']}", headers={"Origin": PAGE}),
            http.get("/responses/resp_unknown", headers={"Origin": PAGE}),  # 404
            http.get("/models", headers={"Origin": PAGE}),
        ):
            assert answer.headers["access-control-allow-origin"] == PAGE
            assert "x-request-id" in answer.headers["access-control-expose-headers"]
        assert answer.status_code == 200
        with http.stream(
            "POST", "/responses", json={**CREATE, "stream": True}, headers={"Origin": PAGE}
        ) as stream:
            assert stream.headers["access-control-allow-origin"] == PAGE
            assert "response.completed" in stream.read().decode()
        # No Origin: no CORS headers, and OPTIONS is not a method of the API.
        assert "access-control-allow-origin" not in http.get("/models").headers
        assert http.options("/responses").status_code == 405
    with WSClient(guarded.ws_url, origin=PAGE) as ws:
        assert output_text(ws.turn(model="m", input="page")) == "You said: page"


def test_origins_compare_as_browsers_send_them() -> None:
    policy = OriginPolicy(["https://App.Example.com/", "http://localhost:3000"])
    assert policy.allows(None)
    assert policy.allows("https://app.example.com")
    assert policy.allows("http://localhost:3000")
    assert not policy.allows("http://localhost:3001")
    assert not policy.allows("https://app.example.com.evil.net")
    assert not policy.allows("null")
    assert not OriginPolicy().allows("http://127.0.0.1:8080")  # none by default
    anything = OriginPolicy(["*"])
    assert anything.allows("null") and anything.allows(OTHER)


def test_any_origin_with_a_star() -> None:
    with running_server(allowed_origins=("*",)) as srv:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as raw:
            raw.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: null\r\n\r\n")
            ((status, headers, _),) = read_responses(raw, 1)
        assert status == 200 and headers["access-control-allow-origin"] == "null"
        with WSClient(srv.ws_url, origin=OTHER) as ws:
            assert output_text(ws.turn(model="m", input="any")) == "You said: any"


def test_allowed_origins_from_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    args = ["serve", "--allowed-origin", PAGE, "--allowed-origin", "http://localhost:3000"]
    config = config_from_args(build_parser().parse_args(args))
    assert config.allowed_origins == (PAGE, "http://localhost:3000")
    monkeypatch.setenv("WARMSOCKET_ALLOWED_ORIGIN", f"{PAGE},http://localhost:3000")
    config = config_from_args(build_parser().parse_args(["serve"]))
    assert config.allowed_origins == (PAGE, "http://localhost:3000")
    monkeypatch.delenv("WARMSOCKET_ALLOWED_ORIGIN")
    assert config_from_args(build_parser().parse_args(["serve"])).allowed_origins == ()
