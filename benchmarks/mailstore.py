"""Fills a test Dovecot's Maildir fast, and makes the mail that goes into it.

Saving 50,000 messages one ``doveadm save`` at a time takes many minutes (one
process and one index update per message). Instead the message files are written
straight into the user's Maildir, the way a delivery agent does it (write into
``tmp/``, rename into ``cur/`` or ``new/``), with the ``S=`` (size) and ``W=``
(CRLF size) fields in the file name so Dovecot never has to open a file to learn
its size. One ``doveadm mailbox status`` then makes Dovecot sync the folder: it
assigns UIDs to every new file, updates ``dovecot-uidlist`` and its index, as a
delivery would have. 50,000 files take about 4 s to write and a fraction of a
second to index; :func:`index` checks the message count Dovecot reports, so a
mistake in the layout fails loudly instead of skewing a measurement.

The folder must exist first: :func:`ensure_folders` saves one seed message per
folder through ``doveadm save``, which creates the Maildir++ directories with the
owner and permissions Dovecot wants. Message files are owned by the mail user
(``nobody`` when running as root).

Messages are plain ASCII with CRLF line endings (the instance stores CRLF, so an
IMAP ``BODY[]`` returns exactly these bytes).
"""

from __future__ import annotations

import itertools
import os
import random
import re
import socket
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.servers import maildir_folder_path
from tests.servers.dovecot import DovecotServer

_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "bench"
_SEQUENCE = itertools.count()

_BODY_LINES = (
    "Thanks for your note earlier this week, I had a look at the figures.",
    "The numbers for the second quarter look better than we expected.",
    "Could you send me the updated spreadsheet before Friday?",
    "We should also talk about the delivery dates for the next order.",
    "Let me know if a call on Thursday afternoon works for you.",
    "I attached nothing this time, the details are all in this message.",
    "Best regards and have a good weekend.",
)


@dataclass(frozen=True)
class Mail:
    """One generated message: its bytes and the ids that decide thread membership."""

    raw: bytes
    message_id: str
    references: tuple[str, ...] = ()


def _date(offset: int) -> str:
    return time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime(1_700_000_000 + offset * 37))


def _body(rng: random.Random, lines: int) -> str:
    return "\r\n".join(rng.choice(_BODY_LINES) for _ in range(lines)) + "\r\n"


def make_mail(
    rng: random.Random,
    n: int,
    *,
    sender: str,
    to: str,
    subject: str,
    in_reply_to: str | None = None,
    references: Sequence[str] = (),
    body_lines: int = 24,
    domain: str = "mail.example.net",
) -> Mail:
    """A realistic plain-text message (about 2 KB with ``body_lines=24``)."""
    message_id = f"<{n}.{rng.getrandbits(48):012x}@{domain}>"
    headers = [
        f"Return-Path: <{sender}>",
        f"Received: from mx{n % 7}.example.net (mx{n % 7}.example.net [192.0.2.{n % 250 + 1}])"
        f"\r\n\tby mail.example.test with ESMTPS id {rng.getrandbits(40):010x}"
        f"\r\n\tfor <{to}>; {_date(n)}",
        f"From: Sender {n % 997} <{sender}>",
        f"To: <{to}>",
        f"Subject: {subject}",
        f"Date: {_date(n)}",
        f"Message-ID: {message_id}",
    ]
    if in_reply_to:
        headers.append(f"In-Reply-To: {in_reply_to}")
    if references:
        headers.append("References: " + "\r\n ".join(references))
    headers += [
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 7bit",
    ]
    raw = ("\r\n".join(headers) + "\r\n\r\n" + _body(rng, body_lines)).encode("ascii")
    return Mail(raw, message_id, tuple(references))


def unrelated_mail(rng: random.Random, n: int, to: str) -> Mail:
    """Personal mail: newsletters, and replies in threads the CRM never started
    (about a third carry In-Reply-To/References to ids threadsync does not know)."""
    sender = f"person{n % 1511}@example.net"
    if rng.random() < 0.35:
        parent = f"<p{rng.getrandbits(40):010x}@example.net>"
        chain = [f"<p{rng.getrandbits(40):010x}@example.net>" for _ in range(rng.randint(0, 4))]
        return make_mail(rng, n, sender=sender, to=to, subject=f"Re: Personal matter {n}",
                         in_reply_to=parent, references=[*chain, parent],
                         body_lines=rng.randint(8, 40))
    return make_mail(rng, n, sender=sender, to=to, subject=f"Newsletter {n}",
                     body_lines=rng.randint(8, 40))


