"""``threadsync mailserver reply``: a contact in the outside world answers a message.

Trying threadsync by hand, the contact is somebody in the local mail system's
outside world: they received the user's message there, and :func:`reply` makes
them answer it, the way their mail program would. The message they answer is
found in the outside world by its Message-ID (by default the newest one
the contact received); the reply carries ``In-Reply-To``
and ``References`` (the parent's chain plus the parent), ``Re:`` and the
parent's subject, and is submitted over SMTP to the running mail system
without logging in, as mail from another domain arrives.
"""

from __future__ import annotations

import smtplib
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import default
from email.utils import formatdate, make_msgid

from threadsync.core.errors import InvalidInput, NotFound, ProviderError
from threadsync.plugins.localmail.outside import list_outside
from threadsync.plugins.localmail.settings import MailserverSettings


def _norm(message_id: str) -> str:
    text = message_id.strip()
    return text if text.startswith("<") else f"<{text}>"


def compose_reply(
    settings: MailserverSettings, sender: str, to: str | None, parent_id: str | None, text: str
) -> EmailMessage:
    """The reply of ``sender`` to the outside-world message ``parent_id``, or to the
    newest message ``sender`` received."""
    received = [
        m for m in list_outside(settings.outside_dir) if m.delivered_to.lower() == sender.lower()
    ]
    if parent_id is None:
        mine = received[-1:]
        if not mine:
            raise NotFound(f"{sender} has received nothing in the outside world yet")
    else:
        mine = [m for m in received if m.message_id == _norm(parent_id)]
        if not mine:
            raise NotFound(
                f"{sender} received no message {_norm(parent_id)} in the outside world (see "
                "threadsync mailserver --list-outside; the Message-ID is the one `send` printed)"
            )
    wanted = mine[0].message_id
    parent = BytesParser(policy=default).parsebytes(mine[0].raw())
    subject = str(parent.get("Subject", ""))
    references = " ".join(str(parent.get("References", "")).split())
    reply = EmailMessage()
    reply["From"] = sender
    reply["To"] = to or str(parent.get("Reply-To") or parent.get("From", ""))
    if not reply["To"]:
        raise InvalidInput("the message has no From: give --to")
    reply["Subject"] = subject if subject.lower().startswith("re:") else f"Re: {subject}"
    reply["Date"] = formatdate(localtime=True)
    reply["Message-ID"] = make_msgid(domain=sender.rpartition("@")[2] or "outside.example")
    reply["In-Reply-To"] = wanted
    reply["References"] = f"{references} {wanted}".strip()
    reply.set_content(text)
    return reply


def reply(
    settings: MailserverSettings, sender: str, to: str | None, parent_id: str | None, text: str
) -> dict[str, str]:
    """Submit the reply to the mail system at ``settings``; what was sent."""
    message = compose_reply(settings, sender, to, parent_id, text)
    recipients = [a.addr_spec for a in message["To"].addresses]
    try:
        with smtplib.SMTP(settings.host, settings.smtp_port, timeout=30) as smtp:
            smtp.send_message(message, from_addr=sender, to_addrs=recipients)
    except (OSError, smtplib.SMTPException) as exc:
        raise ProviderError(
            f"the local mail system at {settings.host}:{settings.smtp_port} did not take "
            f"the reply ({exc}); is `threadsync mailserver` running?"
        ) from None
    return {
        "message_id": str(message["Message-ID"]),
        "in_reply_to": str(message["In-Reply-To"]),
        "from": sender,
        "to": ", ".join(recipients),
        "subject": str(message["Subject"]),
    }
