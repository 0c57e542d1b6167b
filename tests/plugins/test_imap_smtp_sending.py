"""The ``imap_smtp`` provider's SMTP connection, reused across messages.

One authenticated connection carries every message of a provider; it is closed
after it sat idle and at ``close()``. A reused connection the server closed in
the meantime is replaced, and the message tried again, only while nothing can
have left (before the checkpoint); after the checkpoint nothing is retried.
Real peers: the aiosmtpd-based test server; a scripted peer plays the replies
aiosmtpd never gives (``421`` to a command, a drop during DATA).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP

from tests.plugins.test_imap_smtp import (
    make_provider,
    outgoing,
    scripted_provider,
    scripted_server,
)
from tests.servers import ImapServer
from tests.servers.smtp import SmtpServer
from tests.servers.tlscerts import TestCA
from threadsync.core.errors import TransientProviderError
from threadsync.plugins.imap_smtp import ImapSmtpProvider


class CountingSmtpServer(SmtpServer):
    """The test SMTP server, counting the connections it accepted and lost;
    ``idle_timeout`` makes it drop a connection idle that long, as real ones do."""

    def __init__(self, *, idle_timeout: float | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.idle_timeout = idle_timeout
        self.opened = 0
        self.closed = 0

    def _factory(self) -> SMTP:
        protocol = super()._factory()
        if self.idle_timeout is not None:
            protocol._timeout_duration = self.idle_timeout
        self.opened += 1
        lost = protocol.connection_lost

        def connection_lost(exc: Exception | None) -> None:
            self.closed += 1
            lost(exc)

        protocol.connection_lost = connection_lost  # type: ignore[method-assign, assignment]
        return protocol


@pytest.fixture
def counting_smtp(
    mailbox: tuple[str, str], imap_server: ImapServer, test_ca: TestCA
) -> CountingSmtpServer:
    email, password = mailbox
    return CountingSmtpServer(users={email: password}, ca=test_ca, require_auth=True)


class Checkpoints:
    """A checkpoint that records how many messages the server had at each call."""

    def __init__(self, server: SmtpServer) -> None:
        self.server = server
        self.seen: list[int] = []

    async def __call__(self) -> None:
        self.seen.append(len(self.server.received))


def message_ids(server: SmtpServer) -> list[str | None]:
    return [r.message_id for r in server.received]


async def wait_until(condition: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_one_connection_carries_every_message(
    imap_server: ImapServer, mailbox: tuple[str, str], counting_smtp: CountingSmtpServer
) -> None:
    email = mailbox[0]
    with counting_smtp:
        provider = make_provider(imap_server, mailbox, smtp=counting_smtp)
        checkpoints = Checkpoints(counting_smtp)
        mails = [outgoing(email, f"contact{i}@example.org") for i in range(5)]
        for mail in mails:
            await provider.send(mail, checkpoints)
        assert checkpoints.seen == [0, 1, 2, 3, 4]  # each one right before its DATA
        assert message_ids(counting_smtp) == [m.message_id.strip("<>") for m in mails]
        assert counting_smtp.opened == 1 and counting_smtp.closed == 0
        await provider.close()
        await wait_until(lambda: counting_smtp.closed == 1)
        await provider.close()


async def test_a_checkpoint_that_fails_leaves_nothing_at_the_server(
    imap_server: ImapServer, mailbox: tuple[str, str], counting_smtp: CountingSmtpServer
) -> None:
    """The checkpoint runs inside DATA, before its end: when it fails (the
    process dies there, the lease was lost) the server has the whole message
    but not its end, and discards it when the connection goes. Sending it again
    then delivers it exactly once."""
    email = mailbox[0]

    class Died(Exception):
        pass

    async def dies() -> None:
        assert counting_smtp.received == []
        raise Died

    with counting_smtp:
        provider = make_provider(imap_server, mailbox, smtp=counting_smtp)
        mail = outgoing(email, "contact@example.org")
        with pytest.raises(Died):
            await provider.send(mail, dies)
        await wait_until(lambda: counting_smtp.closed == 1)
        assert counting_smtp.received == []  # the unterminated message was dropped
        checkpoints = Checkpoints(counting_smtp)
        await provider.send(mail, checkpoints)
        assert checkpoints.seen == [0]
        assert message_ids(counting_smtp) == [mail.message_id.strip("<>")]
        await provider.close()


async def test_an_idle_connection_is_closed(
    imap_server: ImapServer, mailbox: tuple[str, str], counting_smtp: CountingSmtpServer
) -> None:
    email = mailbox[0]
    with counting_smtp:
        account = make_provider(imap_server, mailbox, smtp=counting_smtp).account
        provider = ImapSmtpProvider(account, {"timeout": 10, "smtp_idle_seconds": 0.2})
        await provider.send(outgoing(email, "contact@example.org"), Checkpoints(counting_smtp))
        await asyncio.sleep(0.05)
        assert counting_smtp.closed == 0
        await wait_until(lambda: counting_smtp.closed == 1)
        await provider.send(outgoing(email, "contact@example.org"), Checkpoints(counting_smtp))
        assert counting_smtp.opened == 2 and len(counting_smtp.received) == 2
        await provider.close()


@pytest.mark.parametrize("noticed", [True, False], ids=["noticed", "unnoticed"])
async def test_a_connection_dropped_while_idle_still_sends_each_message_once(
    imap_server: ImapServer,
    mailbox: tuple[str, str],
    test_ca: TestCA,
    noticed: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The server drops the idle connection between two sends. When the client
    saw it go, the next send connects anew; when it did not (the event loop has
    not read the close yet), MAIL FROM fails on the dead connection and the
    message is sent on a new one: nothing had left, the checkpoint not reached."""
    caplog.set_level(logging.INFO, logger="threadsync.core.outbox.smtp")
    email, password = mailbox
    server = CountingSmtpServer(
        users={email: password}, ca=test_ca, require_auth=True, idle_timeout=0.3
    )
    with server:
        provider = make_provider(imap_server, mailbox, smtp=server)
        checkpoints = Checkpoints(server)
        first, second = outgoing(email, "a@example.org"), outgoing(email, "b@example.org")
        await provider.send(first, checkpoints)
        if noticed:
            await wait_until(lambda: server.closed == 1)
        else:
            # Blocks the event loop on purpose: the server's close stays unread.
            time.sleep(0.6)
        await provider.send(second, checkpoints)
        assert checkpoints.seen == [0, 1]
        assert message_ids(server) == [first.message_id.strip("<>"), second.message_id.strip("<>")]
        assert server.opened == 2
        await provider.close()
    retried = "closed by the server while idle" in caplog.text
    assert retried is not noticed


