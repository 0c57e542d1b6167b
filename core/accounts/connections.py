"""Sub-accounts and connections: the Labs flag (R1), connect and re-authorise
(R2, R2a), disconnect (R6), update-email (R7) and status.

Every network check (logging in to a new mailbox) happens before the
transaction that records its result, so a failed login changes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from threadsync.core import rules
from threadsync.core.errors import (
    AlreadyConnected,
    ConfigError,
    LabsDisabled,
    NotFound,
    ProviderError,
    Refused,
)
from threadsync.core.host.events import EventBuffer
from threadsync.core.kernel import Kernel
from threadsync.core.mime import check_address
from threadsync.core.provider import Account, Provider, resolve_credentials
from threadsync.core.rules import (
    LIVE_STATES,
    ConnectionState,
    MessageState,
    OutboxStatus,
    ThreadState,
)
from threadsync.core.store.models import (
    Connection,
    Cursor,
    Message,
    OutboxEntry,
    SubAccount,
    SyncedThread,
    iso,
    utcnow,
)
from threadsync.core.sync import workers

log = logging.getLogger(__name__)



def get_subaccount(session: Session, subaccount: str, *, create: bool = False) -> SubAccount:
    sub = session.get(SubAccount, subaccount)
    if sub is None:
        if not create:
            raise NotFound(f"sub-account {subaccount!r} not found")
        sub = SubAccount(id=subaccount, two_way_email_sync=False)
        session.add(sub)
        session.flush()
    return sub


def labs_on(session: Session, subaccount: str) -> bool:
    sub = session.get(SubAccount, subaccount)
    return bool(sub and sub.two_way_email_sync)


def require_labs(session: Session, subaccount: str) -> None:
    """R1: connect and update-email need the sub-account's Labs flag."""
    if not labs_on(session, subaccount):
        raise LabsDisabled(
            f"two-way email sync is a Labs feature: enable it for sub-account "
            f"{subaccount!r} first (threadsync labs enable {subaccount})"
        )


def live_connection(session: Session, subaccount: str, user: str) -> Connection | None:
    return session.scalars(
        select(Connection).where(
            Connection.subaccount_id == subaccount,
            Connection.user_id == user,
            Connection.state.in_(LIVE_STATES),
        )
    ).first()


# ---- Labs (R1) ------------------------------------------------------------------------


def set_labs(k: Kernel, subaccount: str, enabled: bool) -> dict[str, Any]:
    """Switch the Labs flag. Off pauses every connection of the sub-account;
    on resumes them, and the cursors they kept make the next pass catch up."""
    _check_id(subaccount, "sub-account")

    def work(session: Session) -> dict[str, Any]:
        sub = get_subaccount(session, subaccount, create=True)
        if sub.two_way_email_sync != enabled:
            sub.two_way_email_sync = enabled
            sub.labs_changed_at = utcnow()
        return labs_json(sub)

    return k.store.call(work)


def labs_status(k: Kernel, subaccount: str) -> dict[str, Any]:
    def work(session: Session) -> dict[str, Any]:
        sub = session.get(SubAccount, subaccount)
        return {
            "subaccount": subaccount,
            "two_way_email_sync": bool(sub and sub.two_way_email_sync),
        }

    return k.store.call(work)


def labs_json(sub: SubAccount) -> dict[str, Any]:
    return {"subaccount": sub.id, "two_way_email_sync": sub.two_way_email_sync}


def _check_id(value: str, what: str) -> None:
    if not value or len(value) > 255 or any(ch in value for ch in "\r\n\0"):
        from threadsync.core.errors import InvalidInput

        raise InvalidInput(f"{what} id must be 1-255 characters without line breaks")


# ---- connect / re-authorise (R2, R2a) -----------------------------------------------------


