"""A connection ended by another process (disconnect, update-email) while the
daemon is in the middle of a pass, on SQLite and PostgreSQL: the pass drops what
it read, nothing is stored for the ended connection and its cursors stay deleted
(R6), no error is recorded, and the connection's task just stops.

The daemon is a second threadsync instance on the same database, as another
process would be. Its IMAP provider lets a test act at an exact point of the
pass (after a batch of headers is read, while a body is fetched), and a
SQLAlchemy session event lets one act inside the transaction that stores the
batch, between reading the folder's cursor and writing it back.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import event, func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import ORMExecuteState, Session

from tests.kernelfixtures import CONTACT, SUB, USER, EventRecorder, World, make_mail
from threadsync.core.accounts import connections as accounts
from threadsync.core.api import Threadsync
from threadsync.core.hookspecs import hookimpl
from threadsync.core.outbox.compose import Draft
from threadsync.core.provider import ChangeBatch, Folder, Provider
from threadsync.core.store.models import Cursor, Message
from threadsync.core.sync.daemon import Daemon, run_once
from threadsync.plugins.imap_smtp.provider import ImapSmtpProvider

BOTH = pytest.mark.parametrize("scenario_database_url", ["sqlite", "postgresql"], indirect=True)

Hook = Callable[[Folder], Awaitable[None]]


def daemon_process(
    world: World, *, after_changes: Hook | None = None, during_fetch: Hook | None = None
) -> tuple[Threadsync, EventRecorder]:
    """Another threadsync on ``world``'s database whose ``imap_smtp`` provider
    calls ``after_changes`` once a batch of headers is read and ``during_fetch``
    before a body is fetched."""

    class SteppedImap(ImapSmtpProvider):
        async def changes(
            self, folder: Folder, cursor: Mapping[str, Any] | None, limit: int = 250
        ) -> ChangeBatch:
            batch = await super().changes(folder, cursor, limit)
            if after_changes is not None and batch.headers:
                await after_changes(folder)
            return batch

        async def fetch(self, folder: Folder, ref: str) -> bytes:
            if during_fetch is not None:
                await during_fetch(folder)
            return await super().fetch(folder, ref)

    class Plugin:
        @hookimpl
        def register_providers(self, register: Callable[[type[Provider]], None]) -> None:
            register(SteppedImap)

    recorder = EventRecorder()
    ts = Threadsync.from_settings(
        world.ts.kernel.settings,
        plugins=[Plugin(), recorder],
        load_entry_points=False,
        environ=world.env,
    )
    return ts, recorder


def cursors_of(world: World, conn_id: int) -> int:
    def work(session: Session) -> int:
        q = select(func.count(Cursor.id)).where(Cursor.connection_id == conn_id)
        return int(session.scalar(q) or 0)

    return world.ts.kernel.store.call(work)


def stored_messages(world: World) -> list[str]:
    return world.ts.kernel.store.call(
        lambda s: list(s.scalars(select(Message.message_id).order_by(Message.id)))
    )


def writer_would_wait(world: World, conn_id: int) -> bool:
    """Whether a transaction that ends the connection would have to wait now."""
    url = make_url(world.ts.kernel.settings.database_url)
    if url.get_backend_name() == "sqlite":
        lite = sqlite3.connect(str(url.database), timeout=0, isolation_level=None)
        try:
            lite.execute("BEGIN IMMEDIATE")
            lite.execute("ROLLBACK")
            return False
        except sqlite3.OperationalError:
            return True
        finally:
            lite.close()
    with world.ts.kernel.store.engine.connect() as pg:
        try:
            pg.execute(
                text("SELECT id FROM connections WHERE id = :id FOR UPDATE NOWAIT"), {"id": conn_id}
            )
            return False
        except OperationalError:
            return True
        finally:
            pg.rollback()


@contextmanager
def after_cursor_read(
    daemon: Threadsync, armed: Callable[[], bool], act: Callable[[], None]
) -> Iterator[list[bool]]:
    """Call ``act`` once, right after the daemon's first read of a cursor row once
    ``armed()``, inside the transaction that read it. Yields a list that holds
    ``True`` once it ran."""
    engine = daemon.kernel.store.engine
    ran: list[bool] = []

    def on_execute(state: ORMExecuteState) -> Any:
        if ran or state.session.get_bind() is not engine or not state.is_select:
            return None
        if not armed() or not any(m.class_ is Cursor for m in state.all_mappers):
            return None
        ran.append(True)
        result = state.invoke_statement()
        act()
        return result

    event.listen(Session, "do_orm_execute", on_execute)
    try:
        yield ran
    finally:
        event.remove(Session, "do_orm_execute", on_execute)


def assert_quiet(caplog: pytest.LogCaptureFixture) -> None:
    """No warning, error or traceback from threadsync (the test servers may talk)."""
    ours = [r for r in caplog.records if r.name.split(".")[0] in ("core", "plugins")]
    loud = [r for r in ours if r.levelno >= logging.WARNING or r.exc_info]
    assert not loud, [r.getMessage() for r in loud]


@BOTH
async def test_disconnect_while_a_body_is_fetched(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """The pass has read a contact's reply and is fetching its body when the user
    disconnects: the reply is not stored, and the daemon's task ends by itself."""
    caplog.set_level(logging.INFO)
    conn_id = (await world.connect())["id"]
    sent = await world.ts.send(SUB, USER, Draft(to=[CONTACT], subject="Offer", text="hi"))
    reply = world.contact_replies(sent)
    ended = asyncio.Event()

    async def disconnect(folder: Folder) -> None:
        if not ended.is_set():
            await accounts.disconnect(world.ts.kernel, SUB, USER)
            ended.set()

    daemon_ts, recorder = daemon_process(world, during_fetch=disconnect)
    daemon = Daemon(daemon_ts.kernel, supervise_seconds=3600)
    running = asyncio.create_task(daemon.run())
    try:
        await asyncio.wait_for(ended.wait(), 30)
        task = daemon.tasks[conn_id]
        # Ends on its own: the supervisor (asleep for an hour) does not cancel it.
        await asyncio.wait_for(asyncio.shield(task), 30)
        assert not task.cancelled() and task.exception() is None
    finally:
        daemon.stop()
        await running
        await daemon_ts.aclose()

    assert reply not in stored_messages(world)
    assert not recorder.of("message.synced") and not recorder.of("message.skipped")
    assert cursors_of(world, conn_id) == 0
    conn = world.ts.status(SUB, USER)["connections"][0]
    assert (conn["state"], conn["last_error"], conn["last_sync_at"]) == ("disconnected", None, None)
    assert not recorder.of("connection.state_changed")
    assert_quiet(caplog)


