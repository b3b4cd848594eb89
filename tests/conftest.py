from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack

import pytest
from openai import OpenAI

from tests.support import RunningServer, running_server
from tests.upstream_support import running_sim, warmsocket_upstream


@pytest.fixture
def server() -> Iterator[RunningServer]:
    with running_server() as running:
        yield running


@pytest.fixture
def sdk(server: RunningServer) -> Iterator[OpenAI]:
    """The official SDK (sync) on `server`, with an API key, no retries."""
    client = OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0)
    yield client
    client.close()


@pytest.fixture(params=["builtin", "chat", "responses", "responses-ws"])
def any_backend(request: pytest.FixtureRequest) -> Iterator[RunningServer]:
    """warmsocket with its built-in model, or in front of the simulated upstream
    speaking each upstream API."""
    with ExitStack() as stack:
        if request.param == "builtin":
            yield stack.enter_context(running_server())
        else:
            sim = stack.enter_context(running_sim())
            server, _metrics = stack.enter_context(warmsocket_upstream(sim.base_url, request.param))
            yield server