async def _verified(
    k: Kernel, cls: type[Provider], account: Account
) -> list[tuple[str, str, dict[str, Any]]]:
    """Log in to the mailbox and place a cursor at the end of each folder: history
    from before the connection is never read. Returns (role, folder, cursor)."""
    provider = cls(account, k.provider_settings.get(cls.name, {}))
    try:
        await provider.open()
        await provider.verify()
        placed: list[tuple[str, str, dict[str, Any]]] = []
        for folder in await provider.folders():
            batch = await provider.changes(folder, None)
            placed.append((folder.role, folder.name, batch.cursor))
        return placed
    finally:
        await provider.close()


def _connect_precheck(
    subaccount: str, user: str, provider: str, email: str
) -> Callable[[Session], Connection | None]:
    """The checks before and after signing in to connect: Labs on (R1), no other
    address connected; returns the connection to re-authorise, if any."""

    def precheck(session: Session) -> Connection | None:
        require_labs(session, subaccount)
        live = live_connection(session, subaccount, user)
        if live is None:
            return None
        if live.state == ConnectionState.CONNECTED:
            raise AlreadyConnected(
                f"user {user!r} already has {live.email} connected; "
                f"use update-email to change the address"
            )
        if live.email.lower() != email.lower() or live.provider != provider:
            raise Refused(
                f"user {user!r} has {live.email} ({live.state}); re-authorise that address "
                f"or use update-email to change it"
            )
        return live

    return precheck


def _update_precheck(subaccount: str, user: str) -> Callable[[Session], Connection]:
    """The checks before and after signing in to update-email (R1, R7)."""

    def precheck(session: Session) -> Connection:
        require_labs(session, subaccount)
        live = live_connection(session, subaccount, user)
        if live is None:
            raise NotFound(f"user {user!r} has no connected mailbox to update; use connect")
        return live

    return precheck


def checked_request(
    k: Kernel, subaccount: str, user: str, provider: str, email: str
) -> tuple[str, type[Provider]]:
    """Validate the ids and the address; the normalised address and the provider."""
    _check_id(subaccount, "sub-account")
    _check_id(user, "user")
    return check_address(email, "email address"), k.provider_class(provider)


async def precheck(
    k: Kernel, subaccount: str, user: str, provider: str, email: str, *, update: bool
) -> None:
    """Raise what connect (or update-email) would refuse before any sign-in."""
    check: Callable[[Session], object] = (
        _update_precheck(subaccount, user)
        if update
        else _connect_precheck(subaccount, user, provider, email)
    )
    await k.unit_of_work(lambda session, _: check(session))


def resolve_secrets(
    k: Kernel,
    cls: type[Provider],
    options: Mapping[str, Any],
    credentials: Mapping[str, str],
) -> dict[str, str]:
    """``cls``'s secrets for a connect: ``credentials`` given directly, else the
    variables of this process's environment that the options name."""
    return resolve_credentials(cls.options, options, k.environ, credentials)


async def connect(
    k: Kernel,
    subaccount: str,
    user: str,
    provider: str,
    email: str,
    options: Mapping[str, Any],
    notify: Callable[[str], None] = log.info,
    credentials: Mapping[str, str] | None = None,
    tenant: bool = False,
) -> dict[str, Any]:
    """Connect a user's mailbox, or re-authorise one in ``needs_reauth``/``error``.

    ``notify`` shows the user what an interactive sign-in needs (a consent URL);
    ``credentials`` are secrets given directly instead of through ``*_env`` options;
    ``tenant``: a tenant named the hosts, so they are held to the network policy
    (:meth:`Kernel.hold_to_policy`), now and at every later connect."""
    return await _authorized(
        connect_with, k, subaccount, user, provider, email, options, notify,
        credentials or {}, tenant,
    )  # fmt: skip


Finish = Callable[
    [Kernel, str, str, str, str, Callable[[], Awaitable[Account]]], Awaitable[dict[str, Any]]
]


