"""Crash safety (R9): the daemon is SIGKILLed at random points while it ingests
contact replies and delivers queued CRM replies, restarted, and killed again.
Afterwards every message exists exactly once on both sides: in the database,
at the contact's SMTP server and in the mailbox's Sent folder."""

from __future__ import annotations

import email
import email.policy
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.kernelfixtures import CONTACT, SUB, USER, World, make_mail, write_config
from threadsync.core.outbox.compose import Draft

ROOT = Path(__file__).resolve().parent.parent
QUEUED, REPLIES = 8, 24
PER_ROUND = QUEUED + REPLIES


def done(world: World, replies: list[str], queued: list[str]) -> int:
    """Items finished so far: contact replies stored, queued CRM replies delivered."""
    wanted = {mid.strip("<>") for mid in queued}
    delivered = sum(1 for r in list(world.submission.received) if r.message_id in wanted)
    return world.count_messages_in(replies) + delivered


def daemon(cfg: Path, env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "cli.py"), "--config", str(cfg), "run", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


@pytest.mark.slow
async def test_sigkill_at_random_points_loses_and_doubles_nothing(
    world: World, tmp_path: Path
) -> None:
    rng = random.Random(int(os.environ.get("THREADSYNC_CRASH_SEED", "20261126")))
    await world.connect()
    threads = []
    for i in range(6):
        sent = await world.ts.send(SUB, USER, Draft(to=[CONTACT], subject=f"Offer {i}", text="hi"))
        threads.append(sent)
    cfg = write_config(
        world,
        tmp_path / "crash.toml",
        poll_interval_seconds=0.2,
        backoff_base_seconds=0.05,
        backoff_max_seconds=0.2,
        lease_seconds=3,
        batch_size=4,
    )
    env = dict(world.ts.kernel.environ)
    queued: list[str] = []
    replies: list[str] = []
    progress: list[int] = []
    for round_no in range(8):
        # New work piles up while no daemon runs: CRM replies queued because the
        # user's SMTP server is down, contact replies and unrelated mail in INBOX.
        port = world.submission.port
        world.submission.stop()
        for i in range(QUEUED):
            thread = threads[(round_no + i) % len(threads)]
            r = await world.ts.reply(thread["thread_id"], Draft(text=f"reply {round_no}.{i}"))
            assert r["status"] == "queued"
            queued.append(r["message_id"])
        world.submission.port = port
        world.submission.start()
        for i in range(REPLIES):
            thread = threads[(round_no * 3 + i) % len(threads)]
            replies.append(world.contact_replies(thread, body=f"answer {round_no}.{i}"))
        for i in range(30):
            raw, _ = make_mail(
                sender=f"news{i}@example.net", to=world.email, subject="News", body="x"
            )
            world.imap.deliver(world.email, raw)
        world.ts.close()
        # The daemon starts and is killed at a random point of its work: once a
        # randomly chosen number of this round's items is done (or after a while).
        before = done(world, replies, queued)
        target = before + rng.randint(1, PER_ROUND - 1)
        proc = daemon(cfg, env)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and done(world, replies, queued) < target:
            time.sleep(rng.uniform(0.0, 0.01))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert proc.stderr is not None
        proc.stderr.close()
        progress.append(done(world, replies, queued))
    # Let the leases of the killed workers be recognised and finish the work.
    for _ in range(3):
        final = daemon(cfg, env, "--once")
        _, err = final.communicate(timeout=120)
        assert final.returncode == 0, err.decode()

    for mid in replies:
        assert world.count_messages(mid) == 1, mid
    for mid in queued:
        assert len(world.submission.by_message_id(mid)) == 1, mid
    sent_ids = [
        email.message_from_bytes(raw, policy=email.policy.default)["Message-ID"]
        for raw in world.imap.messages(world.email, "Sent")
    ]
    for mid in queued:
        assert sent_ids.count(mid) == 1, mid
    total = sum(t["message_count"] for t in world.ts.threads(SUB)["threads"])
    assert total == len(threads) + len(queued) + len(replies)
    # The kills really landed in the middle of the work, not before or after it.
    interrupted = [
        i for i, n in enumerate(progress) if (progress[i - 1] if i else 0) < n < PER_ROUND * (i + 1)
    ]
    print("done after each kill:", progress, "interrupted rounds:", interrupted)
    assert len(interrupted) >= 2, progress
