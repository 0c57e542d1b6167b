"""Tests of the test mail servers in ``tests/servers`` and their fixtures.

Each IMAP test runs against every server kind installed here (Dovecot and
pymap), independently of ``THREADSYNC_TEST_IMAP``; the last tests exercise
the ``conftest`` fixtures themselves.
"""

from __future__ import annotations

import asyncio
import imaplib
import re
import secrets
import ssl
import time
from collections.abc import Iterator
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path

import aioimaplib
import aiosmtplib
import pytest

from tests.servers import (
    IMAP_KIND_ENV,
    ImapServer,
    available_imap_kinds,
    default_imap_kind,
    dovecot_installed,
    imap_utf7_encode,
    port_is_open,
    pymap_installed,
    start_imap_server,
)
from tests.servers.dovecot import DovecotServer
from tests.servers.pymap_server import PymapServer
from tests.servers.smtp import SmtpServer
from tests.servers.tlscerts import TestCA

KINDS = [
    pytest.param(
        "dovecot",
        marks=pytest.mark.skipif(not dovecot_installed(), reason="Dovecot not installed"),
    ),
    pytest.param(
        "pymap", marks=pytest.mark.skipif(not pymap_installed(), reason="pymap not installed")
    ),
]


@pytest.fixture(scope="module", params=KINDS)
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, test_ca: TestCA
) -> Iterator[ImapServer]:
    started = time.monotonic()
    srv = start_imap_server(tmp_path_factory.mktemp(request.param), request.param, ca=test_ca)
    print(f"{request.param} started in {time.monotonic() - started:.2f} s")
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def user(server: ImapServer) -> tuple[str, str]:
    email = f"t-{secrets.token_hex(4)}@threadsync.test"
    password = "p:ss wörd " + secrets.token_hex(4)  # colon, space, non-ASCII
    server.add_user(email, password)
    return email, password


def make_message(subject: str, *, to: str = "someone@example.net") -> tuple[bytes, str]:
    msg = EmailMessage()
    msg["From"] = "Sender <sender@example.org>"
    msg["To"] = to
    msg["Subject"] = subject
    msg["Message-ID"] = message_id = make_msgid(domain="threadsync.test")
    msg.set_content(f"Body of {subject}\n")
    return msg.as_bytes(policy=msg.policy.clone(linesep="\r\n")), message_id


def imap_login(server: ImapServer, email: str, password: str) -> imaplib.IMAP4:
    conn = imaplib.IMAP4(server.host, server.port, timeout=10)
    conn._encoding = "utf-8"  # type: ignore[attr-defined]  # non-ASCII LOGIN
    try:
        conn.login(email, password)
    except imaplib.IMAP4.error:
        conn.shutdown()
        raise
    return conn


def select_count(conn: imaplib.IMAP4, folder: str = "INBOX") -> tuple[int, int]:
    typ, data = conn.select(folder)
    assert typ == "OK", data
    _, uidvalidity = conn.response("UIDVALIDITY")
    assert uidvalidity[0] is not None
    return int(data[0] or 0), int(uidvalidity[0])


async def aio_logout(client: aioimaplib.IMAP4) -> None:
    """LOGOUT, then close the transport: aioimaplib never closes it itself, and
    a transport left open when the test's loop closes is a ResourceWarning."""
    try:
        await client.logout()
    finally:
        transport = client.protocol.transport
        if transport is not None:
            transport.close()
        await asyncio.sleep(0)  # let connection_lost run


# ---------------------------------------------------------------- IMAP


async def test_aioimaplib_plain_login(server: ImapServer, user: tuple[str, str]) -> None:
    email, password = user
    client = aioimaplib.IMAP4(host=server.host, port=server.port, timeout=10)
    await client.wait_hello_from_server()
    response = await client.login(email, password)
    assert response.result == "OK", response
    response = await client.select("INBOX")
    assert response.result == "OK", response
    await aio_logout(client)


async def test_aioimaplib_wrong_password_refused(server: ImapServer, user: tuple[str, str]) -> None:
    email, _ = user
    client = aioimaplib.IMAP4(host=server.host, port=server.port, timeout=10)
    await client.wait_hello_from_server()
    response = await client.login(email, "wrong password")
    assert response.result == "NO", response
    await aio_logout(client)


def test_starttls_verifies_against_test_ca(server: ImapServer, user: tuple[str, str]) -> None:
    email, password = user
    with imaplib.IMAP4(server.host, server.port, timeout=10) as conn:
        assert "STARTTLS" in conn.capabilities
        conn.starttls(ssl_context=server.ca.client_context())
        conn._encoding = "utf-8"  # type: ignore[attr-defined]
        assert conn.login(email, password)[0] == "OK"
        assert conn.sock.version() is not None  # type: ignore[attr-defined]
        conn.logout()


