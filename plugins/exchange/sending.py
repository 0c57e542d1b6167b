"""Sending through EWS: CreateItem from the kernel's MIME with SendAndSaveCopy.

The kernel's bytes go to Exchange unchanged as ``MimeContent``, so the message
keeps our Message-ID, In-Reply-To and References; the envelope's Bcc (never in
the MIME) goes as ``BccRecipients``. Exchange files the copy in Sent Items itself.
The delivery checkpoint is awaited immediately before the one request that
sends: nothing before it can make the message leave. A send whose answer is lost
may have left; the kernel then asks :func:`find_sent` (FindItem on Sent Items,
restricted on InternetMessageId) before ever sending again.
"""

from __future__ import annotations

import email.utils
from email.parser import BytesHeaderParser

from exchangelib import Message
from exchangelib.properties import Mailbox

from threadsync.core.errors import InvalidInput
from threadsync.core.provider import OutgoingMail
from threadsync.plugins.exchange.ews import EwsSession


def bcc_of(mail: OutgoingMail) -> list[str]:
    """Envelope recipients the MIME does not name in To or Cc."""
    headers = BytesHeaderParser().parsebytes(mail.raw)
    named = {a.lower() for _, a in email.utils.getaddresses(
        headers.get_all("To", []) + headers.get_all("Cc", [])) if a}
    return [r for r in mail.recipients if r.lower() not in named]


def send_blocking(session: EwsSession, mail: OutgoingMail) -> None:
    """CreateItem with MessageDisposition=SendAndSaveCopy (blocking: in a worker)."""
    if not mail.recipients:
        raise InvalidInput("a message needs at least one recipient")
    message = Message(
        account=session.account,
        folder=session.folders["sentitems"],
        mime_content=mail.raw,
        bcc_recipients=[Mailbox(email_address=a) for a in bcc_of(mail)] or None,
    )
    message.send_and_save()


def find_in_blocking(session: EwsSession, folder: str, message_id: str) -> bool:
    """Whether ``folder`` holds an item with this InternetMessageId: FindItem
    restricted on ``message:InternetMessageId``, ids only (blocking)."""
    return bool(session.folders[folder].filter(message_id=message_id).only("id").exists())


def find_sent_blocking(session: EwsSession, message_id: str) -> bool:
    """Whether Sent Items holds an item with this InternetMessageId (blocking)."""
    return find_in_blocking(session, "sentitems", message_id)


__all__ = ["bcc_of", "find_in_blocking", "find_sent_blocking", "send_blocking"]
