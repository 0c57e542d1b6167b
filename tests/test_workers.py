"""Several `threadsync run` workers on one PostgreSQL database share the mailboxes:
each mailbox has exactly one IMAP session on the real Dovecot, the mailboxes of a
worker killed with SIGKILL are taken over, contact replies arriving meanwhile are
stored exactly once, CRM mail queued by the CLI is sent once by the holder (woken
through NOTIFY), and on SQLite a second worker is refused naming PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from tests.daemonproc import terminate
from tests.dbfixtures import fresh_database
from tests.kernelfixtures import CONTACT, SUB, make_mail, make_settings, reply_to
from tests.servers import ImapServer
from tests.servers.smtp import SmtpServer
from tests.servers.tlscerts import TestCA
from threadsync.core.api import Threadsync
from threadsync.core.outbox.compose import Draft
from threadsync.core.store.models import Message
from threadsync.core.sync.workers import CHANNEL

ROOT = Path(__file__).resolve().parent.parent
MAILBOXES = 20


@dataclass
class Fleet:
    """N mailboxes connected on one PostgreSQL database, one synced thread each."""

    ts: Threadsync
    imap: ImapServer
    submission: SmtpServer
    config: Path
    emails: dict[str, str]  # user -> address
    threads: dict[str, dict[str, Any]]  # user -> the CRM's first message

    def start_worker(self) -> subprocess.Popen[bytes]:
        # The log goes to a file: twenty connections' lines would fill a pipe.
        log = (self.config.parent / f"worker-{time.monotonic_ns()}.log").open("wb")
        with log:
            return subprocess.Popen(
                [sys.executable, str(ROOT / "cli.py"), "--config", str(self.config), "run"],
                env=dict(os.environ),
                stdout=subprocess.DEVNULL,
                stderr=log,
            )

    def logs(self) -> str:
        return "".join(p.read_text() for p in sorted(self.config.parent.glob("worker-*.log")))

    def cli(self, *args: str) -> Any:
        out = subprocess.run(
            [sys.executable, str(ROOT / "cli.py"), "--config", str(self.config), "--json", *args],
            capture_output=True,
            timeout=60,
            check=True,
        )
        return json.loads(out.stdout)

    def sessions(self) -> Counter[str]:
        """IMAP sessions per address of this fleet, as Dovecot counts them."""
        out = self.imap.doveadm("who", "-1").stdout.decode()  # type: ignore[attr-defined]
        ours = set(self.emails.values())
        users = (line.split()[0] for line in out.splitlines() if line.split())
        return Counter(u for u in users if u in ours)

    def holders(self) -> dict[str, str | None]:
        return {c["user"]: c["worker"] for c in self.ts.status(SUB)["connections"]}

    def count_stored(self, message_ids: list[str]) -> Counter[str]:
        def work(session: Any) -> Counter[str]:
            rows = session.execute(
                select(Message.message_id, func.count(Message.id))
                .where(Message.message_id.in_(message_ids))
                .group_by(Message.message_id)
            ).all()
            return Counter({mid: n for mid, n in rows})

        return self.ts.kernel.store.call(work)

    def contact_replies(self, user: str, body: str) -> str:
        raw, mid = make_mail(
            sender=CONTACT,
            to=self.emails[user],
            subject="Re: Offer",
            body=body,
            headers=reply_to(self.threads[user]["message_id"]),
        )
        self.imap.deliver(self.emails[user], raw, "INBOX")
        return mid


async def until(check: Callable[[], bool], timeout: float, what: str) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if await asyncio.to_thread(check):
            return time.monotonic() - start
        await asyncio.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout} s")


@pytest.fixture
async def fleet(
    tmp_path: Path, imap_server: ImapServer, test_ca: TestCA, relay: SmtpServer
) -> AsyncIterator[Fleet]:
    if imap_server.kind != "dovecot":
        pytest.skip("counting sessions needs Dovecot")
    with fresh_database("postgresql", tmp_path) as url:
        tag = os.urandom(3).hex()
        emails = {f"w{i}": f"fleet{i}-{tag}@threadsync.test" for i in range(MAILBOXES)}
        passwords = {user: f"pw-{tag}-{i}" for i, user in enumerate(emails)}
        for user, address in emails.items():
            imap_server.add_user(address, passwords[user])
        submission = SmtpServer(
            users={emails[u]: passwords[u] for u in emails},
            ca=test_ca,
            require_auth=True,
            deliver_to=imap_server,
        ).start()
        timings = {
            "poll_interval_seconds": 60,
            "idle_seconds": 60,
            "backoff_base_seconds": 0.2,
            "backoff_max_seconds": 1,
            "worker_heartbeat_seconds": 1,
            "worker_lease_seconds": 4,
        }
        settings = make_settings(tmp_path, url, relay.port, **timings)
        Threadsync.init(settings)
        ts = Threadsync.from_settings(settings)
        ts.labs(SUB, enabled=True)
        config = tmp_path / "worker.toml"
        config.write_text(
            f'[database]\nurl = "{url}"\n[security]\nsecret_key_file = '
            f'"{settings.secret_key_file}"\n[sync]\n'
            + "".join(f"{k} = {v}\n" for k, v in timings.items())
            + f'[outbound.default]\nhost = "127.0.0.1"\nport = {relay.port}\n'
            'security = "none"\nfrom_address = "crm@threadsync.local"\n',
            encoding="utf-8",
        )
        threads = {}
        for user, address in emails.items():
            await ts.connect(
                SUB,
                user,
                "imap_smtp",
                email=address,
                options={
                    "imap_host": imap_server.host,
                    "imap_port": imap_server.port,
                    "smtp_host": submission.host,
                    "smtp_port": submission.port,
                    "security": "none",
                },
                credentials={"password": passwords[user]},
            )
            threads[user] = await ts.send(
                SUB, user, Draft(to=[CONTACT], subject="Offer", text="hi")
            )
            assert threads[user]["status"] == "sent"
        await ts.close_sessions()
        try:
            yield Fleet(ts, imap_server, submission, config, emails, threads)
        finally:
            await ts.aclose()
            submission.stop()


async def test_two_workers_share_the_mailboxes_and_take_over_after_sigkill(
    fleet: Fleet,
) -> None:
    a = fleet.start_worker()
    await asyncio.sleep(1.0)
    b = fleet.start_worker()
    procs = [a, b]
    try:
        # Both workers live, each holding its share, each mailbox one session.
        def shared() -> bool:
            workers = fleet.ts.workers()["workers"]
            held = sorted(w["connections"] for w in workers if w["live"])
            sessions = fleet.sessions()
            return held == [MAILBOXES // 2] * 2 and all(
                sessions[e] == 1 for e in fleet.emails.values()
            )

        took = await until(shared, 45, "two workers sharing the mailboxes")
        print(f"\nshared out in {took:.1f} s")
        await asyncio.sleep(2.0)  # and it stays so
        assert shared()
        cli_view = fleet.cli("workers")["workers"]
        ids = {f"{w['host']}:{w['pid']}" for w in cli_view}
        assert {p.pid for p in procs} == {int(i.rpartition(":")[2]) for i in ids}
        holders = fleet.holders()
        assert set(holders.values()) == {w["id"] for w in cli_view}

        # A CRM reply queued by the CLI is left to the holder, which is woken.
        user = "w3"
        holder = holders[user]
        listener = await psycopg.AsyncConnection.connect(
            make_url(fleet.ts.settings.database_url)
            .set(drivername="postgresql")
            .render_as_string(hide_password=False),
            autocommit=True,
        )
        async with listener:
            await listener.execute(f"LISTEN {CHANNEL}")
            asked = time.monotonic()
            queued = await asyncio.to_thread(
                fleet.cli, "reply", fleet.threads[user]["thread_id"], "--text", "from the CLI"
            )
            assert queued["status"] == "queued", "the CLI must leave it to the holder"
            payloads = []
            async for note in listener.notifies(timeout=5, stop_after=1):
                payloads.append(note.payload)
        conn_id = next(
            c["id"] for c in fleet.ts.status(SUB, user)["connections"] if c["state"] != "replaced"
        )
        assert payloads == [str(conn_id)]
        mid = queued["message_id"].strip("<>")
        await until(
            lambda: len(fleet.submission.by_message_id(mid)) == 1, 30, "CLI reply delivered"
        )
        took = time.monotonic() - asked
        print(f"CLI reply (a CLI process of its own) delivered by {holder} {took:.1f} s after")

        # SIGKILL the holder of w0; replies keep arriving during the takeover.
        victim = next(p for p in procs if holders["w0"].endswith(f":{p.pid}"))
        survivor = next(p for p in procs if p is not victim)
        lost = [u for u, h in holders.items() if h.endswith(f":{victim.pid}")]
        assert len(lost) == MAILBOXES // 2
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        killed_at = time.monotonic()
        replies: list[str] = []

        def reply_meanwhile() -> None:
            for round_ in range(3):
                replies.extend(fleet.contact_replies(u, f"reply {round_}") for u in fleet.emails)

        replying = asyncio.create_task(asyncio.to_thread(reply_meanwhile))

        def taken_over() -> bool:
            sessions = fleet.sessions()
            held = fleet.holders()
            return all(
                h is not None and h.endswith(f":{survivor.pid}") for h in held.values()
            ) and all(sessions[e] == 1 for e in fleet.emails.values())

        await until(taken_over, 60, "takeover of the killed worker's mailboxes")
        takeover = time.monotonic() - killed_at
        await replying
        await until(
            lambda: sum(fleet.count_stored(replies).values()) >= len(replies),
            60,
            "every reply stored",
        )
        stored_all = time.monotonic() - killed_at
        print(f"takeover {takeover:.1f} s, all {len(replies)} replies stored {stored_all:.1f} s")
        await asyncio.sleep(2.0)
        counts = fleet.count_stored(replies)
        assert [mid for mid in replies if counts[mid] != 1] == []
        assert len(fleet.submission.by_message_id(mid)) == 1
        survivors = [w for w in fleet.ts.workers()["workers"] if w["live"]]
        assert [(w["pid"], w["connections"]) for w in survivors] == [(survivor.pid, MAILBOXES)]

        # A new worker joins and takes its share from the survivor.
        joiner = fleet.start_worker()
        procs.append(joiner)
        took = await until(shared, 60, "a new worker taking its share")
        print(f"a new worker had its share {took:.1f} s after it was started")

        # The new worker pauses (SIGSTOP: alive but silent, like a machine cut
        # off): its leases run out and the survivor takes its mailboxes over.
        # Resumed, it stops working on them before anything else, then takes a
        # share again.
        paused = [u for u, h in fleet.holders().items() if h and h.endswith(f":{joiner.pid}")]
        assert len(paused) == MAILBOXES // 2
        joiner.send_signal(signal.SIGSTOP)
        paused_at = time.monotonic()
        more = await asyncio.to_thread(
            lambda: [fleet.contact_replies(u, "while paused") for u in paused]
        )

        def all_with_survivor() -> bool:
            return all(h and h.endswith(f":{survivor.pid}") for h in fleet.holders().values())

        await until(all_with_survivor, 60, "takeover of a silent worker's mailboxes")
        expiry = time.monotonic() - paused_at
        await until(
            lambda: sum(fleet.count_stored(more).values()) >= len(more), 60, "replies stored"
        )
        print(f"silent worker's mailboxes taken over by lease expiry after {expiry:.1f} s")
        joiner.send_signal(signal.SIGCONT)
        took = await until(shared, 60, "the resumed worker sharing again")
        print(f"the resumed worker had its share again after {took:.1f} s")
        assert "connection leases lost" in fleet.logs()
        final = await asyncio.to_thread(
            lambda: [fleet.contact_replies(u, "after resume") for u in fleet.emails]
        )
        everything = replies + more + final
        await until(
            lambda: sum(fleet.count_stored(everything).values()) >= len(everything),
            60,
            "replies after the resume stored",
        )
        await asyncio.sleep(1.0)
        counts = fleet.count_stored(everything)
        assert [m for m in everything if counts[m] != 1] == []
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                terminate(proc, 20)
    assert survivor.returncode == 0 and joiner.returncode == 0
    assert "Traceback" not in fleet.logs(), fleet.logs()[-3000:]
    assert fleet.ts.workers() == {"workers": []}, "a stopped worker leaves"


def test_a_second_worker_on_sqlite_is_refused_naming_postgresql(
    tmp_path: Path, relay: SmtpServer
) -> None:
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'ts.db'}", relay.port)
    Threadsync.init(settings)
    config = tmp_path / "worker.toml"
    config.write_text(
        f'[database]\nurl = "{settings.database_url}"\n[security]\nsecret_key_file = '
        f'"{settings.secret_key_file}"\n[outbound.default]\nport = {relay.port}\n',
        encoding="utf-8",
    )
    ts = Threadsync.from_settings(settings)
    command = [sys.executable, str(ROOT / "cli.py"), "--config", str(config), "run"]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not ts.workers()["workers"]:
            assert first.poll() is None, first.communicate()[1].decode()
            assert time.monotonic() < deadline, "the first worker did not register"
            time.sleep(0.1)
        second = subprocess.run(command, capture_output=True, timeout=60)
        assert second.returncode == 4
        message = second.stderr.decode()
        assert "PostgreSQL" in message and f":{first.pid}" in message, message
        assert "Traceback" not in message
        assert [w["pid"] for w in ts.workers()["workers"]] == [first.pid]
        err = terminate(first, 20)
        assert first.returncode == 0, err.decode()
        assert ts.workers() == {"workers": []}, "a stopped worker leaves"
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
        ts.close()