def _smtp_script(
    events: list[str],
    on_second_mail: bytes | None,
    drop_at_data: int | None,
    drop_at_end: int | None = None,
) -> Any:
    """A submission server: ``on_second_mail`` is its answer to the second MAIL
    FROM of a connection (after which it closes); ``drop_at_data`` is the DATA
    command (counted over all connections) at which it hangs up instead of
    answering 354; ``drop_at_end`` the one whose end of data it receives and
    then hangs up without a verdict (the message may have been taken)."""
    counts = {"data": 0}

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        events.append("connect")
        mails = 0
        writer.write(b"220 smtp.test ESMTP\r\n")
        while line := await reader.readline():
            verb = line.split(b" ", 1)[0].strip().upper()
            if verb == b"EHLO":
                writer.write(b"250-smtp.test\r\n250 AUTH PLAIN\r\n")
            elif verb == b"AUTH":
                writer.write(b"235 ok\r\n")
            elif verb.startswith(b"MAIL"):
                mails += 1
                if mails == 2 and on_second_mail is not None:
                    writer.write(on_second_mail)
                    await writer.drain()
                    writer.close()
                    return
                writer.write(b"250 ok\r\n")
            elif verb.startswith(b"RCPT"):
                writer.write(b"250 ok\r\n")
            elif verb == b"DATA":
                counts["data"] += 1
                events.append("data")
                if counts["data"] == drop_at_data:
                    writer.close()
                    return
                writer.write(b"354 go on\r\n")
                while (await reader.readline()) != b".\r\n":
                    pass
                if counts["data"] == drop_at_end:
                    events.append("ended")
                    writer.close()
                    return
                events.append("accepted")
                writer.write(b"250 queued\r\n")
            elif verb == b"QUIT":
                events.append("quit")
                writer.write(b"221 bye\r\n")
                return
            else:
                writer.write(b"250 ok\r\n")
            await writer.drain()

    return script


