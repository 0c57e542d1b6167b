"""The ``imap_smtp`` provider against real servers.

IMAP tests run against the ``imap_server`` fixture: Dovecot by default, pymap
with ``THREADSYNC_TEST_IMAP=pymap`` (or both with ``all``). pymap has no
implicit-TLS port, no CONDSTORE and no SPECIAL-USE; the few tests that need
those say so in their skip reason. SMTP tests use the aiosmtpd-based
``smtp_server`` fixture (STARTTLS with the test CA, AUTH required), which also
delivers mail for the mailbox user into its INBOX.

A few protocol situations no real server here can produce (an XOAUTH2 server
rejecting a token, a server that never answers) are played by small scripted
servers on loopback, written for that one exchange.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import imaplib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from tests.servers import ImapServer, free_port
from tests.servers.smtp import SmtpServer
from tests.servers.tlscerts import TestCA
from threadsync.core.errors import (
    AuthenticationFailed,
    ConfigError,
    ProviderProtocolError,
    TransientProviderError,
)
from threadsync.core.provider import Account, Folder, OutgoingMail, resolve_credentials
from threadsync.core.registry import get_plugin_manager, providers
from threadsync.plugins.imap_smtp import ImapSmtpProvider, wire
from threadsync.plugins.imap_smtp import imap_syntax as syntax
from threadsync.plugins.imap_smtp.imap import ImapEndpoint, ImapSession

INBOX = Folder("INBOX", "inbox")
HEADER_ITEMS = "(UID RFC822.SIZE BODY.PEEK[HEADER.FIELDS (MESSAGE-ID REFERENCES)])"

# ---- helpers ---------------------------------------------------------------------------


def prepare(email: str, options: dict[str, Any], environ: dict[str, str]) -> Account:
    """``prepare`` with the secrets resolved from ``environ`` as the kernel does."""
    credentials = resolve_credentials(ImapSmtpProvider.options, options, environ)
    return ImapSmtpProvider.prepare(email, options, credentials)


def make_provider(
    imap_server: ImapServer,
    mailbox: tuple[str, str],
    *,
    smtp: SmtpServer | None = None,
    password: str | None = None,
    timeout: float = 10.0,
    **options: Any,
) -> ImapSmtpProvider:
    """A provider for ``mailbox`` over STARTTLS with the test CA, unless overridden."""
    email, real_password = mailbox
    opts: dict[str, Any] = {
        "imap_host": imap_server.host,
        "imap_port": imap_server.port,
        "smtp_host": smtp.host if smtp else "127.0.0.1",
        "smtp_port": smtp.port if smtp else free_port(),
        "security": "starttls",
        "password_env": "MAILBOX_PASSWORD",
        "ca_file": str(imap_server.ca.ca_file),
    }
    opts.update(options)
    opts = {k: v for k, v in opts.items() if v is not None}
    env = {"MAILBOX_PASSWORD": real_password if password is None else password}
    account = prepare(email, opts, env)
    return ImapSmtpProvider(account, {"timeout": timeout})


@contextlib.asynccontextmanager
async def opened(provider: ImapSmtpProvider) -> AsyncIterator[ImapSmtpProvider]:
    await provider.open()
    try:
        yield provider
    finally:
        await provider.close()


def message(mid: str, *, refs: str = "", in_reply_to: str = "", body: str = "hello") -> bytes:
    head = f"From: Someone <someone@example.org>\r\nSubject: about {mid}\r\nMessage-ID: <{mid}>\r\n"
    if in_reply_to:
        head += f"In-Reply-To: <{in_reply_to}>\r\n"
    if refs:
        head += f"References: {refs}\r\n"
    return (head + f"\r\n{body}\r\n").encode()


def fill(imap_server: ImapServer, mailbox: tuple[str, str], count: int, prefix: str) -> None:
    """Put ``count`` messages in INBOX quickly (Dovecot: APPEND; pymap: its store)."""
    email, password = mailbox
    raws = [message(f"{prefix}-{i}@example.org") for i in range(count)]
    if imap_server.kind == "dovecot":
        client = imaplib.IMAP4(imap_server.host, imap_server.port)
        try:
            client.login(email, password)
            for raw in raws:
                client.append("INBOX", None, None, raw)
            client.logout()
        finally:
            with contextlib.suppress(OSError):
                client.shutdown()
    else:
        for raw in raws:
            imap_server.deliver(email, raw)


def create_folder(imap_server: ImapServer, mailbox: tuple[str, str], name: str) -> None:
    """Create a folder with the standard library client (an independent peer)."""
    email, password = mailbox
    client = imaplib.IMAP4(imap_server.host, imap_server.port)
    try:
        client.login(email, password)
        typ, data = client.create(syntax.mailbox_arg(name))
        assert typ == "OK", data
        client.logout()
    finally:
        with contextlib.suppress(OSError):
            client.shutdown()


def outgoing(sender: str, *recipients: str, mid: str | None = None) -> OutgoingMail:
    mid = mid or f"<{secrets.token_hex(8)}@threadsync.test>"
    raw = (
        f"From: {sender}\r\nTo: {', '.join(recipients)}\r\nSubject: from the CRM\r\n"
        f"Message-ID: {mid}\r\nMIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n"
        "Hello from the CRM.\r\n.leading dot stays\r\n"
    ).encode()
    return OutgoingMail(raw=raw, message_id=mid, sender=sender, recipients=recipients)


async def from_start(provider: ImapSmtpProvider, folder: Folder) -> dict[str, Any]:
    """A cursor that makes ``changes`` read ``folder`` from its first message."""
    return {**(await provider.changes(folder, None)).cursor, "uidnext": 1}


async def drain(
    provider: ImapSmtpProvider, folder: Folder, cursor: dict[str, Any], limit: int = 250
) -> tuple[list[Any], dict[str, Any], list[bool]]:
    headers: list[Any] = []
    mores: list[bool] = []
    while True:
        batch = await provider.changes(folder, cursor, limit)
        headers += batch.headers
        mores.append(batch.more)
        cursor = batch.cursor
        if not batch.more:
            return headers, cursor, mores


# ---- registration and options (no network) ---------------------------------------------


def test_registered_as_builtin_provider() -> None:
    registered = providers(get_plugin_manager())
    assert registered["imap_smtp"].cls is ImapSmtpProvider
    names = {o.name for o in ImapSmtpProvider.options}
    assert {
        "imap_host",
        "imap_port",
        "smtp_host",
        "smtp_port",
        "username",
        "password_env",
        "security",
        "sent_folder",
        "auth",
        "access_token_env",
        "ca_file",
        "append_sent",
    } <= names


def test_prepare_defaults_ports_by_security_and_keeps_secret_apart() -> None:
    env = {"PW": "s3cret"}
    base = {"imap_host": "imap.example.com", "smtp_host": "smtp.example.com", "password_env": "PW"}
    tls = prepare("a@example.com", base, env)
    assert (tls.settings["imap_port"], tls.settings["smtp_port"]) == (993, 465)
    assert tls.settings["username"] == "a@example.com"
    assert tls.settings["append_sent"] is True
    assert tls.secrets == {"password": "s3cret"}
    assert "s3cret" not in repr(tls.settings)
    starttls = prepare("a@example.com", {**base, "security": "starttls"}, env)
    assert (starttls.settings["imap_port"], starttls.settings["smtp_port"]) == (143, 587)
    local = {**base, "imap_host": "127.0.0.1", "smtp_host": "localhost", "security": "none"}
    plain = prepare("a@example.com", local, env)
    assert (plain.settings["imap_port"], plain.settings["smtp_port"]) == (143, 25)
    off = prepare("a@example.com", {**base, "append_sent": "false"}, env)
    assert off.settings["append_sent"] is False


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"security": "none"}, "loopback"),
        ({"security": "none", "imap_host": "127.0.0.1"}, "loopback"),  # SMTP host still remote
        ({"password_env": "MISSING"}, "MISSING"),
        ({"password_env": None}, "--password-env"),
        ({"auth": "xoauth2"}, "--access-token-env"),
        ({"imap_port": "imap"}, "--imap-port"),
        ({"smtp_port": 70000}, "--smtp-port"),
        ({"append_sent": "maybe"}, "--append-sent"),
        ({"ca_file": "/nonexistent/ca.pem"}, "CA file"),
        ({"security": "ssl"}, "security"),
    ],
)
def test_prepare_refuses_unusable_options(options: dict[str, Any], message: str) -> None:
    opts = {
        "imap_host": "imap.example.com",
        "smtp_host": "smtp.example.com",
        "password_env": "PW",
        **options,
    }
    opts = {k: v for k, v in opts.items() if v is not None}
    with pytest.raises(ConfigError, match=message) as info:
        prepare("a@example.com", opts, {"PW": "s3cret"})
    assert "s3cret" not in str(info.value)


def test_prepare_xoauth2_takes_the_token_from_the_environment() -> None:
    account = prepare(
        "a@example.com",
        {
            "imap_host": "imap.example.com",
            "smtp_host": "smtp.example.com",
            "auth": "xoauth2",
            "access_token_env": "TOKEN",
        },
        {"TOKEN": "ya29.token"},
    )
    assert account.secrets == {"access_token": "ya29.token"}
    assert account.settings["auth"] == "xoauth2"


# ---- IMAP syntax (no network) ----------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "encoded"),
    [
        ("INBOX", "INBOX"),
        ("Sent Items", "Sent Items"),
        ("Éléments envoyés", "&AMk-l&AOk-ments envoy&AOk-s"),
        ("Gesendete Objekte & Co", "Gesendete Objekte &- Co"),
        ("送信済み", "&kAFP4W4IMH8-"),
    ],
)
def test_modified_utf7_round_trip(name: str, encoded: str) -> None:
    assert syntax.encode_mailbox(name) == encoded
    assert syntax.decode_mailbox(encoded) == name


def test_quoting_escapes_and_refuses_line_breaks() -> None:
    assert syntax.quote('a "b" \\c') == '"a \\"b\\" \\\\c"'
    assert syntax.mailbox_arg("Sent Items") == '"Sent Items"'
    with pytest.raises(ValueError):
        syntax.quote("a\r\nb")


def test_uid_sets_are_compact() -> None:
    assert syntax.uid_set([1, 2, 3, 7, 9, 10]) == "1:3,7,9:10"
    assert syntax.uid_set([5]) == "5"


def test_fetch_parsing_copes_with_literals_bare_lf_and_item_order() -> None:
    lines: list[bytes | bytearray] = [
        b"1 FETCH (UID 7 RFC822.SIZE 120 BODY[HEADER.FIELDS (MESSAGE-ID REFERENCES)] {30}",
        bytearray(b"Message-ID: <a@b>\nSubject: x\n\n"),
        b")",
        b"2 FETCH (BODY[HEADER.FIELDS (MESSAGE-ID)] {4}",
        bytearray(b"\r\n\r\n"),
        b" UID 9 RFC822.SIZE 3)",
        b"3 FETCH (FLAGS (\\Seen))",  # unsolicited, no UID: ignored
        b'4 FETCH (UID 11 BODY[HEADER.FIELDS (MESSAGE-ID)] "")',
    ]
    fetched = syntax.parse_fetch(lines)
    assert [(m.uid, m.size) for m in fetched] == [(7, 120), (9, 3), (11, None)]
    assert fetched[0].body == b"Message-ID: <a@b>\nSubject: x\n\n"
    assert fetched[2].body == b""


def test_fetch_parsing_of_the_usual_shape_and_its_neighbours() -> None:
    def one(head: bytes, literal: bytes = b"Subject: x\r\n\r\n", tail: bytes = b")") -> Any:
        return syntax.parse_fetch([head, bytearray(literal), tail])

    usual = b"5 FETCH (UID 7 RFC822.SIZE 120 BODY[HEADER.FIELDS (MESSAGE-ID)] {15}"
    assert one(usual) == [syntax.FetchedMessage(7, 120, b"Subject: x\r\n\r\n")]
    assert one(b"5 fetch (rfc822.size 3 uid 7 body[]<0> {15+}") == [
        syntax.FetchedMessage(7, 3, b"Subject: x\r\n\r\n")
    ]
    assert one(b"5 FETCH (UID 7 UID 8 BODY[] {15}")[0].uid == 8  # the last one counts
    assert one(b"5 FETCH (RFC822.SIZE 3 BODY[] {15}") == []  # no UID
    assert one(b"5 FETCH (UID 7 FLAGS (\\Seen) BODY[] {15}")[0].uid == 7
    assert one(usual, tail=b" FLAGS (\\Seen))")[0].body == b"Subject: x\r\n\r\n"
    assert one(b'5 FETCH (UID 7 X-NAME "a b" BODY[] {15}')[0].size is None
    with pytest.raises(syntax.ImapSyntaxError):
        one(b"5 FETCH (UID 7 BODY[] {15}", tail=b"")


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        (
            b'a "q\\"uo\\\\ted" NIL nil (x (y)) BODY[H (A B)]<0>',
            [
                "a",
                b'q"uo\\ted',
                None,
                None,
                ["x", ["y"]],
                "BODY[H (A B)]<0>",
            ],
        ),
        (b'{abc} x{1} ""', ["{abc}", "x{1}", b""]),
        (b"  spaced   out  ", ["spaced", "out"]),
        (b'caf\xc3\xa9 "\xc3\xa9"', ["café", b"\xc3\xa9"]),
    ],
)
def test_tokenizer(text: bytes, tokens: list[Any]) -> None:
    assert syntax.tokenize([text]) == tokens


@pytest.mark.parametrize("text", [b'"open', b'"ends in \\', b"A[open", b"x)", b"(x"])
def test_tokenizer_refuses_broken_text(text: bytes) -> None:
    with pytest.raises(syntax.ImapSyntaxError):
        syntax.tokenize([text])


def test_search_parsing() -> None:
    lines = [b"SEARCH 3 1 2", b"SEARCH", b"SEARCH 4 (MODSEQ 99)"]
    assert syntax.parse_search(lines) == [1, 2, 3, 4]
    assert syntax.parse_search([b"SEARCH  5\t6 7"]) == [7]  # "5\t6" is one atom


def test_list_and_status_parsing() -> None:
    listed = syntax.parse_list(
        [
            b'(\\HasNoChildren \\Sent) "/" "Sent"',
            b'(\\HasNoChildren) "/" {16}',
            bytearray(b'Sent "Items" a*'),
            b'(\\Noselect) NIL "&AMk-l&AOk-ments"',
        ]
    )
    assert [m.name for m in listed] == ["Sent", 'Sent "Items" a*', "Éléments"]
    assert "\\sent" in listed[0].attributes and listed[2].delimiter is None
    assert syntax.parse_status([b'"INBOX" (UIDNEXT 12 UIDVALIDITY 99)']) == {
        "UIDNEXT": 12,
        "UIDVALIDITY": 99,
    }


async def test_a_huge_response_is_parsed_without_recursion() -> None:
    """Stock aioimaplib recursed once per response line (upstream #118)."""

    class Transport(asyncio.Transport):
        def write(self, data: Any) -> None:
            pass

    protocol = wire.ImapProtocol(asyncio.get_running_loop())
    protocol.transport = Transport()
    protocol.state = wire.STATE_SELECTED
    command = wire.new_command("FETCH", "A1", "1:5000", HEADER_ITEMS, prefix="UID")
    pending = asyncio.ensure_future(protocol.execute(command))
    await asyncio.sleep(0)
    header = b"Message-ID: <m@x>\r\n\r\n"
    data = b"".join(
        b"* %d FETCH (UID %d RFC822.SIZE 9 BODY[HEADER.FIELDS (MESSAGE-ID)] {%d}\r\n%s)\r\n"
        % (i, i, len(header), header)
        for i in range(1, 5001)
    )
    protocol.data_received(data + b"A1 OK done\r\n")
    response = await asyncio.wait_for(pending, 5)
    assert len(syntax.parse_fetch(response.lines[:-1])) == 5000


# ---- connecting and logging in ---------------------------------------------------------


async def test_login_ok_and_close_is_idempotent(
    imap_server: ImapServer, mailbox: tuple[str, str]
) -> None:
    provider = make_provider(imap_server, mailbox)
    await provider.open()
    assert await provider.folders()
    await provider.close()
    await provider.close()


async def test_wrong_password_fails_fast_without_leaking_it(
    imap_server: ImapServer, mailbox: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    provider = make_provider(imap_server, mailbox, password="wrong-Pa55word")
    started = time.monotonic()
    with pytest.raises(AuthenticationFailed) as info:
        await provider.open()
    assert time.monotonic() - started < 5
    text = str(info.value)
    assert mailbox[0] in text and imap_server.host in text
    assert "wrong-Pa55word" not in text and "wrong-Pa55word" not in caplog.text
    await provider.close()


async def test_non_ascii_password(imap_server: ImapServer) -> None:
    email = f"utf8-{secrets.token_hex(4)}@threadsync.test"
    password = "pässwörd-€-" + secrets.token_hex(4)
    imap_server.add_user(email, password)
    async with opened(make_provider(imap_server, (email, password))) as provider:
        assert (await provider.folders())[0] == INBOX


async def test_plaintext_towards_loopback(
    imap_server: ImapServer, mailbox: tuple[str, str]
) -> None:
    async with opened(
        make_provider(imap_server, mailbox, security="none", ca_file=None)
    ) as provider:
        assert (await provider.folders())[0] == INBOX
        session = provider._session
        assert session is not None and not session.encrypted


async def test_starttls_with_the_test_ca(imap_server: ImapServer, mailbox: tuple[str, str]) -> None:
    async with opened(make_provider(imap_server, mailbox, security="starttls")) as provider:
        session = provider._session
        assert session is not None and session.encrypted
        assert (await provider.folders())[0] == INBOX


async def test_implicit_tls_with_the_test_ca(
    imap_server: ImapServer, mailbox: tuple[str, str]
) -> None:
    if imap_server.tls_port is None:
        pytest.skip(f"{imap_server.kind} has no implicit TLS port (STARTTLS only)")
    provider = make_provider(imap_server, mailbox, security="tls", imap_port=imap_server.tls_port)
    async with opened(provider):
        assert (await provider.folders())[0] == INBOX


@pytest.mark.parametrize("security", ["starttls", "tls"])
async def test_untrusted_certificate_is_refused(
    imap_server: ImapServer, mailbox: tuple[str, str], security: str
) -> None:
    port = imap_server.port if security == "starttls" else imap_server.tls_port
    if port is None:
        pytest.skip(f"{imap_server.kind} has no implicit TLS port (STARTTLS only)")
    provider = make_provider(imap_server, mailbox, security=security, imap_port=port, ca_file=None)
    with pytest.raises(ProviderProtocolError, match="certificate"):
        await provider.open()
    await provider.close()


async def test_unreachable_server_is_transient(
    imap_server: ImapServer, mailbox: tuple[str, str]
) -> None:
    provider = make_provider(imap_server, mailbox, imap_port=free_port())
    with pytest.raises(TransientProviderError):
        await provider.open()


# ---- scripted peers for what the real servers here cannot do ---------------------------

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def scripted_server(script: Script) -> AsyncIterator[int]:
    writers: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await script(reader, writer)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        for writer in writers:
            writer.close()
        server.close()
        await server.wait_closed()


def scripted_provider(port: int, **options: Any) -> ImapSmtpProvider:
    account = prepare(
        "user@example.org",
        {
            "imap_host": "127.0.0.1",
            "imap_port": port,
            "smtp_host": "127.0.0.1",
            "security": "none",
            **options,
        },
        {"PW": "pw", "TOKEN": "expired-token"},
    )
    return ImapSmtpProvider(account, {"timeout": 2})


async def test_rejected_xoauth2_token_does_not_hang() -> None:
    """The server answers a bad token with a ``+`` JSON challenge and waits for
    an empty line (stock aioimaplib never sends it and hangs)."""
    answered: list[bytes] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"* OK IMAP4rev1 ready\r\n")
        while line := await reader.readline():
            tag, command = line.split(b" ", 2)[:2]
            if command.upper().startswith(b"CAPABILITY"):
                writer.write(
                    b"* CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2\r\n" + tag + b" OK done\r\n"
                )
            elif command.upper() == b"AUTHENTICATE":
                sasl = base64.b64decode(line.split()[3])
                assert sasl == b"user=user@example.org\x01auth=Bearer expired-token\x01\x01"
                error = base64.b64encode(b'{"status":"401","schemes":"bearer"}')
                writer.write(b"+ " + error + b"\r\n")
                answered.append(await reader.readline())
                writer.write(tag + b" NO [AUTHENTICATIONFAILED] Invalid credentials\r\n")
            else:
                writer.write(tag + b" OK bye\r\n")
                return

    async with scripted_server(script) as port:
        provider = scripted_provider(port, auth="xoauth2", access_token_env="TOKEN")
        started = time.monotonic()
        with pytest.raises(AuthenticationFailed, match=r"user@example\.org"):
            await provider.open()
        assert time.monotonic() - started < 2
        assert answered == [b"\r\n"]
        await provider.close()


async def test_rejected_smtp_xoauth2_token() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 smtp.test ESMTP\r\n")
        while line := await reader.readline():
            verb = line.split(b" ", 1)[0].strip().upper()
            if verb == b"EHLO":
                writer.write(b"250-smtp.test\r\n250 AUTH XOAUTH2\r\n")
            elif verb == b"AUTH":
                writer.write(b"334 " + base64.b64encode(b'{"status":"401"}') + b"\r\n")
                assert await reader.readline() == b"\r\n"
                writer.write(b"535 5.7.8 Username and Password not accepted\r\n")
            else:
                writer.write(b"221 bye\r\n")
                return

    async with scripted_server(script) as port:
        provider = scripted_provider(port, auth="xoauth2", access_token_env="TOKEN", smtp_port=port)
        with pytest.raises(AuthenticationFailed, match="535"):
            await provider.verify()


async def test_silent_server_times_out_as_transient() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # never greets

    async with scripted_server(script) as port:
        provider = scripted_provider(port, password_env="PW")
        provider.timeout = 0.5
        with pytest.raises(TransientProviderError, match="no answer"):
            await provider.open()
        await provider.close()


async def test_a_fetch_times_out_after_silence_not_after_its_length() -> None:
    """A body that keeps flowing may take longer than the timeout; a server that
    stops in the middle of one fails the fetch after one timeout of silence."""
    body = b"Subject: slow\r\n\r\n" + b"x" * 23

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"* OK IMAP4rev1 ready\r\n")
        while line := await reader.readline():
            tag, command = line.split(b" ", 2)[:2]
            command = command.strip().upper()
            if command == b"UID" and b" 1 " in line:
                writer.write(b"* 1 FETCH (UID 1 BODY[] {%d}\r\n" % len(body))
                for i in range(0, len(body), 10):  # 0.8 s in all, never 0.5 s quiet
                    writer.write(body[i : i + 10])
                    await writer.drain()
                    await asyncio.sleep(0.2)
                writer.write(b")\r\n" + tag + b" OK done\r\n")
            elif command == b"UID":
                writer.write(b"* 2 FETCH (UID 2 BODY[] {%d}\r\n" % len(body) + body[:10])
                await writer.drain()
                await reader.read()  # silent from now on
            elif command == b"CAPABILITY":
                writer.write(b"* CAPABILITY IMAP4rev1\r\n" + tag + b" OK done\r\n")
            elif command == b"EXAMINE":
                writer.write(b"* 2 EXISTS\r\n* OK [UIDVALIDITY 7] ok\r\n* OK [UIDNEXT 3] ok\r\n")
                writer.write(tag + b" OK [READ-ONLY] done\r\n")
            else:
                writer.write(tag + b" OK done\r\n")

    async with scripted_server(script) as port:
        provider = scripted_provider(port, password_env="PW")
        provider.timeout = 0.5
        async with opened(provider):
            assert await provider.fetch(INBOX, "1") == body
            started = time.monotonic()
            with pytest.raises(TransientProviderError, match="stopped answering"):
                await provider.fetch(INBOX, "2")
            assert time.monotonic() - started < 2