@BOTH
async def test_disconnect_between_reading_and_writing_the_cursor(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """Personal mail only moves the INBOX cursor (R5). The user disconnects after
    the storing transaction read that cursor and before it writes it back: the
    pass must neither fail on the deleted row nor bring it back."""
    caplog.set_level(logging.INFO)
    conn_id = (await world.connect())["id"]
    raw, personal = make_mail(sender=CONTACT, to=world.email, subject="Lunch?", body="Friday?")
    world.imap.deliver(world.email, raw, "INBOX")
    armed = asyncio.Event()
    other_process: list[threading.Thread] = []
    failures: list[BaseException] = []

    async def arm(folder: Folder) -> None:
        if folder.role == "inbox":
            armed.set()

    def disconnect_from_another_process() -> None:
        try:
            asyncio.run(accounts.disconnect(world.ts.kernel, SUB, USER))
        except BaseException as exc:  # reported by the test below
            failures.append(exc)

    def end_the_connection() -> None:
        thread = threading.Thread(target=disconnect_from_another_process)
        other_process.append(thread)
        thread.start()
        if not writer_would_wait(world, conn_id):
            thread.join(30)  # nothing holds it back: it commits right now

    daemon_ts, recorder = daemon_process(world, after_changes=arm)
    try:
        with after_cursor_read(daemon_ts, armed.is_set, end_the_connection) as ran:
            report = await run_once(daemon_ts.kernel)
        for thread in other_process:
            await asyncio.to_thread(thread.join, 30)
    finally:
        await daemon_ts.aclose()

    assert ran and other_process and not failures
    assert report.errors == [] and report.stored == 0
    assert personal not in stored_messages(world)
    assert cursors_of(world, conn_id) == 0
    conn = world.ts.status(SUB, USER)["connections"][0]
    assert (conn["state"], conn["last_error"]) == ("disconnected", None)
    assert not recorder.of("message.synced") and not recorder.of("message.skipped")
    assert_quiet(caplog)
