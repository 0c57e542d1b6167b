"""Operator-wide read models: the overview behind the status page and the
numbers behind ``/metrics``. Unlike :mod:`threadsync.core.host.views` these span every
sub-account, so only an operator's caller (the admin key) may reach them.
One ``Store.call`` per report; nothing is written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from threadsync.core import rules
from threadsync.core.kernel import Kernel
from threadsync.core.rules import ConnectionState, OutboxStatus
from threadsync.core.store.models import (
    Connection,
    Event,
    Message,
    OutboxEntry,
    SubAccount,
    SyncedThread,
    iso,
    utcnow,
)


def overview(k: Kernel, recent: int = 50) -> dict[str, Any]:
    """Every live or recent connection by sub-account, and the newest messages."""

    def work(session: Session) -> dict[str, Any]:
        labs = {s.id: s.two_way_email_sync for s in session.scalars(select(SubAccount))}
        conns = session.scalars(
            select(Connection).order_by(Connection.subaccount_id, Connection.user_id, Connection.id)
        ).all()
        msgs = session.execute(
            select(Message, SyncedThread.user_id)
            .join(SyncedThread, SyncedThread.id == Message.thread_id)
            .order_by(Message.id.desc())
            .limit(recent)
        ).all()
        return {
            "subaccounts": [{"id": s, "labs": on} for s, on in sorted(labs.items())],
            "connections": [
                {
                    "subaccount": c.subaccount_id,
                    "user": c.user_id,
                    "provider": c.provider,
                    "email": c.email,
                    "state": c.state,
                    "paused": not labs.get(c.subaccount_id, False),
                    "since": iso(c.since),
                    "last_error": c.last_error,
                    "last_sync_at": iso(c.last_sync_at),
                }
                for c in conns
            ],
            "messages": [
                {
                    "subaccount": m.subaccount_id,
                    "user": user,
                    "thread_id": m.thread_id,
                    "direction": m.direction,
                    "origin": m.origin,
                    "from": m.sender,
                    "subject": m.subject,
                    "state": m.state,
                    "reason": m.reason,
                    "at": iso(m.created_at),
                }
                for m, user in msgs
            ],
        }

    return k.store.call(work)


# ---- metrics -------------------------------------------------------------------------------


@dataclass
class Numbers:
    """What ``/metrics`` shows from the database."""

    messages: dict[tuple[str, str, str], int] = field(default_factory=dict)
    connections: dict[str, int] = field(default_factory=dict)
    sync_lag_max: float = 0.0
    sync_lag_sum: float = 0.0
    sync_lag_count: int = 0
    outbox: dict[tuple[str, str], int] = field(default_factory=dict)
    provider_errors: dict[str, int] = field(default_factory=dict)


#: Kinds of provider errors as the connection state they caused.
_ERROR_KIND: dict[str, str] = {
    ConnectionState.NEEDS_REAUTH: "authentication_failed",
    ConnectionState.ERROR: "provider_error",
}


def numbers(k: Kernel) -> Numbers:
    def work(session: Session) -> Numbers:
        out = Numbers()
        for state, reason, direction, n in session.execute(
            select(Message.state, Message.reason, Message.direction, func.count()).group_by(
                Message.state, Message.reason, Message.direction
            )
        ):
            out.messages[(state, reason or "", direction)] = int(n)
        for state, n in session.execute(
            select(Connection.state, func.count()).group_by(Connection.state)
        ):
            out.connections[state] = int(n)
        now = utcnow()
        for (last,) in session.execute(
            select(Connection.last_sync_at).where(rules.worked_connections())
        ):
            lag = (now - last).total_seconds() if last is not None else 0.0
            out.sync_lag_max = max(out.sync_lag_max, lag)
            out.sync_lag_sum += lag
            out.sync_lag_count += 1
        for status, channel, n in session.execute(
            select(OutboxEntry.status, OutboxEntry.channel, func.count())
            .where(OutboxEntry.status != OutboxStatus.SENT)
            .group_by(OutboxEntry.status, OutboxEntry.channel)
        ):
            out.outbox[(status, channel)] = int(n)
        for (payload,) in session.execute(
            select(Event.payload).where(Event.type == "connection.state_changed")
        ):
            data = payload if isinstance(payload, dict) else {}
            kind = data.get("error_code") or _ERROR_KIND.get(str(data.get("state")))
            if kind:
                out.provider_errors[str(kind)] = out.provider_errors.get(str(kind), 0) + 1
        return out

    return k.store.call(work)
