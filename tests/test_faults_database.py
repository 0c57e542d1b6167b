"""The database goes away under a running daemon.

PostgreSQL: a private cluster (:mod:`tests.pgcluster`, never the machine's
shared server) is crashed and started again while the daemon ingests and sends;
the daemon survives, says what happened, and once the database is back every
message is stored once and every CRM message sent once.

SQLite: the database lives on a small file system made for the test (a loop
mounted ext4 image; root only); it fills up mid-pass: writes stop cleanly with
a clear error, nothing is half-stored, and sync resumes once space is freed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from tests.faultproxy import Fault, FaultProxy
from tests.kernelfixtures import CONTACT, SUB, USER, World
from tests.pgcluster import PgCluster, pg_bin
from threadsync.core.errors import StoreError
from threadsync.core.outbox.compose import Draft


@pytest.fixture(scope="module")
def cluster() -> Iterator[PgCluster]:
    if pg_bin() is None:
        pytest.skip("PostgreSQL server binaries are not installed")
    pg = PgCluster()
    pg.start()
    try:
        yield pg
    finally:
        pg.destroy()


@pytest.fixture
def scenario_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh database: on the private cluster for the PostgreSQL tests, on a
    nearly full file system for the SQLite one (see the test's own fixture)."""
    marker = request.node.get_closest_marker("database")
    kind = marker.args[0] if marker else "postgresql"
    if kind == "sqlite":
        small: Path = request.getfixturevalue("small_disk")
        yield f"sqlite:///{small / 'threadsync.db'}"
        return
    pg: PgCluster = request.getfixturevalue("cluster")
    name = f"t{abs(hash(request.node.nodeid)) % 10**8}"
    admin = create_engine(pg.url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS {name}"))
        conn.execute(text(f"CREATE DATABASE {name}"))
    admin.dispose()
    if marker is not None and marker.kwargs.get("through_proxy"):
        line: FaultProxy = request.getfixturevalue("pg_line")
        yield f"postgresql+psycopg://postgres@127.0.0.1:{line.port}/{name}"
        return
    yield pg.url.rsplit("/", 1)[0] + "/" + name


@pytest.fixture
def pg_line(cluster: PgCluster) -> Iterator[FaultProxy]:
    """A fault proxy between threadsync and the private cluster."""
    with FaultProxy("127.0.0.1", cluster.port) as proxy:
        yield proxy


async def until(check: Any, limit: float, what: str) -> None:
    deadline = time.monotonic() + limit
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting: {what}"
        await asyncio.sleep(0.1)


def stored_ids(world: World, thread_id: str) -> list[str]:
    return [m["message_id"] for m in world.ts.thread(thread_id)["messages"]]


def assert_exactly_once(world: World, thread_id: str, crm: list[str], mails: list[str]) -> None:
    stored = stored_ids(world, thread_id)
    assert len(stored) == len(set(stored)), "a message was stored twice"
    assert set(stored) == set(crm + mails), "a message was lost"
    for mid in crm:
        assert len(world.submission.by_message_id(mid)) == 1, f"{mid} submitted != once"


@pytest.mark.database("postgresql")
async def test_postgresql_crashes_and_restarts_under_the_daemon(
    world: World, cluster: PgCluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    await world.connect()
    first = await world.ts.send(SUB, USER, Draft(to=[CONTACT], subject="Offer", text="Offer"))
    thread_id = first["thread_id"]
    crm = [first["message_id"]]
    mails = [world.contact_replies(first, body=f"before {n}") for n in range(3)]
    daemon = world.ts.daemon()
    running = asyncio.create_task(daemon.run())
    try:
        # In flight: the daemon is reading the replies and a CRM reply is sending.
        reply = await world.ts.reply(thread_id, Draft(text="CRM reply before the crash"))
        crm.append(reply["message_id"])
        await asyncio.to_thread(cluster.stop, "immediate")
        mails.append(world.contact_replies(first, body="while the database is down"))
        with pytest.raises(StoreError, match="database"):
            await world.ts.reply(thread_id, Draft(text="refused while down"))
        await asyncio.sleep(3)  # several supervisor and connection cycles fail
        assert not running.done(), "the daemon died with its database"
        await asyncio.to_thread(cluster.start)
        later = await world.ts.reply(thread_id, Draft(text="CRM reply after the restart"))
        crm.append(later["message_id"])
        mails.append(world.contact_replies(first, body="after the restart"))
        want = set(crm + mails)
        await until(lambda: set(stored_ids(world, thread_id)) >= want, 30, "catch-up")
        await until(
            lambda: all(world.submission.by_message_id(m) for m in crm), 30, "CRM sends"
        )
        await asyncio.sleep(1.5)  # a few more passes: nothing new may appear
        assert not running.done()
    finally:
        daemon.stop()
        await asyncio.wait_for(running, 30)
    assert_exactly_once(world, thread_id, crm, mails)
    said = [r.getMessage() for r in caplog.records if r.name.startswith("threadsync")]
    down = [m for m in said if m.startswith("database unavailable")]
    # Said once for the outage (not once per task and cycle), with the cause.
    assert len(down) == 1 and "connect" in down[0], said
    assert "database reachable again; work resumes" in said
    assert not [m for m in said if "crashed" in m or "pass failed" in m], said


@pytest.mark.database("postgresql", through_proxy=True)
async def test_database_lost_while_committing_the_checkpoint_does_not_lose_the_message(
    world: World, pg_line: FaultProxy
) -> None:
    """The line to PostgreSQL drops as the commit of "transmitting" goes out: the
    commit may have happened, but the end of DATA was never written, so the
    message has certainly not left. It must be sent later (once), not taken
    for sent."""
    await world.connect()
    cut = Fault("reset", "up", after=(b"transmitting", b"COMMIT"), plus=1)  # with its NUL
    pg_line.arm(cut)
    first = await world.ts.send(SUB, USER, Draft(to=[CONTACT], subject="Offer", text="Offer"))
    assert cut.fired.is_set() and first["status"] == "queued"  # kept, not lost, not raised
    assert world.submission.received == []  # the end of DATA was never written
    # Passes until well past the lease: the entry may be retried, never taken for sent.
    deadline = time.monotonic() + world.ts.kernel.settings.sync.lease_seconds + 2
    while time.monotonic() < deadline:
        await world.ts.run_once()
        await asyncio.sleep(0.5)
    assert len(world.submission.received) == 1, "the message was lost (taken for sent)"
    assert len(world.submission.by_message_id(first["message_id"])) == 1
    assert len(world.imap.messages(world.email, "Sent")) == 1


# ---- SQLite on a full disk --------------------------------------------------------------


@pytest.fixture
def small_disk() -> Iterator[Path]:
    """A 16 MiB ext4 file system, loop mounted in a temporary directory (root
    only; skipped elsewhere); unmounted and removed afterwards."""
    if os.geteuid() != 0 or not shutil.which("mkfs.ext4"):
        pytest.skip("a loop mount needs root and mkfs.ext4")
    root = Path(tempfile.mkdtemp(prefix="threadsync-disk-"))
    image, mount = root / "disk.img", root / "mnt"
    mount.mkdir()
    with image.open("wb") as f:
        f.truncate(16 * 1024 * 1024)
    run = {"check": True, "capture_output": True, "timeout": 30}
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(image)], **run)  # type: ignore[call-overload]
    try:
        subprocess.run(["mount", "-o", "loop", str(image), str(mount)], **run)  # type: ignore[call-overload]
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(root)
        pytest.skip(f"cannot loop mount here: {exc.stderr.decode(errors='replace').strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False, capture_output=True, timeout=30)
        shutil.rmtree(root, ignore_errors=True)


def fill(disk: Path) -> Path:
    """Take every free byte of ``disk`` with one file; returns it."""
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 65536)
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 512)
        with contextlib.suppress(OSError):
            os.fsync(f.fileno())
    return filler


