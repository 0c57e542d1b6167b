"""Reads new mail of a connection and stores what belongs to synced threads.

For each watched folder: ask the provider for headers since the stored cursor,
decide membership from our own tables (a reply names a Message-ID already in the
thread), fetch only the members' bodies (R5), apply the attachment limit (R8), and
store the
accepted messages together with the new cursor in one transaction, so that a crash
at any point replays a batch instead of losing or doubling it (R9). The unique
constraint on (thread, Message-ID) is the last line of defence when two workers
race or a folder is rescanned after a UIDVALIDITY reset. That transaction first
holds the connection's row (:meth:`Kernel.lock_live_connection`): when another
process ended the connection while a batch was being read, the batch is dropped
and the pass stops (R6) instead of writing a cursor that no longer exists.
Every step reaches the database through :meth:`Kernel.unit_of_work`, so the
events of a batch are announced only once it has committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import bindparam, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from threadsync.core import rules
from threadsync.core.errors import MessageParseError, ProviderError, ProviderProtocolError
from threadsync.core.host.events import EventBuffer
from threadsync.core.kernel import Kernel
from threadsync.core.mime import ParsedMessage, parse_message
from threadsync.core.provider import ChangeBatch, Folder, HeaderSummary, Provider
from threadsync.core.rules import MessageState, ThreadState
from threadsync.core.store.models import Attachment, Cursor, Message, SyncedThread

log = logging.getLogger(__name__)


@dataclass
class Accepted:
    """A message that belongs to a thread, fetched and parsed."""

    thread_id: str
    header: HeaderSummary
    message_id: str
    parsed: ParsedMessage | None
    error: str | None = None
    #: Over ``[sync] max_message_bytes``: neither fetched (when the size was
    #: announced) nor parsed nor stored, only recorded as skipped.
    too_large: bool = False


@dataclass
class PassReport:
    """What one pass over a connection did (for logs, tests and benchmarks)."""

    seen: int = 0
    stored: int = 0
    skipped: int = 0
    duplicates: int = 0
    folders: dict[str, int] = field(default_factory=dict)
    #: The connection was ended (disconnect, update-email) during the pass; what
    #: was read after that was not stored, and the pass stopped.
    ended: bool = False


def _candidate_ids(h: HeaderSummary) -> list[str]:
    return list(dict.fromkeys([*h.in_reply_to, *h.references]))


async def _classify(
    k: Kernel, conn_id: int, headers: list[HeaderSummary]
) -> list[tuple[HeaderSummary, str]]:
    """Which headers belong to an active thread of this connection: (header, thread).

    Decided from our tables only: a thread token inside a referenced Message-ID of
    ours, or a referenced Message-ID already stored in the thread. Headers whose own
    Message-ID is already stored (the CRM's sent copy, INBOX+Sent) are left out.
    """
    domain = k.settings.sync.message_id_domain
    return await k.unit_of_work(lambda session, _: _members(session, domain, conn_id, headers))


def _members(
    session: Session, domain: str, conn_id: int, headers: list[HeaderSummary]
) -> list[tuple[HeaderSummary, str]]:
    """:func:`_classify`'s work, inside its transaction."""
    # Only a header that refers to other messages can be a member, and only then
    # does its own Message-ID matter: the other headers are not looked up.
    candidates = [(h, _candidate_ids(h)) for h in headers if h.in_reply_to or h.references]
    if not candidates:
        return []
    token_of: dict[str, str | None] = {}
    wanted: set[str] = set()
    for h, ids in candidates:
        for mid in ids:
            if mid not in token_of:
                token_of[mid] = rules.token_of(mid, domain)
        wanted.update(ids)
        if h.message_id:
            wanted.add(h.message_id)
    tokens = {token for token in token_of.values() if token}
    by_token, by_mid = _stored(session, conn_id, tokens, wanted)
    members: list[tuple[HeaderSummary, str]] = []
    for h, ids in candidates:
        if h.message_id and h.message_id in by_mid:
            continue  # already stored: the CRM's own copy, or INBOX and Sent
        thread_id = None
        for mid in reversed(ids):
            thread_id = by_mid.get(mid)
            if thread_id is None:
                token = token_of[mid]
                thread_id = by_token.get(token) if token else None
            if thread_id:
                break
        if thread_id is None:
            continue
        members.append((h, thread_id))
        if h.message_id:
            # A later header in the same batch may reply to this one.
            by_mid[h.message_id] = thread_id
    return members


#: Most ids bound in one lookup query (SQLite before 3.32 takes 999 parameters).
_LOOKUP_CHUNK = 500

# The lookups of _classify, built once. Each is led by the index of the ids it
# looks for. Tokens are unique, so the few threads found are checked afterwards
# (with the connection in the query, SQLite walks all of the connection's
# threads instead). A message's thread is checked per message found (EXISTS on
# the thread's key); "thread_id IN (active threads)" made SQLite probe every
# Message-ID once per active thread.
_THREADS_BY_TOKEN = select(
    SyncedThread.token, SyncedThread.id, SyncedThread.connection_id, SyncedThread.state
).where(SyncedThread.token.in_(bindparam("tokens", expanding=True)))
_MESSAGES_IN_ACTIVE_THREADS = (
    select(Message.message_id, Message.thread_id)
    .where(
        Message.message_id.in_(bindparam("mids", expanding=True)),
        select(SyncedThread.id)
        .where(
            SyncedThread.id == Message.thread_id,
            SyncedThread.connection_id == bindparam("conn_id"),
            SyncedThread.state == ThreadState.ACTIVE,
        )
        .exists(),
    )
    # A Message-ID stored in two threads gives the later one, on every database.
    .order_by(Message.id)
)


def _stored(
    session: Session, conn_id: int, tokens: set[str], mids: set[str]
) -> tuple[dict[str, str], dict[str, str]]:
    """The connection's active threads by token, and its messages in them by
    Message-ID, among ``tokens`` and ``mids``: (token -> thread, mid -> thread).
    One query for each while the ids fit (those of a batch of 250 headers do)."""
    by_token: dict[str, str] = {}
    for chunk in _chunks(sorted(tokens), _LOOKUP_CHUNK):
        for token, thread_id, owner, state in session.execute(_THREADS_BY_TOKEN, {"tokens": chunk}):
            if owner == conn_id and state == ThreadState.ACTIVE:
                by_token[token] = thread_id
    by_mid: dict[str, str] = {}
    for chunk in _chunks(sorted(mids), _LOOKUP_CHUNK):
        for mid, thread_id in session.execute(
            _MESSAGES_IN_ACTIVE_THREADS, {"mids": chunk, "conn_id": conn_id}
        ):
            by_mid[mid] = thread_id
    return by_token, by_mid


def _chunks(items: list[str], size: int) -> list[list[str]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


#: Member bodies asked of the provider at once: at most this many, and no more
#: than this many bytes by the sizes the headers announced (one over-size message
#: goes alone). Fewer round trips, bounded memory.
FETCH_GROUP = 50
FETCH_GROUP_BYTES = 8 * 1024 * 1024


def _fetch_groups(
    members: list[tuple[HeaderSummary, str]],
) -> Iterator[list[tuple[HeaderSummary, str]]]:
    group: list[tuple[HeaderSummary, str]] = []
    size = 0
    for member in members:
        member_size = member[0].size or 0
        if group and (len(group) >= FETCH_GROUP or size + member_size > FETCH_GROUP_BYTES):
            yield group
            group, size = [], 0
        group.append(member)
        size += member_size
    if group:
        yield group


def _synthetic_id(raw_ref: str, h: HeaderSummary, conn_id: int) -> str:
    """A stable id for a message without Message-ID, so replays still dedupe."""
    basis = f"{conn_id}|{h.sender}|{h.date}|{h.subject}|{h.in_reply_to}|{h.references}"
    return f"<missing-{hashlib.sha256(basis.encode()).hexdigest()[:32]}@threadsync.invalid>"


async def _store(
    k: Kernel,
    conn_id: int,
    folder: Folder,
    accepted: list[Accepted],
    cursor: dict[str, Any],
    report: PassReport,
) -> None:
    """Store accepted messages and the folder cursor in one transaction; their
    events are announced once it has committed.

    Sets ``report.ended`` and stores nothing when the connection was ended since
    the batch was read (R6): its cursors are gone and must stay gone.
    """
    limit = k.settings.sync.max_attachment_bytes

    counts = {"stored": 0, "skipped": 0, "duplicates": 0}

    def work(session: Session, events: EventBuffer) -> bool:
        for key in counts:
            counts[key] = 0
        # Taken first: an end committed meanwhile is seen here, and one that comes
        # later waits for this transaction instead of deleting the cursor under it.
        conn = k.lock_live_connection(session, conn_id)
        if conn is None:
            return False
        own_address = conn.email.lower()
        # Two queries for the whole batch instead of two per message.
        thread_ids = {item.thread_id for item in accepted}
        threads = {
            t.id: t
            for t in session.scalars(
                select(SyncedThread).where(
                    SyncedThread.id.in_(thread_ids), SyncedThread.state == ThreadState.ACTIVE
                )
            )
        }
        existing = {
            (m.thread_id, m.message_id): m
            for m in session.scalars(
                select(Message).where(
                    Message.thread_id.in_(thread_ids),
                    Message.message_id.in_({item.message_id for item in accepted}),
                )
            )
        }
        for item in accepted:
            thread = threads.get(item.thread_id)
            if thread is None:
                continue
            known = existing.get((thread.id, item.message_id))
            if known is not None:
                refs = dict(known.provider_refs or {})
                if folder.role not in refs:
                    refs[folder.role] = item.header.ref
                    known.provider_refs = refs
                counts["duplicates"] += 1
                continue
            msg = _message_row(thread, item, folder, own_address, limit)
            session.add(msg)
            existing[(thread.id, item.message_id)] = msg
            counts["stored" if msg.state == MessageState.SYNCED else "skipped"] += 1
            events.message(session, thread, msg)
        row = session.scalar(
            select(Cursor).where(Cursor.connection_id == conn_id, Cursor.role == folder.role)
        )
        if row is None:
            session.add(
                Cursor(connection_id=conn_id, role=folder.role, folder=folder.name, data=cursor)
            )
        elif row.data != cursor or row.folder != folder.name:
            row.folder = folder.name
            row.data = cursor
        return True

    # A concurrent worker may have stored one of these messages between our check
    # and our insert: the unique constraint refuses it, and the retry skips it.
    for attempt in range(3):
        try:
            if not await k.unit_of_work(work):
                report.ended = True
                log.info(
                    "connection ended during a pass; batch dropped",
                    extra={"connection_id": conn_id},
                )
                return
            report.stored += counts["stored"]
            report.skipped += counts["skipped"]
            report.duplicates += counts["duplicates"]
            return
        except IntegrityError:
            if attempt == 2:
                raise
            log.info("batch raced another worker; retrying", extra={"connection_id": conn_id})


def _message_row(
    thread: SyncedThread, item: Accepted, folder: Folder, own_address: str, limit: int
) -> Message:
    h, p = item.header, item.parsed
    sender = (p.sender if p else None) or h.sender
    outbound = folder.role == "sent" or (sender or "").lower() == own_address
    msg = Message(
        thread_id=thread.id,
        subaccount_id=thread.subaccount_id,
        message_id=item.message_id,
        direction="outbound" if outbound else "inbound",
        origin="mailbox",
        sender=sender,
        to=list(p.to) if p else [],
        cc=list(p.cc) if p else [],
        subject=(p.subject if p else h.subject) or "",
        date=(p.date if p else None) or h.date,
        headers={
            "in_reply_to": list(p.in_reply_to if p else h.in_reply_to),
            "references": list(p.references if p else h.references),
        },
        provider_refs={folder.role: h.ref},
    )
    if item.too_large:
        msg.state, msg.reason = "skipped", rules.MESSAGE_TOO_LARGE
        return msg
    if p is None:
        msg.state, msg.reason = MessageState.SKIPPED, rules.UNPARSEABLE
        return msg
    msg.defects = list(p.defects)
    too_large = rules.over_limit((a.size for a in p.attachments), limit)
    msg.state = MessageState.SKIPPED if too_large else MessageState.SYNCED
    msg.reason = rules.ATTACHMENT_TOO_LARGE if too_large else None
    if not too_large:
        msg.text, msg.html = p.text, p.html
    msg.attachments = [
        Attachment(
            filename=a.filename,
            content_type=a.content_type,
            size=a.size,
            sha256=a.sha256,
            inline=a.inline,
            content=None if too_large else a.data,
        )
        for a in p.attachments
    ]
    return msg


async def sync_folder(
    k: Kernel, conn_id: int, provider: Provider, folder: Folder, report: PassReport
) -> None:
    """Read one folder up to its current end, batch by batch."""

    def load(session: Session, _events: EventBuffer) -> dict[str, Any] | None:
        row = session.scalar(
            select(Cursor).where(Cursor.connection_id == conn_id, Cursor.role == folder.role)
        )
        if row is None or row.folder != folder.name:
            return None
        return dict(row.data)

    cursor = await k.unit_of_work(load)
    size = k.settings.sync.batch_size
    ahead: asyncio.Task[ChangeBatch] | None = None
    try:
        while True:
            if ahead is not None:
                batch, ahead = await ahead, None
            else:
                batch = await provider.changes(folder, cursor, size)
            report.seen += len(batch.headers)
            members = await _classify(k, conn_id, batch.headers)
            accepted = await _fetch_members(
                provider, folder, conn_id, members, k.settings.sync.max_message_bytes
            )
            if batch.more:
                # The next headers are read while this batch is stored; each cursor
                # is still stored with its own batch, so a crash replays at most one.
                ahead = asyncio.ensure_future(provider.changes(folder, batch.cursor, size))
            if accepted or batch.cursor != cursor:
                await _store(k, conn_id, folder, accepted, batch.cursor, report)
                if report.ended:
                    return
            report.folders[folder.role] = report.folders.get(folder.role, 0) + len(batch.headers)
            cursor = batch.cursor
            if not batch.more:
                return
    finally:
        if ahead is not None:
            await _settle(ahead)


async def _settle(task: asyncio.Task[ChangeBatch]) -> None:
    """Let a read-ahead that is no longer wanted finish (cancelling an IMAP
    command halfway would leave its answer on the line), unless we are being
    cancelled ourselves."""
    current = asyncio.current_task()
    if current is not None and current.cancelling():
        task.cancel()
    with contextlib.suppress(Exception, asyncio.CancelledError):
        await task


async def _fetch_members(
    provider: Provider,
    folder: Folder,
    conn_id: int,
    members: list[tuple[HeaderSummary, str]],
    limit: int,
) -> list[Accepted]:
    """The whole messages of a batch's members, parsed, in groups (R5: members only).

    A member over the message size ``limit`` is not parsed, and not even fetched
    when the provider announced its size: memory stays bounded by the limit."""
    accepted: list[Accepted] = []
    fetch: list[tuple[HeaderSummary, str]] = []
    for header, thread_id in members:
        if rules.message_too_large(header.size, limit):
            mid = header.message_id or _synthetic_id(header.ref, header, conn_id)
            accepted.append(Accepted(thread_id, header, mid, None, too_large=True))
        else:
            fetch.append((header, thread_id))
    for group in _fetch_groups(fetch):
        raws = await provider.fetch_many(folder, [header.ref for header, _ in group])
        for header, thread_id in group:
            mid = header.message_id or _synthetic_id(header.ref, header, conn_id)
            raw = raws.get(header.ref)
            if raw is None:
                raise ProviderProtocolError(f"message {header.ref} was not fetched")
            if rules.message_too_large(len(raw), limit):
                accepted.append(Accepted(thread_id, header, mid, None, too_large=True))
                continue
            try:
                # Big messages are parsed off the loop so IDLE and sends never stall.
                parsed: ParsedMessage | None = (
                    parse_message(raw)
                    if len(raw) < 256 * 1024
                    else await asyncio.to_thread(parse_message, raw)
                )
                error = None
            except MessageParseError as exc:
                parsed, error = None, str(exc)
            accepted.append(Accepted(thread_id, header, mid, parsed, error))
    return accepted


async def sync_connection(k: Kernel, conn_id: int, provider: Provider) -> PassReport:
    """One pass over every watched folder of an open provider. Provider errors
    propagate to the caller, which records them on the connection. A connection
    ended by another process during the pass ends it early (``report.ended``)."""
    report = PassReport()
    for folder in await provider.folders():
        await sync_folder(k, conn_id, provider, folder, report)
        if report.ended:
            return report
    report.ended = not await k.unit_of_work(lambda s, events: k.record_success(s, events, conn_id))
    return report


__all__ = ["PassReport", "ProviderError", "sync_connection", "sync_folder"]
