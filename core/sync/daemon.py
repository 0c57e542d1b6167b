"""The scheduler behind ``threadsync run``: one task per live connection, plus the
default channel's outbox.

A connection task opens its provider, delivers the connection's due outbox
entries, reads its folders, then waits for a push (IMAP IDLE) or the poll
interval, and repeats. A supervisor re-reads the connections every few seconds:
it starts tasks for new connections, stops them for connections that were
disconnected, replaced, left waiting for re-authorisation or paused by the Labs
flag (R1), and respects the backoff of connections in ``error`` (R2). When
several daemons share a database it works only on the connections whose lease
it holds (:mod:`.workers`), and checks the lease before each pass.
``run --once`` is the same work done once for every connection, then exit.

A failure nobody translated (a provider plugin that cannot be loaded, stored
credentials that no longer decrypt, a bug) is recorded on its connection like
any provider failure, as :class:`~threadsync.core.errors.UnexpectedFailure`: the
connection shows ``error`` with a message a person can act on and backs off,
and the other connections carry on. Its traceback is logged once per distinct
failure, not at every retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session

from threadsync.core import rules
from threadsync.core.errors import (
    ConfigError,
    ProviderError,
    SecretsUnreadable,
    StoreError,
    ThreadsyncError,
    UnexpectedFailure,
)
from threadsync.core.host.events import EventBuffer
from threadsync.core.kernel import Kernel
from threadsync.core.outbox import delivery
from threadsync.core.provider import Provider
from threadsync.core.rules import LIVE_STATES, SendStatus
from threadsync.core.store.models import Connection, utcnow
from threadsync.core.sync.ingest import PassReport, sync_connection
from threadsync.core.sync.workers import WorkerLeases

log = logging.getLogger(__name__)


@dataclass
class OnceReport:
    """What ``run --once`` did, for ``--json`` output and tests."""

    connections: int = 0
    stored: int = 0
    skipped: int = 0
    duplicates: int = 0
    sent: int = 0
    errors: list[str] = field(default_factory=list)


async def eligible_connections(k: Kernel) -> list[int]:
    """Connections to work on now: worked on (live, not waiting for
    re-authorisation, Labs on: R1) and past their backoff (R2)."""
    now = utcnow()

    def work(session: Session, _events: EventBuffer) -> list[int]:
        rows = session.execute(
            select(Connection.id, Connection.next_attempt_at)
            .where(rules.worked_connections())
            .order_by(Connection.id)
        ).all()
        return [cid for cid, when in rows if rules.due(when, now)]

    return await k.unit_of_work(work)


async def _fail(k: Kernel, conn_id: int, exc: ProviderError, *, logged: bool = False) -> bool:
    """Record a provider failure on the connection. ``False`` when the connection
    was ended meanwhile: its credentials are gone, so the failure means nothing.
    ``logged``: the caller has logged the failure already."""
    state = await k.unit_of_work(lambda s, events: k.record_failure(s, events, conn_id, exc))
    if state not in LIVE_STATES:
        log.info("connection ended; failure ignored", extra={"connection_id": conn_id})
        return False
    if not logged:
        log.warning("connection failed: %s", exc, extra={"connection_id": conn_id})
    return True


def unexpected_failure(exc: Exception) -> UnexpectedFailure:
    """``exc``, raised by a connection's work and not a provider failure, as one:
    its message says what a person can do. Messages of exceptions from outside
    threadsync are not repeated (they may quote data); the log has them."""
    if isinstance(exc, ConfigError):
        hint = "install the provider's plugin or fix its settings; the connection retries"
    elif isinstance(exc, SecretsUnreadable):
        hint = (
            "restore the secret key file these credentials were stored with, "
            "or reconnect the mailbox (update-email) to store them again"
        )
    else:
        hint = ""
    if isinstance(exc, ThreadsyncError):
        message = f"{exc}: {hint}" if hint else str(exc)
    else:
        message = (
            f"unexpected {type(exc).__name__} while syncing this connection; "
            "the daemon's log has the details"
        )
    failure = UnexpectedFailure(message)
    failure.__cause__ = exc
    return failure


def failure_signature(exc: BaseException) -> str:
    """What makes two failures "the same" for logging: kind and message."""
    return f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}"


def log_unexpected(conn_id: int, exc: Exception) -> None:
    """Log an unexpected failure: one line for a threadsync error (its message
    says it all), the traceback for anything else (a bug)."""
    if isinstance(exc, ThreadsyncError):
        log.error("connection failed: %s", exc, extra={"connection_id": conn_id})
    else:
        log.error("connection failed unexpectedly", exc_info=exc, extra={"connection_id": conn_id})


async def work_connection(k: Kernel, conn_id: int, provider: Provider) -> tuple[PassReport, int]:
    """Deliver the connection's due outbox entries, then read its folders."""
    sent = 0
    for entry_id in await delivery.due_entries(k, conn_id):
        if await delivery.deliver_entry(k, entry_id, provider) == SendStatus.SENT:
            sent += 1
    report = await sync_connection(k, conn_id, provider)
    if not report.ended:
        await k.keep_refreshed_secrets(conn_id, provider)
    return report, sent


