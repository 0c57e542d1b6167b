"""SMTP for the local mail system, on aiosmtpd: submission, relay and local delivery.

One listener plays every SMTP role a small installation has:

* **submission**: a local user logs in (AUTH PLAIN or LOGIN, checked against
  the same hashes pymap uses for IMAP) and may send to anyone, from their own
  address only;
* **relay**: the CRM's own address (``relay_senders``, by default
  ``[outbound.default] from_address``) may send to anyone without logging in,
  from loopback only, which is what ``threadsync run`` expects on port 2525;
* **inbound**: anyone may send to a local user without logging in (as the
  outside world reaching this domain's MX).

Anything else is refused at RCPT. Accepted mail is delivered before DATA is
answered: to a local user's INBOX through pymap, to anyone else into the
outside world. STARTTLS is offered with the local certificate; AUTH works
without TLS only when listening on loopback.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from pymap.exceptions import ResponseError

from threadsync.plugins.localmail.mailboxes import Mailboxes
from threadsync.plugins.localmail.outside import OutsideWorld, stamp

log = logging.getLogger(__name__)

#: Largest message accepted (a 4 MB attachment is about 5.5 MB encoded).
DATA_SIZE_LIMIT = 64 * 1024 * 1024


class _QuietLoginData(logging.Filter):
    """aiosmtpd 1.4 logs a deprecation warning of its own API on every AUTH."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Session.login_data is deprecated")


_QUIET = _QuietLoginData()


def _from_loopback(session: Session) -> bool:
    peer: Any = session.peer
    host = peer[0] if isinstance(peer, tuple) and peer else ""
    try:
        return ipaddress.ip_address(str(host)).is_loopback
    except ValueError:
        return False


def _login(session: Session) -> str | None:
    data = session.auth_data
    if session.authenticated and isinstance(data, LoginPassword):
        return data.login.decode("utf-8", "replace").lower()
    return None


class Handler:
    """aiosmtpd handler: who may send what to whom, and delivery."""

    def __init__(
        self, mailboxes: Mailboxes, outside: OutsideWorld, relay_senders: tuple[str, ...]
    ) -> None:
        self.mailboxes = mailboxes
        self.outside = outside
        self.relay_senders = {s.lower() for s in relay_senders}

    def authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        if isinstance(data, LoginPassword):
            login = data.login.decode("utf-8", "replace")
            password = data.password.decode("utf-8", "replace")
            if self.mailboxes.check_password(login, password):
                return AuthResult(success=True, auth_data=data)
            log.info("SMTP AUTH refused", extra={"login": login, "mechanism": mechanism})
        return AuthResult(success=False, handled=False)

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        login = _login(session)
        if login is not None and address and address.lower() != login:
            return f"553 5.7.1 {login} may send only as itself"
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        relay = _from_loopback(session) and (envelope.mail_from or "").lower() in self.relay_senders
        if not self.mailboxes.has(address) and _login(session) is None and not relay:
            return "550 5.7.1 relaying denied: log in (AUTH) to send to other domains"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content
        if not isinstance(raw, bytes):
            raw = envelope.content if isinstance(envelope.content, bytes) else b""
        sender = envelope.mail_from or ""
        for rcpt in envelope.rcpt_tos:
            try:
                if self.mailboxes.has(rcpt):
                    await self.mailboxes.deliver(rcpt, stamp(raw, sender, rcpt.lower()))
                else:
                    await asyncio.to_thread(self.outside.store, raw, sender, rcpt)
            except (OSError, TimeoutError, ResponseError) as exc:
                log.warning("local delivery failed: %s", exc.__class__.__name__)
                return f"451 4.3.0 delivery to {rcpt} failed; try again later"
        log.info("SMTP message delivered", extra={"recipients": len(envelope.rcpt_tos)})
        return "250 2.0.0 OK: delivered"


def _finished(smtp: SMTP) -> bool:
    task = smtp._handler_coroutine
    return task is not None and task.done()


class SmtpListener:
    """The listening socket and every open SMTP session, closed together."""

    def __init__(self, handler: Handler, ssl_context: Any, *, plaintext_auth: bool) -> None:
        self.handler = handler
        self.ssl_context = ssl_context
        self.plaintext_auth = plaintext_auth
        self.port = 0
        self._server: asyncio.Server | None = None
        self._sessions: set[SMTP] = set()

    def _protocol(self) -> SMTP:
        smtp = SMTP(
            self.handler,
            hostname="localhost",
            ident="threadsync local mail system",
            tls_context=self.ssl_context,
            authenticator=self.handler.authenticate,
            auth_require_tls=not self.plaintext_auth,
            data_size_limit=DATA_SIZE_LIMIT,
            enable_SMTPUTF8=True,
            loop=asyncio.get_running_loop(),
        )
        self._sessions = {s for s in self._sessions if not _finished(s)}
        self._sessions.add(smtp)
        return smtp

    async def start(self, host: str, port: int) -> int:
        logging.getLogger("mail.log").addFilter(_QUIET)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._protocol, host, port, reuse_address=True)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for _ in range(3):  # accepts already in flight become sessions first
            await asyncio.sleep(0)
        tasks = []
        for smtp in list(self._sessions):
            transport = smtp.transport
            if isinstance(transport, asyncio.Transport) and not transport.is_closing():
                transport.abort()
            task = smtp._handler_coroutine
            if task is not None and not task.done():
                task.cancel()
                tasks.append(task)
        await asyncio.gather(*tasks, return_exceptions=True)
        self._sessions.clear()
        await server.wait_closed()
