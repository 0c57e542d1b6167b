"""One SMTP client and one error map for the mailbox's submission server and the
CRM's relay: the same server answer means the same thing on both paths.

A scripted SMTP server on loopback answers what a real one does in the cases
that differed before (a 4xx to AUTH, a recipient deferred with 4xx, a TLS
handshake against a plaintext port)."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import aiosmtplib
import pytest

from threadsync.core.config import DefaultChannel
from threadsync.core.errors import (
    AuthenticationFailed,
    ProviderError,
    ProviderProtocolError,
    TransientProviderError,
)
from threadsync.core.outbox.relay import send_via_relay
from threadsync.core.outbox.smtp import ERROR_MAP, SmtpEndpoint, SmtpSession, translate
from threadsync.core.provider import OutgoingMail

MAIL = OutgoingMail(
    sender="ann@example.test",
    recipients=["carla@example.org", "dora@example.org"],
    raw=b"From: ann@example.test\r\nSubject: x\r\n\r\nhello\r\n",
    message_id="<x@example.test>",
)


@asynccontextmanager
async def scripted(answer: Callable[[str], str | None]) -> AsyncIterator[int]:
    """An SMTP server that greets, offers AUTH PLAIN, and answers each command
    line with ``answer(line)`` (``None``: the usual 250)."""

    writers: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        writer.write(b"220 scripted ESMTP\r\n")
        in_data = False
        while raw := await reader.readline():
            line = raw.decode().rstrip("\r\n")
            if in_data and line != ".":
                continue  # message text: no answer until the line that ends it
            in_data = False
            verb = line.split()[0].upper() if line else ""
            reply = answer(line)
            if reply is None:
                reply = {
                    "EHLO": "250-scripted\r\n250-AUTH PLAIN\r\n250 SIZE 10000000",
                    "AUTH": "235 2.7.0 accepted",
                    "DATA": "354 go on",
                    "QUIT": "221 bye",
                    ".": "250 queued",
                }.get(verb, "250 ok")
            in_data = verb == "DATA" and reply.startswith("354")
            writer.write(reply.encode() + b"\r\n")
            await writer.drain()
            if verb == "QUIT":
                break
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        for writer in writers:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        server.close()
        await server.wait_closed()


async def by_relay(port: int, username: str | None = "crm") -> None:
    channel = DefaultChannel(
        port=port, username=username, password_env="RELAYPW" if username else None
    )
    await send_via_relay(channel, MAIL, "pw" if username else None, _no_checkpoint)


async def by_mailbox(port: int, username: str | None = "crm") -> None:
    endpoint = SmtpEndpoint("127.0.0.1", port, "none", None, username or "", password="pw")
    session = SmtpSession()
    try:
        await session.send(endpoint, MAIL, _no_checkpoint)
    finally:
        await session.close()


async def _no_checkpoint() -> None:
    return None


@pytest.mark.parametrize("send", [by_relay, by_mailbox])
@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (lambda line: "454 4.7.0 try later" if line.startswith("AUTH") else None,
         TransientProviderError),
        (lambda line: "535 5.7.8 bad credentials" if line.startswith("AUTH") else None,
         AuthenticationFailed),
        (lambda line: "450 4.2.0 mailbox busy" if "dora" in line else None,
         TransientProviderError),
        (lambda line: "550 5.1.1 no such user" if line.startswith("RCPT") else None,
         ProviderProtocolError),
        (lambda line: "451 4.3.0 queue full" if line == "." else None, TransientProviderError),
    ],
)
async def test_both_paths_mean_the_same_by_each_answer(
    send: Callable[[int], object], answer: Callable[[str], str | None], expected: type
) -> None:
    async with scripted(answer) as port:
        with pytest.raises(expected):
            await send(port)  # type: ignore[misc]


@pytest.mark.parametrize("send", [by_relay, by_mailbox])
async def test_a_recipient_refused_for_good_is_skipped_the_others_get_it(
    send: Callable[[int], object],
) -> None:
    seen: list[str] = []

    def answer(line: str) -> str | None:
        seen.append(line)
        return "550 5.1.1 no such user" if "dora" in line else None

    async with scripted(answer) as port:
        await send(port)  # type: ignore[misc]
    assert "." in seen  # the message left, for carla


def test_every_aiosmtplib_error_and_network_failure_is_mapped() -> None:
    endpoint = SmtpEndpoint("127.0.0.1", 25, "none", None, "crm")
    library = [
        cls for _, cls in inspect.getmembers(aiosmtplib, inspect.isclass)
        if issubclass(cls, Exception) and cls.__module__.startswith("aiosmtplib")
    ]  # fmt: skip
    assert library
    kinds = {error for _, error in ERROR_MAP}
    for cls in library:
        params = list(inspect.signature(cls.__init__).parameters)[1:]
        values = {"code": 550, "recipients": [], "recipient": "a@b.test", "sender": "a@b.test"}
        exc: BaseException = cls(*(values.get(name, "failed") for name in params))
        found = translate(exc, endpoint, "DATA")
        assert isinstance(found, ProviderError) and type(found) in kinds, cls
    for exc in (ConnectionResetError(), TimeoutError(), ssl.SSLError(1, "WRONG_VERSION_NUMBER")):
        assert isinstance(translate(exc, endpoint, "connect"), ProviderError)
    assert translate(ValueError("not ours"), endpoint, "DATA") is None
