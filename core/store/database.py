"""The one Store over SQLAlchemy 2.0: engine, sessions and schema upgrades.

``Store.session_scope()`` is the only way code opens a session; it commits on
success and rolls back on any error. Work done on the event loop goes through
``Kernel.unit_of_work``, which runs it in a worker thread in one such scope so
that the loop never blocks on the database. SQLAlchemy
errors are translated into :class:`threadsync.core.errors.StoreError` here.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from threadsync.core.errors import StoreError, ThreadsyncError

log = logging.getLogger(__name__)
T = TypeVar("T")
MIGRATIONS = Path(__file__).parent / "migrations"


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _create_private(path: Path) -> None:
    """Create the SQLite file readable by its owner only (it holds mail); SQLite
    gives its -wal and -shm files the database file's mode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def safe_url(url: str) -> str:
    """The database URL without its password, for messages (R11)."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except SQLAlchemyError:
        return "<unparseable database url>"


class Store:
    """Access to the database named by ``url``."""

    def __init__(self, url: str) -> None:
        self.url = url
        kwargs: dict[str, Any] = {"future": True}
        if url.startswith("sqlite"):
            path = url.split("///", 1)[-1]
            if path and path != ":memory:" and not path.startswith("file:"):
                _create_private(Path(path))
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        else:
            kwargs["pool_pre_ping"] = True
        try:
            self.engine: Engine = create_engine(url, **kwargs)
        except (SQLAlchemyError, ImportError, ValueError) as exc:
            raise StoreError(f"cannot use database {safe_url(url)}: {exc}") from None
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    # ---- schema ----------------------------------------------------------------------

    def _alembic_config(self) -> Config:
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        cfg.attributes["engine"] = self.engine
        return cfg

    def upgrade(self) -> None:
        """Create or upgrade the schema to the newest migration (idempotent)."""
        try:
            command.upgrade(self._alembic_config(), "head")
        except OperationalError as exc:
            raise StoreError(f"cannot reach database {safe_url(self.url)}: {exc.orig}") from None
        except SQLAlchemyError as exc:
            raise StoreError(f"database upgrade failed: {exc}") from None

    def current_revision(self) -> str | None:
        try:
            with self.engine.connect() as conn:
                return MigrationContext.configure(conn).get_current_revision()
        except SQLAlchemyError as exc:
            raise StoreError(f"cannot reach database {safe_url(self.url)}: {exc}") from None

    def check_ready(self) -> None:
        """Raise :class:`StoreError` unless the schema is at the newest migration."""
        head = ScriptDirectory.from_config(self._alembic_config()).get_current_head()
        current = self.current_revision()
        if current != head:
            raise StoreError(
                "the database is not initialised or is out of date: run `threadsync init`"
            )

    def dispose(self) -> None:
        self.engine.dispose()

    # ---- sessions --------------------------------------------------------------------

    @contextmanager
    def session_scope(self) -> Iterator[Session]:
        """A transaction: commit on success, roll back on error."""
        session = self._sessions()
        try:
            yield session
            session.commit()
        except ThreadsyncError:
            session.rollback()
            raise
        except OperationalError as exc:
            session.rollback()
            raise StoreError(f"database unavailable: {exc.orig}") from exc
        except SQLAlchemyError:
            session.rollback()
            raise
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    def call(self, fn: Callable[[Session], T]) -> T:
        """Run ``fn(session)`` in one transaction."""
        with self.session_scope() as session:
            return fn(session)