async def _open(k: Kernel, conn_id: int) -> Provider | None:
    """The connection's provider, open; ``None`` when the connection was ended
    since it was chosen (its credentials are gone)."""
    conn = await k.load_connection(conn_id)
    if conn.state not in LIVE_STATES:
        return None
    return await k.open_provider(conn)


async def deliver_default_channel(k: Kernel) -> int:
    sent = 0
    for entry_id in await delivery.due_entries(k, None):
        if await delivery.deliver_entry(k, entry_id) == SendStatus.SENT:
            sent += 1
    return sent


async def run_once(k: Kernel) -> OnceReport:
    """One full pass over every eligible connection and the default channel."""
    report = OnceReport()
    report.sent += await deliver_default_channel(k)
    for conn_id in await eligible_connections(k):
        report.connections += 1
        provider: Provider | None = None
        try:
            provider = await _open(k, conn_id)
            if provider is None:
                continue
            passed, sent = await work_connection(k, conn_id, provider)
            report.stored += passed.stored
            report.skipped += passed.skipped
            report.duplicates += passed.duplicates
            report.sent += sent
        except ProviderError as exc:
            if await _fail(k, conn_id, exc):
                report.errors.append(f"connection {conn_id}: {exc}")
        except Exception as exc:  # one connection's failure must not stop the pass
            log_unexpected(conn_id, exc)
            failure = unexpected_failure(exc)
            if await _fail(k, conn_id, failure, logged=True):
                report.errors.append(f"connection {conn_id}: {failure}")
        finally:
            if provider is not None:
                await provider.close()
    return report


