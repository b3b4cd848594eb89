"""Logs never carry conversation content or credentials, at any level: what other
libraries log (websockets' frame traces, asyncio's reports of failed tasks) is cut
down to their warnings' and errors' first lines."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from openai import OpenAI
from websockets.exceptions import InvalidStatus

from tests.support import WSClient, running_server
from warmsocket import logs
from warmsocket.bench.procs import stop
from warmsocket.logs import ForeignRecords, JSONFormatter, TextFormatter, written_here

CANARY = "zebracorn marmalade"
UPSTREAM_KEY = "sk-upstream-canary-key"


def record(name: str, level: int, msg: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args, None)


def test_own_loggers_are_told_apart_from_libraries() -> None:
    assert written_here("warmsocket") and written_here("warmsocket.server")
    for name in ("warmsocket.websockets", "websockets.client", "asyncio", "warmsocketx", ""):
        assert not written_here(name), name


def test_a_text_line_cannot_be_split_into_forged_lines() -> None:
    """A path or host a client chose (percent-decoded) can hold a line break: in
    `--log-format text` it is escaped, not the start of a line that looks like ours."""
    entry = record("warmsocket.http", logging.INFO, "request")
    entry.path = "/v1/x\n03:00:00 error   warmsocket: forged\r\x00"
    line = TextFormatter().format(entry)
    assert "\n" not in line and "\r" not in line and "\x00" not in line
    assert "path=/v1/x\\n03:00:00 error   warmsocket: forged\\r\\x00" in line


def test_foreign_records_keep_only_first_lines_of_warnings_and_errors() -> None:
    guard = ForeignRecords()
    debug = record("websockets.client", logging.DEBUG, "> TEXT '%s'", CANARY)
    assert not guard.filter(debug)
    assert not guard.filter(record("warmsocket.websockets", logging.INFO, "< %s", CANARY))
    failed = record(
        "asyncio", logging.ERROR, "Task exception was never retrieved\nexception=%r", CANARY
    )
    assert guard.filter(failed)
    line = json.loads(JSONFormatter().format(failed))
    assert line["message"] == "Task exception was never retrieved"
    long_line = record("asyncio", logging.WARNING, "x" * 1000)
    assert guard.filter(long_line) and len(long_line.getMessage()) == 200
    own = record("warmsocket.server", logging.DEBUG, "turn %s", "resp_1")
    assert guard.filter(own) and own.getMessage() == "turn resp_1"


@contextmanager
def process(argv: list[str], log: Path) -> Iterator[str]:
    """Runs a JSON-logging server with its stderr in `log`; yields its base URL."""
    with open(log, "w") as stderr:
        proc = subprocess.Popen(argv, stderr=stderr, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for line in log.read_text().splitlines():
                entry = json.loads(line)
                if entry["message"] == "listening":
                    yield str(entry["url"])
                    return
            assert proc.poll() is None, log.read_text()
            time.sleep(0.05)
        raise AssertionError("did not listen")
    finally:
        stop(proc)


@pytest.mark.parametrize("upstream_api", ["responses-ws", "responses", "chat"])
def test_debug_logs_of_a_sidecar_hold_no_content_and_no_key(
    tmp_path: Path, upstream_api: str
) -> None:
    cli = [sys.executable, "-m", "warmsocket"]
    common = ["--port", "0", "--log-format", "json", "--log-level", "debug"]
    upstream_log, server_log = tmp_path / "upstream.log", tmp_path / "serve.log"
    with (
        process(
            [*cli, "simulate-upstream", *common, "--api-key", UPSTREAM_KEY], upstream_log
        ) as upstream,
        process(
            [
                *cli,
                "serve",
                *common,
                "--upstream",
                upstream,
                "--upstream-api",
                upstream_api,
                "--upstream-api-key",
                UPSTREAM_KEY,
            ],
            server_log,
        ) as base_url,
        OpenAI(base_url=base_url, api_key="client-key") as client,
    ):
        with client.responses.connect() as connection:
            connection.response.create(model="m", input=f"websocket {CANARY}")
            completed = next(e for e in connection if e.type == "response.completed")
            assert CANARY in completed.response.output_text
            connection.response.create(
                model="m", input=f"again {CANARY}", previous_response_id=completed.response.id
            )
            assert next(e for e in connection if e.type == "response.completed")
        answer = client.responses.create(model="m", input=f"http {CANARY}")
        assert CANARY in answer.output_text
    for log in (upstream_log, server_log):
        text = log.read_text()
        assert text, f"{log.name} is empty"
        for line in text.splitlines():
            json.loads(line)
        for secret in ("zebracorn", "marmalade", UPSTREAM_KEY, "client-key"):
            assert secret not in text, f"{log.name} holds {secret!r}"


def test_a_websocket_logs_its_turns_and_its_end_without_content(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with (
        caplog.at_level(logging.DEBUG, logger="warmsocket"),
        running_server(api_keys=frozenset({"k"})) as srv,
    ):
        with pytest.raises(InvalidStatus):
            WSClient(srv.ws_url, additional_headers={"Authorization": "Bearer wrong"})
        with WSClient(srv.ws_url, additional_headers={"Authorization": "Bearer k"}) as client:
            events = client.turn(input=f"hello {CANARY}", stream_id="lane")
        deadline = time.monotonic() + 5
        while not any(r.getMessage() == "websocket closed" for r in caplog.records):
            assert time.monotonic() < deadline
            time.sleep(0.01)
    by_message = {r.getMessage(): r.__dict__ for r in caplog.records}
    assert by_message["websocket refused"]["status"] == 401
    assert by_message["websocket refused"]["request_id"].startswith("req_")
    turn = by_message["turn finished"]
    assert turn["response_id"] == events[-1]["response"]["id"]
    assert (turn["status"], turn["stream_id"]) == ("completed", "lane")
    assert turn["output_tokens"] > 0 and turn["seconds"] >= turn["first_event_seconds"] > 0
    closed = by_message["websocket closed"]
    assert closed["connection"] == by_message["websocket opened"]["connection"]
    assert closed["close_code"] == 1000 and closed["seconds"] > 0
    # (caplog sees the websockets library's frame traces too, which the server's own
    # logging drops: see the end-to-end test above.)
    own = [str(r.__dict__) for r in caplog.records if written_here(r.name)]
    assert own and not any("zebracorn" in line or "Bearer" in line for line in own)


def test_each_http_request_gets_an_access_line_without_its_content(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="warmsocket")
    with running_server() as srv:
        with OpenAI(base_url=srv.base_url, api_key="k", max_retries=0) as sdk:
            made = sdk.responses.with_raw_response.create(model="m", input=CANARY)
            with pytest.raises(Exception):  # noqa: B017 (the SDK's NotFoundError)
                sdk.responses.retrieve("resp_nothing", include=[CANARY])  # type: ignore[list-item]
            sdk.get("/healthz", cast_to=object)  # a probe: not logged
        lines = [r for r in caplog.records if r.getMessage() == "http request"]
        by_id = {r.__dict__["request_id"]: r.__dict__ for r in lines}
        created = by_id[made.headers["x-request-id"]]
        assert (created["method"], created["path"], created["status"]) == (
            "POST",
            "/v1/responses",
            200,
        )
        assert created["error_type"] is None and created["seconds"] > 0
        (missing,) = [r for r in by_id.values() if r["status"] == 404]
        assert missing["path"] == "/v1/responses/resp_nothing"
        assert (missing["error_type"], missing["code"]) == ("invalid_request_error", None)
        assert len(lines) == 2
        # A request answered by the connection before it was read whole.
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as raw:
            raw.sendall(b"NOT HTTP\r\n\r\n")
            raw.recv(65536)
        time.sleep(0.1)
    (unread,) = [r.__dict__ for r in caplog.records if r.getMessage() == "http request"][2:]
    assert (unread["method"], unread["status"], unread["error_type"]) == (
        None,
        400,
        "invalid_request_error",
    )
    assert CANARY not in caplog.text


def test_no_access_lines_when_switched_off(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="warmsocket")
    with (
        running_server(access_log=False) as srv,
        OpenAI(base_url=srv.base_url, api_key="k", max_retries=0) as sdk,
    ):
        sdk.responses.create(model="m", input="quiet")
    assert not [r for r in caplog.records if r.getMessage() == "http request"]


def test_a_tally_reports_how_many_happened_since_its_last_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [100.0]
    monkeypatch.setattr(logs.time, "monotonic", lambda: now[0])
    tally = logs.Tally(10.0)
    assert tally.count() == 1  # the first is reported at once
    assert [tally.count() for _ in range(3)] == [None, None, None]
    now[0] += 10.0
    assert tally.count() == 4  # the three unreported and this one
    assert tally.count() is None
