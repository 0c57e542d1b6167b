"""What ``threadsync run`` and the commands say on stderr, through real processes
against real servers: one INFO line per synced message, per CRM message sent and
per connection state change, a DEBUG summary per pass, "daemon stopped" on
SIGTERM; with ``--log-format json`` one object per line carrying connection id,
thread id and direction; never a body, never the password."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.daemonproc import terminate
from tests.kernelfixtures import CONTACT, SUB, USER, World, write_config

ROOT = Path(__file__).resolve().parent.parent
BODY = "Body text that must never reach a log"
REPLY = "Reply text that must never reach a log"


def lines(stderr: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stderr.splitlines() if line.strip()]


def cli(cfg: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), *args, "--config", str(cfg)],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    return proc


async def test_the_daemon_logs_each_event_with_fields(world: World, tmp_path: Path) -> None:
    cfg = write_config(world, tmp_path / "config.toml", poll_interval_seconds=1)
    env = {"MAILPW": world.password}
    await world.connect()
    sent_proc = cli(
        cfg, env, "send", SUB, USER, "--to", CONTACT, "--subject", "Offer", "--text", BODY,
        "--json", "-v", "--log-format", "json",
    )  # fmt: skip
    sent = json.loads(sent_proc.stdout)
    crm = [e for e in lines(sent_proc.stderr) if e["message"] == "CRM message sent"]
    assert len(crm) == 1, sent_proc.stderr
    assert crm[0]["thread_id"] == sent["thread_id"] and crm[0]["direction"] == "outbound"
    assert crm[0]["channel"] == "mailbox" and crm[0]["connection_id"] >= 1
    world.contact_replies(sent, body=REPLY)

    daemon = subprocess.Popen(
        [sys.executable, str(ROOT / "cli.py"), "run", "-vv", "--log-format", "json",
         "--config", str(cfg)],
        env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while len(world.ts.thread(sent["thread_id"])["messages"]) < 2:
            assert time.monotonic() < deadline, "the reply did not sync"
            assert daemon.poll() is None
            time.sleep(0.2)
    finally:
        err = terminate(daemon).decode()
    logged = lines(err)
    synced = [e for e in logged if e["message"] == "message synced"]
    assert len(synced) == 1, err
    assert synced[0]["thread_id"] == sent["thread_id"]
    assert synced[0]["direction"] == "inbound" and synced[0]["level"] == "INFO"
    assert synced[0]["connection_id"] == crm[0]["connection_id"]
    passes = [e for e in logged if e["message"] == "pass done"]
    assert passes and passes[0]["level"] == "DEBUG" and "stored" in passes[0]
    assert logged[-1]["message"] == "daemon stopped"
    assert not any(e["logger"].startswith("alembic") for e in logged)

    gone = cli(cfg, env, "disconnect", SUB, USER, "-v", "--log-format", "json")
    changed = [e for e in lines(gone.stderr) if e.get("state") == "disconnected"]
    assert changed and changed[0]["previous_state"] == "connected", gone.stderr
    assert changed[0]["connection_id"] == crm[0]["connection_id"]
    for text in (sent_proc.stderr, err, gone.stderr):
        assert BODY not in text and REPLY not in text and world.password not in text
