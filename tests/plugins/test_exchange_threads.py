"""exchangelib is synchronous: every call into it runs in the bounded EWS worker
pool, never on the event loop. Proved against real peers: while the fake
Exchange Server takes its time answering, another connection's IMAP pass against
Dovecot runs to its end on the same event loop."""

from __future__ import annotations

import asyncio
import threading

import pytest
from exchangelib.protocol import Protocol

from tests.fakes.ews import FakeEws
from tests.fakes.ews_world import MAILBOX, account, opened
from tests.servers import ImapServer
from tests.servers.tlscerts import TestCA
from threadsync.core.provider import Folder
from threadsync.plugins.exchange import ExchangeProvider
from threadsync.plugins.exchange.ews import WORKERS, run_in_worker
from threadsync.plugins.imap_smtp import ImapSmtpProvider
from threadsync.testing import make_message

pytest_plugins = ["tests.fakes.ews_fixtures"]

INBOX = Folder("inbox", "inbox")
IMAP_INBOX = Folder("INBOX", "inbox")


async def imap_pass(imap_server: ImapServer, mailbox: tuple[str, str]) -> list[bytes]:
    """What the kernel does for an IMAP connection: log in, read new headers,
    fetch the new message, log out."""
    email, password = mailbox
    acct = ImapSmtpProvider.prepare(email, {
        "imap_host": imap_server.host, "imap_port": imap_server.port,
        "smtp_host": "127.0.0.1", "smtp_port": 1, "security": "starttls",
        "password_env": "PW", "ca_file": str(imap_server.ca.ca_file)}, {"password": password})
    provider = ImapSmtpProvider(acct, {"timeout": 10.0})
    await provider.open()
    try:
        cursor = (await provider.changes(IMAP_INBOX, None)).cursor
        imap_server.deliver(email, make_message("<imap-pass@example.org>", to=email))
        batch = await provider.changes(IMAP_INBOX, cursor)
        fetched = await provider.fetch_many(IMAP_INBOX, [h.ref for h in batch.headers])
        return list(fetched.values())
    finally:
        await provider.close()


async def test_a_slow_exchange_answer_does_not_stall_an_imap_pass(
    ews: FakeEws, test_ca: TestCA, imap_server: ImapServer, mailbox: tuple[str, str]
) -> None:
    async with opened(account(ews, test_ca)) as exchange:
        cursor = (await exchange.changes(INBOX, None)).cursor
        ews.deliver(MAILBOX, make_message("<slow@example.org>", to=MAILBOX))
        ews.delay = 3.0  # every EWS answer now takes three seconds
        slow = asyncio.ensure_future(exchange.changes(INBOX, cursor))
        await asyncio.sleep(0.2)  # the EWS request is under way
        fetched = await asyncio.wait_for(imap_pass(imap_server, mailbox), 30)
        # The IMAP pass finished while Exchange had not answered yet.
        assert not slow.done()
        assert len(fetched) == 1 and b"<imap-pass@example.org>" in fetched[0]
        batch = await asyncio.wait_for(slow, 30)
        assert [h.message_id for h in batch.headers] == ["<slow@example.org>"]
        ews.delay = 0.0


async def test_calls_run_in_a_bounded_pool_of_named_worker_threads() -> None:
    running = 0
    peak = 0
    lock = threading.Lock()
    release = threading.Event()
    names: set[str] = set()

    def work() -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
            names.add(threading.current_thread().name)
        release.wait(10)
        with lock:
            running -= 1

    loop_thread = threading.current_thread().name
    tasks = [asyncio.ensure_future(run_in_worker(work)) for _ in range(WORKERS * 3)]
    for _ in range(100):
        await asyncio.sleep(0.02)
        if peak >= WORKERS:
            break
    release.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 30)
    assert peak == WORKERS
    assert loop_thread not in names and all(n.startswith("threadsync-ews") for n in names)


async def test_the_provider_never_calls_exchangelib_on_the_loop_thread(
    ews: FakeEws, test_ca: TestCA, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str] = []
    original = Protocol.get_session

    def get_session(self: Protocol) -> object:
        seen.append(threading.current_thread().name)
        return original(self)

    monkeypatch.setattr(Protocol, "get_session", get_session)
    loop_thread = threading.current_thread().name
    provider = ExchangeProvider(account(ews, test_ca), {"event_poll_seconds": 0.05})
    await provider.open()
    try:
        await provider.verify()
        cursor = (await provider.changes(INBOX, None)).cursor
        assert await provider.wait_for_changes(0.1) is False  # subscribes
        ews.deliver(MAILBOX, make_message("<t@example.org>", to=MAILBOX))
        assert await provider.wait_for_changes(10) is True
        batch = await provider.changes(INBOX, cursor)
        await provider.fetch(INBOX, batch.headers[0].ref)
        await provider.find_sent("<t@example.org>")
    finally:
        await provider.close()
    assert len(seen) >= 5
    assert loop_thread not in seen and all(n.startswith("threadsync-ews") for n in seen)