# ---- folders ---------------------------------------------------------------------------


async def test_folders_find_sent(imap_server: ImapServer, mailbox: tuple[str, str]) -> None:
    # A decoy with a common name: Dovecot must still pick the \Sent one by its
    # special use; pymap (no SPECIAL-USE) falls back to the first common name.
    create_folder(imap_server, mailbox, "Sent Items")
    async with opened(make_provider(imap_server, mailbox)) as provider:
        assert await provider.folders() == [INBOX, Folder("Sent", "sent")]


@pytest.mark.parametrize("name", ["Sent Items", "Éléments envoyés"])
async def test_sent_folder_option_with_spaces_and_non_ascii(
    imap_server: ImapServer, mailbox: tuple[str, str], name: str
) -> None:
    create_folder(imap_server, mailbox, name)
    async with opened(make_provider(imap_server, mailbox, sent_folder=name)) as provider:
        assert await provider.folders() == [INBOX, Folder(name, "sent")]
        mail = outgoing(mailbox[0], "contact@example.org")
        await provider.store_sent_copy(mail)
        assert await provider.find_sent(mail.message_id)
        sent = Folder(name, "sent")
        batch = await provider.changes(sent, await from_start(provider, sent))
        assert [h.message_id for h in batch.headers] == [mail.message_id]
    assert len(imap_server.messages(mailbox[0], name)) == 1