def test_starttls_rejects_untrusted_certificate(server: ImapServer) -> None:
    untrusted = ssl.create_default_context()  # system CAs only
    conn = imaplib.IMAP4(server.host, server.port, timeout=10)
    try:
        with pytest.raises(ssl.SSLCertVerificationError):
            conn.starttls(ssl_context=untrusted)
    finally:
        # The failed handshake already closed the socket.
        conn.file.close()
        conn.sock.close()


def test_implicit_tls(server: ImapServer, user: tuple[str, str]) -> None:
    if server.tls_port is None:
        pytest.skip(f"{server.kind} has no implicit-TLS port")
    email, password = user
    with imaplib.IMAP4_SSL(
        server.host, server.tls_port, ssl_context=server.ca.client_context(), timeout=10
    ) as conn:
        conn._encoding = "utf-8"  # type: ignore[attr-defined]
        assert conn.login(email, password)[0] == "OK"
        conn.logout()


def test_capabilities_match_declared_support(server: ImapServer, user: tuple[str, str]) -> None:
    conn = imap_login(server, *user)
    try:
        _, data = conn.capability()
        caps = set(data[0].decode().upper().split())
    finally:
        conn.logout()
    assert ("CONDSTORE" in caps) == server.supports_condstore
    assert ("QRESYNC" in caps) == server.supports_condstore
    assert ("IDLE" in caps) == server.supports_idle


def test_add_user_creates_inbox_and_sent(server: ImapServer, user: tuple[str, str]) -> None:
    conn = imap_login(server, *user)
    try:
        _, listing = conn.list()
        _, subscribed = conn.lsub()
        assert select_count(conn, "INBOX")[0] == 0
        assert select_count(conn, "Sent")[0] == 0
    finally:
        conn.logout()
    sent = [ln.decode() for ln in listing if isinstance(ln, bytes) and ln.endswith(b" Sent")]
    assert len(sent) == 1, listing
    if server.kind == "dovecot":
        assert "\\Sent" in sent[0]  # SPECIAL-USE
    assert any(isinstance(ln, bytes) and ln.endswith(b" Sent") for ln in subscribed), subscribed


def test_add_user_is_idempotent_and_updates_password(
    server: ImapServer, user: tuple[str, str]
) -> None:
    email, password = user
    server.deliver(email, make_message("kept")[0])
    server.add_user(email, password)
    server.add_user(email, "new password")
    assert len(server.messages(email)) == 1
    with pytest.raises(imaplib.IMAP4.error):
        imap_login(server, email, password)
    imap_login(server, email, "new password").logout()


def test_deliver_then_select_count(server: ImapServer, user: tuple[str, str]) -> None:
    email, _ = user
    first, _ = make_message("first")
    second, _ = make_message("second")
    server.deliver(email, first)
    server.deliver(email, second)
    server.deliver(email, make_message("to sent")[0], folder="Sent")
    conn = imap_login(server, *user)
    try:
        assert select_count(conn, "INBOX")[0] == 2
        _, data = conn.uid("FETCH", "1:*", "(BODY.PEEK[])")
        fetched = [item[1] for item in data if isinstance(item, tuple)]
        assert select_count(conn, "Sent")[0] == 1
    finally:
        conn.logout()
    assert server.messages(email) == [first, second]
    if server.kind == "pymap":  # it serves BODY[] with bare LF line endings
        assert fetched == [first.replace(b"\r\n", b"\n"), second.replace(b"\r\n", b"\n")]
    else:
        assert fetched == [first, second]
    assert b"Subject: to sent" in server.messages(email, "Sent")[0]
    assert server.flags(email) == [set(), set()]  # BODY.PEEK never sets \Seen


def test_flags_reflect_store(server: ImapServer, user: tuple[str, str]) -> None:
    email, _ = user
    server.deliver(email, make_message("one")[0])
    server.deliver(email, make_message("two")[0])
    conn = imap_login(server, *user)
    try:
        select_count(conn)
        conn.uid("STORE", "2", "+FLAGS", "(\\Seen \\Answered $Forwarded)")
    finally:
        conn.logout()
    assert server.flags(email) == [set(), {"\\Seen", "\\Answered", "$Forwarded"}]


@pytest.mark.parametrize("folder", ["Archive", "CRM Synced", "Entwürfe"])
def test_deliver_to_other_folders(server: ImapServer, user: tuple[str, str], folder: str) -> None:
    email, _ = user
    raw, _ = make_message("filed")
    server.deliver(email, raw, folder=folder)  # created when missing
    assert server.messages(email, folder) == [raw]
    conn = imap_login(server, *user)
    try:
        assert select_count(conn, '"' + imap_utf7_encode(folder) + '"')[0] == 1
    finally:
        conn.logout()


