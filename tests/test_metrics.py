"""``/metrics``: provider errors per kind, from the error codes the kernel records
on ``connection.state_changed`` events, the same after a restart; the live
workers and the connections each holds."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy.orm import Session

from tests.kernelfixtures import SUB, USER, World
from tests.test_http_api_support import (  # noqa: F401 (fixtures)
    Api,
    api_factory_fixture,
    api_fixture,
    http_settings,
    synced_thread,
)
from threadsync.core.api import Threadsync
from threadsync.core.outbox.compose import Draft
from threadsync.core.store.models import Event
from threadsync.core.sync.workers import WorkerLeases
from threadsync.plugins.http_api import metrics
from threadsync.plugins.http_api.context import ApiContext


def provider_errors(text: str) -> dict[str, int]:
    prefix = 'threadsync_provider_errors_total{kind="'
    found: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith(prefix):
            kind, value = line[len(prefix) :].split('"} ')
            found[kind] = int(value)
    return found


@pytest.mark.parametrize("scenario_database_url", ["sqlite", "postgresql"], indirect=True)
async def test_provider_errors_by_kind_from_error_codes(api: Api, world: World) -> None:
    with api.client(api.admin) as admin:
        zero = provider_errors(admin.get("/metrics").text)
    assert zero == {
        "authentication_failed": 0,
        "provider_error": 0,
        "provider_protocol_error": 0,
        "transient_provider_error": 0,
        "unexpected_failure": 0,
    }

    sent = await synced_thread(world)
    # The mailbox password changes: rejected credentials.
    world.imap.add_user(world.email, "rotated-password")
    world.submission.users[world.email] = "rotated-password"
    await world.ts.run_once()
    world.ts.kernel.environ["MAILPW"] = "rotated-password"
    await world.connect()
    # The mailbox's SMTP server goes away: a CRM reply fails for now and is queued.
    port = world.submission.port
    world.submission.stop()
    queued = await world.ts.reply(sent["thread_id"], Draft(text="queued"))
    world.submission.port = port
    world.submission.start()
    assert queued["status"] == "queued"
    assert world.ts.status(SUB, USER)["connections"][0]["state"] == "error"

    changes = world.recorder.of("connection.state_changed")
    assert [(e["state"], e["error_code"]) for e in changes] == [
        ("connected", None),
        ("needs_reauth", "authentication_failed"),
        ("connected", None),
        ("error", "transient_provider_error"),
    ]

    # An event recorded before error codes existed counts by the state it caused.
    def legacy(session: Session) -> None:
        payload = {"event": "connection.state_changed", "subaccount": SUB, "state": "error"}
        session.add(Event(subaccount_id=SUB, type="connection.state_changed", payload=payload))

    world.ts.kernel.store.call(legacy)
    expected = {
        "authentication_failed": 1,
        "provider_error": 1,
        "provider_protocol_error": 0,
        "transient_provider_error": 1,
        "unexpected_failure": 0,
    }
    with api.client(api.admin) as admin:
        assert provider_errors(admin.get("/metrics").text) == expected

    # Counted from the database: a restarted process shows the same numbers.
    restarted = Threadsync.from_settings(world.ts.kernel.settings, environ=world.env)
    try:
        text = metrics.collect(ApiContext.build(restarted, http_settings()), None)
    finally:
        await restarted.aclose()
    assert provider_errors(text) == expected


async def test_live_workers_and_the_connections_each_holds(api: Api, world: World) -> None:
    await world.connect()
    with api.client(api.admin) as admin:
        lines = admin.get("/metrics").text.splitlines()
    assert "threadsync_workers 0" in lines
    assert world.ts.status(SUB, USER)["connections"][0]["worker"] is None

    leases = WorkerLeases(world.ts.kernel)
    await asyncio.to_thread(leases.register)

    async def stop(conn_ids: list[int]) -> None:
        raise AssertionError(f"nothing to give up, asked to stop {conn_ids}")

    assert await leases.share(stop) == {world.ts.status(SUB, USER)["connections"][0]["id"]}
    with api.client(api.admin) as admin:
        lines = admin.get("/metrics").text.splitlines()
    assert "threadsync_workers 1" in lines
    assert f'threadsync_worker_connections{{worker="{leases.id}"}} 1' in lines
    assert world.ts.status(SUB, USER)["connections"][0]["worker"] == leases.id
    [shown] = world.ts.workers()["workers"]
    assert (shown["id"], shown["live"], shown["connections"]) == (leases.id, True, 1)

    await asyncio.to_thread(leases.leave)
    assert world.ts.workers() == {"workers": []}
    assert world.ts.status(SUB, USER)["connections"][0]["worker"] is None
