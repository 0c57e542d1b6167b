"""Database fixtures: every store test runs on SQLite and on PostgreSQL.

PostgreSQL is the local server at 127.0.0.1:5432 (database ``test``, trust auth),
or ``THREADSYNC_TEST_POSTGRES`` when set. Each test gets its own schema, dropped
afterwards, so tests never see each other's rows. Where no PostgreSQL answers,
its variants are skipped with the reason (CI always has one).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

POSTGRES = os.environ.get(
    "THREADSYNC_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
_pg_ok: bool | None = None


def postgres_available() -> bool:
    global _pg_ok
    if _pg_ok is None:
        engine = create_engine(POSTGRES, connect_args={"connect_timeout": 3})
        try:
            with engine.connect() as conn:
                conn.execute(text("select 1"))
            _pg_ok = True
        except OperationalError:
            _pg_ok = False
        finally:
            engine.dispose()
    return _pg_ok


@contextmanager
def fresh_database(kind: str, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database URL: SQLite in tmp_path, or a new PostgreSQL schema."""
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'threadsync.db'}"
        return
    if not postgres_available():
        pytest.skip("no PostgreSQL server answers at " + POSTGRES.split("@")[-1])
    schema = "ts_" + secrets.token_hex(6)
    admin = create_engine(POSTGRES)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    sep = "&" if "?" in POSTGRES else "?"
    try:
        yield f"{POSTGRES}{sep}options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Runs the test once on SQLite and once on PostgreSQL."""
    with fresh_database(request.param, tmp_path) as url:
        yield url


@pytest.fixture
def scenario_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """SQLite unless a test parametrizes it (indirect) with "postgresql"."""
    with fresh_database(getattr(request, "param", "sqlite"), tmp_path) as url:
        yield url
