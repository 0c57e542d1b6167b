"""The provider contract (threadsync.testing) against every built-in provider setup:
``imap_smtp`` on the suite's IMAP server (Dovecot by default, with the aiosmtpd
submission fixture) and ``imap_smtp`` on the local mail system of
``threadsync mailserver`` (pymap and aiosmtpd in one process). The example
third-party plugin runs the same suite in tests/test_example_plugin.py."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Iterator
from email.parser import BytesHeaderParser
from email.policy import compat32
from pathlib import Path
from typing import Any

import pytest

from tests.servers import ImapServer
from tests.servers.smtp import SmtpServer
from threadsync.core.provider import Provider
from threadsync.plugins.imap_smtp import ImapSmtpProvider
from threadsync.plugins.localmail import MailserverSettings, MailSystemThread
from threadsync.testing import ContractMailbox, ProviderContract


def imap_smtp(email: str, password: str, **options: Any) -> ImapSmtpProvider:
    account = ImapSmtpProvider.prepare(email, options, {"password": password})
    return ImapSmtpProvider(account, {"timeout": 10})


def message_id_of(raw: bytes) -> str:
    value = BytesHeaderParser(policy=compat32).parsebytes(raw).get("Message-ID")
    return str(value).strip() if value is not None else ""


# ---- imap_smtp on the test IMAP server + aiosmtpd submission ------------------------------


class TestServerMailbox(ContractMailbox):
    """A user on the session's IMAP server; sending through the SMTP fixture."""

    __test__ = False
    pushes = True

    def __init__(self, imap: ImapServer, smtp: SmtpServer, email: str, password: str) -> None:
        self.imap, self.smtp, self.address, self.password = imap, smtp, email, password

    def _provider(self, password: str) -> Provider:
        return imap_smtp(
            self.address,
            password,
            imap_host=self.imap.host,
            imap_port=self.imap.port,
            smtp_host=self.smtp.host,
            smtp_port=self.smtp.port,
            security="starttls",
            ca_file=str(self.imap.ca.ca_file),
        )

    def provider(self) -> Provider:
        return self._provider(self.password)

    def provider_with_wrong_credentials(self) -> Provider | None:
        return self._provider("not-the-Passw0rd")

    async def deliver(self, raw: bytes) -> None:
        await asyncio.to_thread(self.imap.deliver, self.address, raw, "INBOX")

    async def file_in_sent(self, raw: bytes) -> None:
        await asyncio.to_thread(self.imap.deliver, self.address, raw, "Sent")

    async def transmitted(self) -> list[bytes]:
        return [r.raw for r in self.smtp.received if r.auth_login == self.address]

    async def is_unread(self, message_id: str) -> bool | None:
        raws = self.imap.messages(self.address)
        for raw, flags in zip(raws, self.imap.flags(self.address), strict=True):
            if message_id_of(raw) == message_id:
                return "\\Seen" not in flags
        return None


class TestImapSmtpOnTheTestServer(ProviderContract):
    @pytest.fixture
    async def contract_mailbox(
        self, imap_server: ImapServer, smtp_server: SmtpServer, mailbox: tuple[str, str]
    ) -> AsyncIterator[ContractMailbox]:
        yield TestServerMailbox(imap_server, smtp_server, *mailbox)


# ---- imap_smtp on the local mail system ----------------------------------------------------


@pytest.fixture(scope="module")
def local_mail(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MailSystemThread]:
    settings = MailserverSettings(
        data_dir=tmp_path_factory.mktemp("localmail"), smtp_port=0, imap_port=0
    )
    with MailSystemThread(settings) as mail:
        yield mail


class LocalMailbox(ContractMailbox):
    """A new user of the local mail system; what it sends lands in the outside world."""

    pushes = True

    def __init__(self, mail: MailSystemThread) -> None:
        self.mail = mail
        self.address = f"user-{secrets.token_hex(4)}@example.test"
        self.password = secrets.token_urlsafe(12)
        mail.add_user(self.address, self.password)

    def _provider(self, password: str) -> Provider:
        info = self.mail.info()
        return imap_smtp(
            self.address,
            password,
            imap_host=info["host"],
            imap_port=info["imap_port"],
            smtp_host=info["host"],
            smtp_port=info["smtp_port"],
            security="starttls",
            ca_file=info["ca_file"],
        )

    def provider(self) -> Provider:
        return self._provider(self.password)

    def provider_with_wrong_credentials(self) -> Provider | None:
        return self._provider("not-the-Passw0rd")

    async def deliver(self, raw: bytes) -> None:
        await asyncio.to_thread(self.mail.deliver, self.address, raw, "INBOX")

    async def file_in_sent(self, raw: bytes) -> None:
        await asyncio.to_thread(self.mail.deliver, self.address, raw, "Sent")

    async def transmitted(self) -> list[bytes]:
        return [m.raw() for m in self.mail.outside_messages() if m.envelope_from == self.address]

    async def is_unread(self, message_id: str) -> bool | None:
        """From the Maildir file names (flags after ``:2,``); pymap may rename a
        file while it is read, so a vanished file means: look again."""
        inbox: Path = self.mail.system.mailboxes.maildir(self.address)
        for _attempt in range(5):
            try:
                for sub in ("new", "cur"):
                    for path in (inbox / sub).iterdir():
                        if message_id_of(path.read_bytes()) == message_id:
                            return "S" not in path.name.partition(":2,")[2]
                return None
            except FileNotFoundError:
                await asyncio.sleep(0.05)
        raise AssertionError(f"the Maildir of {self.address} kept changing")


class TestImapSmtpOnTheLocalMailSystem(ProviderContract):
    @pytest.fixture
    async def contract_mailbox(
        self, local_mail: MailSystemThread
    ) -> AsyncIterator[ContractMailbox]:
        yield LocalMailbox(local_mail)
