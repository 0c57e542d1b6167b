"""The daemon (`threadsync run`) as a real process: IMAP IDLE wakes it well before
the poll interval, CRM mail queued while the mailbox was unreachable goes out when
it recovers, a disconnect made from another process is honoured, and SIGTERM ends
it cleanly."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.daemonproc import terminate
from tests.kernelfixtures import CONTACT, SUB, USER, World, write_config
from threadsync.core.outbox.compose import Draft

ROOT = Path(__file__).resolve().parent.parent


def start_daemon(world: World, tmp_path: Path, poll: float) -> subprocess.Popen[bytes]:
    cfg = write_config(
        world,
        tmp_path / "daemon.toml",
        poll_interval_seconds=poll,
        idle_seconds=poll,
        backoff_base_seconds=0.2,
        backoff_max_seconds=1,
    )
    return subprocess.Popen(
        [sys.executable, str(ROOT / "cli.py"), "--config", str(cfg), "run"],
        env={**os.environ, **world.ts.kernel.environ},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


async def wait_until(check, timeout: float) -> float:  # type: ignore[no-untyped-def]
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if check():
            return time.monotonic() - start
        await asyncio.sleep(0.1)
    raise AssertionError(f"not within {timeout} s")


async def test_daemon_idle_push_recovery_disconnect_and_sigterm(
    world: World, tmp_path: Path
) -> None:
    if not world.imap.supports_idle:
        pytest.skip(f"{world.imap.kind} has no IDLE")
    await world.connect()
    sent = await world.ts.send(SUB, USER, Draft(to=[CONTACT], subject="Offer", text="hi"))
    proc = start_daemon(world, tmp_path, poll=60)
    try:
        await asyncio.sleep(2.0)  # started and idling
        first = world.contact_replies(sent, body="pushed")
        took = await wait_until(lambda: world.count_messages(first) == 1, 15)
        assert took < 10, "IDLE should wake the daemon long before the 60 s poll"

        # The mailbox's SMTP server goes away: the CRM reply is queued...
        port = world.submission.port
        world.submission.stop()
        queued = await world.ts.reply(sent["thread_id"], Draft(text="queued"))
        assert queued["status"] == "queued"
        world.submission.port = port
        world.submission.start()
        # ...and the daemon delivers it once the connection works again.
        took = await wait_until(
            lambda: len(world.submission.by_message_id(queued["message_id"])) == 1, 30
        )
        assert took < 15, "queued CRM mail should wake the connection, not wait for the poll"

        # A disconnect from another process stops the connection's work.
        await world.ts.disconnect(SUB, USER)
        await asyncio.sleep(3.0)
        late = world.contact_replies(sent, body="after disconnect")
        await asyncio.sleep(2.0)
        assert world.count_messages(late) == 0
        assert proc.poll() is None, "the daemon must keep running"
    finally:
        err = terminate(proc, 15)
    assert proc.returncode == 0, err.decode()
    assert b"Traceback" not in err
    assert world.password.encode() not in err
    assert len(world.submission.by_message_id(queued["message_id"])) == 1