async def test_missing_sent_folder_option(
    imap_server: ImapServer, mailbox: tuple[str, str]
) -> None:
    async with opened(make_provider(imap_server, mailbox, sent_folder="Nope")) as provider:
        with pytest.raises(ProviderProtocolError, match="Nope"):
            await provider.folders()


# ---- changes ---------------------------------------------------------------------------


async def test_changes_reads_only_new_headers(
    imap_server: ImapServer, mailbox: tuple[str, str]
) -> None:
    email = mailbox[0]
    imap_server.deliver(email, message("old@example.org"))
    async with opened(make_provider(imap_server, mailbox)) as provider:
        first = await provider.changes(INBOX, None)
        assert first.headers == [] and not first.more and not first.reset
        assert set(first.cursor) >= {"uidvalidity", "uidnext"}
        assert ("highestmodseq" in first.cursor) == imap_server.supports_condstore

        imap_server.deliver(email, message("one@example.org"))
        imap_server.deliver(
            email,
            message(
                "two@example.org",
                in_reply_to="one@example.org",
                refs="<root@crm.test> <one@example.org>",
            ),
        )
        batch = await provider.changes(INBOX, first.cursor)
        assert [h.message_id for h in batch.headers] == ["<one@example.org>", "<two@example.org>"]
        two = batch.headers[1]
        assert two.in_reply_to == ("<one@example.org>",)
        assert two.references == ("<root@crm.test>", "<one@example.org>")
        assert two.subject == "about two@example.org"
        assert two.size and two.ref.isdigit()
        assert not batch.more and not batch.reset

        again = await provider.changes(INBOX, batch.cursor)
        assert again.headers == [] and again.cursor["uidnext"] == batch.cursor["uidnext"]

        # INBOX is selected now: new mail must still be seen (not a stale STATUS).
        imap_server.deliver(email, message("three@example.org"))
        later = await provider.changes(INBOX, again.cursor)
        assert [h.message_id for h in later.headers] == ["<three@example.org>"]
    assert imap_server.flags(email) == [set(), set(), set(), set()]


