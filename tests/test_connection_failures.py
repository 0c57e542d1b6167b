"""A connection whose work fails in an unexpected way (its provider plugin is
gone, its credentials no longer decrypt, a bug) is shown as failing everywhere
an operator looks, backs off, and never stops the other connections' work;
the daemon logs its traceback once per distinct failure, not at every pass."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

from cryptography.fernet import Fernet
from sqlalchemy.orm import Session

from tests.daemonproc import terminate
from tests.kernelfixtures import CONTACT, SUB, USER, World, write_config
from tests.test_http_api_support import (  # noqa: F401 (fixtures)
    Api,
    api_factory_fixture,
    api_fixture,
)
from threadsync.core.outbox.compose import Draft
from threadsync.core.store.models import Connection

ROOT = Path(__file__).resolve().parent.parent


async def break_two(world: World) -> tuple[int, int]:
    """u1 works; u2's credentials were sealed with another key; u3's provider
    plugin is no longer installed. Returns the ids of the broken two."""
    await world.connect(USER)
    await world.connect("u2")
    await world.connect("u3")

    def damage(session: Session) -> tuple[int, int]:
        rows = {c.user_id: c for c in session.query(Connection).all()}
        rows["u2"].secrets = Fernet(Fernet.generate_key()).encrypt(b'{"password": "x"}')
        rows["u3"].provider = "uninstalled_plugin"
        return rows["u2"].id, rows["u3"].id

    return world.ts.kernel.store.call(damage)


def states(world: World) -> dict[str, tuple[str, str | None]]:
    return {c["user"]: (c["state"], c["last_error"]) for c in world.ts.status(SUB)["connections"]}


async def test_run_once_fails_only_the_broken_connections(world: World, api: Api) -> None:
    await break_two(world)
    sent = await world.ts.send(SUB, USER, Draft(to=[CONTACT], subject="Offer", text="hi"))
    reply = world.contact_replies(sent)

    report = await world.ts.run_once()

    assert world.count_messages(reply) == 1, "the healthy connection is synced"
    assert report.stored == 1 and len(report.errors) == 2
    seen = states(world)
    assert seen[USER] == ("connected", None)
    assert seen["u2"][0] == "error" and "decrypt" in (seen["u2"][1] or "")
    assert "reconnect" in (seen["u2"][1] or "") or "update" in (seen["u2"][1] or "")
    assert seen["u3"][0] == "error" and "uninstalled_plugin" in (seen["u3"][1] or "")
    backoff = world.ts.kernel.store.call(
        lambda s: {c.user_id: c.next_attempt_at for c in s.query(Connection).all()}
    )
    assert backoff["u2"] is not None and backoff["u3"] is not None, "backs off"

    with api.client(api.key) as crm:
        listed = crm.get(f"/v1/subaccounts/{SUB}/connections").json()
        shown = {c["user"]: c["state"] for c in listed["connections"]}
        assert shown == {USER: "connected", "u2": "error", "u3": "error"}
    with api.client(api.admin) as admin:
        text = admin.get("/metrics").text
        assert 'threadsync_connections{state="error"} 2' in text
        assert 'threadsync_provider_errors_total{kind="unexpected_failure"} 2' in text
    with api.client() as browser:
        browser.post("/login", data={"key": api.admin})
        html = browser.get("/").text
        assert html.count("data-state='error'") == 2
        assert "uninstalled_plugin" in html


async def test_cli_run_once_continues_past_undecryptable_credentials(
    world: World, tmp_path: Path
) -> None:
    await break_two(world)
    sent = await world.ts.send(SUB, USER, Draft(to=[CONTACT], subject="Offer", text="hi"))
    reply = world.contact_replies(sent)
    cfg = write_config(world, tmp_path / "c.toml", poll_interval_seconds=1)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), "--config", str(cfg), "run", "--once"],
        env={**os.environ, **world.env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert world.count_messages(reply) == 1
    assert [s for s, _ in states(world).values()].count("error") == 2
    status = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), "--config", str(cfg), "--json", "status", SUB],
        env={**os.environ, **world.env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert status.returncode == 0, status.stderr
    assert status.stdout.count('"state": "error"') == 2


async def test_daemon_logs_a_failure_once_and_keeps_the_others(
    world: World, tmp_path: Path
) -> None:
    await break_two(world)
    sent = await world.ts.send(SUB, USER, Draft(to=[CONTACT], subject="Offer", text="hi"))
    cfg = write_config(
        world,
        tmp_path / "daemon.toml",
        poll_interval_seconds=0.5,
        idle_seconds=0.5,
        backoff_base_seconds=0.2,
        backoff_max_seconds=0.5,
    )
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "cli.py"), "--config", str(cfg), "run"],
        env={**os.environ, **world.env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        reply = world.contact_replies(sent)
        deadline = time.monotonic() + 20
        while world.count_messages(reply) == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert world.count_messages(reply) == 1
        await asyncio.sleep(6)  # many supervisor passes and backoffs
        assert proc.poll() is None
        seen = states(world)
        assert seen["u2"][0] == "error" and seen["u3"][0] == "error"
    finally:
        err = terminate(proc, 15).decode()
    assert proc.returncode == 0, err
    # Once per distinct failure, as one line: both are threadsync errors whose
    # message says it all (a bug would bring its traceback, once).
    assert err.count("connection failed: ") == 2, err
    assert "Traceback" not in err
    assert world.password not in err
