"""The kernel's shared context: settings, store, vault, plugins and live provider
sessions, plus the applying of connection state changes (R2) that every other
kernel module uses when a provider succeeds or fails.

Kernel work done on the event loop reaches the database through one door,
:meth:`Kernel.unit_of_work`: a function run in a worker thread inside one
transaction, whose events are announced to the host once that transaction has
committed, and never when it rolled back. (Synchronous readers, such as the
API's views and reports, use :meth:`Store.call <threadsync.core.store.database.Store.call>`.)

Nothing outside ``core`` changes a connection's state; providers only raise
:mod:`threadsync.core.errors` exceptions, :mod:`threadsync.core.rules` decides what
they mean and :meth:`Kernel.record_failure` writes it. A connection can be ended
by another process (disconnect, update-email) at any moment, so every write made
on behalf of a live connection first takes :meth:`Kernel.lock_live_connection` in
its own transaction.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pluggy
from sqlalchemy import update
from sqlalchemy.orm import Session

from threadsync.core import rules
from threadsync.core.config import Settings, check_sections
from threadsync.core.errors import (
    AuthenticationFailed,
    ConfigError,
    NotFound,
    ProviderError,
    TransientProviderError,
)
from threadsync.core.host.events import EventBuffer
from threadsync.core.network import NetworkPolicy, network_policy
from threadsync.core.outbox.pool import ProviderPool
from threadsync.core.provider import Account, Provider
from threadsync.core.registry import (
    RegisteredProvider,
    config_sections,
    get_plugin_manager,
    providers,
)
from threadsync.core.rules import LIVE_STATES
from threadsync.core.store import keys
from threadsync.core.store.database import Store
from threadsync.core.store.models import Connection, utcnow
from threadsync.core.store.vault import Vault

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Key of a connection's stored settings marking hosts named by a tenant: they are
#: held to the network policy at every connect (:mod:`threadsync.core.network`).
TENANT_HOSTS = "tenant_hosts"


def _with_env_secrets(section: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """``client_secret_env = "VAR"`` in a provider section also gives the provider
    ``client_secret`` from the environment: app-wide secrets are read per process,
    never stored per connection, so rotating one needs no reconnection."""
    for key, value in list(section.items()):
        if key.endswith("_env") and isinstance(value, str) and environ.get(value):
            section.setdefault(key.removesuffix("_env"), environ[value])
    return section


def worker_id() -> str:
    """Who holds a lease (outbox, webhooks): host and process, so that a dead
    holder is recognised (:func:`worker_is_dead`)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def worker_is_dead(owner: str) -> bool:
    """Whether the lease holder ``owner`` (a :func:`worker_id`) is a process of
    this host that no longer runs. Holders on other hosts, and this process,
    count as alive: their leases end by expiring."""
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


