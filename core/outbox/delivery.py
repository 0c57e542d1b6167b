"""Delivers the transactional outbox, at most once per CRM message (R9).

An entry moves ``pending`` -> ``claimed`` (a lease, before any network call) ->
``transmitting`` (committed by the provider's checkpoint, immediately before the
step after which the message may have left: the line that ends SMTP DATA, Graph
send) -> ``sent``.

After a crash:

* ``claimed`` with a dead or expired lease: nothing left; it is sent again.
* ``transmitting``: it may have left. It is never sent again; the Sent folder is
  checked for its Message-ID and the copy filed if missing. Over SMTP the
  window between that commit and the message leaving is the write of the
  three bytes that end DATA (:mod:`threadsync.core.outbox.smtp_data`); a crash in it loses the
  message rather than doubling it, the one case R9's two demands conflict.

A failure before the checkpoint returns the entry to ``pending`` with backoff.
Each step is its own :meth:`Kernel.unit_of_work`: a worker thread, one
transaction, its events announced after the commit.

If the database fails while committing "transmitting" (the commit may or may
not have happened), the provider stops before that step, so the message has
certainly not left: the entry is remembered in this process and its next claim
here sends it (without waiting for the lease to run out, and without taking it
for sent). A failure after it that leaves the outcome unknown (the provider
raises :class:`~threadsync.core.errors.DeliveryUnconfirmed`: the line dropped
after the end of SMTP DATA, before the server's answer) keeps ``transmitting``
with the lease released: it is handled as after a crash (never sent again, the
Sent copy filed on the next pass), and the message carries the reason
``delivery_unconfirmed`` so the CRM user sees that it may not have arrived.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, undefer

from threadsync.core import rules
from threadsync.core.errors import (
    DeliveryUnconfirmed,
    LeaseLost,
    ProviderError,
    ProviderProtocolError,
    StoreError,
)
from threadsync.core.host.events import MESSAGE_SYNCED, EventBuffer, message_json
from threadsync.core.kernel import Kernel, worker_is_dead
from threadsync.core.outbox.relay import send_via_relay
from threadsync.core.provider import OutgoingMail, Provider
from threadsync.core.rules import (
    LEASED,
    ConnectionState,
    MessageState,
    OutboxStatus,
    SendStatus,
)
from threadsync.core.store.database import Store
from threadsync.core.store.models import Connection, Message, OutboxEntry, utcnow
from threadsync.core.sync import workers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Claim:
    entry_id: int
    channel: str
    connection_id: int | None
    mail: OutgoingMail
    was_transmitting: bool
    sent_copy_stored: bool
    already_sent: bool
    #: The mailbox's connection as read with the claim (detached), so that
    #: opening a provider for this delivery needs no further query.
    connection: Connection | None = None
    message_pk: int = 0
    #: (sub-account, payload) of the ``message.synced`` event recorded when the
    #: message has left, prepared with the claim (the message is at hand there).
    synced_event: tuple[str, dict[str, Any]] | None = None


#: Reason on a CRM message whose server answer was lost after it may have left.
DELIVERY_UNCONFIRMED = "delivery_unconfirmed"

#: Per database, the entries this process holds in "transmitting" although they
#: certainly did not leave: the commit of the checkpoint failed (its outcome
#: unknown) and the provider stopped before the point of no return.
_NOT_SENT: weakref.WeakKeyDictionary[Store, set[int]] = weakref.WeakKeyDictionary()


def _not_sent(k: Kernel) -> set[int]:
    return _NOT_SENT.setdefault(k.store, set())


def _lease_is_dead(owner: str | None, until: datetime | None, now: datetime) -> bool:
    return owner is None or until is None or until <= now or worker_is_dead(owner)


def claim_in(session: Session, k: Kernel, entry_id: int, provider_open: bool) -> Claim | None:
    """Take the lease on an entry inside ``session``'s transaction, or ``None``
    when it is not ours to deliver now (someone else holds it, it waits for its
    backoff, or its mailbox cannot be used now). ``compose`` claims the entry it
    has just written in that same transaction."""
    entry = session.get(OutboxEntry, entry_id, options=[undefer(OutboxEntry.raw)])
    if entry is None:
        return None
    now = utcnow()
    conn: Connection | None = None
    if entry.channel == "mailbox":
        conn = _mailbox_ready(session, entry.connection_id, provider_open, now)
        if conn is None:
            return None
        if workers.holder_elsewhere(session, k, conn.id) is not None:
            # The worker that holds the mailbox sends it: woken now, not at its poll.
            workers.notify(session, conn.id)
            return None
    # Ours, and known here not to have left (see _NOT_SENT): sent now, not waited for.
    not_sent = (
        entry.status == OutboxStatus.TRANSMITTING
        and entry.lease_owner == k.worker
        and entry.id in _not_sent(k)
    )
    if entry.status == OutboxStatus.SENT:
        if entry.channel == "mailbox" and not entry.sent_copy_stored:
            if not _lease_is_dead(entry.lease_owner, entry.lease_until, now):
                return None
        else:
            return None
    elif entry.status in LEASED:
        if (
            not not_sent
            and not _lease_is_dead(entry.lease_owner, entry.lease_until, now)
            and not (
                # Safe to take before the lease ends: the old owner can no longer
                # move it to "transmitting" once the lease is ours.
                entry.status == OutboxStatus.CLAIMED
                and conn is not None
                and workers.left_by_gone_worker(session, k, conn.id, entry.lease_owner)
            )
        ):
            return None
    elif entry.status == OutboxStatus.PENDING:
        if entry.next_attempt_at and entry.next_attempt_at > now:
            return None
    else:
        return None
    was_transmitting = entry.status == OutboxStatus.TRANSMITTING and not not_sent
    already_sent = entry.status == OutboxStatus.SENT
    # Compare-and-set, so that two workers never both win the same entry.
    won = session.execute(
        update(OutboxEntry)
        .where(
            OutboxEntry.id == entry.id,
            OutboxEntry.status == entry.status,
            OutboxEntry.lease_owner.is_(None)
            if entry.lease_owner is None
            else OutboxEntry.lease_owner == entry.lease_owner,
        )
        .values(
            status=(
                OutboxStatus.CLAIMED
                if entry.status in (OutboxStatus.PENDING, OutboxStatus.CLAIMED) or not_sent
                else entry.status
            ),
            lease_owner=k.worker,
            lease_until=now + timedelta(seconds=k.settings.sync.lease_seconds),
        )
        .execution_options(synchronize_session=False)
    )
    if won.rowcount != 1:  # type: ignore[attr-defined]
        return None
    msg = session.get(Message, entry.message_pk)
    assert msg is not None
    synced_event = None
    if entry.channel == "mailbox" and msg.state == MessageState.SYNCED and not already_sent:
        thread = msg.thread
        synced_event = (
            thread.subaccount_id,
            {"user": thread.user_id, "thread_id": thread.id, "message": message_json(msg)},
        )
    return Claim(
        entry_id=entry.id,
        channel=entry.channel,
        connection_id=entry.connection_id,
        mail=OutgoingMail(
            raw=entry.raw,
            message_id=msg.message_id,
            sender=entry.sender,
            recipients=tuple(entry.recipients),
        ),
        was_transmitting=was_transmitting,
        sent_copy_stored=entry.sent_copy_stored,
        already_sent=already_sent,
        connection=conn,
        message_pk=msg.id,
        synced_event=synced_event,
    )


async def _claim(k: Kernel, entry_id: int, provider_open: bool) -> Claim | None:
    claim = await k.unit_of_work(
        lambda session, _: claim_in(session, k, entry_id, provider_open)
    )
    if claim is not None:
        _not_sent(k).discard(entry_id)
    return claim


async def _update(k: Kernel, entry_id: int, **values: object) -> None:
    def work(session: Session, _events: EventBuffer) -> None:
        session.execute(
            update(OutboxEntry)
            .where(OutboxEntry.id == entry_id)
            .values(**values)
            .execution_options(synchronize_session=False)
        )

    await k.unit_of_work(work)


async def _release(k: Kernel, claim: Claim, error: str, *, failures: int = 1) -> None:
    when = rules.backoff(
        failures,
        k.settings.sync.backoff_base_seconds,
        k.settings.sync.backoff_max_seconds,
        utcnow(),
    )

    def work(session: Session, _events: EventBuffer) -> None:
        entry = session.get(OutboxEntry, claim.entry_id)
        if entry is None:
            return
        entry.status = OutboxStatus.PENDING
        entry.lease_owner = None
        entry.lease_until = None
        entry.attempts = (entry.attempts or 0) + 1
        entry.last_error = error
        entry.next_attempt_at = when

    await k.unit_of_work(work)


async def deliver_entry(k: Kernel, entry_id: int, provider: Provider | None = None) -> SendStatus:
    """Try to deliver one entry; returns ``sent`` or ``queued``.

    ``provider`` is an open provider of the entry's connection (the daemon's), or
    ``None`` to open one for this delivery only.
    """
    claim = await _claim(k, entry_id, provider is not None)
    if claim is None:
        return await _status(k, entry_id)
    return await deliver_claim(k, claim, provider)


async def deliver_claim(k: Kernel, claim: Claim, provider: Provider | None = None) -> SendStatus:
    """Deliver an entry whose lease this worker holds (see :func:`deliver_entry`)."""
    try:
        if claim.channel == "default":
            return await _deliver_default(k, claim)
        return await _deliver_mailbox(k, claim, provider)
    except LeaseLost as exc:
        log.warning("%s; not sent here", exc, extra={"outbox_id": claim.entry_id})
        return await _status(k, claim.entry_id)


async def _status(k: Kernel, entry_id: int) -> SendStatus:
    def work(session: Session, _events: EventBuffer) -> SendStatus:
        entry = session.get(OutboxEntry, entry_id)
        sent = entry is not None and entry.status == OutboxStatus.SENT
        return SendStatus.SENT if sent else SendStatus.QUEUED

    return await k.unit_of_work(work)


class _Checkpoint:
    """The provider's checkpoint for one claim: commits "transmitting". When that
    commit fails, its outcome is unknown, but the provider stops before the point
    of no return: the entry is noted as not sent (see :data:`_NOT_SENT`)."""

    def __init__(self, k: Kernel, claim: Claim) -> None:
        self.k = k
        self.claim = claim
        self.store_failed = False

    async def __call__(self) -> None:
        try:
            await _to_transmitting(self.k, self.claim)
        except StoreError:
            self.store_failed = True
            _not_sent(self.k).add(self.claim.entry_id)
            log.warning(
                "database failed while recording a send; the message did not leave "
                "and is sent later",
                extra={"outbox_id": self.claim.entry_id},
            )
            raise


def _checkpoint(k: Kernel, claim: Claim) -> _Checkpoint:
    return _Checkpoint(k, claim)


async def _to_transmitting(k: Kernel, claim: Claim) -> None:
    """Commit "transmitting" only while this worker still holds the lease: if it
    ran out (a server slower than ``lease_seconds`` before DATA) and another
    worker took the entry, sending here as well would duplicate the message."""

    def work(session: Session, _events: EventBuffer) -> int:
        moved = session.execute(
            update(OutboxEntry)
            .where(
                OutboxEntry.id == claim.entry_id,
                OutboxEntry.status == OutboxStatus.CLAIMED,
                OutboxEntry.lease_owner == k.worker,
            )
            .values(status=OutboxStatus.TRANSMITTING)
            .execution_options(synchronize_session=False)
        )
        return int(moved.rowcount)  # type: ignore[attr-defined]

    if await k.unit_of_work(work) != 1:
        raise LeaseLost(f"outbox entry {claim.entry_id} was taken over by another worker")


async def _deliver_default(k: Kernel, claim: Claim) -> SendStatus:
    if claim.was_transmitting:
        await _mark_sent(k, claim, True)
        return SendStatus.SENT
    channel = k.settings.default_channel
    password = k.environ.get(channel.password_env) if channel.password_env else None
    checkpoint = _checkpoint(k, claim)
    try:
        await send_via_relay(channel, claim.mail, password, checkpoint)
    except StoreError:
        if not checkpoint.store_failed:
            raise
        return SendStatus.QUEUED
    except ProviderProtocolError as exc:
        await _fail(k, claim, str(exc))
        return SendStatus.QUEUED
    except DeliveryUnconfirmed as exc:
        await _unconfirmed(k, claim, exc)
        return SendStatus.QUEUED
    except ProviderError as exc:
        log.warning("default channel failed: %s", exc, extra={"outbox_id": claim.entry_id})
        await _release(k, claim, str(exc))
        return SendStatus.QUEUED
    await _mark_sent(k, claim, True)
    return SendStatus.SENT


async def _mark_sent(k: Kernel, claim: Claim, copy_stored: bool) -> None:
    """Record that the message left, with its ``message.synced`` event unless a
    disconnect turned it into a skipped one meanwhile."""

    def work(session: Session, events: EventBuffer) -> None:
        session.execute(
            update(OutboxEntry)
            .where(OutboxEntry.id == claim.entry_id)
            .values(
                status=OutboxStatus.SENT,
                sent_at=utcnow(),
                sent_copy_stored=copy_stored,
                lease_owner=None if copy_stored else k.worker,
                last_error=None,
            )
            .execution_options(synchronize_session=False)
        )
        if claim.synced_event is not None:
            state = session.scalar(select(Message.state).where(Message.id == claim.message_pk))
            if state == MessageState.SYNCED:
                subaccount, payload = claim.synced_event
                events.record(session, subaccount, MESSAGE_SYNCED, payload)

    await k.unit_of_work(work)
    thread_id = claim.synced_event[1]["thread_id"] if claim.synced_event else None
    log.info(
        "CRM message sent",
        extra={
            "outbox_id": claim.entry_id,
            "channel": claim.channel,
            "connection_id": claim.connection_id,
            "thread_id": thread_id,
            "message_id": claim.mail.message_id,
            "direction": "outbound",
        },
    )


async def _fail(k: Kernel, claim: Claim, error: str) -> None:
    await _update(k, claim.entry_id, status=OutboxStatus.FAILED, last_error=error, lease_owner=None)


def _mailbox_ready(
    session: Session, conn_id: int | None, provider_open: bool, now: datetime
) -> Connection | None:
    """The connection when its mailbox may be used now: one that is worked on
    (:func:`~threadsync.core.rules.worked_connections`). With a provider the daemon
    just opened, a connection in ``error`` is usable (it is recovering); for a
    one-off delivery it must be ``connected`` and past any backoff."""
    if not conn_id:
        return None
    conn = session.scalar(
        select(Connection).where(Connection.id == conn_id, rules.worked_connections())
    )
    if conn is None:
        return None
    if provider_open:
        return conn
    ready = conn.state == ConnectionState.CONNECTED and rules.due(conn.next_attempt_at, now)
    return conn if ready else None


async def _deliver_mailbox(k: Kernel, claim: Claim, provider: Provider | None) -> SendStatus:
    try:
        if provider is not None:
            return await _transmit(k, claim, provider)
        async with k.pool.borrow(claim.connection_id or 0, claim.connection) as pooled:
            return await _transmit(k, claim, pooled)
    except ProviderError as exc:
        await _connection_failed(k, claim, exc)
        return await _status(k, claim.entry_id)


async def _transmit(k: Kernel, claim: Claim, provider: Provider) -> SendStatus:
    """Send (unless a crash may already have sent it), then file the Sent copy."""
    if not (claim.was_transmitting or claim.already_sent):
        checkpoint = _checkpoint(k, claim)
        try:
            await provider.send(claim.mail, checkpoint)
        except StoreError:
            if not checkpoint.store_failed:
                raise
            return SendStatus.QUEUED  # not sent; the outbox keeps it (see _NOT_SENT)
        except ProviderProtocolError as exc:
            await _fail(k, claim, str(exc))
            return SendStatus.QUEUED
        if provider.files_sent_copy:
            await _mark_sent(k, claim, True)
            return SendStatus.SENT
        # Filed in Sent first, then one commit records both; a crash in between
        # leaves "transmitting", which never sends again and checks Sent.
        try:
            await provider.store_sent_copy(claim.mail)
        except ProviderError:
            await _mark_sent(k, claim, False)
            raise
        await _mark_sent(k, claim, True)
        return SendStatus.SENT
    elif claim.was_transmitting:
        # It may have left before the crash: never send again (R9).
        await _mark_sent(k, claim, provider.files_sent_copy)
    if not provider.files_sent_copy and not claim.sent_copy_stored:
        # Only a recovery can find a copy already filed; a fresh send skips the search.
        recovering = claim.was_transmitting or claim.already_sent
        if not recovering or not await provider.find_sent(claim.mail.message_id):
            await provider.store_sent_copy(claim.mail)
        await _update(k, claim.entry_id, sent_copy_stored=True, lease_owner=None)
    return SendStatus.SENT


async def _connection_failed(k: Kernel, claim: Claim, exc: ProviderError) -> None:
    def work(session: Session, events: EventBuffer) -> None:
        entry = session.get(OutboxEntry, claim.entry_id)
        if entry is not None and entry.lease_owner != k.worker:
            entry = None  # another worker holds it now: its state is not ours to change
        if entry is not None and isinstance(exc, DeliveryUnconfirmed):
            if entry.status == OutboxStatus.TRANSMITTING:
                _record_unconfirmed(session, entry, exc)
        elif entry is not None and entry.status in LEASED:
            # Any other error raised by the provider means the server did not take it.
            entry.status = OutboxStatus.PENDING
            entry.attempts = (entry.attempts or 0) + 1
            entry.last_error = str(exc)
        if entry is not None:
            entry.lease_owner = None
            entry.lease_until = None
        if claim.connection_id is not None:
            k.record_failure(session, events, claim.connection_id, exc)

    await k.unit_of_work(work)


async def _unconfirmed(k: Kernel, claim: Claim, exc: DeliveryUnconfirmed) -> None:
    def work(session: Session, _events: EventBuffer) -> None:
        entry = session.get(OutboxEntry, claim.entry_id)
        if entry is not None and entry.lease_owner == k.worker:
            _record_unconfirmed(session, entry, exc)

    await k.unit_of_work(work)


def _record_unconfirmed(session: Session, entry: OutboxEntry, exc: DeliveryUnconfirmed) -> None:
    """The message may have left: keep ``transmitting`` (never sent again, settled
    by the next claim as after a crash), release the lease, say so on the message."""
    entry.lease_owner = None
    entry.lease_until = None
    entry.last_error = f"{DELIVERY_UNCONFIRMED}: {exc}"
    msg = session.get(Message, entry.message_pk)
    if msg is not None:
        msg.reason = DELIVERY_UNCONFIRMED
    log.warning(
        "delivery unconfirmed: the answer to the end of the message was lost; "
        "it is not sent again",
        extra={"outbox_id": entry.id, "reason": DELIVERY_UNCONFIRMED},
    )


def _due_clause(now: datetime) -> Any:
    return or_(
        (OutboxEntry.status == OutboxStatus.PENDING)
        & (or_(OutboxEntry.next_attempt_at.is_(None), OutboxEntry.next_attempt_at <= now)),
        OutboxEntry.status.in_(LEASED),
        (OutboxEntry.status == OutboxStatus.SENT)
        & (OutboxEntry.channel == "mailbox")
        & (OutboxEntry.sent_copy_stored.is_(False)),
    )


async def connections_with_due_mail(k: Kernel) -> list[int]:
    """Connections that have outbox entries to work on now."""
    now = utcnow()

    def work(session: Session, _events: EventBuffer) -> list[int]:
        query = (
            select(OutboxEntry.connection_id)
            .where(_due_clause(now), OutboxEntry.connection_id.is_not(None))
            .distinct()
        )
        return [c for c in session.scalars(query).all() if c is not None]

    return await k.unit_of_work(work)


async def due_entries(k: Kernel, connection_id: int | None) -> list[int]:
    """Entries to try now: pending and due, stale leases, sent copies not filed."""
    now = utcnow()

    def work(session: Session, _events: EventBuffer) -> list[int]:
        query = select(OutboxEntry.id).where(_due_clause(now))
        if connection_id is None:
            query = query.where(OutboxEntry.channel == "default")
        else:
            query = query.where(OutboxEntry.connection_id == connection_id)
        return list(session.scalars(query.order_by(OutboxEntry.id)).all())

    return await k.unit_of_work(work)
