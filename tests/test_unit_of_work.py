"""The kernel's one unit of work (``Kernel.unit_of_work``), against real SQLite and
PostgreSQL: the function runs in a worker thread inside one transaction, and the
events it recorded reach the host hooks in order only after that transaction has
committed, never when it rolled back (the function raised, or the commit failed)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from tests.kernelfixtures import make_settings
from threadsync.core.api import Threadsync
from threadsync.core.errors import NotFound
from threadsync.core.hookspecs import hookimpl
from threadsync.core.host.events import MESSAGE_SKIPPED, MESSAGE_SYNCED, EventBuffer
from threadsync.core.kernel import Kernel
from threadsync.core.store.models import Event, SubAccount


class Host:
    """A host that, for every event, notes the thread it is told on and whether
    the transaction that caused the event is visible to another session."""

    def __init__(self) -> None:
        self.kernel: Kernel | None = None
        self.seen: list[tuple[str, int, bool]] = []

    def _note(self, payload: dict[str, Any]) -> None:
        assert self.kernel is not None
        committed = self.kernel.store.call(
            lambda s: s.get(SubAccount, payload["subaccount"]) is not None
        )
        self.seen.append((payload["n"], threading.get_ident(), committed))

    @hookimpl
    def message_synced(self, payload: dict[str, Any]) -> None:
        self._note(payload)

    @hookimpl
    def message_skipped(self, payload: dict[str, Any]) -> None:
        self._note(payload)


@pytest.fixture
def host() -> Host:
    return Host()


@pytest.fixture
def kernel(tmp_path: Path, database_url: str, host: Host) -> Iterator[Kernel]:
    settings = make_settings(tmp_path, database_url, relay_port=1)
    Threadsync.init(settings)
    k = Kernel.build(settings, plugins=(host,), load_entry_points=False)
    host.kernel = k
    yield k
    k.store.dispose()


def events_stored(k: Kernel) -> int:
    return k.store.call(lambda s: int(s.scalar(select(func.count()).select_from(Event)) or 0))


def write_and_record(sub: str, *kinds: str) -> Any:
    def work(session: Session, events: EventBuffer) -> str:
        session.add(SubAccount(id=sub, two_way_email_sync=True))
        session.flush()
        for n, kind in enumerate(kinds):
            events.record(session, sub, kind, {"n": f"{sub}-{n}"})
        return f"{sub} written"

    return work


def test_events_are_announced_in_order_after_the_commit_on_the_loop(
    kernel: Kernel, host: Host
) -> None:
    async def main() -> tuple[str, int]:
        work = write_and_record("acme", MESSAGE_SYNCED, MESSAGE_SKIPPED, MESSAGE_SYNCED)
        return await kernel.unit_of_work(work), threading.get_ident()

    result, loop_thread = asyncio.run(asyncio.wait_for(main(), 30))
    assert result == "acme written"
    assert [(n, committed) for n, _, committed in host.seen] == [
        ("acme-0", True),
        ("acme-1", True),
        ("acme-2", True),
    ]
    # Announced by the caller (on the event loop), not from the worker thread.
    assert {thread for _, thread, _ in host.seen} == {loop_thread}
    assert events_stored(kernel) == 3


def test_nothing_is_announced_or_kept_when_the_work_raises(kernel: Kernel, host: Host) -> None:
    def work(session: Session, events: EventBuffer) -> None:
        write_and_record("acme", MESSAGE_SYNCED)(session, events)
        raise NotFound("changed my mind")

    with pytest.raises(NotFound):
        asyncio.run(asyncio.wait_for(kernel.unit_of_work(work), 30))
    assert host.seen == []
    assert events_stored(kernel) == 0
    assert kernel.store.call(lambda s: s.get(SubAccount, "acme")) is None


def test_nothing_is_announced_when_the_commit_fails_and_a_retry_starts_afresh(
    kernel: Kernel, host: Host
) -> None:
    asyncio.run(kernel.unit_of_work(write_and_record("acme")))
    attempts: list[int] = []

    def work(session: Session, events: EventBuffer) -> None:
        attempts.append(len(events.pending))
        events.record(session, "acme", MESSAGE_SYNCED, {"n": f"try-{len(attempts)}"})
        # The same key as the row committed above: refused only when the
        # transaction writes (the flush at commit), after the event was recorded.
        if len(attempts) == 1:
            session.add(SubAccount(id="acme", two_way_email_sync=False))

    with pytest.raises(IntegrityError):
        asyncio.run(asyncio.wait_for(kernel.unit_of_work(work), 30))
    assert host.seen == []
    assert events_stored(kernel) == 0
    asyncio.run(asyncio.wait_for(kernel.unit_of_work(work), 30))
    assert attempts == [0, 0]  # each run gets a fresh, empty buffer
    assert [n for n, _, _ in host.seen] == ["try-2"]
    assert events_stored(kernel) == 1


def test_the_work_runs_off_the_event_loop(kernel: Kernel) -> None:
    """The work blocks until a coroutine on the loop has run: were it on the
    loop, it would wait forever (bounded here by the timeout)."""
    released = threading.Event()

    def work(session: Session, _events: EventBuffer) -> int:
        assert released.wait(10), "the event loop was blocked by the unit of work"
        return threading.get_ident()

    async def main() -> tuple[int, int]:
        job = asyncio.ensure_future(kernel.unit_of_work(work))
        await asyncio.sleep(0.05)
        released.set()
        return await asyncio.wait_for(job, 30), threading.get_ident()

    worker, loop_thread = asyncio.run(main())
    assert worker != loop_thread