async def test_changes_in_chunks(imap_server: ImapServer, mailbox: tuple[str, str]) -> None:
    async with opened(make_provider(imap_server, mailbox)) as provider:
        start = (await provider.changes(INBOX, None)).cursor
        for i in range(5):
            imap_server.deliver(mailbox[0], message(f"c{i}@example.org"))
        b1 = await provider.changes(INBOX, start, limit=2)
        b2 = await provider.changes(INBOX, b1.cursor, limit=2)
        b3 = await provider.changes(INBOX, b2.cursor, limit=2)
        assert [len(b.headers) for b in (b1, b2, b3)] == [2, 2, 1]
        assert [b.more for b in (b1, b2, b3)] == [True, True, False]
        ids = [h.message_id for b in (b1, b2, b3) for h in b.headers]
        assert ids == [f"<c{i}@example.org>" for i in range(5)]


async def test_uidvalidity_reset_rereads_every_header(
    imap_server: ImapServer, mailbox: tuple[str, str]
) -> None:
    email = mailbox[0]
    for i in range(3):
        imap_server.deliver(email, message(f"r{i}@example.org"))
    async with opened(make_provider(imap_server, mailbox)) as provider:
        cursor = (await provider.changes(INBOX, None)).cursor
        await provider.fetch(INBOX, "1")  # INBOX now selected: Dovecot will drop us
        imap_server.reset_uidvalidity(email)
        batch = await provider.changes(INBOX, cursor)
        assert batch.reset
        assert batch.cursor["uidvalidity"] != cursor["uidvalidity"]
        assert [h.message_id for h in batch.headers] == [f"<r{i}@example.org>" for i in range(3)]
        assert (await provider.changes(INBOX, batch.cursor)).headers == []


