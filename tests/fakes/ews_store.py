"""The state behind the fake Exchange Server: users, mailboxes, folders, items,
the sync states it issued, pull subscriptions and what left through it.

Items live in distinguished folders (``inbox``, ``sentitems``, ``drafts``) with
an EWS item id and change key. Every item keeps its MIME; mail received from
outside also keeps its transport headers, sent mail does not (as on a real
Exchange Server). Every change to a folder gets a sequence number; a sync state
names the folder, the folder's epoch and the sequence number it reached, and the
server remembers each one it issued, so a forged or forgotten sync state is
refused with ``ErrorInvalidSyncStateData`` like a real server does.
"""

from __future__ import annotations

import base64
import email
import email.policy
import email.utils
import json
import os
import secrets
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from typing import Any

FOLDERS = ("inbox", "sentitems", "drafts", "deleteditems")
EXCHANGE_HOST = "exch01.contoso.test"


def new_item_id() -> str:
    return "AAMkAGE1" + base64.b64encode(os.urandom(30)).decode() + "AAA="


def parse_mime(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


@dataclass
class EwsItem:
    id: str
    folder: str
    mime: EmailMessage
    received: datetime
    transport_headers: str | None
    seq: int = 0
    is_read: bool = False
    change: int = 1

    @property
    def change_key(self) -> str:
        return f"CQAAABYAAAA{self.change:08d}"

    def header(self, name: str) -> str | None:
        value = self.mime.get(name)
        return " ".join(str(value).split()) if value is not None else None

    @property
    def internet_message_id(self) -> str | None:
        return self.header("Message-ID")

    def raw(self) -> bytes:
        return self.mime.as_bytes(policy=email.policy.SMTP)


@dataclass
class EwsFolder:
    name: str
    seq: int = 0
    epoch: int = 0


@dataclass
class Transmission:
    """A message that left a mailbox: its envelope and MIME as transmitted."""

    mailbox: str
    message_id: str | None
    recipients: list[str]
    raw: bytes


@dataclass
class Subscription:
    id: str
    mailbox: str
    folders: tuple[str, ...]
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, item id, folder)
    watermark: int = 0


class EwsMailbox:
    """One user's mailbox."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.folders = {name: EwsFolder(name) for name in FOLDERS}
        self.items: dict[str, EwsItem] = {}

    def add(self, raw: bytes, folder: str, *, transport: bool) -> EwsItem:
        mime = parse_mime(raw)
        headers = None
        if transport:
            received = (f"Received: from mx.example.org by {EXCHANGE_HOST}; "
                        f"{email.utils.formatdate()}")
            block = raw.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
            headers = received + "\r\n" + block.decode("utf-8", "replace")
        item = EwsItem(new_item_id(), folder, mime, datetime.now(UTC), headers)
        self.items[item.id] = item
        self.touch(item)
        return item

    def touch(self, item: EwsItem) -> None:
        folder = self.folders[item.folder]
        folder.seq += 1
        item.seq = folder.seq

    def in_folder(self, folder: str) -> list[EwsItem]:
        return sorted((i for i in self.items.values() if i.folder == folder), key=lambda i: i.seq)


class EwsStore:
    """Every user and mailbox of the fake organisation."""

    def __init__(self) -> None:
        #: login name (lower-case UPN, DOMAIN\\user or address) -> (password, address)
        self.logins: dict[str, tuple[str, str]] = {}
        self.mailboxes: dict[str, EwsMailbox] = {}
        #: service accounts holding the ApplicationImpersonation role
        self.impersonators: set[str] = set()
        self.transmissions: list[Transmission] = []
        self.subscriptions: dict[str, Subscription] = {}
        self._issued: dict[str, tuple[str, str, int, int]] = {}
        #: The fake identity platform whose EWS access tokens are accepted.
        self.identity: Any = None

    # ---- users ------------------------------------------------------------------------

    def add_user(self, address: str, password: str, *, domain: str = "CONTOSO") -> EwsMailbox:
        local = address.split("@", 1)[0]
        for login in (address, f"{domain}\\{local}"):
            self.logins[login.lower()] = (password, address)
        self.mailboxes.setdefault(address.lower(), EwsMailbox(address))
        return self.mailboxes[address.lower()]

    def login(self, username: str, password: str) -> str | None:
        """The address of the account these credentials log in as, or None."""
        known = self.logins.get(username.lower())
        if known is None or not secrets.compare_digest(known[0], password):
            return None
        return known[1]

    def bearer(self, token: str) -> str | None:
        """The address of a valid delegated EWS token (EWS.AccessAsUser.All), or None."""
        grant = self.identity.graph_grant(token) if self.identity is not None else None
        if grant is None or not any(s.endswith("/EWS.AccessAsUser.All") for s in grant.scopes):
            return None
        return str(grant.user.email)

    def mailbox(self, address: str) -> EwsMailbox | None:
        return self.mailboxes.get(address.lower())

    # ---- sync states ------------------------------------------------------------------

    def issue_sync_state(self, box: EwsMailbox, folder: str, seq: int) -> str:
        token = base64.b64encode(
            json.dumps({"n": uuid.uuid4().hex, "s": seq}).encode() + os.urandom(24)
        ).decode()
        self._issued[token] = (box.owner.lower(), folder, box.folders[folder].epoch, seq)
        return token

    def check_sync_state(self, box: EwsMailbox, folder: str, token: str) -> int | None:
        """The sequence number a sync state stands for; None if this server did not
        issue it for this folder, or the folder's sync states were reset since."""
        known = self._issued.get(token)
        if known is None:
            return None
        owner, name, epoch, seq = known
        if owner != box.owner.lower() or name != folder or epoch != box.folders[folder].epoch:
            return None
        return seq

    def forget_sync_states(self, address: str, folder: str) -> None:
        """What a mailbox move or a store repair does: old sync states go invalid."""
        box = self.mailboxes[address.lower()]
        box.folders[folder].epoch += 1

    # ---- events -----------------------------------------------------------------------

    def notify(self, box: EwsMailbox, item: EwsItem) -> None:
        for sub in self.subscriptions.values():
            if sub.mailbox == box.owner.lower() and item.folder in sub.folders:
                sub.events.append(("CreatedEvent", item.id, item.folder))
                if item.folder == "inbox":
                    sub.events.append(("NewMailEvent", item.id, item.folder))
