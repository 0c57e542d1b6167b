"""The servers and databases a benchmark run needs, and their cleanup.

:class:`BenchEnvironment` starts one private Dovecot (``tests.servers``) and the
users' SMTP submission server (:mod:`benchmarks.smtp_process`) on loopback, makes
fresh mailbox users, and builds :class:`threadsync.core.api.Threadsync` instances, each on
its own fresh database: a SQLite file, or a new PostgreSQL schema (dropped at
exit), as the test suite does (``tests/dbfixtures.py``). Everything it started is
stopped by :meth:`close`, which also runs on SIGINT/SIGTERM and at interpreter
exit.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import shutil
import signal
import tempfile
from pathlib import Path
from types import FrameType
from typing import Any

from benchmarks.smtp_process import SmtpProcess
from tests.kernelfixtures import make_settings
from tests.servers import start_imap_server
from tests.servers.dovecot import DovecotServer
from threadsync.core.api import Threadsync

SUB = "bench"
PASSWORD = "bench-password"
PASSWORD_ENV = "BENCH_MAILPW"
POSTGRES = os.environ.get(
    "THREADSYNC_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


class BenchEnvironment:
    def __init__(self, database: str, users: list[str], *, keep: bool = False) -> None:
        if database not in ("sqlite", "postgresql"):
            raise ValueError(f"unknown database kind {database!r}")
        self.database = database
        self.keep = keep
        self.workdir = Path(tempfile.mkdtemp(prefix="threadsync-bench-"))
        self.workdir.chmod(0o755)  # Dovecot's mail user must traverse it
        self.user_names = {name: f"{name}-{secrets.token_hex(3)}@bench.test" for name in users}
        self.imap: DovecotServer | None = None
        self.smtp: SmtpProcess | None = None
        self._schemas: list[str] = []
        self._instances: list[Threadsync] = []
        self._closed = False
        self._previous_handlers: dict[int, Any] = {}

    # ---- lifecycle ----------------------------------------------------------------------

    def start(self) -> BenchEnvironment:
        atexit.register(self.close)
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous_handlers[sig] = signal.signal(sig, self._on_signal)
        server = start_imap_server(self.workdir / "imap", "dovecot")
        assert isinstance(server, DovecotServer)
        self.imap = server
        self.smtp = SmtpProcess({email: PASSWORD for email in self.user_names.values()}).start()
        if self.database == "postgresql":
            self._check_postgres()
        return self

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.close()
        raise KeyboardInterrupt(f"signal {signum}")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for ts in self._instances:
            with contextlib.suppress(Exception):
                ts.close()
        if self.smtp is not None:
            self.smtp.stop()
        if self.imap is not None:
            self.imap.stop()
        if self._schemas:
            self._drop_schemas()
        if not self.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)

    # ---- users ----------------------------------------------------------------------------

    def user(self, name: str) -> str:
        """The e-mail address of a benchmark user, created on first use."""
        assert self.imap is not None
        email = self.user_names[name]
        if not self.imap.has_user(email):
            self.imap.add_user(email, PASSWORD)
        return email

    def options(self) -> dict[str, Any]:
        assert self.imap is not None and self.smtp is not None
        return {
            "imap_host": self.imap.host,
            "imap_port": self.imap.port,
            "smtp_host": self.smtp.host,
            "smtp_port": self.smtp.port,
            "security": "none",
            "password_env": PASSWORD_ENV,
        }

    # ---- threadsync instances ------------------------------------------------------------

    def threadsync(self, name: str) -> Threadsync:
        """A threadsync instance on a fresh database, Labs on for :data:`SUB`."""
        assert self.smtp is not None
        home = self.workdir / "ts" / name
        home.mkdir(parents=True)
        settings = make_settings(home, self._database_url(home), self.smtp.port)
        Threadsync.init(settings)
        ts = Threadsync.from_settings(settings, environ={PASSWORD_ENV: PASSWORD})
        ts.labs(SUB, enabled=True)
        self._instances.append(ts)
        return ts

    async def connect(self, ts: Threadsync, user: str, email: str) -> None:
        await ts.connect(SUB, user, "imap_smtp", email=email, options=self.options())

    def _database_url(self, home: Path) -> str:
        if self.database == "sqlite":
            return f"sqlite:///{home / 'threadsync.db'}"
        from sqlalchemy import create_engine, text

        schema = "bench_" + secrets.token_hex(6)
        engine = create_engine(POSTGRES)
        try:
            with engine.begin() as conn:
                conn.execute(text(f"CREATE SCHEMA {schema}"))
        finally:
            engine.dispose()
        self._schemas.append(schema)
        sep = "&" if "?" in POSTGRES else "?"
        return f"{POSTGRES}{sep}options=-csearch_path%3D{schema}"

    def _check_postgres(self) -> None:
        from sqlalchemy import create_engine, text

        engine = create_engine(POSTGRES, connect_args={"connect_timeout": 3})
        try:
            with engine.connect() as conn:
                conn.execute(text("select 1"))
        finally:
            engine.dispose()

    def _drop_schemas(self) -> None:
        from sqlalchemy import create_engine, text

        engine = create_engine(POSTGRES)
        try:
            with engine.begin() as conn:
                for schema in self._schemas:
                    conn.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
        finally:
            engine.dispose()
        self._schemas.clear()
