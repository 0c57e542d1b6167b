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
import gc
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.faultproxy import Fault, FaultProxy
from tests.kernelfixtures import CONTACT, SUB, USER, World, make_mail, make_settings, reply_to
from tests.servers import free_port
from tests.servers.smtp import SmtpServer
from threadsync.core.api import Threadsync
from threadsync.core.errors import TransientProviderError
from threadsync.core.outbox.compose import Draft
from threadsync.plugins.imap_smtp.imap import ImapEndpoint, ImapSession

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


# ---- IMAP: header FETCH, body FETCH, APPEND --------------------------------------------


async def conversation(world: World, lines: Lines) -> tuple[str, list[str], list[str]]:
    """A synced thread with mail waiting both ways: (thread id, CRM Message-IDs,
    Message-IDs of mail the contact and the user's mail client put in the mailbox)."""
    await connect_through(world, lines)
    first = await world.ts.send(SUB, USER, offer())
    assert first["status"] == "sent"
    mails = [world.contact_replies(first, body=f"reply {n} " + "y" * 3000) for n in range(3)]
    mails.append(world.user_replies_from_client(mails[0], chain=[first["message_id"]]))
    return first["thread_id"], [first["message_id"]], mails


@pytest.mark.parametrize("seed", [1, 2])
async def test_cut_during_a_header_fetch(world: World, lines: Lines, seed: int) -> None:
    thread_id, crm, mails = await conversation(world, lines)
    offset = random.Random(seed).randint(0, 200)
    cut = Fault("reset", "down", after=b"BODY[HEADER.FIELDS", plus=offset)
    lines.imap.arm(cut)
    reply = await world.ts.reply(thread_id, Draft(text="CRM reply while the line drops"))
    await passes(world, 4)
    assert cut.fired.is_set()
    assert_exactly_once(world, thread_id, [*crm, reply["message_id"]], mails)
    assert world.ts.status(SUB, USER)["connections"][0]["state"] == "connected"


@pytest.mark.parametrize("seed", [1, 2])
async def test_cut_during_a_body_fetch(world: World, lines: Lines, seed: int) -> None:
    thread_id, crm, mails = await conversation(world, lines)
    cut = Fault("reset", "down", after=b"BODY[] {", plus=random.Random(seed).randint(5, 2500))
    lines.imap.arm(cut)
    reply = await world.ts.reply(thread_id, Draft(text="CRM reply while the line drops"))
    await passes(world, 4)
    assert cut.fired.is_set()
    assert_exactly_once(world, thread_id, [*crm, reply["message_id"]], mails)


async def test_stalled_body_fetch_gives_up_within_its_timeout(world: World, lines: Lines) -> None:
    thread_id, crm, mails = await conversation(world, lines)
    stall = Fault("stall", "down", after=b"BODY[] {", plus=100)
    lines.imap.arm(stall)
    started = time.monotonic()
    report = await world.ts.run_once()
    took = time.monotonic() - started
    assert stall.fired.is_set() and report.errors
    assert took < TIMEOUT * 4, f"a stalled FETCH held the pass {took:.1f}s"
    conn = world.ts.status(SUB, USER)["connections"][0]
    assert conn["state"] == "error" and conn["last_error"]
    await passes(world, 4, pause=0.6)
    assert_exactly_once(world, thread_id, crm, mails)


async def test_cut_inside_the_append_of_the_sent_copy(world: World, lines: Lines) -> None:
    """The APPEND breaks off mid-literal: the server files nothing; the copy is
    filed on a later pass, once, and the message was submitted once."""
    thread_id, crm, mails = await conversation(world, lines)
    await passes(world, 1)
    cut = Fault("reset", "up", after=b"APPEND", plus=300)
    lines.imap.arm(cut)
    reply = await world.ts.reply(thread_id, Draft(text="CRM reply " + "z" * 2000))
    assert cut.fired.is_set()
    await passes(world, 3)
    assert_exactly_once(world, thread_id, [*crm, reply["message_id"]], mails)


async def test_lost_answer_to_append_files_the_sent_copy_once(world: World, lines: Lines) -> None:
    """The server filed the copy but its answer was lost: the next pass finds the
    copy in Sent and does not file a second one."""
    thread_id, crm, mails = await conversation(world, lines)
    await passes(world, 1)
    cut = Fault("reset", "down", after=b"[APPENDUID")
    lines.imap.arm(cut)
    reply = await world.ts.reply(thread_id, Draft(text="CRM reply, answer lost"))
    assert cut.fired.is_set()
    await passes(world, 3)
    assert_exactly_once(world, thread_id, [*crm, reply["message_id"]], mails)


