"""Fixtures for end-to-end scenarios: a threadsync instance on a fresh database,
a user's real mailbox (IMAP server + SMTP submission), the CRM's default relay,
and a recorder of host events.

``World`` speaks for the people in the story: the CRM (through the Python API),
the contact (who replies by mail into the user's INBOX) and the user's own mail
client (which sends over SMTP and files the copy in Sent).
"""

from __future__ import annotations

import email.policy
import email.utils
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from tests.servers import ImapServer
from tests.servers.smtp import SmtpServer
from threadsync.core.api import Threadsync
from threadsync.core.config import Settings, from_mapping
from threadsync.core.hookspecs import hookimpl
from threadsync.core.store.models import Message

SUB = "acme"
USER = "u1"
CONTACT = "contact@example.org"


class EventRecorder:
    """A host plugin that keeps every event it is told about."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    @hookimpl
    def message_synced(self, payload: dict[str, Any]) -> None:
        self.events.append(payload)

    @hookimpl
    def message_skipped(self, payload: dict[str, Any]) -> None:
        self.events.append(payload)

    @hookimpl
    def connection_state_changed(self, payload: dict[str, Any]) -> None:
        self.events.append(payload)

    @hookimpl
    def thread_stopped(self, payload: dict[str, Any]) -> None:
        self.events.append(payload)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == kind]


def make_settings(tmp_path: Path, database_url: str, relay_port: int, **sync: Any) -> Settings:
    raw = {
        "database": {"url": database_url},
        "security": {"secret_key_file": "secret.key"},
        "sync": {
            "poll_interval_seconds": 1,
            "backoff_base_seconds": 0.05,
            "backoff_max_seconds": 0.5,
            "lease_seconds": 5,
            **sync,
        },
        "outbound": {
            "default": {
                "host": "127.0.0.1",
                "port": relay_port,
                "security": "none",
                "from_address": "crm@threadsync.local",
            }
        },
    }
    return from_mapping(raw, base=tmp_path)


def write_config(world: World, path: Path, **sync: float) -> Path:
    """A config file for another process (the CLI, the daemon) on the same
    database, key and relay as ``world``, with ``[sync]`` overrides."""
    s = world.ts.kernel.settings
    sync_lines = "".join(f"{k} = {v}\n" for k, v in sync.items())
    path.write_text(
        f"""[database]