async def _authorized(
    finish: Finish,
    k: Kernel,
    subaccount: str,
    user: str,
    provider: str,
    email: str,
    options: Mapping[str, Any],
    notify: Callable[[str], None],
    credentials: Mapping[str, str],
    tenant: bool,
) -> dict[str, Any]:
    """``finish`` (connect or update-email) with the account the provider's
    :meth:`~threadsync.core.provider.Provider.authorize` signs in."""
    email, cls = checked_request(k, subaccount, user, provider, email)
    settings = k.provider_settings.get(cls.name, {})
    secrets = resolve_secrets(k, cls, options, credentials)

    async def signed_in() -> Account:
        account = await cls.authorize(email, options, secrets, notify, settings)
        return k.hold_to_policy(account, tenant)

    return await finish(k, subaccount, user, provider, email, signed_in)


async def connect_with(
    k: Kernel,
    subaccount: str,
    user: str,
    provider: str,
    email: str,
    authorize: Callable[[], Awaitable[Account]],
) -> dict[str, Any]:
    """Connect (or re-authorise) with the account that ``authorize()`` signs in."""
    cls = k.provider_class(provider)
    precheck = _connect_precheck(subaccount, user, provider, email)
    existing = await k.unit_of_work(lambda session, _: precheck(session))
    account = await authorize()
    placed = await _verified(k, cls, account)

    def record(session: Session, events: EventBuffer) -> dict[str, Any]:
        precheck(session)  # the world may have changed while we logged in
        if existing is not None:
            conn = k.get_connection(session, existing.id)
            conn.settings = account.settings
            conn.secrets = k.vault.seal(account.secrets)
            known = {c.role for c in conn.cursors}
            for role, folder, cursor in placed:
                if role not in known:
                    session.add(
                        Cursor(connection_id=conn.id, role=role, folder=folder, data=cursor)
                    )
            k.apply(session, events, conn, rules.connected())
        else:
            conn = _new_connection(session, k, events, subaccount, user, provider, account, placed)
        return connection_json(conn, paused=False)

    return await k.unit_of_work(record)


def _new_connection(
    session: Session,
    k: Kernel,
    events: EventBuffer,
    subaccount: str,
    user: str,
    provider: str,
    account: Account,
    placed: list[tuple[str, str, dict[str, Any]]],
) -> Connection:
    conn = Connection(
        subaccount_id=subaccount,
        user_id=user,
        provider=provider,
        email=account.email,
        state=ConnectionState.CONNECTED,
        settings=account.settings,
        secrets=k.vault.seal(account.secrets),
        failures=0,
    )
    session.add(conn)
    session.flush()
    for role, folder, cursor in placed:
        session.add(Cursor(connection_id=conn.id, role=role, folder=folder, data=cursor))
    events.connection(session, conn, None)
    return conn


# ---- ending a connection (R6, R7) -----------------------------------------------------------


def _end(session: Session, k: Kernel, events: EventBuffer, conn: Connection, state: str) -> None:
    """Final state for ``conn``: credentials and cursors deleted, threads stopped,
    queued CRM mail sent by the default channel instead."""
    k.set_state(session, events, conn, state)
    conn.secrets = None
    conn.ended_at = utcnow()
    for cursor in list(conn.cursors):
        session.delete(cursor)
    threads = session.scalars(
        select(SyncedThread).where(
            SyncedThread.connection_id == conn.id, SyncedThread.state == ThreadState.ACTIVE
        )
    ).all()
    for thread in threads:
        thread.state = ThreadState.STOPPED
        thread.stop_reason = state
        events.thread_stopped(session, thread)
    queued = session.scalars(
        select(OutboxEntry).where(
            OutboxEntry.connection_id == conn.id,
            OutboxEntry.status.in_((OutboxStatus.PENDING, OutboxStatus.CLAIMED)),
        )
    ).all()
    for entry in queued:
        entry.channel = "default"
        entry.connection_id = None
        entry.sender = k.settings.default_channel.from_address
        msg = session.get(Message, entry.message_pk)
        if msg is not None:
            msg.state = MessageState.SKIPPED
            msg.reason = state
            events.message(session, msg.thread, msg)