async def test_a_421_before_the_checkpoint_is_retried_on_a_new_connection() -> None:
    events: list[str] = []
    script = _smtp_script(events, b"421 4.4.2 idle too long, closing\r\n", drop_at_data=None)
    async with scripted_server(script) as port:
        provider = scripted_provider(port, password_env="PW", smtp_port=port)
        calls: list[str] = []

        async def checkpoint() -> None:
            calls.append("checkpoint")

        await provider.send(outgoing("user@example.org", "a@example.org"), checkpoint)
        await provider.send(outgoing("user@example.org", "b@example.org"), checkpoint)
        await provider.close()
    assert calls == ["checkpoint", "checkpoint"]
    assert events == ["connect", "data", "accepted", "connect", "data", "accepted", "quit"]


async def test_a_failure_before_the_end_of_data_sends_nothing() -> None:
    """The server hangs up at DATA: the checkpoint was not reached, so the
    kernel keeps the message pending and sends it again later."""
    events: list[str] = []
    script = _smtp_script(events, None, drop_at_data=1)
    async with scripted_server(script) as port:
        provider = scripted_provider(port, password_env="PW", smtp_port=port)
        calls: list[str] = []

        async def checkpoint() -> None:
            calls.append("checkpoint")

        with pytest.raises(TransientProviderError, match="DATA"):
            await provider.send(outgoing("user@example.org", "a@example.org"), checkpoint)
        assert calls == [] and events == ["connect", "data"]
        await provider.close()


async def test_a_failure_after_the_checkpoint_is_never_retried() -> None:
    events: list[str] = []
    script = _smtp_script(events, None, drop_at_data=None, drop_at_end=2)
    async with scripted_server(script) as port:
        provider = scripted_provider(port, password_env="PW", smtp_port=port)
        calls: list[str] = []

        async def checkpoint() -> None:
            calls.append("checkpoint")

        await provider.send(outgoing("user@example.org", "a@example.org"), checkpoint)
        with pytest.raises(TransientProviderError, match="DATA"):
            await provider.send(outgoing("user@example.org", "b@example.org"), checkpoint)
        assert calls == ["checkpoint", "checkpoint"]
        assert events == ["connect", "data", "accepted", "data", "ended"]  # not sent again
        await provider.send(outgoing("user@example.org", "c@example.org"), checkpoint)
        await provider.close()
    assert events[5:] == ["connect", "data", "accepted", "quit"]


async def test_a_refused_message_does_not_poison_the_connection(
    imap_server: ImapServer, mailbox: tuple[str, str], counting_smtp: CountingSmtpServer
) -> None:
    email = mailbox[0]
    with counting_smtp:
        provider = make_provider(imap_server, mailbox, smtp=counting_smtp)

        class Crash(Exception):
            pass

        async def crash() -> None:
            raise Crash

        await provider.send(outgoing(email, "a@example.org"), Checkpoints(counting_smtp))
        with pytest.raises(Crash):
            await provider.send(outgoing(email, "b@example.org"), crash)
        await provider.send(outgoing(email, "c@example.org"), Checkpoints(counting_smtp))
        assert [r.rcpt_tos for r in counting_smtp.received] == [
            ["a@example.org"],
            ["c@example.org"],
        ]
        await provider.close()
