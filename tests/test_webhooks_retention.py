"""The retention sweep: finished webhook deliveries and idempotency records past
their retention are deleted, a batch per statement, by the dispatcher; pending
deliveries and recent rows stay. On SQLite and PostgreSQL, with back-dated rows."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from tests.kernelfixtures import SUB, World
from tests.test_http_api_support import wait_for
from threadsync.core.host import apikeys, webhooks
from threadsync.core.host.webhooks import WebhookSettings
from threadsync.core.store.models import IdempotencyRecord, WebhookDelivery, utcnow
from threadsync.plugins.http_api.dispatcher import Dispatcher

SETTINGS = WebhookSettings(
    delivered_retention_days=7, dead_retention_days=30, idempotency_hours=24, poll_seconds=0.05
)


def backdate(world: World, endpoint_id: int, rows: list[tuple[str, float | None]]) -> None:
    """Deliveries of ``endpoint_id``: (status, finished so many days ago)."""
    now = utcnow()

    def work(session: Session) -> None:
        first = session.scalar(select(func.max(WebhookDelivery.event_id))) or 0
        for n, (status, days) in enumerate(rows, start=first + 1):
            created = now - timedelta(days=60)
            session.add(
                WebhookDelivery(
                    endpoint_id=endpoint_id, event_id=n, subaccount_id=SUB,
                    event_type="thread.stopped", ordering_key=f"thread:{n}", status=status,
                    attempts=1, next_attempt_at=now + timedelta(days=1),  # not claimed here
                    retry_from=created, created_at=created,
                    finished_at=None if days is None else now - timedelta(days=days),
                )
            )  # fmt: skip

    world.ts.kernel.store.call(work)


def keys(world: World, ages_hours: dict[str, float]) -> None:
    now = utcnow()
    world.ts.kernel.store.call(
        lambda s: s.add_all(
            IdempotencyRecord(subaccount_id=SUB, key=key, request_hash="h", state="done",
                              status_code=201, response={}, created_at=now - timedelta(hours=h))
            for key, h in ages_hours.items()
        )
    )  # fmt: skip


def remaining(world: World) -> dict[str, Any]:
    def work(session: Session) -> dict[str, Any]:
        statuses = session.scalars(select(WebhookDelivery.status).order_by(WebhookDelivery.id))
        return {
            "deliveries": sorted(statuses),
            "keys": sorted(session.scalars(select(IdempotencyRecord.key))),
        }

    return world.ts.kernel.store.call(work)


@pytest.mark.parametrize("scenario_database_url", ["sqlite", "postgresql"], indirect=True)
async def test_old_finished_rows_are_purged_in_batches(world: World) -> None:
    k = world.ts.kernel
    endpoint = webhooks.create_endpoint(k, SUB, "https://crm.example.com/hook")["id"]
    backdate(
        world,
        endpoint,
        [("delivered", 8)] * 5 + [("delivered", 1)] * 2  # 7 days for delivered ones
        + [("dead", 31)] * 3 + [("dead", 10)]  # 30 days for dead letters
        + [("pending", None)],  # still being retried: never purged
    )  # fmt: skip
    keys(world, {"old-1": 25, "old-2": 30, "old-3": 48, "new-1": 1, "new-2": 23})

    assert webhooks.purge(k, SETTINGS, batch=2) == {"delivered": 2, "dead": 2, "idempotency": 2}
    assert webhooks.purge(k, SETTINGS, batch=2) == {"delivered": 2, "dead": 1, "idempotency": 1}
    assert webhooks.purge(k, SETTINGS, batch=2) == {"delivered": 1, "dead": 0, "idempotency": 0}
    assert webhooks.purge(k, SETTINGS, batch=2) == {"delivered": 0, "dead": 0, "idempotency": 0}
    assert remaining(world) == {
        "deliveries": ["dead", "delivered", "delivered", "pending"],
        "keys": ["new-1", "new-2"],
    }
    # Past its window a key is forgotten: a new request may use it again.
    assert apikeys.begin(k.store, SUB, "old-1", "other request") is None
    assert apikeys.begin(k.store, SUB, "new-1", "other request") is not None

    # The dispatcher sweeps on its own (at start, then every few minutes).
    backdate(world, endpoint, [("delivered", 9), ("dead", 40)])
    keys(world, {"old-4": 30})
    dispatcher = Dispatcher(webhooks.Webhooks(k), SETTINGS)
    task = asyncio.create_task(dispatcher.run())
    swept = {
        "deliveries": ["dead", "delivered", "delivered", "pending"],
        "keys": ["new-1", "new-2", "old-1"],  # old-1 was claimed again just now
    }
    try:
        await wait_for(lambda: remaining(world) == swept, 10, "the dispatcher's sweep")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
