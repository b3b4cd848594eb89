"""`write_retry.keep_trying`: a write Redis does not answer is tried again with a
backoff, by default until it answers (a failover that takes longer than Sentinel's 30 s
to notice loses nothing), else for `--redis-write-retry` seconds; while it keeps
failing, it is reported again now and then."""

from __future__ import annotations

import asyncio
import time

import pytest

from warmsocket import serve, write_retry
from warmsocket.cli import build_parser
from warmsocket.write_retry import keep_trying


class Flaky:
    """A write that fails `failures` times (ConnectionError), then answers."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.tries = 0

    async def __call__(self) -> str:
        self.tries += 1
        if self.tries <= self.failures:
            raise ConnectionError("Connection refused")
        return "written"


@pytest.fixture
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    """Delays of 10 ms; reported again every 50 ms."""
    monkeypatch.setattr(write_retry, "FIRST_DELAY", 0.01)
    monkeypatch.setattr(write_retry, "MAX_DELAY", 0.01)
    monkeypatch.setattr(write_retry, "STILL_FAILING_SECONDS", 0.05)


@pytest.mark.usefixtures("quick")
def test_by_default_a_write_is_tried_until_redis_answers() -> None:
    assert write_retry.WRITE_RETRY_SECONDS is None
    write = Flaky(40)  # about 0.4 s of failures
    reports: list[BaseException] = []
    started = time.monotonic()
    result = asyncio.run(keep_trying(write, retriable=(ConnectionError,), on_retry=reports.append))
    took = time.monotonic() - started
    assert result == "written" and write.tries == 41
    # Told at the first failure, then every 50 ms while it went on (not at every try).
    assert 1 + int(took / 0.05) - 2 <= len(reports) <= 1 + int(took / 0.05) + 1
    assert len(reports) < 20
    assert all(isinstance(exc, ConnectionError) for exc in reports)


@pytest.mark.usefixtures("quick")
def test_with_a_limit_a_write_is_given_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(write_retry, "WRITE_RETRY_SECONDS", 0.1)
    write = Flaky(1000)
    with pytest.raises(ConnectionError):
        asyncio.run(keep_trying(write, retriable=(ConnectionError,)))
    assert 5 <= write.tries <= 15


def test_other_errors_are_not_tried_again() -> None:
    async def refused() -> None:
        raise ValueError("WRONGTYPE")

    with pytest.raises(ValueError):
        asyncio.run(keep_trying(refused, retriable=(ConnectionError,)))


def test_the_flag_sets_how_long_writes_are_tried(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(write_retry, "WRITE_RETRY_SECONDS", None)
    parser = build_parser()
    url = ["serve", "--redis-url", "redis://127.0.0.1:1/0"]
    options = serve.shared_options(parser.parse_args(url))
    assert options is not None and options.write_retry is None  # until Redis answers
    options = serve.shared_options(parser.parse_args([*url, "--redis-write-retry", "45"]))
    assert options is not None and options.write_retry == 45
    store = serve.shared_store(options)  # (connects only when started)
    assert write_retry.WRITE_RETRY_SECONDS == 45
    assert store is not None
