"""Connections to Microsoft Graph cut and stalled mid-stream, and Graph
answering 503 for a while, with mail flowing both ways.

The fake Graph (tests/fakes) is reached through a
:class:`~tests.faultproxy.FaultProxy`; its links (``@odata.nextLink``, upload
URLs) point at the proxy too. The traffic is TLS, so a fault cannot be placed
by a byte pattern: the fake arms it at the moment it handles the request that
matters (a delta page, an upload session), a chosen number of bytes into the
next data in that direction.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.microsoft import FakeMicrosoft
from tests.fakes.server import Call
from tests.fakes.world import MAILBOX, OutlookWorld, outlook_settings_for
from tests.faultproxy import Fault, FaultProxy
from tests.kernelfixtures import CONTACT, SUB, USER, EventRecorder
from tests.servers.smtp import SmtpServer
from threadsync.core.api import Threadsync
from threadsync.core.mime import AttachmentIn
from threadsync.core.outbox.compose import Draft

pytest_plugins = ["tests.fakes.fixtures"]

#: Graph's network timeout in these tests (seconds): stalls outlast it.
TIMEOUT = 2


@pytest.fixture
async def line(ms: FakeMicrosoft) -> AsyncIterator[FaultProxy]:
    proxy = FaultProxy("127.0.0.1", ms.server.port).start()
    direct = ms.graph.base
    ms.graph.base = f"https://127.0.0.1:{proxy.port}"
    try:
        yield proxy
    finally:
        ms.graph.base = direct
        proxy.stop()


@pytest.fixture
async def world(
    tmp_path: Path,
    scenario_database_url: str,
    ms: FakeMicrosoft,
    outlook_relay: SmtpServer,
    line: FaultProxy,
) -> AsyncIterator[OutlookWorld]:
    settings = outlook_settings_for(
        tmp_path,
        scenario_database_url,
        outlook_relay.port,
        ms,
        graph_url=f"https://127.0.0.1:{line.port}/v1.0",
        timeout_seconds=TIMEOUT,
        max_retry_wait_seconds=1,
    )
    Threadsync.init(settings)
    recorder = EventRecorder()
    ts = Threadsync.from_settings(settings, plugins=[recorder], environ=ms.environ())
    ts.labs(SUB, enabled=True)
    yield OutlookWorld(ts, ms, outlook_relay, MAILBOX, recorder)
    await ts.aclose()


def arm_on(ms: FakeMicrosoft, line: FaultProxy, fault: Fault, match: Any) -> None:
    """Arm ``fault`` on the proxy when the fake handles the first request that
    ``match``es (the hook is the fake's own request filter; it never refuses)."""
    armed: list[bool] = []

    def when(call: Call) -> bool:
        if not armed and match(call):
            armed.append(True)
            line.arm(fault)
        return False

    ms.graph.throttle(1, when=when)


def is_delta(call: Call) -> bool:
    return call.method == "GET" and "delta" in call.path


async def passes(world: OutlookWorld, count: int, pause: float = 0.3) -> None:
    for _ in range(count):
        await world.ts.run_once()
        await asyncio.sleep(pause)


async def conversation(world: OutlookWorld) -> tuple[str, list[str], list[str]]:
    await world.connect()
    first = await world.ts.send(SUB, USER, Draft(to=[CONTACT], subject="Offer", text="Offer."))
    assert first["status"] == "sent"
    mails = [world.contact_replies(first, body=f"reply {n} " + "y" * 4000) for n in range(4)]
    mails.append(world.user_replies_from_client(mails[0], chain=[first["message_id"]]))
    return first["thread_id"], [first["message_id"]], mails


def assert_exactly_once(
    world: OutlookWorld, thread_id: str, crm_ids: list[str], mail_ids: list[str]
) -> None:
    stored = [m["message_id"] for m in world.ts.thread(thread_id)["messages"]]
    assert len(stored) == len(set(stored)), "a message was stored twice"
    assert set(stored) == set(crm_ids + mail_ids), "a message was lost"
    for mid in crm_ids:
        assert len(world.ms.sent(mid)) == 1, f"{mid} sent != once"


@pytest.mark.parametrize("seed", [1, 2])
async def test_cut_during_a_delta_page(world: OutlookWorld, line: FaultProxy, seed: int) -> None:
    thread_id, crm, mails = await conversation(world)
    cut = Fault("reset", "down", plus=random.Random(seed).randint(50, 4000))
    arm_on(world.ms, line, cut, is_delta)
    reply = await world.ts.reply(thread_id, Draft(text="CRM reply while the line drops"))
    await passes(world, 4)
    assert cut.fired.is_set()
    assert_exactly_once(world, thread_id, [*crm, reply["message_id"]], mails)
    assert world.ts.status(SUB, USER)["connections"][0]["state"] == "connected"


async def test_stalled_delta_page_gives_up_within_its_timeout(
    world: OutlookWorld, line: FaultProxy
) -> None:
    thread_id, crm, mails = await conversation(world)
    stall = Fault("stall", "down", plus=200)
    arm_on(world.ms, line, stall, is_delta)
    started = time.monotonic()
    await world.ts.run_once()
    took = time.monotonic() - started
    assert stall.fired.is_set()
    # The client retries a read once or twice after a timeout; each waits TIMEOUT.
    assert took < TIMEOUT * 6, f"a stalled delta page held the pass {took:.1f}s"
    await passes(world, 3)
    assert_exactly_once(world, thread_id, crm, mails)


async def test_cut_during_an_upload_session(world: OutlookWorld, line: FaultProxy) -> None:
    """A CRM reply large enough for an upload session; the upload's PUT is cut
    part-way: the message goes out once, with its attachment whole."""
    thread_id, crm, mails = await conversation(world)
    data = random.Random(7).randbytes(3_050_000)
    cut = Fault("reset", "up", plus=random.Random(7).randint(100_000, 2_000_000))
    arm_on(world.ms, line, cut, lambda call: "createUploadSession" in call.path)
    reply = await world.ts.reply(
        thread_id,
        Draft(text="big file", attachments=[AttachmentIn("big.bin", "application/x-big", data)]),
    )
    assert cut.fired.is_set()
    await passes(world, 4)
    assert_exactly_once(world, thread_id, [*crm, reply["message_id"]], mails)
    sent = world.ms.sent(reply["message_id"])[0]
    parsed = email.message_from_bytes(sent.raw, policy=email.policy.default)
    parts = [p.get_content() for p in parsed.iter_attachments()]  # type: ignore[attr-defined]
    assert parts == [data]


async def test_graph_answers_503_for_a_while(world: OutlookWorld, line: FaultProxy) -> None:
    """Every Graph request is refused with 503 for a few seconds: passes fail
    visibly, nothing is lost or doubled, and sync resumes when it is over."""
    thread_id, crm, mails = await conversation(world)
    until = time.monotonic() + 3
    world.ms.graph.throttle(
        10_000, status=503, retry_after=0.5, when=lambda call: time.monotonic() < until
    )
    reply = await world.ts.reply(thread_id, Draft(text="CRM reply during the outage"))
    assert reply["status"] == "queued"
    await world.ts.run_once()
    conn = world.ts.status(SUB, USER)["connections"][0]
    assert conn["state"] == "error" and conn["last_error"]
    while time.monotonic() < until:
        await asyncio.sleep(0.2)
    await passes(world, 4)
    assert_exactly_once(world, thread_id, [*crm, reply["message_id"]], mails)
    assert world.ts.status(SUB, USER)["connections"][0]["state"] == "connected"
