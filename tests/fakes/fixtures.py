"""Pytest fixtures for Outlook tests: one fake-Microsoft HTTPS server per
session, fresh fake state with the mailbox ``ann@contoso.test`` per test, and an
:class:`~tests.fakes.world.OutlookWorld` on a fresh database with the CRM's
default relay. Use them with ``pytest_plugins = ["tests.fakes.fixtures"]``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.microsoft import FakeMicrosoft
from tests.fakes.server import ServerThread
from tests.fakes.world import MAILBOX, OutlookWorld, outlook_settings_for
from tests.kernelfixtures import SUB, EventRecorder
from tests.servers.smtp import SmtpServer
from tests.servers.tlscerts import TestCA
from threadsync.core.api import Threadsync


@pytest.fixture(scope="session")
def ms_server(test_ca: TestCA) -> Iterator[ServerThread]:
    """One loopback HTTPS server for the fakes, shared by the session."""

    async def idle(call: Any) -> Any:
        raise RuntimeError("no fake is attached")

    server = ServerThread(idle, test_ca).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def ms(test_ca: TestCA, ms_server: ServerThread) -> Iterator[FakeMicrosoft]:
    """Fresh fake Microsoft state with the user's mailbox ``ann@contoso.test``."""
    fake = FakeMicrosoft(test_ca, ms_server)
    fake.add_user(MAILBOX)
    yield fake
    fake.close()


@pytest.fixture
def outlook_relay() -> Iterator[SmtpServer]:
    server = SmtpServer().start()
    yield server
    server.stop()


@pytest.fixture
async def outlook_world(
    tmp_path: Path,
    scenario_database_url: str,
    ms: FakeMicrosoft,
    outlook_relay: SmtpServer,
) -> AsyncIterator[OutlookWorld]:
    settings = outlook_settings_for(tmp_path, scenario_database_url, outlook_relay.port, ms)
    Threadsync.init(settings)
    recorder = EventRecorder()
    ts = Threadsync.from_settings(settings, plugins=[recorder], environ=ms.environ())
    ts.labs(SUB, enabled=True)
    yield OutlookWorld(ts, ms, outlook_relay, MAILBOX, recorder)
    await ts.aclose()  # also logs out of mailbox sessions kept open between sends

