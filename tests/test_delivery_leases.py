"""Outbox leases between workers: a worker whose lease ran out before the point
of no return never sends (the worker that took the entry over does), and a
CRM send claims its entry in the transaction that writes it."""

from __future__ import annotations

import dataclasses
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from tests.kernelfixtures import CONTACT, SUB, USER, World
from threadsync.core.outbox import delivery
from threadsync.core.outbox.compose import Draft
from threadsync.core.store.models import Connection, OutboxEntry, utcnow

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
