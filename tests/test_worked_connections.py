"""The Labs gate (R1) as the one query condition the daemon, delivery and the
reports share (``rules.worked_connections``), and the backoff check (``rules.due``),
run against real SQLite and PostgreSQL: every connection state with the Labs flag
on and off, and the daemon's choice of connections made from them."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from tests.kernelfixtures import make_settings
from threadsync.core import rules
from threadsync.core.api import Threadsync
from threadsync.core.kernel import Kernel
from threadsync.core.outbox.delivery import _mailbox_ready
from threadsync.core.store.models import Connection, SubAccount, utcnow
from threadsync.core.sync.daemon import eligible_connections


@pytest.fixture
def kernel(tmp_path: Path, database_url: str) -> Iterator[Kernel]:
    settings = make_settings(tmp_path, database_url, relay_port=1)
    Threadsync.init(settings)
    k = Kernel.build(settings, load_entry_points=False)
    yield k
    k.store.dispose()


def add_connections(k: Kernel) -> dict[tuple[str, str], int]:
    """One connection per (sub-account, state); ``on`` has Labs on, ``off`` not."""
    ids: dict[tuple[str, str], int] = {}

    def work(session: Session) -> None:
        for sub, flag in (("on", True), ("off", False)):
            session.add(SubAccount(id=sub, two_way_email_sync=flag))
            session.flush()
            for n, state in enumerate(rules.ConnectionState):
                conn = Connection(
                    subaccount_id=sub,
                    user_id=f"u{n}",
                    provider="imap_smtp",
                    email=f"u{n}@example.org",
                    state=state,
                    settings={},
                    failures=0,
                )
                session.add(conn)
                session.flush()
                ids[(sub, state)] = conn.id

    k.store.call(work)
    return ids


def test_worked_connections_are_live_not_waiting_for_the_user_and_labs_on(
    kernel: Kernel,
) -> None:
    ids = add_connections(kernel)
    worked = kernel.store.call(
        lambda s: set(s.scalars(select(Connection.id).where(rules.worked_connections())))
    )
    assert worked == {ids[("on", "connected")], ids[("on", "error")]}
    assert asyncio.run(eligible_connections(kernel)) == sorted(worked)


def test_the_daemon_waits_for_the_backoff_and_labs_off_pauses_everything(
    kernel: Kernel,
) -> None:
    ids = add_connections(kernel)
    failing = ids[("on", "error")]

    def back_off(session: Session) -> None:
        conn = session.get(Connection, failing)
        assert conn is not None
        conn.next_attempt_at = utcnow() + timedelta(minutes=5)

    kernel.store.call(back_off)
    assert asyncio.run(eligible_connections(kernel)) == [ids[("on", "connected")]]

    def labs_off(session: Session) -> None:
        sub = session.get(SubAccount, "on")
        assert sub is not None
        sub.two_way_email_sync = False

    kernel.store.call(labs_off)
    assert asyncio.run(eligible_connections(kernel)) == []


def test_a_mailbox_is_used_only_while_worked_on(kernel: Kernel) -> None:
    ids = add_connections(kernel)
    now = utcnow()

    def ready(conn_id: int, provider_open: bool) -> bool:
        return kernel.store.call(
            lambda s: _mailbox_ready(s, conn_id, provider_open, now) is not None
        )

    usable_with_open_provider = {key for key, cid in ids.items() if ready(cid, True)}
    usable_one_off = {key for key, cid in ids.items() if ready(cid, False)}
    assert usable_with_open_provider == {("on", "connected"), ("on", "error")}
    assert usable_one_off == {("on", "connected")}
    assert kernel.store.call(lambda s: _mailbox_ready(s, None, True, now)) is None


def test_due_is_inclusive() -> None:
    now = utcnow()
    assert rules.due(None, now) and rules.due(now, now)
    assert not rules.due(now + timedelta(microseconds=1), now)
