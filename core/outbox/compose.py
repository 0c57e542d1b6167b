"""CRM mail: ``send`` starts a thread, ``reply`` continues one (R3, R4, R8).

The route is decided by :mod:`threadsync.core.rules`; the message is built with a
Message-ID carrying the thread token and stored, with its outbox entry, in one
transaction before any network call (the transactional outbox). Delivery is then
tried at once; if it cannot happen now, the daemon delivers it later.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from threadsync.core import rules
from threadsync.core.accounts.connections import get_subaccount, labs_on, live_connection
from threadsync.core.errors import InvalidInput, MessageTooLarge, NotFound
from threadsync.core.host.events import EventBuffer
from threadsync.core.kernel import Kernel
from threadsync.core.mime import AttachmentIn, build_message, check_address, check_header_value
from threadsync.core.outbox import delivery
from threadsync.core.rules import MessageState, OutboxStatus, SendStatus, ThreadState
from threadsync.core.store.models import (
    Attachment,
    Connection,
    Message,
    OutboxEntry,
    SyncedThread,
    utcnow,
)


@dataclass(frozen=True)
class Draft:
    """What the CRM wants to send."""

    text: str
    html: str | None = None
    attachments: Sequence[AttachmentIn] = ()
    to: Sequence[str] = ()
    cc: Sequence[str] = ()
    subject: str = ""


def _attachment_rows(draft: Draft, keep_content: bool) -> list[Attachment]:
    import hashlib

    return [
        Attachment(
            filename=a.filename,
            content_type=a.content_type,
            size=len(a.data),
            sha256=hashlib.sha256(a.data).hexdigest(),
            inline=False,
            content=a.data if keep_content else None,
        )
        for a in draft.attachments
    ]


def _result(thread: SyncedThread, msg: Message, route: rules.Route) -> dict[str, Any]:
    return {
        "thread_id": thread.id,
        "message_id": msg.message_id,
        "channel": route.channel,
        "synced": route.synced,
        "reason": route.reason,
        "status": SendStatus.QUEUED,
    }


def _store_outgoing(
    session: Session,
    k: Kernel,
    events: EventBuffer,
    thread: SyncedThread,
    conn: Connection | None,
    route: rules.Route,
    draft: Draft,
    *,
    in_reply_to: str | None,
    references: list[str],
    user_name: str | None = None,
    request_key: str | None = None,
) -> tuple[Message, int]:
    """Store the message and its outbox entry; returns both (the entry's id)."""
    domain = k.settings.sync.message_id_domain
    message_id = rules.make_message_id(thread.token, domain)
    mailbox = route.channel == "mailbox" and conn is not None
    sender = conn.email if mailbox and conn is not None else k.settings.default_channel.from_address
    reply_to = conn.email if not mailbox and conn is not None else None
    raw = build_message(
        sender=sender,
        to=list(draft.to),
        cc=list(draft.cc),
        subject=draft.subject,
        text=draft.text,
        html=draft.html,
        attachments=list(draft.attachments),
        message_id=message_id,
        in_reply_to=in_reply_to,
        references=references,
        reply_to=reply_to,
        sender_name=user_name,
    )
    msg = Message(
        thread_id=thread.id,
        subaccount_id=thread.subaccount_id,
        message_id=message_id,
        direction="outbound",
        origin="crm",
        state=MessageState.SYNCED if route.synced else MessageState.SKIPPED,
        reason=route.reason,
        sender=sender,
        to=list(draft.to),
        cc=list(draft.cc),
        subject=draft.subject,
        date=utcnow().isoformat() + "Z",
        headers={"in_reply_to": [in_reply_to] if in_reply_to else [], "references": references},
        provider_refs={},
        text=draft.text,
        html=draft.html,
    )
    msg.attachments = _attachment_rows(draft, keep_content=route.synced)
    session.add(msg)
    session.flush()
    entry = OutboxEntry(
        message_pk=msg.id,
        connection_id=conn.id if mailbox and conn is not None else None,
        channel=route.channel,
        status=OutboxStatus.PENDING,
        sender=sender,
        recipients=[*draft.to, *draft.cc],
        raw=raw,
        attempts=0,
        request_key=request_key,
    )
    session.add(entry)
    session.flush()
    if not route.synced:
        events.message(session, thread, msg)
    return msg, entry.id


def _validate(draft: Draft, *, need_recipients: bool) -> Draft:
    to = [check_address(a, "to address") for a in draft.to]
    cc = [check_address(a, "cc address") for a in draft.cc]
    if need_recipients and not to:
        raise InvalidInput("at least one --to address is needed")
    if len(to) + len(cc) > 500:
        raise InvalidInput("at most 500 recipients per message")
    subject = check_header_value(draft.subject, "subject")
    for a in draft.attachments:
        check_header_value(a.filename, "attachment filename")
        check_header_value(a.content_type, "attachment content type")
    return Draft(
        text=draft.text,
        html=draft.html,
        attachments=draft.attachments,
        to=to,
        cc=cc,
        subject=subject,
    )


def _check_size(k: Kernel, draft: Draft) -> None:
    """Refuse a message over ``[sync] max_message_bytes`` once encoded, before
    anything is stored: it would be refused by most mail servers, and building it
    would hold several copies in the shared process."""
    limit = k.settings.sync.max_message_bytes
    size = rules.encoded_size(
        len(draft.text.encode("utf-8")),
        len(draft.html.encode("utf-8")) if draft.html else 0,
        (len(a.data) for a in draft.attachments),
    )
    if rules.message_too_large(size, limit):
        raise MessageTooLarge(
            f"the message would be about {size:,} bytes once encoded, over the limit of "
            f"{limit:,} ([sync] max_message_bytes); send large files as links"
        )


Outcome = tuple[dict[str, Any], "delivery.Claim | None"]


def request_key(key: str | None, *scope: str) -> str | None:
    """The outbox's key for a caller's idempotency key: a digest of the key and
    what it was given for (``send`` and the user, or ``reply`` and the thread),
    so one key names one message and never another sub-account's."""
    if key is None:
        return None
    if not key or len(key) > 255 or not key.isprintable():
        raise InvalidInput("an idempotency key must be 1-255 printable characters")
    parts = [*scope, key]
    return hashlib.sha256("".join(f"{len(x)}:{x}" for x in parts).encode()).hexdigest()


def _earlier(session: Session, k: Kernel, key: str | None) -> Outcome | None:
    """The message already made with this idempotency key, if any: its result,
    and its entry claimed when it still waits to leave (the first request died
    before delivering it; a live delivery's lease keeps this from sending twice)."""
    if key is None:
        return None
    row = session.execute(
        select(OutboxEntry.id, OutboxEntry.channel, OutboxEntry.status, Message)
        .join(Message, Message.id == OutboxEntry.message_pk)
        .where(OutboxEntry.request_key == key)
    ).first()
    if row is None:
        return None
    entry_id, channel, status, msg = row
    result = {
        "thread_id": msg.thread_id,
        "message_id": msg.message_id,
        "channel": channel,
        "synced": msg.state == MessageState.SYNCED,
        "reason": msg.reason,
        "status": SendStatus.SENT if status == OutboxStatus.SENT else SendStatus.QUEUED,
    }
    claim = None if status == OutboxStatus.SENT else delivery.claim_in(session, k, entry_id, False)
    return result, claim


async def _store_once(
    k: Kernel, key: str | None, work: Callable[[Session, EventBuffer], Outcome]
) -> Outcome:
    """Run ``work`` as a unit of work (its events announced once it committed);
    when a concurrent request with the same idempotency key won the insert, run
    it again, and it finds that request's message."""
    try:
        return await k.unit_of_work(work)
    except IntegrityError:
        if key is None:
            raise
        return await k.unit_of_work(work)


async def send(
    k: Kernel, subaccount: str, user: str, draft: Draft, idempotency_key: str | None = None
) -> dict[str, Any]:
    """Start a thread from the CRM (R3): through the mailbox when the route allows.

    With ``idempotency_key``, a repeated call returns the first call's message
    (delivering it if it still waits) instead of sending another."""
    draft = _validate(draft, need_recipients=True)
    _check_size(k, draft)
    key = request_key(idempotency_key, "send", subaccount, user)
    limit = k.settings.sync.max_attachment_bytes

    def work(session: Session, events: EventBuffer) -> Outcome:
        earlier = _earlier(session, k, key)
        if earlier is not None:
            return earlier
        get_subaccount(session, subaccount, create=True)
        conn = live_connection(session, subaccount, user)
        route = rules.route_first_message(
            labs_on=labs_on(session, subaccount),
            connection_state=conn.state if conn else None,
            attachment_sizes=[len(a.data) for a in draft.attachments],
            limit=limit,
        )
        synced = route.channel == "mailbox"
        thread = SyncedThread(
            id=rules.new_thread_id(),
            token=rules.new_token(),
            subaccount_id=subaccount,
            user_id=user,
            connection_id=conn.id if synced and conn else None,
            email=conn.email if conn else None,
            state=ThreadState.ACTIVE if synced else ThreadState.UNSYNCED,
            stop_reason=None if synced else route.reason,
            subject=draft.subject,
        )
        session.add(thread)
        session.flush()
        msg, entry_id = _store_outgoing(
            session, k, events, thread, conn, route, draft,
            in_reply_to=None, references=[], request_key=key,
        )  # fmt: skip
        return _result(thread, msg, route), delivery.claim_in(session, k, entry_id, False)

    result, claim = await _store_once(k, key, work)
    if claim is not None:
        result["status"] = await delivery.deliver_claim(k, claim)
    return result


async def reply(
    k: Kernel, thread_id: str, draft: Draft, idempotency_key: str | None = None
) -> dict[str, Any]:
    """Reply from the CRM in an existing thread (R4), threaded for mail clients.
    ``idempotency_key`` as for :func:`send`."""
    draft = _validate(draft, need_recipients=False)
    _check_size(k, draft)
    limit = k.settings.sync.max_attachment_bytes

    def work(session: Session, events: EventBuffer) -> Outcome:
        thread = session.get(SyncedThread, thread_id)
        if thread is None:
            raise NotFound(f"thread {thread_id!r} not found")
        key = request_key(idempotency_key, "reply", thread.subaccount_id, thread.id)
        earlier = _earlier(session, k, key)
        if earlier is not None:
            return earlier
        # Only the ids of the chain and the last message's addresses, not bodies.
        chain = list(
            session.scalars(
                select(Message.message_id)
                .where(Message.thread_id == thread.id)
                .order_by(Message.id)
            )
        )
        if not chain:
            raise NotFound(f"thread {thread_id!r} has no message to reply to")
        last = session.scalars(
            select(Message)
            .where(Message.thread_id == thread.id)
            .order_by(Message.id.desc())
            .limit(1)
        ).one()
        conn = session.get(Connection, thread.connection_id) if thread.connection_id else None
        route = rules.route_reply(
            thread_state=thread.state,
            labs_on=labs_on(session, thread.subaccount_id),
            connection_state=conn.state if conn else None,
            attachment_sizes=[len(a.data) for a in draft.attachments],
            limit=limit,
        )
        own = {a.lower() for a in (conn.email if conn else "", thread.email or "") if a}
        if draft.to:
            to, cc = list(draft.to), list(draft.cc)
        elif last.direction == "inbound" and last.sender:
            to = [last.sender]
            cc = [a for a in [*last.to, *last.cc] if a.lower() not in own and a != last.sender]
        else:
            to, cc = list(last.to), list(last.cc)
        full = Draft(
            text=draft.text,
            html=draft.html,
            attachments=draft.attachments,
            to=to,
            cc=cc,
            subject=draft.subject or rules.reply_subject(thread.subject),
        )
        msg, entry_id = _store_outgoing(
            session,
            k,
            events,
            thread,
            conn,
            route,
            full,
            in_reply_to=last.message_id,
            references=rules.references_for_reply(chain),
            request_key=key,
        )
        return _result(thread, msg, route), delivery.claim_in(session, k, entry_id, False)

    result, claim = await _store_once(k, idempotency_key, work)
    # The entry is claimed with its message, in the same transaction; one not
    # claimable now (its mailbox in backoff, say) waits for the daemon.
    if claim is not None:
        result["status"] = await delivery.deliver_claim(k, claim)
    return result
