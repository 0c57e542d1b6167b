"""Many mailboxes, several workers: ``python benchmarks/scale.py [--mailboxes N] [--workers W]``.

Starts a private Dovecot in which every user has a uid of its own (Dovecot needs
an inotify instance per IMAP session and the kernel allows 128 per uid, so one
shared uid silently loses push beyond 128 sessions; per-user uids need root,
otherwise it says so and shares one), a fresh PostgreSQL database, N mailboxes
each with a synced thread, and W ``threadsync run`` workers. It prints:

* how long until the workers share the mailboxes with exactly one IMAP session
  each (``doveadm who``), and each worker's share;
* idle figures over a quiet window: worker RSS and CPU, database transactions
  per second (``pg_stat_database``);
* wake latency of contact replies (delivered to a sample of mailboxes, until
  stored) p50 / p95;
* after SIGKILL of one worker: how long until its mailboxes are held by the
  others with one session each, and replies delivered meanwhile lost / stored
  twice.

Numbers are printed, never asserted; the quick size runs in the test suite as
``tests/test_workers.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from sqlalchemy import create_engine, func, select, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from tests.kernelfixtures import CONTACT, make_mail, make_settings, reply_to  # noqa: E402
from tests.servers import make_test_ca  # noqa: E402
from tests.servers.dovecot import DovecotServer  # noqa: E402
from tests.servers.smtp import SmtpServer  # noqa: E402
from threadsync.core.api import Threadsync  # noqa: E402
from threadsync.core.outbox.compose import Draft  # noqa: E402
from threadsync.core.store.models import Message  # noqa: E402

SUB = "scale"
FIRST_UID = 20000
POSTGRES = os.environ.get(
    "THREADSYNC_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


class PerUserDovecot(DovecotServer):
    """The test Dovecot with a uid per user (as root); mail homes made by Dovecot."""

    def __init__(self, workdir: Path, ca: Any) -> None:
        super().__init__(workdir, ca)
        self.per_user = self._running_as_root
        self._uids: dict[str, int] = {}

    def _prepare_root(self) -> None:
        super()._prepare_root()
        if self.per_user:
            (self.root / "mail").chmod(0o1777)

    def _config_text(self) -> str:
        conf = super()._config_text()
        if not self.per_user:
            return conf
        static = f"  driver = static\n  args = uid={self.mail_uid} gid={self.mail_gid} "
        start = conf.index(static)
        end = conf.index("}", start)
        conf = conf[:start] + f"  driver = passwd-file\n  args = {self.users_dir}/%u\n" + conf[end:]
        return conf.replace(f"first_valid_uid = {self.mail_uid}", f"first_valid_uid = {FIRST_UID}")

    def _write_user(self, email: str, password: str) -> bool:
        if not self.per_user:
            return super()._write_user(email, password)
        import base64

        uid = self._uids.setdefault(email, FIRST_UID + len(self._uids))
        encoded = base64.b64encode(password.encode()).decode("ascii")
        home = self.root / "mail" / email
        path = self.users_dir / email
        path.write_text(f"{email}:{{PLAIN.b64}}{encoded}:{uid}:{uid}::{home}::\n")
        path.chmod(0o644)
        return False


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Bench:
    def __init__(self, mailboxes: int, workers: int, workdir: Path) -> None:
        self.n = mailboxes
        self.w = workers
        self.workdir = workdir
        self.dbname = "ts_scale_" + secrets.token_hex(4)
        self.admin = create_engine(POSTGRES, isolation_level="AUTOCOMMIT")
        self.url = make_url(POSTGRES).set(database=self.dbname).render_as_string(False)
        self.procs: list[subprocess.Popen[bytes]] = []

    def xacts(self) -> int:
        with self.admin.connect() as conn:
            conn.execute(text("SELECT pg_stat_clear_snapshot()"))
            return int(conn.execute(
                text("SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = :d"),
                {"d": self.dbname},
            ).scalar_one())  # fmt: skip

    def sessions(self) -> Counter[str]:
        out = self.imap.doveadm("who", "-1").stdout.decode()
        users = (line.split()[0] for line in out.splitlines() if line.split())
        return Counter(u for u in users if u in self.emails.values())

    def held(self) -> dict[str, int]:
        return {w["id"]: w["connections"] for w in self.ts.workers()["workers"] if w["live"]}

    def stored(self, mids: list[str]) -> Counter[str]:
        def work(session: Any) -> Counter[str]:
            rows = session.execute(
                select(Message.message_id, func.count(Message.id))
                .where(Message.message_id.in_(mids))
                .group_by(Message.message_id)
            ).all()
            return Counter(dict(rows))

        return self.ts.kernel.store.call(work)

    def reply(self, user: str, body: str) -> str:
        raw, mid = make_mail(
            sender=CONTACT, to=self.emails[user], subject="Re: Offer", body=body,
            headers=reply_to(self.threads[user]),
        )  # fmt: skip
        self.imap.deliver(self.emails[user], raw, "INBOX")
        return mid

    def start_worker(self) -> subprocess.Popen[bytes]:
        log = (self.workdir / f"worker-{len(self.procs)}.log").open("wb")
        with log:
            proc = subprocess.Popen(
                [sys.executable, str(REPO_ROOT / "cli.py"), "--config", str(self.config), "run"],
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        self.procs.append(proc)
        return proc

    async def until(self, check: Any, timeout: float) -> float:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if await asyncio.to_thread(check):
                return time.monotonic() - start
            await asyncio.sleep(0.1)
        raise SystemExit(f"not within {timeout} s: {check.__name__}")

    async def run(self) -> dict[str, Any]:
        results: dict[str, Any] = {"mailboxes": self.n, "workers": self.w}
        ca = make_test_ca(self.workdir / "tls")
        self.imap = PerUserDovecot(self.workdir / "imap", ca).start()
        results["uid per user"] = self.imap.per_user
        with self.admin.connect() as conn:
            conn.execute(text(f"CREATE DATABASE {self.dbname}"))
        try:
            return await self._run(results)
        finally:
            for proc in self.procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(30)
            self.imap.stop()
            if hasattr(self, "smtp"):
                self.smtp.stop()
            if hasattr(self, "ts"):
                self.ts.close()
            with self.admin.connect() as conn:
                conn.execute(text(f"DROP DATABASE IF EXISTS {self.dbname} WITH (FORCE)"))
            self.admin.dispose()

    async def _run(self, results: dict[str, Any]) -> dict[str, Any]:
        tag = secrets.token_hex(3)
        self.emails = {f"s{i}": f"scale{i}-{tag}@threadsync.test" for i in range(self.n)}
        passwords = {u: f"pw-{tag}-{u}" for u in self.emails}
        for user, address in self.emails.items():
            self.imap.add_user(address, passwords[user])
        self.smtp = SmtpServer(
            users={self.emails[u]: passwords[u] for u in self.emails},
            require_auth=True,
            deliver_to=self.imap,
        ).start()
        timings = {"poll_interval_seconds": 30, "worker_heartbeat_seconds": 2,
                   "worker_lease_seconds": 10}  # fmt: skip
        settings = make_settings(self.workdir, self.url, self.smtp.port, **timings)
        Threadsync.init(settings)
        self.ts = Threadsync.from_settings(settings)
        self.ts.labs(SUB, enabled=True)
        self.config = self.workdir / "worker.toml"
        self.config.write_text(
            f'[database]\nurl = "{self.url}"\n[security]\nsecret_key_file = '
            f'"{settings.secret_key_file}"\n[sync]\n'
            + "".join(f"{k} = {v}\n" for k, v in timings.items())
            + f'[outbound.default]\nport = {self.smtp.port}\n',
            encoding="utf-8",
        )
        self.threads = {}
        for user, address in self.emails.items():
            await self.ts.connect(
                SUB, user, "imap_smtp", email=address,
                options={"imap_host": self.imap.host, "imap_port": self.imap.port,
                         "smtp_host": self.smtp.host, "smtp_port": self.smtp.port,
                         "security": "none"},
                credentials={"password": passwords[user]},
            )  # fmt: skip
            sent = await self.ts.send(SUB, user, Draft(to=[CONTACT], subject="Offer", text="hi"))
            self.threads[user] = sent["message_id"]
        await self.ts.close_sessions()

        started = time.monotonic()
        for _ in range(self.w):
            self.start_worker()

        def shared() -> bool:
            held = self.held()
            sessions = self.sessions()
            return (
                len(held) == self.w
                and max(held.values()) - min(held.values()) <= 1
                and sum(held.values()) == self.n
                and all(sessions[e] == 1 for e in self.emails.values())
            )

        await self.until(shared, 300)
        results["shared out, one session each (s)"] = round(time.monotonic() - started, 1)
        results["shares"] = sorted(self.held().values())

        await asyncio.sleep(5)  # settle, then a quiet window
        window = 10.0
        pids = [p.pid for p in self.procs]
        cpu0, x0 = [cpu_seconds(p) for p in pids], self.xacts()
        await asyncio.sleep(window)
        cpu1, x1 = [cpu_seconds(p) for p in pids], self.xacts()
        results["idle CPU per worker (% of a core)"] = [
            round(100 * (b - a) / window, 1) for a, b in zip(cpu0, cpu1, strict=True)
        ]
        results["idle DB transactions/s (all workers)"] = round((x1 - x0) / window, 1)
        results["RSS per worker (MB)"] = [round(rss_kib(p) / 1024) for p in pids]

        sample = list(self.emails)[: min(20, self.n)]
        latencies = []
        for user in sample:
            t0 = time.monotonic()
            mid = await asyncio.to_thread(self.reply, user, "wake")
            await self.until(lambda mid=mid: self.stored([mid])[mid] == 1, 60)
            latencies.append(time.monotonic() - t0)
        q = statistics.quantiles(latencies, n=20) if len(latencies) > 1 else latencies * 19
        results["wake p50 / p95 (s)"] = (round(statistics.median(latencies), 2), round(q[18], 2))

        victim, survivors = self.procs[0], self.procs[1:]
        if survivors:
            victim_id = next(w for w in self.held() if w.endswith(f":{victim.pid}"))
            gone = [c["user"] for c in self.ts.status(SUB)["connections"]
                    if c["worker"] == victim_id]  # fmt: skip
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            killed = time.monotonic()
            replies: list[str] = []

            def reply_all() -> None:
                replies.extend(self.reply(u, "during takeover") for u in self.emails)

            replying = asyncio.create_task(asyncio.to_thread(reply_all))

            def taken_over() -> bool:
                holders = {c["user"]: c["worker"] for c in self.ts.status(SUB)["connections"]}
                sessions = self.sessions()
                return all(
                    holders[u] not in (None, victim_id) and sessions[self.emails[u]] == 1
                    for u in gone
                )

            await self.until(taken_over, 120)
            results["takeover after SIGKILL (s)"] = round(time.monotonic() - killed, 1)
            await replying
            await self.until(lambda: sum(self.stored(replies).values()) >= len(replies), 120)
            results["all replies stored after SIGKILL (s)"] = round(time.monotonic() - killed, 1)
            await asyncio.sleep(2)
            counts = self.stored(replies)
            results["replies lost / stored twice"] = (
                sum(1 for m in replies if counts[m] == 0),
                sum(1 for m in replies if counts[m] > 1),
            )
        return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mailboxes", type=int, default=50)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="threadsync-scale-") as tmp:
        results = asyncio.run(Bench(args.mailboxes, args.workers, Path(tmp)).run())
    width = max(len(k) for k in results)
    for key, value in results.items():
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
