"""The people of the demo who are not the CRM: a contact out in the world and the
user's own mail client. Both speak real SMTP and IMAP to the local mail system,
with STARTTLS verified against its CA, as a person's mail program would.
"""

from __future__ import annotations

import asyncio
import email.policy
import email.utils
import imaplib
import re
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from email.message import EmailMessage

import aiosmtplib

_MESSAGE_ID = re.compile(rb"<[^>\s]+>")


def compose(
    *,
    sender: str,
    to: str,
    subject: str,
    body: str,
    in_reply_to: str | None = None,
    references: Sequence[str] = (),
    attachment: tuple[str, bytes] | None = None,
) -> tuple[bytes, str]:
    """A message as a mail program writes it, and its Message-ID."""
    msg = EmailMessage(policy=email.policy.SMTP)
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    msg["Date"] = email.utils.formatdate(localtime=True)
    message_id = email.utils.make_msgid(domain=sender.rpartition("@")[2])
    msg["Message-ID"] = message_id
    if in_reply_to:
        msg["In-Reply-To"] = in_reply_to
        msg["References"] = " ".join(dict.fromkeys([*references, in_reply_to]))
    msg.set_content(body)
    if attachment is not None:
        name, data = attachment
        msg.add_attachment(data, maintype="application", subtype="octet-stream", filename=name)
    return msg.as_bytes(), message_id


@dataclass(frozen=True)
class Server:
    """Where the local mail system listens and the CA that signed its certificate."""

    host: str
    smtp_port: int
    imap_port: int
    ca_file: str

    def tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.ca_file)


@dataclass(frozen=True)
class Contact:
    """Someone outside: writes to local users without an account on the server,
    the way mail from the internet reaches a domain's mail server."""

    address: str
    server: Server

    async def write(self, to: str, subject: str, body: str, **headers: object) -> str:
        raw, message_id = compose(sender=self.address, to=to, subject=subject, body=body, **headers)  # type: ignore[arg-type]
        await aiosmtplib.send(
            raw, sender=self.address, recipients=[to], hostname=self.server.host,
            port=self.server.smtp_port, start_tls=True, tls_context=self.server.tls(),
        )  # fmt: skip
        return message_id


@dataclass(frozen=True)
class MailClient:
    """The user's own mail program: sends with a login and files a copy in Sent."""

    address: str
    password: str
    server: Server

    async def send(self, to: str, subject: str, body: str, **headers: object) -> str:
        raw, message_id = compose(sender=self.address, to=to, subject=subject, body=body, **headers)  # type: ignore[arg-type]
        await aiosmtplib.send(
            raw, sender=self.address, recipients=[to], hostname=self.server.host,
            port=self.server.smtp_port, start_tls=True, tls_context=self.server.tls(),
            username=self.address, password=self.password,
        )  # fmt: skip
        await asyncio.to_thread(self._append, "Sent", raw)
        return message_id

    async def message_ids(self, folder: str) -> list[str]:
        """The Message-IDs in ``folder``, oldest first, read without marking anything."""
        return await asyncio.to_thread(self._message_ids, folder)

    def _imap(self) -> imaplib.IMAP4:
        imap = imaplib.IMAP4(self.server.host, self.server.imap_port, timeout=30)
        try:
            imap.starttls(self.server.tls())
            imap.login(self.address, self.password)
        except BaseException:
            imap.shutdown()
            raise
        return imap

    def _append(self, folder: str, raw: bytes) -> None:
        imap = self._imap()
        try:
            imap.append(folder, "(\\Seen)", imaplib.Time2Internaldate(time.time()), raw)
        finally:
            imap.logout()

    def _message_ids(self, folder: str) -> list[str]:
        imap = self._imap()
        try:
            _, count = imap.select(folder, readonly=True)
            if not count or count[0] in (b"0", None):
                return []
            _, data = imap.uid("FETCH", "1:*", "(BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
        finally:
            imap.logout()
        found = []
        for item in data:
            if isinstance(item, tuple):
                match = _MESSAGE_ID.search(item[1])
                if match:
                    found.append(match.group().decode())
        return found
