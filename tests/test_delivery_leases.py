"""Outbox leases between workers: a worker whose lease ran out before the point
of no return never sends (the worker that took the entry over does), an entry
claimed by a worker that vanished goes to the worker now holding its mailbox, and
a CRM send claims its entry in the transaction that writes it."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from tests.kernelfixtures import CONTACT, SUB, USER, World
from threadsync.core.outbox import delivery
from threadsync.core.outbox.compose import Draft
from threadsync.core.store.models import Connection, OutboxEntry, Worker, utcnow
from threadsync.core.sync.workers import WorkerLeases

pytestmark = pytest.mark.parametrize(
    "scenario_database_url", ["sqlite", "postgresql"], indirect=True
)


def _entry(world: World) -> OutboxEntry:
    return world.ts.kernel.store.call(
        lambda s: s.scalars(select(OutboxEntry).order_by(OutboxEntry.id.desc())).first()
    )


async def test_a_worker_that_lost_its_lease_does_not_send(world: World) -> None:
    await world.connect()
    k_a = world.ts.kernel
    k_b = dataclasses.replace(k_a, worker="another-host:4242")
    store = k_a.store
    # The mailbox is in backoff: the send is queued for the daemon.
    store.call(lambda s: s.execute(
        update(Connection).values(next_attempt_at=utcnow() + timedelta(hours=1))
    ))  # fmt: skip
    sent = await world.ts.send(SUB, USER, Draft(to=[CONTACT], subject="Lease", text="once"))
    assert sent["status"] == "queued"
    store.call(lambda s: s.execute(update(Connection).values(next_attempt_at=None)))
    entry_id = _entry(world).id

    claim_a = store.call(lambda s: delivery.claim_in(s, k_a, entry_id, False))
    assert claim_a is not None
    # A stalls past its lease; B finds the lease dead and takes the entry.
    store.call(lambda s: s.execute(
        update(OutboxEntry).values(lease_until=utcnow() - timedelta(seconds=1))
    ))  # fmt: skip
    claim_b = store.call(lambda s: delivery.claim_in(s, k_b, entry_id, False))
    assert claim_b is not None

    before = len(world.submission.received)
    assert await delivery.deliver_claim(k_a, claim_a) == "queued"
    assert len(world.submission.received) == before  # A stopped before DATA
    assert _entry(world).lease_owner == k_b.worker  # and left B's lease alone
    assert await delivery.deliver_claim(k_b, claim_b) == "sent"
    ids = [r.message_id for r in world.submission.received[before:]]
    assert ids == [sent["message_id"].strip("<>")]
    assert _entry(world).status == "sent"


async def test_a_crm_send_claims_its_entry_with_the_message(world: World) -> None:
    await world.connect()
    sent = await world.ts.send(SUB, USER, Draft(to=[CONTACT], subject="Claimed", text="hi"))
    assert sent["status"] == "sent"
    entry = _entry(world)
    assert (entry.status, entry.lease_owner, entry.sent_copy_stored) == ("sent", None, True)
    assert entry.attempts == 0


async def test_the_holder_of_a_mailbox_takes_over_an_entry_claimed_by_a_gone_worker(
    world: World,
) -> None:
    """A worker on another machine claimed a CRM message and vanished: the worker
    that took its mailbox over sends it when the worker is gone, not after the
    outbox lease (which may be longer than the takeover) ran out."""
    await world.connect()
    k = world.ts.kernel
    gone = dataclasses.replace(k, worker="another-host:4242")
    store = k.store
    store.call(lambda s: s.execute(
        update(Connection).values(next_attempt_at=utcnow() + timedelta(hours=1))
    ))  # fmt: skip
    sent = await world.ts.send(SUB, USER, Draft(to=[CONTACT], subject="Gone", text="once"))
    assert sent["status"] == "queued"
    store.call(lambda s: s.execute(update(Connection).values(next_attempt_at=None)))
    entry_id = _entry(world).id
    claim_gone = store.call(lambda s: delivery.claim_in(s, gone, entry_id, False))
    assert claim_gone is not None

    # This process becomes the worker holding the mailbox.
    leases = WorkerLeases(k)
    await asyncio.to_thread(leases.register)

    async def stop(conn_ids: list[int]) -> None:
        raise AssertionError(f"nothing to give up, asked to stop {conn_ids}")

    assert len(await leases.share(stop)) == 1
    # While the other worker still beats, its claim stands.
    now = utcnow()
    store.call(lambda s: s.add(Worker(
        id=gone.worker, host="another-host", pid=4242, started_at=now, heartbeat_at=now
    )))  # fmt: skip
    assert store.call(lambda s: delivery.claim_in(s, k, entry_id, False)) is None
    # Its heartbeat stops: the holder of the mailbox takes the entry over.
    old = now - timedelta(seconds=k.settings.sync.worker_lease_seconds + 1)
    store.call(lambda s: s.execute(
        update(Worker).where(Worker.id == gone.worker).values(heartbeat_at=old)
    ))  # fmt: skip
    claim = store.call(lambda s: delivery.claim_in(s, k, entry_id, False))
    assert claim is not None

    before = len(world.submission.received)
    assert await delivery.deliver_claim(k, claim) == "sent"
    # The vanished worker comes back: it must not send it again.
    assert await delivery.deliver_claim(gone, claim_gone) == "sent"
    ids = [r.message_id for r in world.submission.received[before:]]
    assert ids == [sent["message_id"].strip("<>")]
    await asyncio.to_thread(leases.leave)
