"""The floors: the least protocol work that gives the same result as threadsync,
written with bare aioimaplib and aiosmtplib and no database.

* :func:`poll` is a no-new-mail check: log in, ``STATUS`` INBOX and Sent, log out.
* :func:`ingest` reads the headers of every new INBOX message (one ``UID FETCH``
  of the three threading fields per 250 UIDs: stock aioimaplib breaks on longer
  responses), decides membership against the known Message-IDs, then fetches the
  members' bodies, ``body_chunk`` per ``UID FETCH``.
* :func:`send_all` submits prepared messages over one SMTP connection and files
  each in Sent with ``APPEND`` over one IMAP connection.

They keep results in memory only; what they return is checked by the caller so a
floor that silently did less work cannot make threadsync look slow.

Two costs of stock aioimaplib 2.0.3 are not protocol work and would inflate the
floor, so the floor client avoids them as threadsync's own protocol class does:
its ``data_received`` formats every received chunk into a debug message before
checking the log level (a ``repr`` of every message body), and its FETCH command
decides whether a response is complete by rescanning all lines received so far
on every new line (quadratic in the response length). :class:`_Protocol` and
:class:`_Fetch` replace just those two methods.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import aiosmtplib
from aioimaplib import aioimaplib

HEADER_CHUNK = 250
_UID = re.compile(rb"\bUID (\d+)")
_MSGID = re.compile(rb"<[^<>\s]+>")
_FOLD = re.compile(rb"\r?\n[ \t]+")


@dataclass(frozen=True)
class Login:
    host: str
    port: int
    user: str
    password: str


class _Protocol(aioimaplib.IMAP4ClientProtocol):  # type: ignore[misc]
    incomplete_line: bytes
    current_command: Any

    def data_received(self, d: bytes) -> None:
        try:
            self._handle_responses(self.incomplete_line + d, self._handle_line,
                                   self.current_command)
            self.incomplete_line = b""
            self.current_command = None
        except aioimaplib.IncompleteRead as incomplete:
            self.current_command = incomplete.cmd
            self.incomplete_line = incomplete.data


class _Fetch(aioimaplib.FetchCommand):  # type: ignore[misc]
    """FETCH that keeps the parenthesis balance of the current response as lines
    arrive instead of recounting all of them (same answer, linear time)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._depth = 0
        super().__init__(*args, **kwargs)

    def append_to_resp(self, line: bytes, result: str = "Pending") -> None:
        super().append_to_resp(line, result)
        if type(line) is bytes:
            if self.FETCH_MESSAGE_DATA_RE.match(line):
                self._depth = 0
            self._depth += line.count(b"(") - line.count(b")")

    def wait_data(self) -> bool:
        return self._depth != 0


class _Client(aioimaplib.IMAP4):  # type: ignore[misc]
    def create_client(self, host: str, port: int, loop: Any, conn_lost_cb: Any = None,
                      ssl_context: Any = None) -> None:
        local_loop = loop if loop is not None else asyncio.get_running_loop()
        self.protocol = _Protocol(local_loop, conn_lost_cb)
        self._client_task = local_loop.create_task(
            local_loop.create_connection(lambda: self.protocol, host, port, ssl=ssl_context))

    async def uid_fetch(self, uids: str, items: str) -> aioimaplib.Response:
        protocol = self.protocol
        return await protocol.execute(_Fetch(protocol.new_tag(), uids, items, prefix="UID",
                                             loop=protocol.loop, timeout=self.timeout))


async def _imap(login: Login) -> _Client:
    client = _Client(host=login.host, port=login.port, timeout=60)
    await client.wait_hello_from_server()
    reply = await client.login(login.user, login.password)
    if reply.result != "OK":
        raise RuntimeError(f"floor IMAP login failed: {reply}")
    return client


def _check(reply: aioimaplib.Response, what: str) -> aioimaplib.Response:
    if reply.result != "OK":
        raise RuntimeError(f"floor {what} failed: {reply.result} {reply.lines[-1:]!r}")
    return reply