url = "{s.database_url}"
[security]
secret_key_file = "{s.secret_key_file}"
[sync]
{sync_lines}[outbound.default]
host = "127.0.0.1"
port = {s.default_channel.port}
security = "none"
from_address = "crm@threadsync.local"
""",
        encoding="utf-8",
    )
    return path


def reply_to(parent: dict[str, Any] | str, chain: list[str] | None = None) -> dict[str, str]:
    """In-Reply-To and References headers of a reply to ``parent`` (a message dict
    from ``thread()`` or a Message-ID)."""
    mid = parent if isinstance(parent, str) else parent["message_id"]
    refs = [*(chain or []), mid]
    return {"In-Reply-To": mid, "References": " ".join(dict.fromkeys(refs))}


def make_mail(
    *,
    sender: str,
    to: str,
    subject: str,
    body: str,
    headers: dict[str, str] | None = None,
    attachments: list[tuple[str, bytes]] = (),  # type: ignore[assignment]
    message_id: str | None = None,
) -> tuple[bytes, str]:
    msg = EmailMessage(policy=email.policy.SMTP)
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    msg["Date"] = email.utils.formatdate()
    mid = message_id or email.utils.make_msgid(domain="mail.example.org")
    msg["Message-ID"] = mid
    for k, v in (headers or {}).items():
        msg[k] = v
    msg.set_content(body)
    for name, data in attachments:
        msg.add_attachment(data, maintype="application", subtype="octet-stream", filename=name)
    return msg.as_bytes(), mid


@dataclass
class World:
    ts: Threadsync
    imap: ImapServer
    submission: SmtpServer
    relay: SmtpServer
    email: str
    password: str
    recorder: EventRecorder
    env: dict[str, str] = field(default_factory=dict)

    def options(self, password_env: str = "MAILPW", **over: Any) -> dict[str, Any]:
        opts = {
            "imap_host": self.imap.host,
            "imap_port": self.imap.port,
            "smtp_host": self.submission.host,
            "smtp_port": self.submission.port,
            "security": "none",
            "password_env": password_env,
        }
        opts.update(over)
        return opts

    async def connect(self, user: str = USER, **over: Any) -> dict[str, Any]:
        return await self.ts.connect(
            SUB, user, "imap_smtp", email=self.email, options=self.options(**over)
        )

    def contact_replies(
        self,
        parent: dict[str, Any] | str,
        body: str = "Thanks, sounds good.",
        attachments: list[tuple[str, bytes]] = (),
        chain: list[str] | None = None,  # type: ignore[assignment]
        sender: str = CONTACT,
    ) -> str:
        raw, mid = make_mail(
            sender=sender,
            to=self.email,
            subject="Re: Offer",
            body=body,
            headers=reply_to(parent, chain),
            attachments=attachments,
        )
        self.imap.deliver(self.email, raw, "INBOX")
        return mid

    def user_replies_from_client(
        self,
        parent: dict[str, Any] | str,
        body: str = "Sent from my mail client.",
        chain: list[str] | None = None,
        to: str = CONTACT,
    ) -> str:
        """What a mail client does: submit over SMTP and file the copy in Sent."""
        import smtplib

        raw, mid = make_mail(
            sender=self.email,
            to=to,
            subject="Re: Offer",
            body=body,
            headers=reply_to(parent, chain),
        )
        with smtplib.SMTP(self.submission.host, self.submission.port, timeout=10) as smtp:
            smtp.login(self.email, self.password)
            smtp.sendmail(self.email, [to], raw)
        self.imap.deliver(self.email, raw, "Sent")
        return mid

    def count_messages_in(self, message_ids: list[str]) -> int:
        """How many of these Message-IDs are stored (one query)."""
        if not message_ids:
            return 0

        def work(session: Any) -> int:
            q = select(func.count(Message.id)).where(Message.message_id.in_(message_ids))
            return int(session.scalar(q) or 0)

        return self.ts.kernel.store.call(work)

    def count_messages(self, message_id: str | None = None) -> int:
        def work(session: Any) -> int:
            q = select(func.count(Message.id))
            if message_id is not None:
                q = q.where(Message.message_id == message_id)
            return int(session.scalar(q) or 0)

        return self.ts.kernel.store.call(work)


@pytest.fixture
def relay() -> Iterator[SmtpServer]:
    """The CRM's own default relay."""
    server = SmtpServer().start()
    yield server
    server.stop()


@pytest.fixture
async def world(
    tmp_path: Path,
    scenario_database_url: str,
    imap_server: ImapServer,
    mailbox: tuple[str, str],
    smtp_server: SmtpServer,
    relay: SmtpServer,
) -> AsyncIterator[World]:
    email_addr, password = mailbox
    settings = make_settings(tmp_path, scenario_database_url, relay.port)
    Threadsync.init(settings)
    recorder = EventRecorder()
    env = {"MAILPW": password}
    ts = Threadsync.from_settings(settings, plugins=[recorder], environ=env)
    ts.labs(SUB, enabled=True)
    yield World(ts, imap_server, smtp_server, relay, email_addr, password, recorder, env)
    await ts.aclose()


@pytest.fixture
def mailbox_factory(imap_server: ImapServer) -> Iterator[Any]:
    """Makes more fresh users on the IMAP server: ``() -> (email, password)``."""
    import secrets

    def make() -> tuple[str, str]:
        addr = f"user-{secrets.token_hex(4)}@example.test"
        password = secrets.token_urlsafe(12)
        imap_server.add_user(addr, password)
        return addr, password

    yield make
