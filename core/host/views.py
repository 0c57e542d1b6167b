"""Read-only views for the host: threads of a sub-account, one whole thread, an
attachment's stored content and the event log, in the JSON shapes of
the command line. Every query names its sub-account (R10); nothing is written."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, selectinload

from threadsync.core.errors import NotFound
from threadsync.core.host.events import message_json
from threadsync.core.kernel import Kernel
from threadsync.core.store.models import Attachment, Event, Message, SubAccount, SyncedThread

#: How a sub-account comes into being, for the messages that say it does not exist.
UNKNOWN_SUBACCOUNT = (
    "sub-account {!r} not found (threadsync knows a sub-account once its Labs flag "
    "was set, or the CRM sent mail for it)"
)


def _thread_row(t: SyncedThread, count: int) -> dict[str, Any]:
    return {
        "thread_id": t.id,
        "subaccount": t.subaccount_id,
        "user": t.user_id,
        "email": t.email,
        "state": t.state,
        "stop_reason": t.stop_reason,
        "subject": t.subject,
        "message_count": count,
    }


def subaccount_known(k: Kernel, subaccount: str) -> bool:
    """Whether threadsync has seen ``subaccount`` (Labs set, or CRM mail sent)."""
    return bool(k.store.call(lambda session: session.get(SubAccount, subaccount) is not None))


def threads(k: Kernel, subaccount: str, user: str | None = None) -> dict[str, Any]:
    """The threads of a sub-account; :class:`NotFound` for one never seen."""

    def work(session: Session) -> dict[str, Any]:
        if session.get(SubAccount, subaccount) is None:
            raise NotFound(UNKNOWN_SUBACCOUNT.format(subaccount))
        counts = (
            select(Message.thread_id, func.count(Message.id).label("n"))
            .group_by(Message.thread_id)
            .subquery()
        )
        query = (
            select(SyncedThread, func.coalesce(counts.c.n, 0))
            .outerjoin(counts, counts.c.thread_id == SyncedThread.id)
            .where(SyncedThread.subaccount_id == subaccount)
        )
        if user is not None:
            query = query.where(SyncedThread.user_id == user)
        rows = session.execute(query.order_by(SyncedThread.created_at, SyncedThread.id)).all()
        return {"threads": [_thread_row(t, int(n)) for t, n in rows]}

    return k.store.call(work)


def thread(k: Kernel, thread_id: str, subaccount: str | None = None) -> dict[str, Any]:
    """One thread with every message; ``subaccount`` restricts it to a tenant."""

    def work(session: Session) -> dict[str, Any]:
        t = session.get(SyncedThread, thread_id)
        if t is None or (subaccount is not None and t.subaccount_id != subaccount):
            raise NotFound(f"thread {thread_id!r} not found")
        msgs = session.scalars(
            select(Message)
            .where(Message.thread_id == t.id)
            .options(selectinload(Message.attachments))
            .order_by(Message.id)
        ).all()
        return {
            **_thread_row(t, len(msgs)),
            "messages": [
                {**message_json(m), "received_at": m.created_at.isoformat(timespec="seconds")}
                for m in msgs
            ],
        }

    return k.store.call(work)


def recent_messages(
    k: Kernel,
    *,
    subaccount: str | None = None,
    state: str | None = None,
    before: int | None = None,
    limit: int = 50,
) -> dict[str, Any]:
    """The newest messages of every sub-account (or one), newest first, optionally
    only ``synced`` or ``skipped`` ones, older than message row ``before``; the
    status page's list. ``next_before`` continues the list (``None``: no more)."""

    def work(session: Session) -> dict[str, Any]:
        query = select(Message).order_by(Message.id.desc()).limit(limit + 1)
        if subaccount:
            query = query.where(Message.subaccount_id == subaccount)
        if state:
            query = query.where(Message.state == state)
        if before is not None:
            query = query.where(Message.id < before)
        rows = session.scalars(query).all()
        page = rows[:limit]
        return {
            "messages": [
                {
                    "id": m.id,
                    "subaccount": m.subaccount_id,
                    "thread_id": m.thread_id,
                    "direction": m.direction,
                    "origin": m.origin,
                    "from": m.sender,
                    "subject": m.subject,
                    "state": m.state,
                    "reason": m.reason,
                    "at": m.created_at.isoformat(timespec="seconds"),
                }
                for m in page
            ],
            "next_before": page[-1].id if len(rows) > limit else None,
        }

    return k.store.call(work)


def events(k: Kernel, subaccount: str, after: int = 0, limit: int = 100) -> dict[str, Any]:
    """The event log of a sub-account, oldest first, after event id ``after``."""

    def work(session: Session) -> dict[str, Any]:
        rows = session.scalars(
            select(Event)
            .where(Event.subaccount_id == subaccount, Event.id > after)
            .order_by(Event.id)
            .limit(limit)
        ).all()
        return {"events": [{"id": e.id, **e.payload} for e in rows]}

    return k.store.call(work)


@dataclass(frozen=True)
class AttachmentContent:
    filename: str | None
    content_type: str
    data: bytes


def attachment(
    k: Kernel, thread_id: str, message_id: str, index: int, subaccount: str | None
) -> AttachmentContent:
    """Attachment ``index`` (0-based, as listed) of a message in a thread. Content
    is stored only for synced messages (R8); otherwise :class:`NotFound`."""

    def work(session: Session) -> AttachmentContent:
        thread = session.get(SyncedThread, thread_id)
        if thread is None or (subaccount is not None and thread.subaccount_id != subaccount):
            raise NotFound(f"thread {thread_id!r} not found")
        msg = session.scalars(
            select(Message).where(Message.thread_id == thread.id, Message.message_id == message_id)
        ).first()
        if msg is None:
            raise NotFound(f"message {message_id!r} not found in thread {thread_id!r}")
        rows = session.scalars(
            select(Attachment).where(Attachment.message_pk == msg.id).order_by(Attachment.id)
        ).all()
        if not 0 <= index < len(rows):
            raise NotFound(f"message {message_id!r} has no attachment {index}")
        row = rows[index]
        if row.content is None:
            why = f" ({msg.reason})" if msg.reason else ""
            raise NotFound(
                f"attachment {index} of {message_id!r} has no stored content: only synced "
                f"messages keep attachment content; this one is {msg.state}{why}"
            )
        return AttachmentContent(row.filename, row.content_type, row.content)

    return k.store.call(work)
