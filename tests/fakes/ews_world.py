"""Helpers for Exchange tests: the fake's mailbox, connect options and an
opened ``exchange`` provider for it. The pytest fixtures are in
:mod:`tests.fakes.ews_fixtures`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from tests.fakes.ews import FakeEws
from tests.servers.tlscerts import TestCA
from threadsync.core.provider import Account
from threadsync.plugins.exchange import ExchangeProvider

MAILBOX = "ann@contoso.test"
PASSWORD = "Winter-2026-ann"
PASSWORD_ENV = "EXCHANGE_TEST_PASSWORD"
#: Test settings: short waits, events asked for often.
SETTINGS: dict[str, Any] = {"timeout_seconds": 10, "max_retry_wait_seconds": 2,
                            "event_poll_seconds": 0.2}


def options(ews: FakeEws, ca: TestCA, **over: Any) -> dict[str, Any]:
    """Connect options pointing at the fake (Basic auth unless overridden)."""
    opts: dict[str, Any] = {"ews_url": ews.url, "password_env": PASSWORD_ENV, "auth": "basic",
                            "ca_file": str(ca.ca_file)}
    opts.update(over)
    return opts


def account(ews: FakeEws, ca: TestCA, email: str = MAILBOX, password: str = PASSWORD,
            **over: Any) -> Account:
    return ExchangeProvider.prepare(email, options(ews, ca, **over), {PASSWORD_ENV: password})


@contextlib.asynccontextmanager
async def opened(acct: Account) -> AsyncIterator[ExchangeProvider]:
    provider = ExchangeProvider(acct, SETTINGS)
    try:
        await provider.open()
        yield provider
    finally:
        await provider.close()
