"""The state behind the fake Graph: mailboxes, folders, messages and their changes.

Messages live in well-known folders (``inbox``, ``sentitems``, ``drafts``,
``deleteditems``) with an immutable id that survives moves, and a REST id that
does not (what Graph hands out without ``Prefer: IdType="ImmutableId"``). Each
message keeps its MIME; received mail also keeps its transport headers (Graph's
``internetMessageHeaders``), sent mail does not, as in Exchange. ``In-Reply-To``
and ``References`` are also exposed as the MAPI properties 0x1042 and 0x1039.

Every change to a folder gets a sequence number; a delta round lists what
changed between two sequence numbers, and removals as ``@removed`` tombstones.
"""

from __future__ import annotations

import base64
import email
import email.policy
import email.utils
import os
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from typing import Any

FOLDERS = ("inbox", "sentitems", "drafts", "deleteditems")
EXCHANGE_DOMAIN = "fake.prod.outlook.test"


def new_id() -> str:
    return "AAkALgAAAAAAHYQDEapmEc2byACqAC-EWg0A" + base64.urlsafe_b64encode(
        os.urandom(24)
    ).decode() + "AAA="


def parse_mime(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def addresses(msg: EmailMessage, name: str) -> list[tuple[str, str]]:
    return email.utils.getaddresses([str(v) for v in msg.get_all(name, [])])


@dataclass
class FakeMessage:
    id: str
    folder: str
    mime: EmailMessage
    is_draft: bool
    received: datetime
    transport_headers: list[tuple[str, str]] = field(default_factory=list)
    sent: datetime | None = None
    is_read: bool = False
    version: int = 1
    seq: int = 0
    conversation_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    #: Sequence number at which the message entered its folder.
    created_seq: int = 0
    #: Properties the last update changed (what a later delta round carries).
    changed: set[str] = field(default_factory=set)
    #: When a sent message lands in Sent Items (it was sent, the copy lags).
    lands_at: datetime | None = None
    #: How often it moved between folders (its REST id changes when it does).
    moves: int = 0

    def header(self, name: str) -> str | None:
        value = self.mime.get(name)
        return " ".join(str(value).split()) if value is not None else None

    @property
    def internet_message_id(self) -> str | None:
        return self.header("Message-ID")

    def raw(self) -> bytes:
        return self.mime.as_bytes(policy=email.policy.SMTP)

    def recipients(self, *kinds: str) -> list[str]:
        return [a for kind in kinds for _, a in addresses(self.mime, kind) if a]

    def attachments(self) -> list[EmailMessage]:
        found = []
        for part in self.mime.walk():
            if part.is_multipart():
                continue
            if part.get_content_disposition() in ("attachment", "inline") and (
                part.get_filename() or part.get_content_maintype() != "text"
            ):
                found.append(part)
        return found

    def rest_id(self) -> str:
        return f"R{FOLDERS.index(self.folder)}{self.moves}_{self.id}"

    def json(self, select: set[str] | None, owner: str, immutable: bool,
             props: list[str] | None = None) -> dict[str, Any]:
        """The Graph JSON of this message, reduced to ``select`` (plus id)."""

        def recipient(pair: tuple[str, str]) -> dict[str, Any]:
            return {"emailAddress": {"name": pair[0] or pair[1], "address": pair[1]}}

        sender = (addresses(self.mime, "From") or [("", owner)])[0]
        full: dict[str, Any] = {
            "@odata.etag": f'W/"CQAAABYAAAD{self.version:08d}"',
            "id": self.id if immutable else self.rest_id(),
            "createdDateTime": iso(self.received),
            "lastModifiedDateTime": iso(self.received),
            "changeKey": f"CQAAABYAAAD{self.version:08d}",
            "receivedDateTime": iso(self.received),
            "sentDateTime": iso(self.sent or self.received),
            "hasAttachments": bool(self.attachments()),
            "internetMessageId": self.internet_message_id,
            "subject": self.header("Subject") or "",
            "bodyPreview": "(preview)",
            "importance": "normal",
            "parentFolderId": f"AQMkAD-{self.folder}",
            "conversationId": self.conversation_id,
            "isRead": self.is_read,
            "isDraft": self.is_draft,
            "body": {"contentType": "text", "content": "(body)"},
            "sender": recipient(sender),
            "from": recipient(sender),
            "toRecipients": [recipient(p) for p in addresses(self.mime, "To")],
            "ccRecipients": [recipient(p) for p in addresses(self.mime, "Cc")],
            "bccRecipients": [recipient(p) for p in addresses(self.mime, "Bcc")],
        }
        if select is not None and "internetmessageheaders" in select and self.transport_headers:
            full["internetMessageHeaders"] = [
                {"name": n, "value": v} for n, v in self.transport_headers
            ]
        if select is None:
            data = {k: v for k, v in full.items() if k != "internetMessageHeaders"}
        else:
            data = {k: v for k, v in full.items()
                    if k in ("id", "@odata.etag") or k.lower() in select}
        if props is not None:
            values = {"string 0x1042": self.header("In-Reply-To"),
                      "string 0x1039": self.header("References")}
            data["singleValueExtendedProperties"] = [
                {"id": p, "value": values[p.lower()]} for p in props
                if values.get(p.lower())
            ]
        return data


@dataclass
class Tombstone:
    id: str
    seq: int


@dataclass
class Folder:
    name: str
    seq: int = 0
    epoch: int = 0
    tombstones: list[Tombstone] = field(default_factory=list)


@dataclass
class Transmission:
    """A message that left a mailbox: envelope and the MIME as transmitted."""

    mailbox: str
    message_id: str | None
    recipients: list[str]
    raw: bytes


class FakeMailbox:
    """One user's mailbox."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.folders = {name: Folder(name) for name in FOLDERS}
        self.messages: dict[str, FakeMessage] = {}

    def _touch(self, msg: FakeMessage) -> None:
        folder = self.folders[msg.folder]
        folder.seq += 1
        msg.seq = folder.seq

    def add(self, mime: EmailMessage, folder: str, *, draft: bool = False,
            transport: bool = False) -> FakeMessage:
        now = datetime.now(UTC)
        headers = [(k, " ".join(str(v).split())) for k, v in mime.items()] if transport else []
        if transport:
            headers.insert(0, ("Received", f"from mail.example.org by {EXCHANGE_DOMAIN}; "
                                           f"{email.utils.formatdate()}"))
        msg = FakeMessage(new_id(), folder, mime, draft, now, headers,
                          sent=None if draft else now)
        self.messages[msg.id] = msg
        self._touch(msg)
        msg.created_seq = msg.seq
        return msg

    def changed(self, msg: FakeMessage, *fields: str) -> None:
        """``msg`` was updated; ``fields`` name the properties that changed."""
        msg.version += 1
        msg.changed = {*fields, "lastModifiedDateTime", "changeKey"}
        self._touch(msg)

    def move(self, msg: FakeMessage, folder: str) -> None:
        old = self.folders[msg.folder]
        old.seq += 1
        old.tombstones.append(Tombstone(msg.id, old.seq))
        msg.folder = folder
        msg.version += 1
        msg.moves += 1
        self._touch(msg)
        msg.created_seq = msg.seq  # new in the folder it moved to
        msg.changed = {"parentFolderId", "lastModifiedDateTime", "changeKey"}

    def delete(self, msg: FakeMessage) -> None:
        if msg.folder == "deleteditems":
            folder = self.folders[msg.folder]
            folder.seq += 1
            folder.tombstones.append(Tombstone(msg.id, folder.seq))
            del self.messages[msg.id]
        else:
            self.move(msg, "deleteditems")

    def find(self, ref: str) -> FakeMessage | None:
        """By immutable id, or by a REST id that is still current."""
        msg = self.messages.get(ref)
        if msg is not None:
            return msg
        for candidate in self.messages.values():
            if candidate.rest_id() == ref:
                return candidate
        return None

    def in_folder(self, folder: str) -> list[FakeMessage]:
        return sorted((m for m in self.messages.values() if m.folder == folder),
                      key=lambda m: m.seq)

    def exchange_message_id(self) -> str:
        return f"<{uuid.uuid4().hex.upper()}@{EXCHANGE_DOMAIN}>"
