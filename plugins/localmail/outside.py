"""The "outside world": a catch-all Maildir for mail to anyone who is not a local user.

Nothing leaves the machine. Every message the local mail system accepts for a
non-local recipient is kept here, one file per recipient, stamped with
``Return-Path`` (envelope sender) and ``Delivered-To`` (envelope recipient) as
a delivery agent would, so Bcc recipients show too. :func:`list_outside`
reads it without a running server (``threadsync mailserver --list-outside``).
"""

from __future__ import annotations

import mailbox
import os
from dataclasses import asdict, dataclass
from email.parser import BytesHeaderParser
from email.policy import compat32
from pathlib import Path
from typing import Any


def stamp(raw: bytes, sender: str, recipient: str) -> bytes:
    """``raw`` with the envelope written on top, as delivery agents do."""
    return f"Return-Path: <{sender}>\r\nDelivered-To: {recipient}\r\n".encode() + raw


@dataclass(frozen=True)
class OutsideMessage:
    """One message as the outside world received it."""

    envelope_from: str
    delivered_to: str
    sender: str
    to: str
    subject: str
    message_id: str
    in_reply_to: str
    date: str
    size: int
    path: Path

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["from"] = data.pop("sender")
        data["path"] = str(self.path)
        return data

    def raw(self) -> bytes:
        return self.path.read_bytes()


class OutsideWorld:
    """The catch-all Maildir at ``root`` (``new/`` holds the messages)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def store(self, raw: bytes, sender: str, recipient: str) -> None:
        """Keep one copy for ``recipient`` (atomically: tmp/ then new/)."""
        box = mailbox.Maildir(str(self.root), create=True)
        box.add(stamp(raw, sender, recipient))
        box.close()


def _header(headers: Any, name: str) -> str:
    value = headers.get(name)
    return " ".join(str(value).split()) if value is not None else ""


def list_outside(root: Path) -> list[OutsideMessage]:
    """Every message in the outside world, oldest first."""
    files: list[Path] = []
    for sub in ("new", "cur"):
        folder = root / sub
        if folder.is_dir():
            files.extend(p for p in folder.iterdir() if p.is_file())
    files.sort(key=lambda p: (p.stat().st_mtime_ns, p.name))
    parser = BytesHeaderParser(policy=compat32)
    found = []
    for path in files:
        try:
            with open(path, "rb") as handle:
                headers = parser.parse(handle)
            size = os.path.getsize(path)
        except FileNotFoundError:
            continue
        found.append(
            OutsideMessage(
                envelope_from=_header(headers, "Return-Path").strip("<>"),
                delivered_to=_header(headers, "Delivered-To"),
                sender=_header(headers, "From"),
                to=_header(headers, "To"),
                subject=_header(headers, "Subject"),
                message_id=_header(headers, "Message-ID"),
                in_reply_to=_header(headers, "In-Reply-To"),
                date=_header(headers, "Date"),
                size=size,
                path=path,
            )
        )
    return found