async def test_six_hundred_messages_in_chunks(
    imap_server: ImapServer, mailbox: tuple[str, str]
) -> None:
    async with opened(make_provider(imap_server, mailbox)) as provider:
        cursor = (await provider.changes(INBOX, None)).cursor
        fill(imap_server, mailbox, 600, "bulk")
        headers, cursor, mores = await asyncio.wait_for(drain(provider, INBOX, cursor), 60)
        assert mores == [True, True, False]
        assert [h.message_id for h in headers] == [f"<bulk-{i}@example.org>" for i in range(600)]
        assert (await provider.changes(INBOX, cursor)).headers == []


async def test_one_fetch_of_twelve_hundred_headers(
    imap_server: ImapServer, mailbox: tuple[str, str]
) -> None:
    """A single large response over plaintext (large reads), beyond the depth at
    which stock aioimaplib raised RecursionError and hung."""
    fill(imap_server, mailbox, 1200, "big")
    endpoint = ImapEndpoint(imap_server.host, imap_server.port, "none", None, 30)
    session = await ImapSession.connect(endpoint)
    try:
        await session.login(*mailbox)
        await session.examine("INBOX")
        fetched = await session.uid_fetch("1:1200", HEADER_ITEMS)
        assert len(fetched) == 1200
        assert fetched[-1].body is not None and b"big-1199@" in fetched[-1].body
    finally:
        await session.close()


