"""Idempotent sends and replies, in the kernel and over HTTP, on SQLite and
PostgreSQL: one key, one message, whatever happened to the first request."""

from __future__ import annotations

import asyncio
import hashlib
from datetime import timedelta

import pytest
from sqlalchemy import update

from tests.kernelfixtures import CONTACT, SUB, USER, World
from tests.test_http_api_support import (  # noqa: F401 (fixtures)
    Api,
    api_factory_fixture,
    api_fixture,
)
from threadsync.core.errors import InvalidInput
from threadsync.core.host import apikeys
from threadsync.core.outbox.compose import Draft
from threadsync.core.store.models import Connection, utcnow

pytestmark = pytest.mark.parametrize(
    "scenario_database_url", ["sqlite", "postgresql"], indirect=True
)
DRAFT = Draft(to=[CONTACT], subject="Once", text="only once")


def _backoff(world: World, hours: float) -> None:
    """Put the mailbox in backoff (one-off sends then wait for the daemon), or
    take it out with ``hours=0``."""
    until = utcnow() + timedelta(hours=hours) if hours else None
    world.ts.kernel.store.call(
        lambda s: s.execute(update(Connection).values(next_attempt_at=until))
    )


async def test_the_kernel_sends_once_per_key(world: World) -> None:
    await world.connect()
    first = await world.ts.send(SUB, USER, DRAFT, idempotency_key="crm-1")
    again = await world.ts.send(SUB, USER, DRAFT, idempotency_key="crm-1")
    assert first == again and first["status"] == "sent"
    assert len(world.submission.by_message_id(first["message_id"])) == 1
    # Concurrent calls with one key: one message, every caller gets it.
    burst = await asyncio.gather(
        *(world.ts.send(SUB, USER, DRAFT, idempotency_key="crm-2") for _ in range(5))
    )
    assert len({r["message_id"] for r in burst}) == 1
    assert len(world.submission.by_message_id(burst[0]["message_id"])) == 1
    # Replies too; keys are per sub-account, and no key means a new message.
    reply = await world.ts.reply(first["thread_id"], Draft(text="r"), idempotency_key="crm-1")
    assert reply["thread_id"] == first["thread_id"]
    assert reply["message_id"] != first["message_id"]
    assert reply == await world.ts.reply(first["thread_id"], Draft(text="r"),
                                         idempotency_key="crm-1")  # fmt: skip
    other = await world.ts.send("other-sub", USER, DRAFT, idempotency_key="crm-1")
    assert other["message_id"] != first["message_id"]
    plain = [await world.ts.send(SUB, USER, DRAFT) for _ in range(2)]
    assert plain[0]["message_id"] != plain[1]["message_id"]
    assert len(world.ts.threads(SUB)["threads"]) == 4  # crm-1, crm-2 and the two plain
    with pytest.raises(InvalidInput):
        await world.ts.send(SUB, USER, DRAFT, idempotency_key="bad\nkey")


async def test_a_repeated_key_delivers_what_the_first_call_left_queued(world: World) -> None:
    await world.connect()
    _backoff(world, 1)
    queued = await world.ts.send(SUB, USER, DRAFT, idempotency_key="crm-q")
    assert queued["status"] == "queued" and world.submission.received == []
    _backoff(world, 0)
    again = await world.ts.send(SUB, USER, DRAFT, idempotency_key="crm-q")
    assert again == {**queued, "status": "sent"}
    assert len(world.submission.by_message_id(queued["message_id"])) == 1


def _died(api: Api, key: str, body: bytes) -> None:
    """What a request that died mid-way leaves behind: its key taken, no answer."""
    url = f"/v1/subaccounts/{SUB}/users/{USER}/send"
    fingerprint = hashlib.sha256(b"POST " + url.encode() + b"\n" + body).hexdigest()
    store = api.world.ts.kernel.store
    assert apikeys.begin(store, SUB, key, fingerprint) is None


async def test_a_retry_after_the_first_request_died_sends_once(api: Api, world: World) -> None:
    await world.connect()
    url = f"/v1/subaccounts/{SUB}/users/{USER}/send"
    body = b'{"to": ["' + CONTACT.encode() + b'"], "subject": "Once", "text": "x"}'
    headers = {"Content-Type": "application/json"}
    with api.client(api.key) as c:
        # Died after storing the message, before delivering it.
        _died(api, "died-after", body)
        _backoff(world, 1)
        stored = await world.ts.send(SUB, USER, Draft(to=[CONTACT], subject="Once", text="x"),
                                     idempotency_key="died-after")  # fmt: skip
        _backoff(world, 0)
        r = c.post(url, content=body, headers={**headers, "Idempotency-Key": "died-after"})
        assert r.status_code == 201, r.text
        assert r.json() == {**stored, "status": "sent"}
        assert len(world.submission.by_message_id(stored["message_id"])) == 1

        # Died before storing anything: the retry sends it, once.
        _died(api, "died-before", body)
        r = c.post(url, content=body, headers={**headers, "Idempotency-Key": "died-before"})
        assert r.status_code == 201 and r.json()["status"] == "sent", r.text
        again = c.post(url, content=body, headers={**headers, "Idempotency-Key": "died-before"})
        assert again.json() == r.json() and again.headers["idempotent-replayed"] == "true"
        assert len(world.submission.by_message_id(r.json()["message_id"])) == 1
    assert len(world.ts.threads(SUB)["threads"]) == 2
