"""Events for the host CRM: recorded in the event log inside the transaction that
caused them, and handed to the pluggy host hooks after that transaction commits.

A host hook that raises is logged and ignored: sync never waits on the host.
Payloads never carry secrets (R11) and always name their sub-account, so an
integration can route them without looking anything up (R10). A
``connection.state_changed`` caused by a provider failure carries the error's
``error_code``; counted from the event log, these are the provider errors per
kind of ``/metrics``, the same in every process and across restarts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import pluggy
from sqlalchemy.orm import Session

from threadsync.core.rules import MessageState
from threadsync.core.store.models import Attachment, Connection, Event, Message, SyncedThread

log = logging.getLogger(__name__)

MESSAGE_SYNCED = "message.synced"
MESSAGE_SKIPPED = "message.skipped"
CONNECTION_STATE_CHANGED = "connection.state_changed"
THREAD_STOPPED = "thread.stopped"

_HOOKS = {
    MESSAGE_SYNCED: "message_synced",
    MESSAGE_SKIPPED: "message_skipped",
    CONNECTION_STATE_CHANGED: "connection_state_changed",
    THREAD_STOPPED: "thread_stopped",
}


def attachment_json(a: Attachment) -> dict[str, Any]:
    return {"filename": a.filename, "content_type": a.content_type, "size": a.size}


def message_json(m: Message) -> dict[str, Any]:
    """A message as in ``threadsync thread`` (the documented JSON shape)."""
    return {
        "message_id": m.message_id,
        "direction": m.direction,
        "origin": m.origin,
        "from": m.sender,
        "to": list(m.to or []),
        "cc": list(m.cc or []),
        "subject": m.subject,
        "date": m.date,
        "state": m.state,
        "reason": m.reason,
        "text": m.text,
        "html": m.html,
        "attachments": [attachment_json(a) for a in m.attachments],
        # What the parser dropped or repaired: non-empty means parts of this
        # message could not be read and the CRM should say so.
        "defects": list(m.defects or []),
    }


@dataclass
class EventBuffer:
    """Events raised inside one unit of work, to be announced after it commits."""

    pending: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def record(self, session: Session, subaccount: str, kind: str, payload: dict[str, Any]) -> None:
        body = {"event": kind, "subaccount": subaccount, **payload}
        session.add(Event(subaccount_id=subaccount, type=kind, payload=body))
        self.pending.append((kind, body))

    def message(self, session: Session, thread: SyncedThread, m: Message) -> None:
        kind = MESSAGE_SYNCED if m.state == MessageState.SYNCED else MESSAGE_SKIPPED
        self.record(
            session,
            thread.subaccount_id,
            kind,
            {"user": thread.user_id, "thread_id": thread.id, "message": message_json(m)},
        )

    def connection(
        self,
        session: Session,
        conn: Connection,
        previous: str | None,
        *,
        error_code: str | None = None,
    ) -> None:
        """``error_code`` is the ``code`` of the provider error that caused the
        change (``authentication_failed``, ``transient_provider_error``, ...),
        ``None`` for changes no failure caused."""
        self.record(
            session,
            conn.subaccount_id,
            CONNECTION_STATE_CHANGED,
            {
                "user": conn.user_id,
                "provider": conn.provider,
                "email": conn.email,
                "state": conn.state,
                "previous": previous,
                "last_error": conn.last_error,
                "error_code": error_code,
            },
        )

    def thread_stopped(self, session: Session, thread: SyncedThread) -> None:
        self.record(
            session,
            thread.subaccount_id,
            THREAD_STOPPED,
            {"user": thread.user_id, "thread_id": thread.id, "reason": thread.stop_reason},
        )

    def announce(self, pm: pluggy.PluginManager) -> None:
        """Call the host hooks for everything recorded, in order, then forget it."""
        pending, self.pending = self.pending, []
        for kind, payload in pending:
            hook = getattr(pm.hook, _HOOKS[kind])
            try:
                hook(payload=payload)
            except Exception:  # a host's bug must not stop sync
                log.exception("host hook %s failed", _HOOKS[kind], extra={"event": kind})