async def _forget(k: Kernel, subaccount: str, user: str) -> None:
    """Let the live connection's provider release its server-side state (R6)."""
    conn = await k.unit_of_work(lambda s, _: live_connection(s, subaccount, user))
    if conn is None or conn.secrets is None:
        return
    cls = k.provider_class(conn.provider)
    if cls.forget is Provider.forget:
        return  # nothing kept on the server: no need to log in
    provider = k.provider_for(conn)
    try:
        await provider.open()
        await provider.forget()
    except (ProviderError, ConfigError) as exc:
        log.warning("provider state not released: %s", exc, extra={"connection_id": conn.id})
    finally:
        await provider.close()


async def disconnect(k: Kernel, subaccount: str, user: str) -> dict[str, Any]:
    await _forget(k, subaccount, user)

    def work(session: Session, events: EventBuffer) -> dict[str, Any]:
        conn = live_connection(session, subaccount, user)
        if conn is None:
            raise NotFound(f"user {user!r} of sub-account {subaccount!r} has no connected mailbox")
        _end(session, k, events, conn, rules.DISCONNECTED)
        return connection_json(conn, paused=not labs_on(session, subaccount))

    return await k.unit_of_work(work)


async def update_email(
    k: Kernel,
    subaccount: str,
    user: str,
    provider: str,
    email: str,
    options: Mapping[str, Any],
    notify: Callable[[str], None] = log.info,
    credentials: Mapping[str, str] | None = None,
    tenant: bool = False,
) -> dict[str, Any]:
    """Replace the connected address without a gap: the new connection is verified
    first, then in one transaction the old one becomes ``replaced``. ``credentials``
    and ``tenant`` as for :func:`connect`."""
    return await _authorized(
        update_email_with, k, subaccount, user, provider, email, options, notify,
        credentials or {}, tenant,
    )  # fmt: skip


async def update_email_with(
    k: Kernel,
    subaccount: str,
    user: str,
    provider: str,
    email: str,
    authorize: Callable[[], Awaitable[Account]],
) -> dict[str, Any]:
    """Update-email with the account that ``authorize()`` signs in."""
    cls = k.provider_class(provider)
    precheck = _update_precheck(subaccount, user)
    await k.unit_of_work(lambda session, _: precheck(session))
    account = await authorize()
    placed = await _verified(k, cls, account)
    await _forget(k, subaccount, user)

    def record(session: Session, events: EventBuffer) -> dict[str, Any]:
        old = precheck(session)
        _end(session, k, events, old, rules.REPLACED)
        session.flush()
        conn = _new_connection(session, k, events, subaccount, user, provider, account, placed)
        return connection_json(conn, paused=False)

    return await k.unit_of_work(record)


# ---- status ------------------------------------------------------------------------------


def connection_json(conn: Connection, *, paused: bool) -> dict[str, Any]:
    return {
        "id": conn.id,
        "subaccount": conn.subaccount_id,
        "user": conn.user_id,
        "provider": conn.provider,
        "email": conn.email,
        "state": conn.state,
        "paused": paused and conn.state in LIVE_STATES,
        "since": iso(conn.since),
        "last_error": conn.last_error,
        "last_sync_at": iso(conn.last_sync_at),
    }


def status(k: Kernel, subaccount: str, user: str | None = None) -> dict[str, Any]:
    def work(session: Session) -> dict[str, Any]:
        query = select(Connection).where(Connection.subaccount_id == subaccount)
        if user is not None:
            query = query.where(Connection.user_id == user)
        paused = not labs_on(session, subaccount)
        rows = session.scalars(query.order_by(Connection.user_id, Connection.id)).all()
        held = workers.holders(session, (c.id for c in rows))
        return {
            "connections": [
                {**connection_json(c, paused=paused), "worker": held.get(c.id)} for c in rows
            ]
        }

    return k.store.call(work)