def test_dovecot_lda_delivery(server: ImapServer, user: tuple[str, str]) -> None:
    if not isinstance(server, DovecotServer) or server.binaries.lda is None:
        pytest.skip("needs Dovecot with dovecot-lda")
    email, _ = user
    raw, _ = make_message("via lda")
    server.deliver_with_lda(email, raw, sender="sender@example.org")
    [stored] = server.messages(email)
    assert stored.endswith(raw)  # the LDA may prepend Return-Path and the like


def test_reset_uidvalidity(server: ImapServer, user: tuple[str, str]) -> None:
    email, _ = user
    raw, _ = make_message("survives")
    server.deliver(email, raw)
    conn = imap_login(server, *user)
    try:
        count, before = select_count(conn)
    finally:
        conn.logout()
    server.reset_uidvalidity(email)
    conn = imap_login(server, *user)
    try:
        count_after, after = select_count(conn)
    finally:
        conn.logout()
    assert after != before
    assert count == count_after == 1
    assert server.messages(email) == [raw]


async def test_idle_sees_delivery(server: ImapServer, user: tuple[str, str]) -> None:
    assert server.supports_idle
    email, password = user
    client = aioimaplib.IMAP4(host=server.host, port=server.port, timeout=10)
    await client.wait_hello_from_server()
    await client.login(email, password)
    await client.select("INBOX")
    idle = await client.idle_start(timeout=10)
    await asyncio.get_running_loop().run_in_executor(
        None, server.deliver, email, make_message("pushed")[0], "INBOX"
    )
    pushed: list[bytes] = []
    deadline = time.monotonic() + 8
    while not any(re.match(rb"\d+ EXISTS", line) for line in pushed):
        assert time.monotonic() < deadline, pushed
        pushed += [
            line if isinstance(line, bytes) else line.encode()
            for line in await client.wait_server_push(timeout=8)
        ]
    client.idle_done()
    await asyncio.wait_for(idle, 10)
    await aio_logout(client)


@pytest.mark.parametrize("kind", available_imap_kinds())
def test_stop_closes_port_and_restart_keeps_data(
    tmp_path: Path, test_ca: TestCA, kind: str
) -> None:
    srv = start_imap_server(tmp_path, kind, ca=test_ca)
    try:
        srv.add_user("restart@threadsync.test", "pw")
        srv.deliver("restart@threadsync.test", make_message("before outage")[0])
        ports = [p for p in (srv.port, srv.tls_port) if p]
        assert all(port_is_open(srv.host, p) for p in ports)
        started = time.monotonic()
        srv.stop()
        print(f"{kind}: stop {time.monotonic() - started:.2f} s")
        assert not any(port_is_open(srv.host, p) for p in ports)
        srv.stop()  # idempotent
        assert isinstance(srv, DovecotServer | PymapServer)
        srv.start()
        assert [p for p in (srv.port, srv.tls_port) if p] == ports
        conn = imap_login(srv, "restart@threadsync.test", "pw")
        try:
            assert select_count(conn)[0] == 1
        finally:
            conn.logout()
    finally:
        srv.stop()


def test_default_kind_follows_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(IMAP_KIND_ENV, "pymap")
    assert default_imap_kind() == "pymap"
    monkeypatch.setenv(IMAP_KIND_ENV, "exchange")
    with pytest.raises(ValueError):
        default_imap_kind()
    monkeypatch.delenv(IMAP_KIND_ENV)
    assert default_imap_kind() == ("dovecot" if dovecot_installed() else "pymap")


# ---------------------------------------------------------------- SMTP


async def send(
    smtp: SmtpServer,
    raw: bytes,
    *,
    sender: str = "sender@example.org",
    recipients: list[str],
    login: tuple[str, str] | None = None,
    start_tls: bool | None = False,
    use_tls: bool = False,
    ca: TestCA | None = None,
) -> None:
    client = aiosmtplib.SMTP(
        hostname=smtp.host,
        port=smtp.port,
        start_tls=start_tls,
        use_tls=use_tls,
        tls_context=ca.client_context() if ca else None,
        timeout=10,
    )
    async with client:
        if login is not None:
            await client.login(*login)
        await client.sendmail(sender, recipients, raw)


async def test_smtp_auth_accepted_over_starttls(test_ca: TestCA) -> None:
    with SmtpServer(users={"me@threadsync.test": "pw 1"}, ca=test_ca, require_auth=True) as smtp:
        raw, message_id = make_message("hello")
        await send(
            smtp, raw, recipients=["a@example.net"], login=("me@threadsync.test", "pw 1"),
            start_tls=True, ca=test_ca,
        )  # fmt: skip
        [received] = await smtp.wait_for(1)
    assert received.auth_login == "me@threadsync.test"
    assert received.rcpt_tos == ["a@example.net"]
    assert received.mail_from == "sender@example.org"
    assert received.raw.rstrip(b"\r\n") == raw.rstrip(b"\r\n")
    assert smtp.by_message_id(message_id) == [received]
    assert smtp.by_message_id(message_id.strip("<>")) == [received]