# ---- fetch -----------------------------------------------------------------------------


async def test_fetch_returns_whole_message_and_keeps_it_unread(
    imap_server: ImapServer, mailbox: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    email = mailbox[0]
    raw = message("whole@example.org", body="secret body marker 4711")
    imap_server.deliver(email, raw)
    async with opened(make_provider(imap_server, mailbox)) as provider:
        batch = await provider.changes(INBOX, await from_start(provider, INBOX))
        ref = batch.headers[0].ref
        body = await provider.fetch(INBOX, ref)
        assert body.replace(b"\r\n", b"\n") == raw.replace(b"\r\n", b"\n")
        if imap_server.kind == "dovecot":  # pymap sends BODY[] with bare LF
            assert body == imap_server.messages(email)[0] == raw
        with pytest.raises(ProviderProtocolError):
            await provider.fetch(INBOX, "999")
    assert imap_server.flags(email) == [set()]
    assert "marker 4711" not in caplog.text


async def test_fetch_many_returns_every_body_and_keeps_them_unread(
    imap_server: ImapServer, mailbox: tuple[str, str]
) -> None:
    email = mailbox[0]
    fill(imap_server, mailbox, 70, "many")
    async with opened(make_provider(imap_server, mailbox)) as provider:
        headers, _, _ = await drain(provider, INBOX, await from_start(provider, INBOX))
        refs = [h.ref for h in headers]
        wanted = refs[1:3] + refs[5:62:2] + refs[63:]  # gaps, and more than one UID FETCH
        wanted.reverse()
        bodies = await provider.fetch_many(INBOX, wanted)
        assert list(bodies) == wanted
        by_ref = {h.ref: h.message_id for h in headers}
        for ref, body in bodies.items():
            assert f"Message-ID: {by_ref[ref]}".encode() in body
            assert body.rstrip().endswith(b"hello")
        assert await provider.fetch_many(INBOX, []) == {}
        # Another session adds a message: its UID is past the open view, found anyway.
        imap_server.deliver(email, message("late@example.org"))
        late = str(int(refs[-1]) + 1)
        assert b"late@example.org" in (await provider.fetch_many(INBOX, [refs[0], late]))[late]
        with pytest.raises(ProviderProtocolError, match="not in 'INBOX'"):
            await provider.fetch_many(INBOX, [refs[0], "999999"])
        with pytest.raises(ProviderProtocolError, match="not an IMAP UID"):
            await provider.fetch_many(INBOX, ["1:*"])
    assert imap_server.flags(email) == [set()] * 71


async def test_a_subclass_overriding_fetch_still_sees_every_body(
    imap_server: ImapServer, mailbox: tuple[str, str]
) -> None:
    fill(imap_server, mailbox, 3, "sub")
    seen: list[str] = []

    class Observed(ImapSmtpProvider):
        async def fetch(self, folder: Folder, ref: str) -> bytes:
            seen.append(ref)
            return await super().fetch(folder, ref)

    provider = Observed(make_provider(imap_server, mailbox).account, {"timeout": 10})
    async with opened(provider):
        headers, _, _ = await drain(provider, INBOX, await from_start(provider, INBOX))
        refs = [h.ref for h in headers]
        assert list(await provider.fetch_many(INBOX, refs)) == refs
    assert seen == refs


# ---- sending ---------------------------------------------------------------------------


async def test_send_awaits_the_checkpoint_before_data(
    imap_server: ImapServer, mailbox: tuple[str, str], smtp_server: SmtpServer
) -> None:
    email = mailbox[0]
    provider = make_provider(imap_server, mailbox, smtp=smtp_server)
    await provider.verify()
    mail = outgoing(email, "contact@example.org", email)
    received_at_checkpoint: list[int] = []

    async def checkpoint() -> None:
        received_at_checkpoint.append(len(smtp_server.received))

    await provider.send(mail, checkpoint)
    (received,) = await smtp_server.wait_for(1)
    assert received_at_checkpoint == [0]
    assert received.mail_from == email and received.auth_login == email
    assert received.rcpt_tos == ["contact@example.org", email]
    assert received.message_id == mail.message_id.strip("<>")
    assert b"\r\n.leading dot stays\r\n" in received.raw
    await provider.close()


async def test_failing_checkpoint_sends_nothing(
    imap_server: ImapServer, mailbox: tuple[str, str], smtp_server: SmtpServer
) -> None:
    class Crash(Exception):
        pass

    async def checkpoint() -> None:
        raise Crash

    provider = make_provider(imap_server, mailbox, smtp=smtp_server)
    with pytest.raises(Crash):
        await provider.send(outgoing(mailbox[0], "contact@example.org"), checkpoint)
    await asyncio.sleep(0.2)
    assert smtp_server.received == []


async def test_bad_smtp_password(
    imap_server: ImapServer, mailbox: tuple[str, str], smtp_server: SmtpServer
) -> None:
    provider = make_provider(imap_server, mailbox, smtp=smtp_server, password="nope-Pa55")
    with pytest.raises(AuthenticationFailed) as info:
        await provider.verify()
    assert "nope-Pa55" not in str(info.value) and smtp_server.host in str(info.value)

    async def checkpoint() -> None:
        raise AssertionError("must not be reached")

    with pytest.raises(AuthenticationFailed):
        await provider.send(outgoing(mailbox[0], "contact@example.org"), checkpoint)
    assert smtp_server.received == []


async def test_smtp_over_implicit_tls_needs_the_ca(
    imap_server: ImapServer, mailbox: tuple[str, str], test_ca: TestCA
) -> None:
    email, password = mailbox
    server = SmtpServer(
        users={email: password}, ca=test_ca, implicit_tls=True, require_auth=True
    ).start()
    try:
        trusted = make_provider(imap_server, mailbox, smtp=server, security="tls")
        await trusted.verify()
        await trusted.send(outgoing(email, "contact@example.org"), _nothing)
        assert len(await server.wait_for(1)) == 1
        untrusted = make_provider(imap_server, mailbox, smtp=server, security="tls", ca_file=None)
        with pytest.raises(ProviderProtocolError, match="certificate"):
            await untrusted.verify()
    finally:
        server.stop()


async def _nothing() -> None:
    return None


async def test_store_sent_copy_and_find_sent(
    imap_server: ImapServer, mailbox: tuple[str, str]
) -> None:
    email = mailbox[0]
    mail = outgoing(email, "contact@example.org")
    async with opened(make_provider(imap_server, mailbox)) as provider:
        assert not await provider.find_sent(mail.message_id)
        await provider.store_sent_copy(mail)
        assert await provider.find_sent(mail.message_id)
        assert await provider.find_sent(mail.message_id.strip("<>"))
        assert not await provider.find_sent("<other@threadsync.test>")
    (stored,) = imap_server.messages(email, "Sent")
    assert mail.message_id.encode() in stored
    assert imap_server.flags(email, "Sent") == [{"\\Seen"}]


async def test_append_sent_false_leaves_sent_alone(
    imap_server: ImapServer, mailbox: tuple[str, str]
) -> None:
    async with opened(make_provider(imap_server, mailbox, append_sent="false")) as provider:
        await provider.store_sent_copy(outgoing(mailbox[0], "contact@example.org"))
    assert imap_server.messages(mailbox[0], "Sent") == []


# ---- waiting for changes ---------------------------------------------------------------


async def test_wait_for_changes_times_out(
    imap_server: ImapServer, mailbox: tuple[str, str]
) -> None:
    async with opened(make_provider(imap_server, mailbox)) as provider:
        await provider.changes(INBOX, None)
        started = time.monotonic()
        assert await provider.wait_for_changes(0.5) is False
        assert 0.4 < time.monotonic() - started < 3
        # The session is still usable after DONE.
        assert (await provider.changes(INBOX, None)).headers == []


async def test_wait_for_changes_wakes_on_new_mail(
    imap_server: ImapServer, mailbox: tuple[str, str]
) -> None:
    async with opened(make_provider(imap_server, mailbox)) as provider:
        cursor = (await provider.changes(INBOX, None)).cursor

        async def deliver_soon() -> None:
            await asyncio.sleep(0.3)
            await asyncio.to_thread(imap_server.deliver, mailbox[0], message("push@x.test"))

        task = asyncio.create_task(deliver_soon())
        started = time.monotonic()
        assert await provider.wait_for_changes(15) is True
        assert time.monotonic() - started < 5
        await task
        batch = await provider.changes(INBOX, cursor)
        assert [h.message_id for h in batch.headers] == ["<push@x.test>"]


async def test_mail_between_changes_and_wait_is_not_missed(
    imap_server: ImapServer, mailbox: tuple[str, str]
) -> None:
    async with opened(make_provider(imap_server, mailbox)) as provider:
        await provider.changes(INBOX, None)
        imap_server.deliver(mailbox[0], message("early@x.test"))
        started = time.monotonic()
        assert await provider.wait_for_changes(15) is True
        assert time.monotonic() - started < 2


async def test_other_calls_end_a_running_idle(
    imap_server: ImapServer, mailbox: tuple[str, str]
) -> None:
    async with opened(make_provider(imap_server, mailbox)) as provider:
        await provider.changes(INBOX, None)
        waiting = asyncio.create_task(provider.wait_for_changes(30))
        await asyncio.sleep(0.3)
        started = time.monotonic()
        assert (await provider.folders())[0] == INBOX
        assert await asyncio.wait_for(waiting, 5) is False
        assert time.monotonic() - started < 3


async def test_wake_ends_a_wait_even_one_not_started_yet(
    imap_server: ImapServer, mailbox: tuple[str, str]
) -> None:
    async with opened(make_provider(imap_server, mailbox)) as provider:
        await provider.changes(INBOX, None)
        provider.wake()  # before the wait: the next wait returns at once
        started = time.monotonic()
        assert await provider.wait_for_changes(30) is False
        assert time.monotonic() - started < 1
        waiting = asyncio.create_task(provider.wait_for_changes(30))
        await asyncio.sleep(0.3)
        provider.wake()
        assert await asyncio.wait_for(waiting, 5) is False
        assert (await provider.changes(INBOX, None)).headers == []
