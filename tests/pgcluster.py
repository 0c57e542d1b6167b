"""A private PostgreSQL cluster for tests that stop and start their database.

The machine's shared server is never touched: :class:`PgCluster` runs
``initdb`` into a fresh temporary directory and ``pg_ctl`` on a free loopback
port, with trust authentication and its socket in that directory. Run as root,
the server runs as the ``postgres`` system user (PostgreSQL refuses to run as
root). :meth:`PgCluster.stop` and :meth:`PgCluster.start` give an outage;
:meth:`PgCluster.destroy` stops it and removes its files.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.servers import free_port


def pg_bin() -> Path | None:
    """The newest installed PostgreSQL's ``bin`` directory, if any."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(found[-1]).parent if found else None


class PgCluster:
    """One throwaway PostgreSQL cluster on 127.0.0.1."""

    def __init__(self) -> None:
        binaries = pg_bin()
        if binaries is None:
            raise RuntimeError("PostgreSQL server binaries are not installed")
        self.bin = binaries
        self.root = Path(tempfile.mkdtemp(prefix="threadsync-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self._as: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run(
            [*self._as, str(self.bin / tool), *args],
            check=True,
            capture_output=True,
            timeout=60,
        )

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            "pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.root / "log"),
            "-w", "start",
        )

    def stop(self, mode: str = "fast") -> None:
        """Stop the server; ``immediate`` is a crash (no clean shutdown)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def destroy(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)
