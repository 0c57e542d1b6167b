"""Several ``threadsync run`` processes sharing the connections of one database.

Each running daemon is a worker: a row in ``workers`` with a heartbeat, and a
lease in ``connection_leases`` on every connection it works on. At each
heartbeat a worker renews its leases, counts the live workers and keeps at most
its fair share (:func:`threadsync.core.rules.fair_share`); it stops the tasks of
connections above that share first and only then releases their leases, so the
worker that claims them next never overlaps with it. Claiming locks the
connection rows with ``FOR UPDATE SKIP LOCKED``: every write made for a
connection locks that row first (:meth:`Kernel.lock_live_connection`) and then
checks, through :meth:`WorkerLeases.guard`, that no other live worker holds it;
so a takeover waits for a write in flight, and after it the old holder's writes
are refused. A worker also stops a connection on its own once the lease it last
renewed is about to run out (the database unreachable, the process paused),
before another worker may take it. The connections of a dead worker are taken
over when their leases expire, at once when it was a process of this host.

A CRM message queued for a connection held by another worker is left to that
worker (:func:`holder_elsewhere`), which is woken through PostgreSQL
``LISTEN``/``NOTIFY`` (:func:`notify`, :meth:`WorkerLeases.listen`). SQLite has
no row locks and one writer at a time: there, a second worker is refused.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, func, insert, select, text, update
from sqlalchemy.orm import Session

from threadsync.core import rules
from threadsync.core.errors import Refused, StoreError
from threadsync.core.kernel import Kernel, worker_is_dead
from threadsync.core.store.models import (
    Connection,
    ConnectionLease,
    Worker,
    iso,
    utcnow,
)

log = logging.getLogger(__name__)

#: The PostgreSQL channel on which queued CRM mail is announced to its holder.
CHANNEL = "threadsync_outbox"


def _is_postgres(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def holder_elsewhere(session: Session, k: Kernel, conn_id: int) -> str | None:
    """The live worker other than this process that holds ``conn_id``, if any."""
    row = session.execute(
        select(ConnectionLease.worker_id, ConnectionLease.lease_until).where(
            ConnectionLease.connection_id == conn_id
        )
    ).first()
    if row is None:
        return None
    holder, until = row
    if holder == k.worker or until <= utcnow() or worker_is_dead(holder):
        return None
    return str(holder)


def left_by_gone_worker(session: Session, k: Kernel, conn_id: int, owner: str | None) -> bool:
    """Whether an outbox entry of ``conn_id`` claimed by ``owner`` was left by a
    worker that is gone, while this worker holds the connection: the outbox
    follows the connection's holder, whatever the entry's own lease says."""
    if owner is None or owner == k.worker:
        return False
    mine = session.scalar(
        select(ConnectionLease.connection_id).where(
            ConnectionLease.connection_id == conn_id,
            ConnectionLease.worker_id == k.worker,
            ConnectionLease.lease_until > utcnow(),
        )
    )
    if mine is None:
        return False
    fresh = utcnow() - timedelta(seconds=k.settings.sync.worker_lease_seconds)
    alive = session.scalar(
        select(Worker.id).where(Worker.id == owner, Worker.heartbeat_at > fresh)
    )
    return alive is None


def notify(session: Session, conn_id: int) -> None:
    """Announce, when ``session`` commits, that ``conn_id`` has CRM mail to send."""
    if _is_postgres(session):
        session.execute(text("SELECT pg_notify(:channel, :conn)"), {
            "channel": CHANNEL, "conn": str(conn_id)
        })  # fmt: skip


def holders(session: Session, conn_ids: Iterable[int]) -> dict[int, str]:
    """The live holder of each of ``conn_ids`` that has one."""
    ids = list(conn_ids)
    if not ids:
        return {}
    rows = session.execute(
        select(ConnectionLease.connection_id, ConnectionLease.worker_id).where(
            ConnectionLease.connection_id.in_(ids), ConnectionLease.lease_until > utcnow()
        )
    ).all()
    return {int(c): str(w) for c, w in rows}


def list_workers(k: Kernel) -> list[dict[str, Any]]:
    """Every worker that has a row: its heartbeat, whether it counts as live and
    how many connections it holds."""
    lease = k.settings.sync.worker_lease_seconds

    def work(session: Session) -> list[dict[str, Any]]:
        now = utcnow()
        counts = dict(
            session.execute(
                select(ConnectionLease.worker_id, func.count())
                .where(ConnectionLease.lease_until > now)
                .group_by(ConnectionLease.worker_id)
            ).all()
        )
        rows = session.scalars(select(Worker).order_by(Worker.started_at, Worker.id)).all()
        return [
            {
                "id": w.id,
                "host": w.host,
                "pid": w.pid,
                "started_at": iso(w.started_at),
                "heartbeat_at": iso(w.heartbeat_at),
                "heartbeat_age_seconds": round((now - w.heartbeat_at).total_seconds(), 1),
                "live": w.heartbeat_at > now - timedelta(seconds=lease),
                "connections": int(counts.get(w.id, 0)),
            }
            for w in rows
        ]

    return k.store.call(work)


def _leasable() -> Any:
    """Connections a worker may hold: those worked on (R1, R2). Backoff does not
    matter: a connection in backoff stays with its worker."""
    return select(Connection.id).where(rules.worked_connections())


class WorkerLeases:
    """This process's membership among the workers and the leases it holds."""

    def __init__(self, k: Kernel) -> None:
        self.k = k
        self.id = k.worker
        #: Held connections -> monotonic time until which working on them is safe.
        self._until: dict[int, float] = {}
        self._next_beat = 0.0
        self._share = 0

    @property
    def heartbeat_seconds(self) -> float:
        return self.k.settings.sync.worker_heartbeat_seconds

    @property
    def lease_seconds(self) -> float:
        return self.k.settings.sync.worker_lease_seconds

    def _safe_until(self, started: float) -> float:
        # One heartbeat of margin before the lease written at ``started`` ends.
        return started + self.lease_seconds - self.heartbeat_seconds

    # ---- what the daemon asks ------------------------------------------------------

    def holds(self, conn_id: int) -> bool:
        """Whether this worker may still work on ``conn_id`` (checked before each pass)."""
        return self._until.get(conn_id, 0.0) > time.monotonic()

    def held(self) -> set[int]:
        now = time.monotonic()
        return {c for c, until in self._until.items() if until > now}

    def guard(self, session: Session, conn_id: int) -> bool:
        """For :meth:`Kernel.lock_live_connection`, with the connection's row
        already locked: ``False`` when another live worker holds the connection."""
        return holder_elsewhere(session, self.k, conn_id) is None

    async def share(self, stop: Callable[[list[int]], Awaitable[None]]) -> set[int]:
        """At each heartbeat: renew, give up what is above the fair share (after
        ``stop`` has ended the work on it), claim what is missing. The held
        connections (safe to work on now)."""
        if time.monotonic() >= self._next_beat:
            self._next_beat = time.monotonic() + self.heartbeat_seconds
            try:
                excess = await asyncio.to_thread(self.beat)
                if excess:
                    await stop(sorted(excess))
                    await asyncio.to_thread(self.release, excess)
                await asyncio.to_thread(self.claim)
            except StoreError as exc:  # the leases run out on their own
                log.warning("worker heartbeat failed: %s", exc, extra={"worker": self.id})
            except Exception:
                log.exception("worker heartbeat failed", extra={"worker": self.id})
        return self.held()

    # ---- database steps (run in a thread) --------------------------------------------

    def register(self) -> None:
        """Join the workers. On SQLite, refuse while another worker runs."""
        lease = timedelta(seconds=self.lease_seconds)

        def work(session: Session) -> None:
            now = utcnow()
            # A write first: on SQLite it takes the database's write lock, so two
            # processes starting together cannot both pass the check below.
            session.execute(delete(Worker).where(Worker.heartbeat_at < now - lease))
            for other in session.scalars(select(Worker).where(Worker.id != self.id)).all():
                if worker_is_dead(other.id):
                    self._forget(session, other.id)
                elif not _is_postgres(session):
                    age = (now - other.heartbeat_at).total_seconds()
                    raise Refused(
                        f"another threadsync run (worker {other.id}, last heartbeat "
                        f"{age:.0f} s ago) already works on this SQLite database; "
                        "several workers need PostgreSQL "
                        '([database] url = "postgresql+psycopg://...")'
                    )
            self._forget(session, self.id)
            session.add(
                Worker(
                    id=self.id,
                    host=socket.gethostname(),
                    pid=os.getpid(),
                    started_at=now,
                    heartbeat_at=now,
                )
            )

        self.k.store.call(work)
        log.info("worker joined", extra={"worker": self.id})

    def _forget(self, session: Session, worker: str) -> None:
        session.execute(delete(ConnectionLease).where(ConnectionLease.worker_id == worker))
        session.execute(delete(Worker).where(Worker.id == worker))

    def beat(self) -> set[int]:
        """Heartbeat and lease renewal in one transaction; the held connections
        to give up (above the fair share, or no longer to be worked on)."""
        started = time.monotonic()
        lease = timedelta(seconds=self.lease_seconds)

        def work(session: Session) -> set[int]:
            now = utcnow()
            beat = session.execute(
                update(Worker).where(Worker.id == self.id).values(heartbeat_at=now)
            )
            if beat.rowcount != 1:  # type: ignore[attr-defined]
                # Counted as gone by another worker (paused too long): back in.
                session.add(
                    Worker(
                        id=self.id, host=socket.gethostname(), pid=os.getpid(),
                        started_at=now, heartbeat_at=now,
                    )
                )  # fmt: skip
            renewed = set(
                session.scalars(
                    update(ConnectionLease)
                    .where(ConnectionLease.worker_id == self.id)
                    .values(lease_until=now + lease)
                    .returning(ConnectionLease.connection_id)
                ).all()
            )
            session.execute(delete(Worker).where(Worker.heartbeat_at < now - lease))
            live = 0
            for other in session.scalars(select(Worker.id)).all():
                if worker_is_dead(other):
                    self._forget(session, other)
                else:
                    live += 1
            leasable = set(session.scalars(_leasable()).all())
            return self._plan(renewed, leasable, live, started)

        return self.k.store.call(work)

    def _plan(self, renewed: set[int], leasable: set[int], live: int, started: float) -> set[int]:
        self._share = rules.fair_share(len(leasable), live)
        lost = set(self._until) - renewed
        if lost:
            log.warning("connection leases lost: %s", sorted(lost), extra={"worker": self.id})
        keep = sorted(renewed & leasable)
        excess = (renewed - leasable) | set(keep[self._share :])
        self._until = {c: self._safe_until(started) for c in renewed - excess}
        return excess

    def claim(self) -> set[int]:
        """Claim free or expired connections up to the fair share."""
        want = self._share - len(self._until)
        if want <= 0:
            return set()
        started = time.monotonic()
        lease = timedelta(seconds=self.lease_seconds)

        def work(session: Session) -> set[int]:
            now = utcnow()
            free = (
                _leasable()
                .outerjoin(ConnectionLease, ConnectionLease.connection_id == Connection.id)
                .where(
                    (ConnectionLease.connection_id.is_(None))
                    | (ConnectionLease.lease_until <= now)
                )
                .order_by(Connection.id)
                .limit(want)
                .with_for_update(of=Connection, skip_locked=True)
            )
            ids = list(session.scalars(free).all())
            if ids:
                # The rows are locked: nobody else replaces these leases meanwhile.
                session.execute(
                    delete(ConnectionLease).where(ConnectionLease.connection_id.in_(ids))
                )
                session.execute(
                    insert(ConnectionLease),
                    [{"connection_id": c, "worker_id": self.id, "lease_until": now + lease}
                     for c in ids],
                )  # fmt: skip
            return set(ids)

        claimed = self.k.store.call(work)
        if claimed:
            until = self._safe_until(started)
            self._until.update({c: until for c in claimed})
            log.info("connections claimed: %d", len(claimed), extra={"worker": self.id})
        return claimed

    def release(self, conn_ids: Iterable[int]) -> None:
        """Give up leases whose work has stopped, for another worker to claim."""
        ids = list(conn_ids)
        for c in ids:
            self._until.pop(c, None)

        def work(session: Session) -> None:
            session.execute(
                delete(ConnectionLease).where(
                    ConnectionLease.connection_id.in_(ids),
                    ConnectionLease.worker_id == self.id,
                )
            )

        if ids:
            self.k.store.call(work)
            log.info("connections released: %d", len(ids), extra={"worker": self.id})

    def leave(self) -> None:
        """Give up every lease and the worker row (the work has stopped)."""
        self._until.clear()
        self.k.store.call(lambda session: self._forget(session, self.id))
        log.info("worker left", extra={"worker": self.id})

    # ---- wake-ups ----------------------------------------------------------------

    async def listen(self, wake: Callable[[int], None]) -> None:
        """Wake held connections announced by :func:`notify` (PostgreSQL only;
        elsewhere the supervisor's outbox check does it). Reconnects after a
        failure; runs until cancelled."""
        url = self.k.store.engine.url
        if url.get_backend_name() != "postgresql":
            await asyncio.Event().wait()
        import psycopg

        conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
        while True:
            try:
                aconn = await psycopg.AsyncConnection.connect(conninfo, autocommit=True)
                async with aconn:
                    await aconn.execute(f"LISTEN {CHANNEL}")
                    async for note in aconn.notifies():
                        if note.payload.isdigit() and self.holds(int(note.payload)):
                            wake(int(note.payload))
            except psycopg.Error as exc:
                log.warning("outbox listener lost its connection: %s", exc)
            await asyncio.sleep(self.heartbeat_seconds)