class Daemon:
    """Runs until :meth:`stop` is called (SIGTERM, Ctrl-C).

    ``extra`` are coroutine functions run beside the sync loop for as long as it
    runs (the HTTP API, the webhook dispatcher); they are cancelled when it
    stops. One that ends or fails stops the daemon, so that a process supervisor
    restarts the whole of it.
    """

    def __init__(
        self,
        k: Kernel,
        *,
        supervise_seconds: float = 2.0,
        extra: Sequence[Callable[[], Awaitable[None]]] = (),
    ) -> None:
        self.k = k
        self.supervise_seconds = supervise_seconds
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.providers: dict[int, Provider] = {}
        #: The last unexpected failure logged with its traceback, per connection.
        self.logged_failures: dict[int, str] = {}
        self.extra = tuple(extra)
        self._stop = asyncio.Event()
        #: This process's share of the connections among the workers on the database.
        self.leases = WorkerLeases(k)
        #: Set while the database is unreachable: said once per outage, not per task.
        self._store_down = False

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        try:
            await asyncio.to_thread(self.leases.register)
        except StoreError as exc:  # it joins at a later heartbeat
            self._database_down(exc)
        self.k.connection_guard = self.leases.guard
        listen: Callable[[], Awaitable[None]] = functools.partial(self.leases.listen, self._wake)
        extras = [asyncio.create_task(self._beside(fn)) for fn in (*self.extra, listen)]
        try:
            while not self._stop.is_set():
                await self._supervise()
                # Never slower than the lease heartbeat, or held leases would lapse.
                pause = min(self.supervise_seconds, self.leases.heartbeat_seconds)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), pause)
        finally:
            await self._cancel(list(self.tasks))
            for task in extras:
                task.cancel()
            await asyncio.gather(*extras, return_exceptions=True)
            try:
                await asyncio.to_thread(self.leases.leave)
            except Exception:  # the leases run out on their own
                log.exception("could not give up the connection leases")
            log.info("daemon stopped")

    async def _beside(self, fn: Callable[[], Awaitable[None]]) -> None:
        try:
            await fn()
            log.error("a task beside the sync loop ended; stopping")
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("a task beside the sync loop failed; stopping")
        self.stop()

    def _database_down(self, exc: StoreError) -> None:
        if not self._store_down:
            self._store_down = True
            log.warning(
                "database unavailable; work pauses and is retried every %gs: %s",
                self.supervise_seconds,
                exc,
                extra={"error": exc.code},
            )

    async def _supervise(self) -> None:
        try:
            await deliver_default_channel(self.k)
            wanted = set(await eligible_connections(self.k))
        except StoreError as exc:
            self._database_down(exc)
            await self._cancel([c for c in self.tasks if not self.leases.holds(c)])
            return
        except Exception:  # the supervisor must survive a database hiccup
            log.exception("supervisor pass failed")
            await self._cancel([c for c in self.tasks if not self.leases.holds(c)])
            return
        wanted &= await self.leases.share(self._cancel)
        if self._store_down:
            self._store_down = False
            log.warning("database reachable again; work resumes")
        for conn_id, task in list(self.tasks.items()):
            if task.done():
                del self.tasks[conn_id]
        await self._cancel([c for c in self.tasks if c not in wanted])
        for conn_id in wanted - set(self.tasks):
            self.tasks[conn_id] = asyncio.create_task(
                self._connection_loop(conn_id), name=f"connection-{conn_id}"
            )
        # CRM mail queued by another process (the CLI, the API) wakes its
        # connection from IDLE instead of waiting for the next poll.
        try:
            waiting = await delivery.connections_with_due_mail(self.k)
        except StoreError as exc:
            self._database_down(exc)
            return
        except Exception:
            log.exception("supervisor could not read the outbox")
            return
        for conn_id in waiting:
            provider = self.providers.get(conn_id)
            if provider is not None:
                provider.wake()

    def _wake(self, conn_id: int) -> None:
        provider = self.providers.get(conn_id)
        if provider is not None:
            provider.wake()

    async def _cancel(self, conn_ids: list[int]) -> None:
        tasks = [self.tasks.pop(c) for c in conn_ids if c in self.tasks]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _connection_loop(self, conn_id: int) -> None:
        """Work one connection until it fails (the supervisor restarts it after
        its backoff), is ended by another process (disconnect, update-email: the
        task just stops) or is cancelled."""
        k = self.k
        provider: Provider | None = None
        try:
            provider = await _open(k, conn_id)
            if provider is None:
                return
            self.providers[conn_id] = provider
            while True:
                if not self.leases.holds(conn_id):
                    log.info("connection lease ended; task stops", extra={"connection_id": conn_id})
                    return
                report, sent = await work_connection(k, conn_id, provider)
                self.logged_failures.pop(conn_id, None)
                log.debug(
                    "pass done",
                    extra={
                        "connection_id": conn_id,
                        "seen": report.seen,
                        "stored": report.stored,
                        "skipped": report.skipped,
                        "duplicates": report.duplicates,
                        "sent": sent,
                    },
                )
                if report.ended:
                    log.info("connection ended; task stops", extra={"connection_id": conn_id})
                    return
                await provider.wait_for_changes(
                    min(k.settings.sync.poll_interval_seconds, k.settings.sync.idle_seconds)
                )
        except ProviderError as exc:
            await _fail(k, conn_id, exc)
        except asyncio.CancelledError:
            raise
        except SecretsUnreadable as exc:  # this connection's credentials, not the database
            await self._unexpected(conn_id, exc)
        except StoreError as exc:  # the supervisor restarts the task once it is back
            self._database_down(exc)
        except Exception as exc:  # one connection's failure must not stop the others
            await self._unexpected(conn_id, exc)
        finally:
            self.providers.pop(conn_id, None)
            if provider is not None:
                await asyncio.shield(provider.close())

    async def _unexpected(self, conn_id: int, exc: Exception) -> None:
        """Record an unexpected failure on its connection (error, backoff); the
        traceback is logged the first time this failure is seen."""
        signature = failure_signature(exc)
        if self.logged_failures.get(conn_id) != signature:
            self.logged_failures[conn_id] = signature
            log_unexpected(conn_id, exc)
        try:
            await _fail(self.k, conn_id, unexpected_failure(exc), logged=True)
        except Exception:  # the database itself failed: the next pass retries
            log.warning(
                "could not record a connection's failure",
                exc_info=True,
                extra={"connection_id": conn_id},
            )
