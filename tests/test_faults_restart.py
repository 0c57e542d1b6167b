"""The user's mail servers restart mid-work: Dovecot during a pass, aiosmtpd
inside a mail transaction. Each test runs on its own Dovecot (the session's
shared one is left alone), through a :class:`~tests.faultproxy.FaultProxy`
that holds the line at the chosen moment while the server goes down and up.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.faultproxy import Fault, FaultProxy
from tests.kernelfixtures import SUB, USER, World
from tests.servers import ImapServer, dovecot_installed, start_imap_server
from tests.servers.tlscerts import TestCA
from tests.test_faults_imap_smtp import (
    TIMEOUT,
    Lines,
    assert_exactly_once,
    connect_through,
    offer,
    passes,
)
from threadsync.core.outbox.compose import Draft

pytestmark = pytest.mark.skipif(not dovecot_installed(), reason="needs Dovecot")


@pytest.fixture
def imap_server(tmp_path_factory: pytest.TempPathFactory, test_ca: TestCA) -> Iterator[ImapServer]:
    """A private Dovecot for this test only: it is stopped and started again."""
    server = start_imap_server(tmp_path_factory.mktemp("dovecot-restart"), "dovecot", ca=test_ca)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def lines(world: World) -> AsyncIterator[Lines]:
    imap = FaultProxy(world.imap.host, world.imap.port).start()
    smtp = FaultProxy(world.submission.host, world.submission.port).start()
    try:
        yield Lines(imap, smtp)
    finally:
        imap.stop()
        smtp.stop()


async def until_fired(fault: Fault, limit: float = 15.0) -> None:
    deadline = time.monotonic() + limit
    while not fault.fired.is_set():
        assert time.monotonic() < deadline, "the fault never fired"
        await asyncio.sleep(0.02)


async def test_dovecot_restarted_during_a_pass(world: World, lines: Lines, tmp_path: Path) -> None:
    await connect_through(world, lines)
    first = await world.ts.send(SUB, USER, offer())
    mails = [world.contact_replies(first, body=f"reply {n} " + "y" * 3000) for n in range(3)]
    mails.append(world.user_replies_from_client(mails[0], chain=[first["message_id"]]))
    # The body FETCH crawls, so the pass is still running when Dovecot goes away.
    slow = Fault("throttle", "down", after=b"BODY[] {", rate=2000)
    lines.imap.arm(slow)
    reply = await world.ts.reply(first["thread_id"], Draft(text="CRM reply during the outage"))
    running = asyncio.create_task(world.ts.run_once())
    await until_fired(slow)
    await asyncio.to_thread(world.imap.stop)
    report = await asyncio.wait_for(running, TIMEOUT * 5)
    assert report.errors  # said clearly, not swallowed
    conn = world.ts.status(SUB, USER)["connections"][0]
    assert conn["state"] == "error" and conn["last_error"]
    await passes(world, 1)  # still down: retried with backoff, nothing changes
    await asyncio.to_thread(world.imap.start)
    await passes(world, 4, pause=0.6)
    assert_exactly_once(
        world, first["thread_id"], [first["message_id"], reply["message_id"]], mails
    )
    assert world.ts.status(SUB, USER)["connections"][0]["state"] == "connected"


async def test_aiosmtpd_restarted_before_its_data_answer_sends_once(
    world: World, lines: Lines
) -> None:
    """The server took ``DATA`` and goes down before its ``354`` reaches us:
    nothing was sent, so the message goes again after the restart, once."""
    await connect_through(world, lines)
    hold = Fault("stall", "down", after=b"354")
    lines.smtp.arm(hold)
    sending = asyncio.create_task(world.ts.send(SUB, USER, offer()))
    await until_fired(hold)
    await asyncio.to_thread(world.submission.stop)
    first = await asyncio.wait_for(sending, TIMEOUT * 5)
    assert first["status"] == "queued"
    await asyncio.to_thread(world.submission.start)
    await passes(world, 3, pause=0.6)
    assert_exactly_once(world, first["thread_id"], [first["message_id"]], [])
    assert world.ts.thread(first["thread_id"])["messages"][0]["reason"] is None


async def test_aiosmtpd_restarted_before_the_end_of_data_never_sends_twice(
    world: World, lines: Lines
) -> None:
    """We wrote the message and its final dot; the server restarts before it saw
    the dot. We cannot tell this from a lost answer, so the message is never
    sent again blindly: it is recorded as unconfirmed, and later passes do not
    send it (the one case where a gap is preferred to a duplicate)."""
    await connect_through(world, lines)
    # Inside the message text: the 354 has reached us, the rest stays in the proxy.
    hold = Fault("stall", "up", after=b"Subject: Offer")
    lines.smtp.arm(hold)
    sending = asyncio.create_task(world.ts.send(SUB, USER, offer()))
    await until_fired(hold)
    await asyncio.to_thread(world.submission.stop)
    first = await asyncio.wait_for(sending, TIMEOUT * 5)
    await asyncio.to_thread(world.submission.start)
    await passes(world, 3, pause=0.6)
    mid = first["message_id"]
    assert world.submission.by_message_id(mid) == []  # the server never completed it
    msg = world.ts.thread(first["thread_id"])["messages"][0]
    assert msg["reason"] == "delivery_unconfirmed"
    assert world.ts.status(SUB, USER)["connections"][0]["state"] == "connected"
