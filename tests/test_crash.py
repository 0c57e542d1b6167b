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

from core.compose import Draft
from tests.kernelfixtures import CONTACT, SUB, USER, World, make_mail

ROOT = Path(__file__).resolve().parent.parent


def write_config(world: World, tmp_path: Path) -> Path:
    s = world.ts.kernel.settings
    cfg = tmp_path / "crash.toml"
    cfg.write_text(
        f"""
[database]
url = "{s.database_url}"
[security]
secret_key_file = "{s.secret_key_file}"
[sync]
poll_interval_seconds = 0.2
backoff_base_seconds = 0.05
backoff_max_seconds = 0.2
lease_seconds = 3
batch_size = 25
[outbound.default]
host = "127.0.0.1"
port = {s.default_channel.port}
security = "none"
from_address = "crm@threadsync.local"
""",
        encoding="utf-8",
    )
    return cfg


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
    # Queue CRM replies: the user's SMTP server is down while the CRM writes them.
    port = world.submission.port
    world.submission.stop()
    queued = []
    for i in range(24):
        r = await world.ts.reply(threads[i % len(threads)]["thread_id"], Draft(text=f"reply {i}"))
        assert r["status"] == "queued"
        queued.append(r["message_id"])
    world.submission.port = port
    world.submission.start()
    # Contact replies and unrelated mail pile up in the INBOX.
    replies = [
        world.contact_replies(threads[i % len(threads)], body=f"answer {i}") for i in range(60)
    ]
    for i in range(120):
        raw, _ = make_mail(sender=f"news{i}@example.net", to=world.email, subject="News", body="x")
        world.imap.deliver(world.email, raw)
    world.ts.close()

    cfg = write_config(world, tmp_path)
    env = dict(world.ts.kernel.environ)
    kills = 0
    for _ in range(10):
        proc = daemon(cfg, env)
        time.sleep(rng.uniform(0.3, 2.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert proc.stderr is not None
        proc.stderr.close()
        kills += 1
    # Let the leases of the killed workers be recognised and finish the work.
    for _ in range(3):
        done = daemon(cfg, env, "--once")
        _, err = done.communicate(timeout=120)
        assert done.returncode == 0, err.decode()

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
    assert kills == 10
