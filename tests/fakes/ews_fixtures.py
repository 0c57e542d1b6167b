"""Pytest fixtures for Exchange tests: one fake Exchange Server (HTTPS on
loopback, test CA) per session and fresh state with the mailbox
``ann@contoso.test`` per test. Use them with
``pytest_plugins = ["tests.fakes.ews_fixtures"]``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fakes.ews import EwsServerThread, FakeEws
from tests.fakes.ews_world import MAILBOX, PASSWORD
from tests.fakes.server import Call, Reply, ServerThread
from tests.servers.tlscerts import TestCA


@pytest.fixture(scope="session")
def ews_server(test_ca: TestCA) -> Iterator[ServerThread]:
    async def idle(call: Call) -> Reply:
        return Reply.text(503, "no fake attached")

    server = EwsServerThread(idle, test_ca).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def ews(ews_server: ServerThread) -> Iterator[FakeEws]:
    """Fresh Exchange state with the user ``ann@contoso.test``."""
    fake = FakeEws(ews_server.base)
    fake.store.add_user(MAILBOX, PASSWORD)
    ews_server.app = fake.handle
    yield fake
