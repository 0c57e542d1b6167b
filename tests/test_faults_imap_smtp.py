"""Connections to the user's mailbox cut, stalled and throttled mid-stream.

A :class:`~tests.faultproxy.FaultProxy` sits between threadsync and Dovecot
(IMAP) and aiosmtpd (SMTP submission); each test arms a fault at the moment
that matters (a header FETCH, a body FETCH, the APPEND that files the Sent copy,
SMTP DATA and its end) while mail flows both ways, then lets the daemon's
passes recover. Every test ends the same way: each message stored once, each
CRM message submitted once and filed in Sent once.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from tests.faultproxy import Fault, FaultProxy
from tests.kernelfixtures import CONTACT, SUB, USER, World
from threadsync.core.outbox.compose import Draft

#: The provider's network timeout in these tests (seconds): stalls outlast it.
TIMEOUT = 2.0


@dataclass
class Lines:
    """The proxies in front of the user's IMAP and SMTP servers."""

    imap: FaultProxy
    smtp: FaultProxy


@pytest.fixture
async def lines(world: World) -> AsyncIterator[Lines]:
    imap = FaultProxy(world.imap.host, world.imap.port).start()
    smtp = FaultProxy(world.submission.host, world.submission.port).start()
    try:
        yield Lines(imap, smtp)
    finally:
        imap.stop()
        smtp.stop()


async def connect_through(world: World, lines: Lines) -> None:
    world.ts.kernel.provider_settings["imap_smtp"] = {"timeout": TIMEOUT}
    await world.connect(imap_port=lines.imap.port, smtp_port=lines.smtp.port)


def offer(text: str = "Here is our offer.") -> Draft:
    return Draft(to=[CONTACT], subject="Offer", text=text)


def sent_folder_ids(world: World) -> list[str]:
    return [
        str(email.message_from_bytes(r, policy=email.policy.default)["Message-ID"])
        for r in world.imap.messages(world.email, "Sent")
    ]


async def passes(world: World, count: int, pause: float = 0.3) -> None:
    """Daemon passes, with a pause longer than the tests' backoff between them."""
    for _ in range(count):
        await world.ts.run_once()
        await asyncio.sleep(pause)


def assert_exactly_once(world: World, thread_id: str, crm_ids: list[str], mail_ids: list[str]):  # type: ignore[no-untyped-def]
    stored = [m["message_id"] for m in world.ts.thread(thread_id)["messages"]]
    assert sorted(stored) == sorted(set(stored)), "a message was stored twice"
    assert set(crm_ids + mail_ids) == set(stored), "a message was lost"
    for mid in crm_ids:
        assert len(world.submission.by_message_id(mid)) == 1, f"{mid} submitted != once"
    sent = sent_folder_ids(world)
    for mid in crm_ids:
        assert sent.count(mid) == 1, f"{mid} filed in Sent != once"


# ---- SMTP DATA ----------------------------------------------------------------------


async def test_cut_after_the_end_of_data_never_sends_twice(world: World, lines: Lines) -> None:
    """The line drops after the server got the final dot, before its answer:
    the message may have been accepted, so it is never sent again; it is recorded
    as unconfirmed and still filed in Sent once."""
    await connect_through(world, lines)
    cut = Fault("reset", "up", after=b"\r\n.\r\n")
    lines.smtp.arm(cut)
    first = await world.ts.send(SUB, USER, offer())
    assert cut.fired.is_set()
    mid = first["message_id"]
    # The server did take it (the dot arrived); only its answer was lost.
    assert len(world.submission.by_message_id(mid)) == 1
    await passes(world, 3)
    assert len(world.submission.by_message_id(mid)) == 1, "sent twice after a lost answer"
    assert sent_folder_ids(world).count(mid) == 1
    msg = world.ts.thread(first["thread_id"])["messages"][0]
    assert msg["reason"] == "delivery_unconfirmed"
    conn = world.ts.status(SUB, USER)["connections"][0]
    assert conn["state"] == "connected"  # recovered on the next pass


async def test_cut_inside_data_sends_once_after_reconnecting(world: World, lines: Lines) -> None:
    """Cut before the final dot: the server discards the unfinished message, so it
    is sent again on the next pass, once."""
    await connect_through(world, lines)
    rng = random.Random(13)
    # Past the greeting, EHLO, AUTH and the envelope: inside the message text.
    cut = Fault("reset", "up", after=b"Subject: Offer")
    lines.smtp.arm(cut)
    first = await world.ts.send(SUB, USER, offer("x" * rng.randint(2000, 6000)))
    assert cut.fired.is_set() and first["status"] == "queued"
    assert world.submission.by_message_id(first["message_id"]) == []
    await passes(world, 3)
    assert_exactly_once(world, first["thread_id"], [first["message_id"]], [])
    assert world.ts.thread(first["thread_id"])["messages"][0]["reason"] is None


async def test_stalled_smtp_line_times_out_and_the_message_goes_later(
    world: World, lines: Lines
) -> None:
    """No byte after the envelope for longer than the SMTP timeout: the send
    gives up within its timeout, the entry waits, and the next pass sends it once."""
    await connect_through(world, lines)
    stall = Fault("stall", "up", after=b"DATA\r\n")
    lines.smtp.arm(stall)
    started = time.monotonic()
    first = await world.ts.send(SUB, USER, offer())
    took = time.monotonic() - started
    assert stall.fired.is_set() and first["status"] == "queued"
    await passes(world, 3)
    assert_exactly_once(world, first["thread_id"], [first["message_id"]], [])
    assert took < TIMEOUT * 3, f"a stalled line held the send {took:.1f}s"
