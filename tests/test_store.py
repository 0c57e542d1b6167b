"""The store on SQLite and PostgreSQL: migrations from an empty database, and the
unique constraints that make R9 hold whatever the code above them does."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import inspect, select
from sqlalchemy.exc import IntegrityError

from threadsync.core.errors import ConfigError, StoreError
from threadsync.core.store.database import Store, safe_url
from threadsync.core.store.models import (
    Connection,
    Cursor,
    Message,
    OutboxEntry,
    SubAccount,
    SyncedThread,
)
from threadsync.core.store.vault import Vault


@pytest.fixture
def store(database_url: str) -> Iterator[Store]:
    s = Store(database_url)
    s.upgrade()
    yield s
    s.dispose()


def _thread(session, sub: str = "acme", tid: str = "th_1", token: str = "tok1") -> SyncedThread:  # type: ignore[no-untyped-def]
    if session.get(SubAccount, sub) is None:
        session.add(SubAccount(id=sub, two_way_email_sync=True))
    t = SyncedThread(id=tid, token=token, subaccount_id=sub, user_id="u1", state="active")
    session.add(t)
    session.flush()
    return t


def _message(tid: str, mid: str) -> Message:
    return Message(
        thread_id=tid,
        subaccount_id="acme",
        message_id=mid,
        direction="inbound",
        origin="mailbox",
        state="synced",
    )


def test_upgrade_from_empty_is_idempotent(database_url: str) -> None:
    s = Store(database_url)
    with pytest.raises(StoreError, match="threadsync init"):
        s.check_ready()
    s.upgrade()
    s.upgrade()
    s.check_ready()
    tables = set(inspect(s.engine).get_table_names())
    assert {
        "subaccounts",
        "connections",
        "threads",
        "messages",
        "attachments",
        "cursors",
        "outbox",
        "events",
        "alembic_version",
        "sign_ins",
    } <= tables
    s.dispose()


def test_the_migrations_build_exactly_the_models(database_url: str) -> None:
    """What ``alembic upgrade head`` creates is what threadsync.core.store.models declares: no
    column, index or constraint missing from a migration."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from threadsync.core.store.models import Base

    s = Store(database_url)
    s.upgrade()
    with s.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(context, Base.metadata)
    s.dispose()
    assert diff == []


def test_one_message_per_message_id_per_thread(store: Store) -> None:
    with store.session_scope() as session:
        _thread(session)
        session.add(_message("th_1", "<a@x>"))
    with pytest.raises(IntegrityError), store.session_scope() as session:
        session.add(_message("th_1", "<a@x>"))
    with store.session_scope() as session:
        assert session.scalars(select(Message)).all()[0].message_id == "<a@x>"
        assert len(session.scalars(select(Message)).all()) == 1


def test_one_live_connection_per_user(store: Store) -> None:
    def conn(state: str, email: str) -> Connection:
        return Connection(
            subaccount_id="acme",
            user_id="u1",
            provider="imap_smtp",
            email=email,
            state=state,
            settings={},
        )

    with store.session_scope() as session:
        session.add(SubAccount(id="acme", two_way_email_sync=True))
        session.flush()
        session.add(conn("replaced", "old@x.test"))
        session.add(conn("disconnected", "older@x.test"))
        session.add(conn("connected", "new@x.test"))
    with pytest.raises(IntegrityError), store.session_scope() as session:
        session.add(conn("needs_reauth", "other@x.test"))
    with store.session_scope() as session:
        assert len(session.scalars(select(Connection)).all()) == 3


def test_one_cursor_per_folder_role_and_one_outbox_entry_per_message(store: Store) -> None:
    with store.session_scope() as session:
        session.add(SubAccount(id="acme", two_way_email_sync=True))
        session.flush()
        c = Connection(
            subaccount_id="acme",
            user_id="u1",
            provider="p",
            email="a@x.test",
            state="connected",
            settings={},
        )
        session.add(c)
        session.flush()
        session.add(Cursor(connection_id=c.id, role="inbox", folder="INBOX", data={"uidnext": 1}))
        t = _thread(session)
        m = _message(t.id, "<b@x>")
        session.add(m)
        session.flush()
        session.add(
            OutboxEntry(
                message_pk=m.id,
                channel="mailbox",
                sender="a@x.test",
                recipients=["b@y.test"],
                raw=b"x",
            )
        )
        cid, mpk = c.id, m.id
    with pytest.raises(IntegrityError), store.session_scope() as session:
        session.add(Cursor(connection_id=cid, role="inbox", folder="INBOX", data={}))
    with pytest.raises(IntegrityError), store.session_scope() as session:
        session.add(
            OutboxEntry(
                message_pk=mpk, channel="mailbox", sender="a@x.test", recipients=[], raw=b"x"
            )
        )


def test_unreachable_database_is_a_store_error() -> None:
    s = Store("postgresql+psycopg://nobody:hunter2@127.0.0.1:1/none?connect_timeout=2")
    with pytest.raises(StoreError) as info:
        s.upgrade()
    assert "hunter2" not in str(info.value)
    assert "***" in safe_url(s.url)
    s.dispose()


def test_vault_round_trip_and_wrong_key(tmp_path: Path) -> None:
    key = tmp_path / "k" / "secret.key"
    assert Vault.create_key_file(key) is True
    assert Vault.create_key_file(key) is False
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    sealed = Vault.from_file(key).seal({"password": "hunter2"})
    assert b"hunter2" not in sealed
    assert Vault.from_file(key).open(sealed) == {"password": "hunter2"}
    other = tmp_path / "other.key"
    Vault.create_key_file(other)
    with pytest.raises(StoreError, match="cannot be decrypted"):
        Vault.from_file(other).open(sealed)
    with pytest.raises(ConfigError, match="init"):
        Vault.from_file(tmp_path / "missing.key")