def reply_mail(rng: random.Random, n: int, to: str, root: str, contact: str) -> Mail:
    """A contact's reply in a CRM thread: In-Reply-To and References name ``root``."""
    return make_mail(rng, n, sender=contact, to=to, subject="Re: Offer", in_reply_to=root,
                     references=[root], body_lines=rng.randint(8, 40), domain="example.org")


# ---- writing into a Maildir ----------------------------------------------------------------


def folder_dir(server: DovecotServer, email: str, folder: str) -> Path:
    return maildir_folder_path(server.maildir(email), folder)


def ensure_folders(server: DovecotServer, email: str, folders: Iterable[str]) -> None:
    """Create the folders' Maildir directories through Dovecot itself (one seed
    message each), so owner, permissions and ``maildirfolder`` are right."""
    for folder in folders:
        if not (folder_dir(server, email, folder) / "cur").is_dir():
            seed = (
                "From: <seed@example.net>\r\nTo: <" + email + ">\r\nSubject: seed\r\n"
                f"Date: {_date(0)}\r\nMessage-ID: <seed.{folder}.{time.time_ns()}@example.net>"
                "\r\n\r\nThe first message of this folder.\r\n"
            ).encode("ascii")
            server.deliver(email, seed, folder)


def write_messages(
    server: DovecotServer,
    email: str,
    folder: str,
    raws: Iterable[bytes],
    *,
    seen: bool = False,
    as_new: bool = False,
) -> int:
    """Write message files into ``folder``; returns how many.

    ``as_new`` puts them in ``new/`` (as a delivery agent does for new mail),
    otherwise in ``cur/`` with ``\\Seen`` when ``seen``. Each file goes through
    ``tmp/`` and a rename, so nothing ever sees half a message.
    """
    base = folder_dir(server, email, folder)
    tmp, dest = base / "tmp", base / ("new" if as_new else "cur")
    if not dest.is_dir():
        raise FileNotFoundError(f"{dest} does not exist: call ensure_folders() first")
    uid, gid = server.mail_uid, server.mail_gid
    chown = os.geteuid() == 0
    info = "" if as_new else (":2,S" if seen else ":2,")
    stamp, pid = int(time.time()), os.getpid()
    count = 0
    for raw in raws:
        n = next(_SEQUENCE)
        name = f"{stamp}.M{n}P{pid}Q{n}.{_HOST},S={len(raw)},W={len(raw)}"
        temp = tmp / name
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, raw)
            if chown:
                os.fchown(fd, uid, gid)
        finally:
            os.close(fd)
        os.rename(temp, dest / (name + info))
        count += 1
    return count


def index(server: DovecotServer, email: str, expected: dict[str, int]) -> dict[str, int]:
    """Let Dovecot sync the folders (UIDs, uidlist, index) and check the counts.

    ``expected`` maps folder -> message count; returns folder -> UIDNEXT.
    """
    uidnext: dict[str, int] = {}
    for folder, count in expected.items():
        out = server.doveadm(
            "mailbox", "status", "-u", email, "messages uidnext", folder
        ).stdout.decode()
        messages = int(re.search(r"messages=(\d+)", out).group(1))  # type: ignore[union-attr]
        if messages != count:
            raise RuntimeError(f"{email} {folder}: Dovecot sees {messages} messages, "
                               f"expected {count}")
        uidnext[folder] = int(re.search(r"uidnext=(\d+)", out).group(1))  # type: ignore[union-attr]
    return uidnext


def message_count(server: DovecotServer, email: str, folder: str) -> int:
    out = server.doveadm("mailbox", "status", "-u", email, "messages", folder).stdout.decode()
    return int(re.search(r"messages=(\d+)", out).group(1))  # type: ignore[union-attr]