async def test_a_line_that_drops_at_once_is_a_clean_failure(world: World, lines: Lines) -> None:
    """A load balancer whose server is gone accepts the connection and drops it
    before the greeting: the pass fails cleanly (no coroutine left behind) and
    the connection shows the error; it recovers once the server is back."""
    await connect_through(world, lines)
    first = await world.ts.send(SUB, USER, offer())
    target = lines.imap.target_port
    lines.imap.target_port = free_port()  # nothing behind it now: every connect drops
    for _ in range(3):
        report = await world.ts.run_once()
        assert report.errors
        gc.collect()  # a coroutine never awaited is reported when collected
        await asyncio.sleep(0.3)
    conn = world.ts.status(SUB, USER)["connections"][0]
    assert conn["state"] == "error" and "IMAP" in conn["last_error"]
    lines.imap.target_port = target
    mid = world.contact_replies(first)
    await passes(world, 3, pause=0.6)
    assert_exactly_once(world, first["thread_id"], [first["message_id"]], [mid])


async def test_commands_on_a_dropped_imap_line_fail_cleanly(world: World, lines: Lines) -> None:
    """Once the line dropped, every further command fails at once with a
    transient error, and none is left behind unawaited (the daemon may still
    ask a broken session for something before it notices)."""
    endpoint = ImapEndpoint(lines.imap.host, lines.imap.port, "none", None, TIMEOUT)
    session = await ImapSession.connect(endpoint)
    await session.login(world.email, world.password)
    lines.imap.arm(Fault("reset", "down"))
    with pytest.raises(TransientProviderError):
        await session.status("INBOX", ["MESSAGES"])
    for _ in range(3):
        with pytest.raises(TransientProviderError):
            await session.status("INBOX", ["MESSAGES"])
        with pytest.raises(TransientProviderError):
            await session.uid_search("ALL")
    await session.close()
    gc.collect()  # a coroutine never awaited would be reported (as an error) here


# ---- the CRM's default relay ---------------------------------------------------------------


async def test_lost_answer_from_the_default_relay_never_sends_twice(
    tmp_path: Path, scenario_database_url: str, relay: SmtpServer
) -> None:
    """The same point of no return on the CRM's own relay: a user without a
    mailbox gets the message through the default channel; the answer to the end
    of DATA is lost; later passes never send it again."""
    with FaultProxy(relay.host, relay.port) as proxy:
        settings = make_settings(tmp_path, scenario_database_url, proxy.port)
        Threadsync.init(settings)
        ts = Threadsync.from_settings(settings, environ={})
        try:
            ts.labs(SUB, enabled=True)
            cut = Fault("reset", "up", after=b"\r\n.\r\n")
            proxy.arm(cut)
            first = await ts.send(SUB, USER, offer())
            assert cut.fired.is_set() and first["channel"] == "default"
            for _ in range(3):
                await ts.run_once()
                await asyncio.sleep(0.3)
            assert len(relay.by_message_id(first["message_id"])) == 1
            assert ts.thread(first["thread_id"])["messages"][0]["reason"] == "delivery_unconfirmed"
            # A later message on the same relay goes normally.
            second = await ts.send(SUB, USER, offer("again"))
            assert second["status"] == "sent"
            assert len(relay.by_message_id(second["message_id"])) == 1
        finally:
            await ts.aclose()


# ---- one slow line never slows another -----------------------------------------------------


async def until(check: Any, limit: float) -> None:
    deadline = time.monotonic() + limit
    while not check():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.1)


async def test_a_throttled_line_does_not_slow_another_connection(
    world: World, lines: Lines, mailbox_factory: Any
) -> None:
    """User A's IMAP line crawls at a few hundred bytes a second in the middle of
    a body FETCH; the daemon stores user B's new mail meanwhile, and A's mail
    arrives whole once its line has delivered it."""
    await connect_through(world, lines)
    other, other_pw = mailbox_factory()
    world.submission.users[other] = other_pw
    world.ts.kernel.environ["MAILPW2"] = other_pw
    await world.ts.connect(
        SUB, "u2", "imap_smtp", email=other, options=world.options(password_env="MAILPW2")
    )
    a = await world.ts.send(SUB, USER, offer())
    b = await world.ts.send(SUB, "u2", offer())
    crawl = Fault("throttle", "down", after=b"BODY[] {", rate=400)
    lines.imap.arm(crawl)
    a_reply = world.contact_replies(a, body="slow " + "s" * 3000)
    daemon = world.ts.daemon()
    running = asyncio.create_task(daemon.run())
    try:
        await until(crawl.fired.is_set, 20)
        raw, b_reply = make_mail(
            sender=CONTACT, to=other, subject="Re: Offer", body="quick", headers=reply_to(b)
        )
        world.imap.deliver(other, raw)
        await until(lambda: world.count_messages(b_reply) == 1, 15)
        # B's mail is in while A's body is still crawling through its line.
        assert world.count_messages(a_reply) == 0
        await until(lambda: world.count_messages(a_reply) == 1, 30)
    finally:
        daemon.stop()
        await asyncio.wait_for(running, 30)
    assert_exactly_once(world, a["thread_id"], [a["message_id"]], [a_reply])
    stored_b = [m["message_id"] for m in world.ts.thread(b["thread_id"])["messages"]]
    assert stored_b == [b["message_id"], b_reply]