async def poll(login: Login, sent: str = "Sent") -> dict[str, int]:
    """A no-new-mail pass: the UIDNEXT of INBOX and Sent, one STATUS each."""
    client = await _imap(login)
    result: dict[str, int] = {}
    try:
        for folder in ("INBOX", sent):
            reply = _check(await client.status(folder, "(UIDVALIDITY UIDNEXT HIGHESTMODSEQ)"),
                           "STATUS")
            match = re.search(rb"UIDNEXT (\d+)", bytes(reply.lines[0]))
            result[folder] = int(match.group(1)) if match else 0
    finally:
        await client.logout()
    return result


def _fetched(lines: Sequence[bytes | bytearray]) -> list[tuple[int, bytes]]:
    """(uid, literal) pairs from a UID FETCH response as aioimaplib returns it."""
    out: list[tuple[int, bytes]] = []
    uid: int | None = None
    for line in lines:
        if isinstance(line, bytearray):
            if uid is not None:
                out.append((uid, bytes(line)))
            uid = None
        else:
            match = _UID.search(line)
            if match and b"FETCH" in line:
                uid = int(match.group(1))
    return out


def _thread_ids(header_block: bytes) -> tuple[bytes | None, list[bytes]]:
    """(Message-ID, referenced ids) from a HEADER.FIELDS block."""
    own: bytes | None = None
    refs: list[bytes] = []
    for line in _FOLD.sub(b" ", header_block).split(b"\n"):
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"message-id":
            ids = _MSGID.findall(value)
            own = ids[0] if ids else None
        elif name in (b"in-reply-to", b"references"):
            refs += _MSGID.findall(value)
    return own, refs


async def ingest(
    login: Login, start_uid: int, known_ids: Iterable[str], *, body_chunk: int = 50
) -> dict[int, bytes]:
    """Bodies of the new INBOX messages (UID >= ``start_uid``) that reply to
    ``known_ids`` or to a member found before them; uid -> raw message."""
    known = {mid.encode("ascii") for mid in known_ids}
    client = await _imap(login)
    try:
        reply = _check(await client.examine("INBOX"), "EXAMINE")
        # aioimaplib tracks the SELECTED state for SELECT only; EXAMINE opens the
        # mailbox read-only, which is what a reader that must not change flags wants.
        client.protocol.state = aioimaplib.SELECTED
        uidnext = next(
            int(m.group(1)) for line in reply.lines
            if (m := re.search(rb"UIDNEXT (\d+)", bytes(line)))
        )
        members: list[int] = []
        for low in range(start_uid, uidnext, HEADER_CHUNK):
            high = min(low + HEADER_CHUNK, uidnext) - 1
            reply = _check(await client.uid_fetch(
                f"{low}:{high}",
                "(BODY.PEEK[HEADER.FIELDS (MESSAGE-ID IN-REPLY-TO REFERENCES)])",
            ), "UID FETCH headers")
            for uid, block in sorted(_fetched(reply.lines)):
                own, refs = _thread_ids(block)
                if any(ref in known for ref in refs):
                    members.append(uid)
                    if own is not None:
                        known.add(own)
        bodies: dict[int, bytes] = {}
        for i in range(0, len(members), body_chunk):
            chunk = members[i : i + body_chunk]
            reply = _check(await client.uid_fetch(",".join(map(str, chunk)), "(BODY.PEEK[])"),
                           "UID FETCH bodies")
            bodies.update(_fetched(reply.lines))
        return bodies
    finally:
        await client.logout()


@dataclass(frozen=True)
class Outgoing:
    sender: str
    recipients: tuple[str, ...]
    raw: bytes


async def send_all(
    imap_login: Login, smtp_host: str, smtp_port: int, mails: Sequence[Outgoing],
    sent: str = "Sent",
) -> int:
    """Submit every mail over one SMTP connection, APPEND each to Sent (\\Seen)
    over one IMAP connection; returns how many went both ways."""
    smtp = aiosmtplib.SMTP(hostname=smtp_host, port=smtp_port, use_tls=False, start_tls=False,
                           timeout=60)
    await smtp.connect()
    await smtp.login(imap_login.user, imap_login.password)
    client = await _imap(imap_login)
    done = 0
    try:
        for mail in mails:
            await smtp.sendmail(mail.sender, list(mail.recipients), mail.raw)
            _check(await client.append(mail.raw, sent, "(\\Seen)"), "APPEND")
            done += 1
    finally:
        await smtp.quit()
        await client.logout()
    return done