async def test_smtp_auth_on_plaintext_loopback(test_ca: TestCA) -> None:
    with SmtpServer(users={"me@threadsync.test": "pw"}, ca=test_ca) as smtp:
        await send(
            smtp, make_message("x")[0], recipients=["a@example.net"],
            login=("me@threadsync.test", "pw"),
        )  # fmt: skip
        assert (await smtp.wait_for(1))[0].auth_login == "me@threadsync.test"


async def test_smtp_auth_refused(test_ca: TestCA) -> None:
    with SmtpServer(users={"me@threadsync.test": "pw"}, ca=test_ca, require_auth=True) as smtp:
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as info:
            await send(
                smtp, make_message("x")[0], recipients=["a@example.net"],
                login=("me@threadsync.test", "wrong"),
            )  # fmt: skip
        assert info.value.code == 535
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
            await send(smtp, make_message("x")[0], recipients=["a@example.net"])
        assert refused.value.code == 530
        assert smtp.received == []


async def test_smtp_without_users_accepts_anonymous() -> None:
    with SmtpServer() as smtp:
        await send(smtp, make_message("anon")[0], recipients=["a@example.net"])
        [received] = await smtp.wait_for(1)
    assert received.auth_login is None


async def test_smtp_implicit_tls(test_ca: TestCA) -> None:
    with SmtpServer(users={"me@threadsync.test": "pw"}, ca=test_ca, implicit_tls=True) as smtp:
        await send(
            smtp, make_message("tls")[0], recipients=["a@example.net"],
            login=("me@threadsync.test", "pw"), use_tls=True, ca=test_ca,
        )  # fmt: skip
        assert len(await smtp.wait_for(1)) == 1
        with pytest.raises(aiosmtplib.SMTPConnectError):
            await send(
                smtp, make_message("tls")[0], recipients=["a@example.net"], use_tls=True,
                ca=TestCA(test_ca.cert_file, test_ca.cert_file, test_ca.key_file),
            )  # fmt: skip


async def test_smtp_deliver_to_local_inbox(
    server: ImapServer, user: tuple[str, str], test_ca: TestCA
) -> None:
    email, password = user
    raw, message_id = make_message("local delivery", to=email)
    with SmtpServer(
        users={email: password}, ca=test_ca, require_auth=True, deliver_to=server
    ) as smtp:
        await send(
            smtp, raw, sender=email, recipients=[email.upper(), "outside@example.net"],
            login=(email, password), start_tls=True, ca=test_ca,
        )  # fmt: skip
        [received] = smtp.by_message_id(message_id)
    assert received.delivered_to == [email.upper()]
    [stored] = server.messages(email)
    assert stored.replace(b"\r\n", b"\n").rstrip() == raw.replace(b"\r\n", b"\n").rstrip()
    conn = imap_login(server, *user)
    try:
        assert select_count(conn)[0] == 1
    finally:
        conn.logout()


async def test_smtp_stop_closes_port_and_restart_keeps_it() -> None:
    smtp = SmtpServer().start()
    try:
        port = smtp.port
        assert port_is_open(smtp.host, port)
        smtp.stop()
        assert not port_is_open(smtp.host, port)
        smtp.stop()  # idempotent
        smtp.start()
        assert smtp.port == port
        await send(smtp, make_message("after restart")[0], recipients=["a@example.net"])
        assert len(await smtp.wait_for(1)) == 1
    finally:
        smtp.stop()


# ---------------------------------------------------------------- conftest fixtures


async def test_fixtures_end_to_end(
    imap_server: ImapServer,
    mailbox: tuple[str, str],
    smtp_server: SmtpServer,
    test_ca: TestCA,
) -> None:
    email, password = mailbox
    assert imap_server.kind in ("dovecot", "pymap")
    assert imap_server.ca is test_ca
    raw, message_id = make_message("via fixtures", to=email)
    await send(
        smtp_server, raw, sender=email, recipients=[email], login=(email, password),
        start_tls=True, ca=test_ca,
    )  # fmt: skip
    assert len(smtp_server.by_message_id(message_id)) == 1
    assert len(imap_server.messages(email)) == 1
    assert imap_server.flags(email) == [set()]


def test_mailbox_fixture_gives_fresh_users(
    imap_server: ImapServer, mailbox: tuple[str, str]
) -> None:
    email, _ = mailbox
    assert imap_server.has_user(email)
    assert imap_server.messages(email) == []
    assert imap_server.messages(email, "Sent") == []
