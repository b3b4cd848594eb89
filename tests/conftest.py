from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support import RunningServer, running_server


@pytest.fixture
def server() -> Iterator[RunningServer]:
    with running_server() as running:
        yield running