@dataclass
class Kernel:
    """Everything a unit of kernel work needs, built once per process."""

    settings: Settings
    store: Store
    vault: Vault
    pm: pluggy.PluginManager
    registry: dict[str, RegisteredProvider] = field(default_factory=dict)
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    worker: str = field(default_factory=worker_id)
    #: Provider kernel-wide settings (timeouts), per provider name, from config.
    provider_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: The network policy hosts named by a tenant are held to (``[network]``).
    network: NetworkPolicy = field(default_factory=NetworkPolicy)
    #: Open providers reused by one-off deliveries (``send`` / ``reply``).
    #: A copy made with ``dataclasses.replace`` shares it with the original.
    pool: ProviderPool = field(default_factory=ProviderPool)
    #: Set in a worker sharing the connections with others: called by
    #: :meth:`lock_live_connection` with the row locked, ``False`` when another
    #: worker holds the connection (see :mod:`threadsync.core.sync.workers`).
    connection_guard: Callable[[Session, int], bool] | None = None

    def __post_init__(self) -> None:
        if not self.pool.bound:
            self.pool.bind(
                load=self.load_connection,
                open=self.open_provider,
                after_use=self.keep_refreshed_secrets,
            )

    async def unit_of_work(self, fn: Callable[[Session, EventBuffer], T]) -> T:
        """Run ``fn(session, events)`` in one transaction, in a worker thread (the
        event loop never waits on the database), and return what it returns.

        The events ``fn`` records in ``events`` are announced to the host hooks,
        in order, after the transaction has committed. When ``fn`` or the commit
        raises, the transaction is rolled back, nothing is announced and the
        error propagates; a retry runs ``fn`` again with a fresh buffer.
        """

        def run() -> tuple[T, EventBuffer]:
            events = EventBuffer()
            with self.store.session_scope() as session:
                result = fn(session, events)
            return result, events

        result, events = await asyncio.to_thread(run)
        events.announce(self.pm)
        return result

    async def load_connection(self, conn_id: int) -> Connection:
        """A connection's row, read in its own transaction (``NotFound`` if gone)."""
        return await self.unit_of_work(lambda s, _: self.get_connection(s, conn_id))

    @classmethod
    def build(
        cls,
        settings: Settings,
        *,
        plugins: tuple[object, ...] = (),
        load_entry_points: bool = True,
        environ: Mapping[str, str] | None = None,
    ) -> Kernel:
        pm = get_plugin_manager(plugins, load_entry_points=load_entry_points)
        check_sections(settings, config_sections(pm))
        registry = providers(pm)
        env = dict(os.environ) if environ is None else dict(environ)
        store = Store(settings.database_url)
        return cls(
            settings=settings,
            store=store,
            vault=keys.open_vault(store, settings.secret_key_file),
            pm=pm,
            registry=registry,
            network=network_policy(settings),
            environ=env,
            provider_settings={
                name: _with_env_secrets(dict(settings.section(name)), env) for name in registry
            },
        )

    # ---- providers -------------------------------------------------------------------

    def provider_class(self, name: str) -> type[Provider]:
        try:
            return self.registry[name].cls
        except KeyError:
            known = ", ".join(sorted(self.registry)) or "none"
            raise ConfigError(f"unknown provider {name!r} (registered: {known})") from None

    def provider_for(self, conn: Connection) -> Provider:
        """A new (unopened) provider instance for a stored connection; hosts a
        tenant named are held to the network policy of this moment's config."""
        cls = self.provider_class(conn.provider)
        settings = dict(conn.settings or {})
        account = Account(
            email=conn.email,
            settings=settings,
            secrets=self.vault.open(conn.secrets),
            network=self.network if settings.pop(TENANT_HOSTS, False) else None,
        )
        return cls(account, self.provider_settings.get(conn.provider, {}))

    def hold_to_policy(self, account: Account, tenant: bool) -> Account:
        """For a ``tenant`` (the HTTP API with a sub-account's key), hold
        ``account``'s hosts to the network policy, now and (by marking its
        settings, :data:`TENANT_HOSTS`) at every later connect."""
        if tenant:
            account.network = self.network
            account.settings = {**account.settings, TENANT_HOSTS: True}
        return account

    async def open_provider(self, conn: Connection) -> Provider:
        """:meth:`provider_for`, logged in; closed again when the login fails."""
        provider = self.provider_for(conn)
        try:
            await provider.open()
        except BaseException:
            await provider.close()
            raise
        return provider

    # ---- applying connection state changes (R2) -----------------------------------------

    def set_state(
        self,
        session: Session,
        events: EventBuffer,
        conn: Connection,
        state: str,
        *,
        error: str | None = None,
        error_code: str | None = None,
    ) -> None:
        """Move ``conn`` to ``state`` and record the event when it really changed.

        ``error_code`` is the :attr:`~threadsync.core.errors.ThreadsyncError.code` of the failure
        that caused the change; the event carries it so that hosts and ``/metrics``
        can tell kinds of failure apart.
        """
        previous = conn.state
        conn.last_error = error
        if previous != state:
            conn.state = state
            conn.since = utcnow()
            events.connection(session, conn, previous, error_code=error_code)
            log.info(
                "connection %s -> %s",
                previous,
                state,
                extra={
                    "connection_id": conn.id,
                    "subaccount": conn.subaccount_id,
                    "user": conn.user_id,
                    "state": state,
                    "previous_state": previous,
                    "error_code": error_code,
                },
            )

    def apply(
        self,
        session: Session,
        events: EventBuffer,
        conn: Connection,
        change: rules.ConnectionChange,
        *,
        error: str | None = None,
        error_code: str | None = None,
    ) -> None:
        """Write a change decided by :mod:`~threadsync.core.rules` onto ``conn``."""
        conn.failures = change.failures
        conn.next_attempt_at = change.next_attempt_at
        self.set_state(session, events, conn, change.state, error=error, error_code=error_code)

    def record_failure(
        self, session: Session, events: EventBuffer, conn_id: int, exc: ProviderError
    ) -> str:
        """Record a provider failure on the connection, as
        :func:`~threadsync.core.rules.after_failure` decides; returns the new state."""
        conn = self.lock_live_connection(session, conn_id)
        if conn is None:
            ended = session.get(Connection, conn_id)
            return ended.state if ended is not None else "gone"
        sync = self.settings.sync
        change = rules.after_failure(
            failures=conn.failures or 0,
            next_attempt_at=conn.next_attempt_at,
            credentials_rejected=isinstance(exc, AuthenticationFailed),
            retry_after=exc.retry_after if isinstance(exc, TransientProviderError) else None,
            base=sync.backoff_base_seconds,
            cap=sync.backoff_max_seconds,
            now=utcnow(),
        )
        message = str(exc) or exc.__class__.__name__
        self.apply(session, events, conn, change, error=message, error_code=exc.code)
        return conn.state

    def record_success(self, session: Session, events: EventBuffer, conn_id: int) -> bool:
        """A pass completed (what it means is :func:`~threadsync.core.rules.after_success`);
        ``False`` (and nothing written) when the connection is no longer live."""
        conn = self.lock_live_connection(session, conn_id)
        if conn is None:
            return False
        now = utcnow()
        conn.last_sync_at = now
        change = rules.after_success(
            state=conn.state, next_attempt_at=conn.next_attempt_at, now=now
        )
        if change is not None:
            self.apply(session, events, conn, change)
        return True

    async def keep_refreshed_secrets(self, conn_id: int, provider: Provider) -> None:
        """Store a provider's refreshed token (``secrets_changed``), encrypted."""
        account = provider.account
        if not account.secrets_changed:
            return
        sealed = self.vault.seal(account.secrets)

        def work(session: Session, _events: EventBuffer) -> None:
            # Never write credentials back into a connection ended meanwhile (R6).
            conn = self.lock_live_connection(session, conn_id)
            if conn is not None and conn.secrets is not None:
                conn.secrets = sealed

        await self.unit_of_work(work)
        account.secrets_changed = False

    def lock_live_connection(self, session: Session, conn_id: int) -> Connection | None:
        """The connection, if it is still live, held until ``session`` commits.

        Ending a connection (:mod:`~threadsync.core.accounts.connections`) writes its
        row before it deletes
        the cursors, so a unit of work that takes this first either sees the end
        and writes nothing, or makes the end wait until it has committed; it never
        updates a cursor that is being deleted, nor overwrites a final state.
        A guarded no-op UPDATE does the holding: on PostgreSQL it locks the row and
        re-checks the state once a concurrent end commits; on SQLite, which has no
        row locks and whose driver begins a transaction only at the first write,
        it takes the database's write lock before anything else is read.
        """
        held = session.scalar(
            update(Connection)
            .where(Connection.id == conn_id, Connection.state.in_(LIVE_STATES))
            .values(state=Connection.state)
            .returning(Connection.id)
            .execution_options(synchronize_session=False)
        )
        if held is None:
            return None
        if self.connection_guard is not None and not self.connection_guard(session, conn_id):
            log.warning("connection held by another worker", extra={"connection_id": conn_id})
            return None
        return session.get(Connection, conn_id, populate_existing=True)

    def get_connection(self, session: Session, conn_id: int) -> Connection:
        conn = session.get(Connection, conn_id)
        if conn is None:
            raise NotFound(f"connection {conn_id} not found")
        return conn
