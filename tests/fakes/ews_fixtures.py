"""Pytest fixtures for Exchange tests: one fake Exchange Server (HTTPS on
loopback, test CA) per session and fresh state with the mailbox
``ann@contoso.test`` per test. Use them with
``pytest_plugins = ["tests.fakes.ews_fixtures"]``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import exchangelib
import pytest

from tests.fakes.ews import FakeEws
from tests.fakes.ews_autodiscover import EwsServerThread
from tests.fakes.ews_world import (
    MAILBOX,
    PASSWORD,
    PASSWORD_ENV,
    ExchangeWorld,
    exchange_settings_for,
)
from tests.fakes.server import Call, Reply, ServerThread
from tests.kernelfixtures import SUB, EventRecorder
from tests.servers.smtp import SmtpServer
from tests.servers.tlscerts import TestCA
from threadsync.core.api import Threadsync


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
    # exchangelib keeps HTTP sessions per endpoint and login beyond a provider's
    # life (its protocol cache): close them, so no connection outlives the test.
    exchangelib.close_connections()


@pytest.fixture
def exchange_relay() -> Iterator[SmtpServer]:
    """The CRM's own default relay."""
    server = SmtpServer().start()
    yield server
    server.stop()


@pytest.fixture
async def exchange_world(
    tmp_path: Path,
    scenario_database_url: str,
    ews: FakeEws,
    test_ca: TestCA,
    exchange_relay: SmtpServer,
) -> AsyncIterator[ExchangeWorld]:
    settings = exchange_settings_for(tmp_path, scenario_database_url, exchange_relay.port)
    Threadsync.init(settings)
    recorder = EventRecorder()
    ts = Threadsync.from_settings(settings, plugins=[recorder],
                                  environ={PASSWORD_ENV: PASSWORD})
    ts.labs(SUB, enabled=True)
    yield ExchangeWorld(ts, ews, test_ca, exchange_relay, MAILBOX, recorder)
    await ts.aclose()
