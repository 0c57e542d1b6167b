"""Helpers for Exchange tests: the fake's mailbox, connect options and an
opened ``exchange`` provider for it. The pytest fixtures are in
:mod:`tests.fakes.ews_fixtures`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from tests.fakes.ews import FakeEws
from tests.kernelfixtures import (
    CONTACT,
    SUB,
    USER,
    EventRecorder,
    make_mail,
    make_settings,
    reply_to,
)
from tests.servers.smtp import SmtpServer
from tests.servers.tlscerts import TestCA
from threadsync.core.api import Threadsync
from threadsync.core.provider import Account
from threadsync.core.store.models import Message
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
    return ExchangeProvider.prepare(email, options(ews, ca, **over), {"password": password})


@contextlib.asynccontextmanager
async def opened(acct: Account) -> AsyncIterator[ExchangeProvider]:
    provider = ExchangeProvider(acct, SETTINGS)
    try:
        await provider.open()
        yield provider
    finally:
        await provider.close()


def exchange_settings_for(tmp_path: Path, database_url: str, relay_port: int) -> Any:
    settings = make_settings(tmp_path, database_url, relay_port)
    return dataclasses.replace(settings, sections={"exchange": dict(SETTINGS)})


@dataclass
class ExchangeWorld:
    """Mirrors :class:`tests.kernelfixtures.World` for an Exchange mailbox: the CRM
    speaks through the Python API, the contact's replies arrive in the Inbox, the
    user's Outlook sends (the copy lands in Sent Items)."""

    ts: Threadsync
    ews: FakeEws
    ca: TestCA
    relay: SmtpServer
    email: str
    recorder: EventRecorder

    def options(self, **over: Any) -> dict[str, Any]:
        return options(self.ews, self.ca, **over)

    async def connect(self, user: str = USER, *, email: str | None = None,
                      update: bool = False, **over: Any) -> dict[str, Any]:
        call = self.ts.update_email if update else self.ts.connect
        return await call(SUB, user, "exchange", email=email or self.email,
                          options=self.options(**over))

    def contact_replies(
        self,
        parent: dict[str, Any] | str,
        body: str = "Thanks, sounds good.",
        attachments: list[tuple[str, bytes]] = (),  # type: ignore[assignment]
        chain: list[str] | None = None,
        sender: str = CONTACT,
    ) -> str:
        raw, mid = make_mail(sender=sender, to=self.email, subject="Re: Offer", body=body,
                             headers=reply_to(parent, chain), attachments=attachments)
        self.ews.deliver(self.email, raw)
        return mid

    def user_replies_from_client(
        self,
        parent: dict[str, Any] | str,
        body: str = "Sent from Outlook.",
        chain: list[str] | None = None,
        to: str = CONTACT,
    ) -> str:
        raw, mid = make_mail(sender=self.email, to=to, subject="Re: Offer", body=body,
                             headers=reply_to(parent, chain))
        self.ews.client_send(self.email, raw)
        return mid

    def count_messages(self, message_id: str | None = None) -> int:
        def work(session: Any) -> int:
            q = select(func.count(Message.id))
            if message_id is not None:
                q = q.where(Message.message_id == message_id)
            return int(session.scalar(q) or 0)

        return self.ts.kernel.store.call(work)


__all__ = ["MAILBOX", "PASSWORD", "PASSWORD_ENV", "SETTINGS", "SUB", "USER", "ExchangeWorld",
           "account", "exchange_settings_for", "opened", "options"]
