"""Webhooks end to end: a real receiving HTTP server on loopback verifies every
signature, fails for a while and recovers; every event arrives, in order per
thread, nothing lost; dead letters are visible and can be retried; events that
become visible out of id order (PostgreSQL) still go out in id order, none skipped."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest
from sqlalchemy import Connection, create_engine, func, select, text

from tests.kernelfixtures import CONTACT, SUB, USER, World
from tests.test_http_api_support import (  # noqa: F401 (fixtures)
    LOOPBACK,
    OTHER,
    Api,
    Receiver,
    http_settings,
    receiver_fixture,
    wait_for,
)
from threadsync.core.host import webhooks
from threadsync.core.host.webhooks import WebhookSettings
from threadsync.core.outbox.compose import Draft
from threadsync.core.store.models import WebhookDelivery, utcnow
from threadsync.plugins.http_api.app import create_app
from threadsync.plugins.http_api.dispatcher import Dispatcher
from threadsync.plugins.http_api.server import ThreadedServer
from threadsync.plugins.http_api.signatures import sign, verify

FAST = WebhookSettings(
    timeout_seconds=2,
    backoff_base_seconds=0.05,
    backoff_max_seconds=0.3,
    poll_seconds=0.1,
    settle_seconds=0,
    lease_seconds=10,
    allowed_networks=LOOPBACK,
)


@contextlib.asynccontextmanager
async def serving(world: World, settings: WebhookSettings) -> AsyncIterator[tuple[Api, Dispatcher]]:
    """The API in a uvicorn thread, the dispatcher on this loop (as under ``run``)."""
    from threadsync.core.host import apikeys

    dispatcher = Dispatcher(world.ts.webhooks, settings)
    world.ts.kernel.pm.register(dispatcher)
    http = http_settings(webhooks=settings)
    app, _ = create_app(world.ts, http, wake_webhooks=dispatcher.wake)
    server = ThreadedServer(app, http).start()
    task = asyncio.create_task(dispatcher.run())
    store = world.ts.kernel.store
    api = Api(
        server.url,
        apikeys.create(store, None)["key"],
        apikeys.create(store, SUB)["key"],
        apikeys.create(store, OTHER)["key"],
        world,
    )
    try:
        yield api, dispatcher
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        server.stop()
        world.ts.kernel.pm.unregister(dispatcher)


def subscribe(api: Api, receiver: Receiver, key: str, subaccount: str = SUB, **body: Any) -> int:
    with api.client(key) as c:
        r = c.post(f"/v1/subaccounts/{subaccount}/webhooks", json={"url": receiver.url, **body})
        assert r.status_code == 201, r.text
        made = r.json()
    assert made["secret"].startswith("whsec_")
    receiver.secret = made["secret"]
    return int(made["id"])


def in_order_per_thread(got: list[Any]) -> dict[str, list[int]]:
    """Event ids per ordering key, in arrival order (duplicates kept)."""
    seen: dict[str, list[int]] = {}
    for r in got:
        key = webhooks.ordering_key(r.body)
        seen.setdefault(key, []).append(r.event_id)
    return seen


@pytest.mark.parametrize("scenario_database_url", ["sqlite", "postgresql"], indirect=True)
async def test_outage_then_recovery_every_event_in_order(world: World, receiver: Receiver) -> None:
    async with serving(world, FAST) as (api, _):
        subscribe(api, receiver, api.key)
        other = Receiver().start()
        try:
            subscribe(api, other, api.other, OTHER)
            receiver.failing = True
            await world.connect()
            threads = []
            with api.client(api.key) as c:
                for i in range(4):
                    body = {"to": [CONTACT], "subject": f"Offer {i}", "text": "hello"}
                    r = c.post(f"/v1/subaccounts/{SUB}/users/{USER}/send", json=body)
                    threads.append(r.json())
            for sent in threads:
                for n in range(3):
                    world.contact_replies(sent["message_id"], body=f"reply {n}")
            await world.ts.run_once()
            await world.ts.disconnect(SUB, USER)
            await world.ts.send(OTHER, USER, Draft(to=[CONTACT], subject="B", text="b"))
            await wait_for(lambda: receiver.refused >= 10, 20, "failed attempts")
            receiver.failing = False

            expected = [e["id"] for e in world.ts.events(SUB, limit=1000)["events"]]
            assert len(expected) >= 4 * 3 + 4 + 2
            await wait_for(lambda: len(receiver.unique()) >= len(expected), 30, "all events")
            await wait_for(lambda: len(other.unique()) == 1, 10, "the other tenant's event")
        finally:
            other.stop()
        got = receiver.unique()
        assert sorted(r.event_id for r in got) == expected
        assert all(r.signature_ok for r in receiver.got)
        assert {r.body["subaccount"] for r in got} == {SUB}  # R10
        assert other.unique()[0].body["subaccount"] == OTHER
        for key, ids in in_order_per_thread(receiver.got).items():
            assert ids == sorted(ids), (key, ids)
        synced = [r.body for r in got if r.body["event"] == "message.synced"]
        assert synced and set(synced[0]) >= {"id", "event", "subaccount", "thread_id", "message"}
        assert max(r.attempt for r in receiver.got) > 1

        def recorded() -> bool:  # outcomes are stored when a chain is done
            return webhooks.backlog(world.ts.kernel)["counts"]["pending"] == 0

        await wait_for(recorded, 10, "the outcomes to be stored")
        with api.client(api.key) as c:
            deliveries = c.get(f"/v1/subaccounts/{SUB}/webhook-deliveries",
                               params={"limit": 1000}).json()["deliveries"]  # fmt: skip
            assert {d["status"] for d in deliveries} == {"delivered"}
            assert any(d["attempts"] > 1 for d in deliveries)


async def test_dead_letters_are_listed_and_retried(world: World, receiver: Receiver) -> None:
    settings = WebhookSettings(
        timeout_seconds=2, backoff_base_seconds=0.05, backoff_max_seconds=0.1,
        poll_seconds=0.05, settle_seconds=0, retry_hours=0.5 / 3600, allowed_networks=LOOPBACK,
    )  # fmt: skip
    async with serving(world, settings) as (api, _):
        endpoint = subscribe(api, receiver, api.key, events=["message.skipped"])
        receiver.failing = True
        first = await world.ts.send(SUB, USER, Draft(to=[CONTACT], subject="x", text="1"))
        await world.ts.reply(first["thread_id"], Draft(text="2"))
        with api.client(api.key) as c:
            url = f"/v1/subaccounts/{SUB}/webhook-deliveries"

            def dead() -> list[dict[str, Any]]:
                return list(c.get(url, params={"status": "dead"}).json()["deliveries"])

            await wait_for(lambda: len(dead()) == 2, 20, "two dead letters")
            letters = dead()
            assert all(d["last_status_code"] == 500 for d in letters)
            assert letters[0]["attempts"] >= 2  # retried until its window closed
            assert letters[0]["event_id"] < letters[1]["event_id"]
            receiver.failing = False
            retried = c.post(f"{url}/{letters[0]['id']}/retry").json()
            assert retried["status"] == "pending"
            await wait_for(lambda: len(receiver.unique()) == 1, 10, "the retried delivery")
            assert receiver.unique()[0].event_id == letters[0]["event_id"]
            assert [d["id"] for d in dead()] == [letters[1]["id"]]

            # Deleting the endpoint: what was pending for it is dead, not lost silently.
            receiver.failing = True
            await world.ts.reply(first["thread_id"], Draft(text="3"))
            await wait_for(lambda: receiver.refused >= 3, 10, "a failing attempt")
            assert c.delete(f"/v1/subaccounts/{SUB}/webhooks/{endpoint}").status_code == 200
            assert c.get(f"/v1/subaccounts/{SUB}/webhooks").json() == {"webhooks": []}
            assert dead()[-1]["last_error"] == "endpoint deleted"
            assert c.get(f"/v1/subaccounts/{SUB}/webhooks/{endpoint}").status_code == 404


def test_signatures() -> None:
    header = sign("whsec_k", b'{"id":1}', 1_700_000_000)
    assert header.startswith("t=1700000000,v1=")
    assert verify("whsec_k", b'{"id":1}', header, now=1_700_000_100)
    assert not verify("whsec_k", b'{"id":2}', header, now=1_700_000_100)  # body changed
    assert not verify("whsec_other", b'{"id":1}', header, now=1_700_000_100)
    assert not verify("whsec_k", b'{"id":1}', header, now=1_700_000_400)  # replayed late
    assert not verify("whsec_k", b'{"id":1}', "v1=abc", now=1_700_000_000)


def insert_event(conn: Connection, thread_id: str) -> int:
    """An event of ``thread_id`` written in ``conn``'s open transaction, as the kernel
    writes them (its time from the writer's clock); returns its id."""
    payload = {"event": "thread.stopped", "subaccount": SUB, "thread_id": thread_id}
    return int(
        conn.execute(
            text(
                "INSERT INTO events (subaccount_id, type, payload, created_at) "
                "VALUES (:s, 'thread.stopped', CAST(:p AS json), :t) RETURNING id"
            ),
            {"s": SUB, "p": json.dumps(payload), "t": utcnow()},
        ).scalar_one()
    )


async def delivered_ids(world: World, receiver: Receiver, settings: WebhookSettings,
                        count: int) -> list[int]:  # fmt: skip
    """Run the dispatcher until ``count`` events arrived and were recorded as
    delivered; their ids in arrival order."""
    dispatcher = Dispatcher(world.ts.webhooks, settings)
    task = asyncio.create_task(dispatcher.run())

    def recorded() -> int:
        return int(world.ts.kernel.store.call(lambda s: s.scalar(
            select(func.count()).select_from(WebhookDelivery)
            .where(WebhookDelivery.status == "delivered")
        )))  # fmt: skip

    try:
        await wait_for(
            lambda: len(receiver.got) >= count and recorded() >= count, 10, f"{count} deliveries"
        )
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return [r.event_id for r in receiver.got]


@pytest.mark.parametrize("scenario_database_url", ["postgresql"], indirect=True)
async def test_events_committed_out_of_id_order_go_out_in_id_order(
    world: World, receiver: Receiver, scenario_database_url: str
) -> None:
    """PostgreSQL hands out ids before commit: of two transactions writing events of
    one thread, the later id may commit first. The enqueuer waits at the gap, so
    the thread's events are delivered in id order and none is lost."""
    k = world.ts.kernel
    receiver.secret = webhooks.create_endpoint(k, SUB, receiver.url)["secret"]
    settings = replace(FAST, settle_seconds=60)
    engine = create_engine(scenario_database_url)
    try:
        with engine.connect() as a, engine.connect() as b:
            first = insert_event(a, "th_a")  # transaction A: id N, open
            second = insert_event(b, "th_a")  # transaction B: id N+1
            assert first < second
            b.commit()
            assert webhooks.enqueue(k, settings) == 0  # N+1 waits for N
            a.commit()
        assert webhooks.enqueue(k, settings) == 2
        assert webhooks.enqueue(k, settings) == 0
    finally:
        engine.dispose()
    assert await delivered_ids(world, receiver, settings, 2) == [first, second]
    rows = webhooks.list_deliveries(k, SUB)["deliveries"]
    assert [(d["event_id"], d["status"]) for d in rows] == [
        (first, "delivered"),
        (second, "delivered"),
    ]


@pytest.mark.parametrize("scenario_database_url", ["postgresql"], indirect=True)
async def test_a_rolled_back_event_holds_the_queue_only_for_the_settle_time(
    world: World, receiver: Receiver, scenario_database_url: str
) -> None:
    k = world.ts.kernel
    receiver.secret = webhooks.create_endpoint(k, SUB, receiver.url)["secret"]
    settings = replace(FAST, settle_seconds=2)
    engine = create_engine(scenario_database_url)
    try:
        with engine.connect() as a, engine.connect() as b:
            insert_event(a, "th_a")
            second = insert_event(b, "th_a")
            b.commit()
            assert webhooks.enqueue(k, settings) == 0
            a.rollback()  # the gap never fills
    finally:
        engine.dispose()
    await wait_for(lambda: webhooks.enqueue(k, settings) == 1, 10, "the settle time")
    assert await delivered_ids(world, receiver, settings, 1) == [second]
