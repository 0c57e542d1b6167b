"""The people around an Outlook mailbox, for scenarios and provider tests.

:class:`OutlookWorld` mirrors :class:`tests.kernelfixtures.World`: the CRM speaks
through the Python API, the contact replies into the mailbox's Inbox, and the
user's Outlook sends (the copy lands in Sent Items). :func:`sign_in` and
:func:`opened` give provider tests a signed-in, open provider. The pytest
fixtures are in :mod:`tests.fakes.fixtures`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from tests.fakes.microsoft import FakeMicrosoft
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
from threadsync.core.api import Threadsync
from threadsync.core.provider import Account
from threadsync.core.store.models import Message
from threadsync.plugins.outlook import OutlookProvider

MAILBOX = "ann@contoso.test"


@dataclass
class OutlookWorld:
    ts: Threadsync
    ms: FakeMicrosoft
    relay: SmtpServer
    email: str
    recorder: EventRecorder

    async def connect(
        self,
        user: str = USER,
        *,
        email: str | None = None,
        as_user: str | None = None,
        device_code: bool = False,
        update: bool = False,
    ) -> dict[str, Any]:
        """Connect (or update-email) the way a user does it: consent in a browser,
        as ``as_user`` when someone else is signed in there, or by device code."""
        address = email or self.email
        notify = self.ms.device(as_user or address) if device_code else self.ms.browser(as_user)
        options = {"device_code": True} if device_code else {}
        call = self.ts.update_email if update else self.ts.connect
        try:
            return await call(SUB, user, "outlook", email=address, options=options,
                              notify=notify)
        finally:
            await self.ms.settle()

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
        self.ms.deliver(self.email, raw)
        return mid

    def user_replies_from_client(
        self,
        parent: dict[str, Any] | str,
        body: str = "Sent from Outlook.",
        chain: list[str] | None = None,
        to: str = CONTACT,
    ) -> str:
        """The user writes in Outlook: it leaves, and the copy is in Sent Items."""
        raw, mid = make_mail(sender=self.email, to=to, subject="Re: Offer", body=body,
                             headers=reply_to(parent, chain))
        self.ms.client_send(self.email, raw)
        return mid

    def count_messages(self, message_id: str | None = None) -> int:
        def work(session: Any) -> int:
            q = select(func.count(Message.id))
            if message_id is not None:
                q = q.where(Message.message_id == message_id)
            return int(session.scalar(q) or 0)

        return self.ts.kernel.store.call(work)

    def count_messages_in(self, message_ids: list[str]) -> int:
        if not message_ids:
            return 0

        def work(session: Any) -> int:
            q = select(func.count(Message.id)).where(Message.message_id.in_(message_ids))
            return int(session.scalar(q) or 0)

        return self.ts.kernel.store.call(work)


async def sign_in(ms: FakeMicrosoft, email: str = MAILBOX, **over: Any
                  ) -> tuple[Account, dict[str, Any]]:
    """Authorize ``email`` through the browser flow; the account and its settings."""
    settings = ms.provider_settings(**over)
    try:
        account = await OutlookProvider.authorize(email, {}, {}, ms.browser(),
                                                  settings)
    finally:
        await ms.settle()
    return account, settings


@contextlib.asynccontextmanager
async def opened(account: Account, settings: dict[str, Any]) -> AsyncIterator[OutlookProvider]:
    provider = OutlookProvider(account, settings)
    try:
        await provider.open()
        yield provider
    finally:
        await provider.close()


def outlook_settings_for(tmp_path: Path, database_url: str, relay_port: int,
                         ms: FakeMicrosoft, **outlook: Any) -> Any:
    settings = make_settings(tmp_path, database_url, relay_port)
    return dataclasses.replace(settings, sections={"outlook": ms.outlook_settings(**outlook)})



__all__ = ["CONTACT", "MAILBOX", "SUB", "USER", "OutlookWorld", "opened", "outlook_settings_for",
           "sign_in"]
