"""The daemon process (``python cli.py run --listen``) serving the API and
delivering webhooks is killed with SIGKILL in the middle of a delivery run and
started again: every event still arrives, in order per thread, signed, nothing
lost (at least once: deliveries in flight at the kill may come again)."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import httpx

from tests.daemonproc import free_port, start, terminate, wait_ready
from tests.kernelfixtures import CONTACT, SUB, World, write_config
from tests.test_http_api_support import (  # noqa: F401 (fixtures)
    Receiver,
    receiver_fixture,
    wait_for,
)
from threadsync.core.host import apikeys
from threadsync.core.outbox.compose import Draft

THREADS, MESSAGES = 8, 8


async def test_daemon_killed_mid_delivery_loses_nothing(
    world: World, receiver: Receiver, tmp_path: Path
) -> None:
    cfg = write_config(world, tmp_path / "daemon.toml", poll_interval_seconds=5)
    with cfg.open("a", encoding="utf-8") as fh:
        fh.write(
            "[webhooks]\nbackoff_base_seconds = 0.1\nbackoff_max_seconds = 0.5\n"
            "poll_seconds = 0.1\nconcurrency = 2\nlease_seconds = 30\n"
            'allowed_networks = ["127.0.0.0/8"]  # the receiver is on loopback\n'
        )
    listen = f"127.0.0.1:{free_port()}"
    url = f"http://{listen}"
    key = apikeys.create(world.ts.kernel.store, SUB)["key"]
    receiver.delay = 0.1
    proc = start(cfg, listen, world.env)
    try:
        wait_ready(url, proc)
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}) as c:
            made = c.post(f"/v1/subaccounts/{SUB}/webhooks", json={"url": receiver.url})
            assert made.status_code == 201, made.text
            receiver.secret = made.json()["secret"]
        # Events written by another process (this one): THREADS threads of MESSAGES.
        for i in range(THREADS):
            first = await world.ts.send(SUB, "u1", Draft(to=[CONTACT], subject=f"T{i}", text="0"))
            for n in range(1, MESSAGES):
                await world.ts.reply(first["thread_id"], Draft(text=str(n)))
        expected = [e["id"] for e in world.ts.events(SUB, limit=1000)["events"]]
        assert len(expected) == THREADS * MESSAGES

        await wait_for(lambda: len(receiver.unique()) >= 15, 30, "deliveries under way")
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=10)  # reaps it and closes its pipes
        before = len(receiver.unique())
        assert before < len(expected), "killed too late to prove anything"

        proc = start(cfg, listen, world.env)
        wait_ready(url, proc)
        await wait_for(lambda: len(receiver.unique()) == len(expected), 60, "every event")
        await asyncio.sleep(0.5)  # nothing more (no stray re-deliveries keep coming)
    finally:
        err = terminate(proc)
    assert proc.returncode == 0, err.decode()
    assert b"Traceback" not in err and key.encode() not in err
    assert sorted(r.event_id for r in receiver.unique()) == expected
    assert all(r.signature_ok for r in receiver.got)
    # At least once: what was posted but not yet recorded when the process died
    # (the chains in flight) comes again; the receiver deduplicates by event id.
    duplicates = len(receiver.got) - len(receiver.unique())
    assert duplicates <= 2 * 10, duplicates  # concurrency x chain length
    by_thread: dict[str, list[int]] = {}
    for r in receiver.unique():
        by_thread.setdefault(r.body["thread_id"], []).append(r.event_id)
    assert len(by_thread) == THREADS
    for ids in by_thread.values():
        assert ids == sorted(ids) and len(ids) == MESSAGES  # first arrivals in event order