@pytest.mark.database("sqlite")
async def test_sqlite_disk_fills_up_mid_pass_and_sync_resumes(
    world: World, small_disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    await world.connect()
    first = await world.ts.send(SUB, USER, Draft(to=[CONTACT], subject="Offer", text="Offer"))
    thread_id = first["thread_id"]
    await world.ts.run_once()
    before = stored_ids(world, thread_id)
    filler = fill(small_disk)
    # Large replies: storing them needs space the disk no longer has.
    mails = [world.contact_replies(first, body=f"big {n} " + "b" * 400_000) for n in range(3)]
    with pytest.raises(StoreError, match="full"):
        await world.ts.run_once()
    with pytest.raises(StoreError, match="full"):
        await world.ts.reply(thread_id, Draft(text="x" * 500_000))
    assert stored_ids(world, thread_id) == before  # nothing half-stored
    daemon = world.ts.daemon()
    running = asyncio.create_task(daemon.run())
    try:
        await asyncio.sleep(2.5)
        assert not running.done(), "the daemon died with its disk"
        said = [r.getMessage() for r in caplog.records if r.name.startswith("threadsync")]
        assert [m for m in said if m.startswith("database unavailable") and "full" in m], said
        filler.unlink()
        reply = await world.ts.reply(thread_id, Draft(text="after space was freed"))
        want = {first["message_id"], reply["message_id"], *mails}
        await until(lambda: set(stored_ids(world, thread_id)) >= want, 30, "catch-up")
    finally:
        daemon.stop()
        await asyncio.wait_for(running, 30)
    assert_exactly_once(world, thread_id, [first["message_id"], reply["message_id"]], mails)
    engine = create_engine(world.ts.kernel.settings.database_url)
    with engine.connect() as conn:
        assert conn.execute(text("PRAGMA integrity_check")).scalar() == "ok"
    engine.dispose()
    assert world.ts.status(SUB, USER)["connections"][0]["state"] == "connected"
