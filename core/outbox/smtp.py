"""The one SMTP client of threadsync, over aiosmtplib: the mailbox's own submission
server (the ``imap_smtp`` provider) and the CRM's relay (the default channel,
:mod:`.relay`) both send through it, and both translate errors with the one map
below (:data:`ERROR_MAP`).

:class:`SmtpSession` keeps one authenticated connection (implicit TLS, STARTTLS
or loopback plaintext, certificate verified; PLAIN/LOGIN/CRAM-MD5 as offered,
or XOAUTH2) and reuses it for every message, closing it after it sat idle or
at :meth:`SmtpSession.close`. Each message is MAIL FROM, RCPT TO for each
recipient, then DATA with the caller's checkpoint right before the line that
ends it (:mod:`threadsync.core.outbox.smtp_data`). Everything before the checkpoint can fail
without the message having left, so a reused connection that turns out to be
gone by then (the server closed it while idle) is replaced and the message tried
once more; the end of DATA is the point of no return (see
:data:`threadsync.core.provider.Checkpoint`): after the checkpoint nothing is retried.
Errors leave as :mod:`threadsync.core.errors` only (:func:`translate`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Iterator
from dataclasses import dataclass

import aiosmtplib

from threadsync.core.errors import (
    AuthenticationFailed,
    ProviderError,
    ProviderProtocolError,
    ThreadsyncError,
    TransientProviderError,
)
from threadsync.core.network import NetworkPolicy, open_socket
from threadsync.core.outbox.smtp_data import send_data
from threadsync.core.provider import Checkpoint, OutgoingMail
from threadsync.core.tls import certificate_error, certificate_failure

log = logging.getLogger(__name__)

#: An open connection unused this long is closed: servers drop idle sessions
#: (RFC 5321 asks them to wait at least 5 minutes; many wait less).
IDLE_SECONDS = 30.0
#: "Service not available, closing transmission channel".
CLOSING = 421


@dataclass(frozen=True)
class SmtpEndpoint:
    """Where to submit mail and with which credentials (password or token)."""

    host: str
    port: int
    security: str  # "tls" | "starttls" | "none"
    ssl_context: ssl.SSLContext | None
    username: str
    password: str | None = None
    access_token: str | None = None
    timeout: float = 30.0
    local_hostname: str | None = None
    #: How messages name this server ("SMTP server", "relay").
    label: str = "SMTP server"
    #: Set when a tenant named the host: connect only to addresses it allows.
    network: NetworkPolicy | None = None

    def __repr__(self) -> str:  # never show credentials
        return f"SmtpEndpoint({self.host!r}, {self.port}, {self.security!r})"

    @property
    def authenticates(self) -> bool:
        """Whether to log in (a relay may accept mail without)."""
        return bool(self.username) or self.access_token is not None


async def check_login(endpoint: SmtpEndpoint) -> None:
    """Connect, authenticate and QUIT: proves the SMTP settings work."""
    client = await _open(endpoint)
    await _quit(client)


class SmtpSession:
    """One authenticated SMTP connection, reused for every message sent.

    Opened by the first :meth:`send`, kept while messages follow each other and
    closed (QUIT) once it sat idle for ``idle_seconds``, by :meth:`close`, after
    any failure, or when the endpoint changes (a refreshed token). Sends are
    serialised: a connection carries one mail transaction at a time.
    """

    def __init__(self, idle_seconds: float = IDLE_SECONDS) -> None:
        self.idle_seconds = idle_seconds
        self._client: aiosmtplib.SMTP | None = None
        self._endpoint: SmtpEndpoint | None = None
        self._lock = asyncio.Lock()
        self._idle_timer: asyncio.TimerHandle | None = None
        self._closer: asyncio.Task[None] | None = None

    @property
    def connected(self) -> bool:
        """Whether a connection is open for the next message."""
        return self._client is not None and self._client.is_connected

    async def send(
        self, endpoint: SmtpEndpoint, mail: OutgoingMail, checkpoint: Checkpoint
    ) -> None:
        """Submit ``mail``; ``checkpoint`` is awaited inside DATA, before its end.

        An exception from ``checkpoint`` propagates unchanged and nothing is sent.
        A recipient refused for good (5xx) while others are accepted is logged and
        skipped; one deferred (4xx) defers the whole message (nothing has left
        yet, so it is sent to everyone later), as does a refusal of every one.
        """
        if not mail.recipients:
            raise ProviderProtocolError("a message needs at least one recipient")
        async with self._lock:
            self._stop_idle_timer()
            try:
                client = await self._envelope_sent(endpoint, mail)
                # The checkpoint runs inside DATA, right before the line that ends
                # it: after that nothing is retried (threadsync.core.outbox.smtp_data).
                with _translated(endpoint, "DATA"):
                    await send_data(client, mail.raw, checkpoint)
            except BaseException as exc:
                # The transaction may be half done (or the checkpoint refused it):
                # never reuse that connection. A cancelled send may have stopped
                # inside DATA, where a QUIT would only be read as message text.
                await self._drop(polite=isinstance(exc, Exception))
                raise
            log.info(
                "SMTP message submitted",
                extra={"smtp_host": endpoint.host, "recipient_count": len(mail.recipients)},
            )
            self._start_idle_timer()

    async def _envelope_sent(self, endpoint: SmtpEndpoint, mail: OutgoingMail) -> aiosmtplib.SMTP:
        """MAIL FROM and RCPT TO on a live connection. A reused connection that
        the server closed meanwhile is replaced once: nothing has left yet."""
        if self._endpoint != endpoint or not self.connected:
            await self._drop()
        if self._client is not None:
            try:
                await _envelope(self._client, mail)
                return self._client
            except Exception as exc:
                if not _closed_by_server(exc):
                    with _translated(endpoint, "MAIL/RCPT"):
                        raise
                log.info(
                    "SMTP connection closed by the server while idle; reconnecting",
                    extra={"smtp_host": endpoint.host},
                )
                await self._drop()
        self._client = await _open(endpoint)
        self._endpoint = endpoint
        with _translated(endpoint, "MAIL/RCPT"):
            await _envelope(self._client, mail)
        return self._client

    async def close(self) -> None:
        """QUIT and release the socket. Safe to call twice."""
        async with self._lock:
            await self._drop()

    async def _drop(self, *, polite: bool = True) -> None:
        self._stop_idle_timer()
        client, self._client, self._endpoint = self._client, None, None
        if client is not None and polite:
            await _quit(client)
        elif client is not None:
            client.close()

    def _start_idle_timer(self) -> None:
        loop = asyncio.get_running_loop()
        self._idle_timer = loop.call_later(self.idle_seconds, self._idle_expired)

    def _stop_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _idle_expired(self) -> None:
        self._idle_timer = None
        if self._closer is None or self._closer.done():
            self._closer = asyncio.get_running_loop().create_task(self._close_if_idle())

    async def _close_if_idle(self) -> None:
        async with self._lock:
            if self._idle_timer is None:  # no send started a new idle period meanwhile
                await self._drop()


def _closed_by_server(exc: BaseException) -> bool:
    """Whether ``exc`` says the connection is gone (closed while idle, or
    ``421``: the server is closing it), rather than that the message was refused."""
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return exc.code == CLOSING
    return isinstance(exc, (aiosmtplib.SMTPServerDisconnected, ConnectionError))


async def _envelope(client: aiosmtplib.SMTP, mail: OutgoingMail) -> None:
    options: list[str] = []
    encoding = "ascii"
    if not all(a.isascii() for a in (mail.sender, *mail.recipients)):
        if not client.supports_extension("smtputf8"):
            raise ProviderProtocolError(
                "an address is not ASCII and the SMTP server does not offer SMTPUTF8"
            )
        options.append("SMTPUTF8")
        encoding = "utf-8"
    if not mail.raw.isascii() and client.supports_extension("8bitmime"):
        options.append("BODY=8BITMIME")
    if client.supports_extension("size"):
        options.append(f"SIZE={len(mail.raw)}")
    await client.mail(mail.sender, options=options, encoding=encoding)

    refused: dict[str, int] = {}
    for recipient in mail.recipients:
        try:
            await client.rcpt(recipient, encoding=encoding)
        except aiosmtplib.SMTPRecipientRefused as exc:
            if exc.code == CLOSING:
                raise  # not about this recipient: the connection is going away
            refused[recipient] = exc.code
    codes = sorted(set(refused.values()))
    if any(400 <= c < 500 for c in codes):
        raise TransientProviderError(f"the SMTP server deferred a recipient (codes {codes})")
    if len(refused) == len(mail.recipients):
        raise ProviderProtocolError(f"the SMTP server refused every recipient (codes {codes})")
    if refused:
        log.warning(
            "SMTP server refused some recipients; sending to the others",
            extra={"refused_count": len(refused), "codes": sorted(set(refused.values()))},
        )


async def _open(endpoint: SmtpEndpoint) -> aiosmtplib.SMTP:
    tls = endpoint.security != "none"
    client = aiosmtplib.SMTP(
        hostname=endpoint.host,
        port=endpoint.port if endpoint.network is None else None,
        use_tls=endpoint.security == "tls",
        start_tls=endpoint.security == "starttls",
        tls_context=endpoint.ssl_context if tls else None,
        timeout=endpoint.timeout,
        local_hostname=endpoint.local_hostname,
    )
    try:
        with _translated(endpoint, "connect"):
            await _connect(client, endpoint)
            await _authenticate(client, endpoint)
    except BaseException:
        client.close()
        await asyncio.sleep(0)  # let the transport finish closing
        raise
    return client


async def _connect(client: aiosmtplib.SMTP, endpoint: SmtpEndpoint) -> None:
    """Connect, with TLS and EHLO. For a host a tenant named (``endpoint.network``)
    the socket goes to an address the network policy allowed (TLS still checks
    the name), and any failure is told as "could not connect", whatever the cause:
    a tenant must not learn which ports are closed, silent or speak TLS."""
    if endpoint.network is None:
        await client.connect()
        return
    try:
        sock = await open_socket(endpoint.host, endpoint.port, endpoint.network, endpoint.timeout)
        try:
            await client.connect(sock=sock)
        except BaseException:
            sock.close()
            raise
    except (ThreadsyncError, aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
        log.warning(
            "SMTP connect for a tenant failed: %s",
            exc,
            extra={"smtp_host": endpoint.host, "smtp_port": endpoint.port},
        )
        raise TransientProviderError(
            f"could not connect to SMTP server {endpoint.host}:{endpoint.port}"
        ) from None


async def _authenticate(client: aiosmtplib.SMTP, endpoint: SmtpEndpoint) -> None:
    if not endpoint.authenticates:
        return
    if endpoint.access_token is not None:
        await client.ehlo()
        if "xoauth2" not in client.server_auth_methods:
            raise ProviderProtocolError(f"SMTP server {endpoint.host} does not offer XOAUTH2")
        await client.auth_xoauth2(endpoint.username, endpoint.access_token)
    else:
        await client.login(endpoint.username, endpoint.password or "")


async def _quit(client: aiosmtplib.SMTP) -> None:
    if client.is_connected:
        with contextlib.suppress(aiosmtplib.SMTPException, OSError, TimeoutError):
            await client.quit()
    client.close()
    await asyncio.sleep(0)


#: How an aiosmtplib or network error becomes one of threadsync's, first match
#: wins. ``auth-4xx``: the server cannot check credentials now (try again);
#: ``certificate``: verification failed (fix the certificate or the CA file);
#: ``tls``: the TLS handshake failed (wrong port or settings, not fixed by
#: retrying); the rest by reply code: 4xx or no answer may pass, 5xx will not.
ERROR_MAP: tuple[tuple[str, type[ProviderError]], ...] = (
    ("auth-4xx", TransientProviderError),
    ("auth", AuthenticationFailed),
    ("reply-4xx", TransientProviderError),
    ("reply-5xx", ProviderProtocolError),
    ("certificate", ProviderProtocolError),
    ("tls", ProviderProtocolError),
    ("network", TransientProviderError),
    ("protocol", ProviderProtocolError),
)


def _kind(exc: BaseException) -> str | None:
    if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
        return "auth-4xx" if 400 <= exc.code < 500 else "auth"
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return "reply-4xx" if 400 <= exc.code < 500 else "reply-5xx"
    if certificate_error(exc) is not None:
        return "certificate"
    if isinstance(exc, ssl.SSLError) and not isinstance(exc, ssl.SSLEOFError):
        return "tls"
    if isinstance(
        exc,
        aiosmtplib.SMTPConnectError
        | aiosmtplib.SMTPServerDisconnected
        | aiosmtplib.SMTPTimeoutError
        | OSError
        | TimeoutError,
    ):
        return "network"
    if isinstance(exc, aiosmtplib.SMTPException):
        return "protocol"  # a missing extension (AUTH, STARTTLS) and the like
    return None


def translate(exc: BaseException, endpoint: SmtpEndpoint, stage: str) -> ProviderError | None:
    """The threadsync error for ``exc`` raised at ``stage`` (``connect``,
    ``MAIL/RCPT``, ``DATA``), or ``None`` when it is not an SMTP or network error."""
    kind = _kind(exc)
    if kind is None:
        return None
    error = dict(ERROR_MAP)[kind]
    where = f"{endpoint.label} {endpoint.host}:{endpoint.port}"
    if kind == "auth":
        who = f" as {endpoint.username}" if endpoint.username else ""
        detail = _short(getattr(exc, "message", ""))
        code = getattr(exc, "code", "")
        return error(f"SMTP login{who} at {where} was rejected ({code} {detail})")
    if kind == "auth-4xx":
        return error(f"{where} cannot authenticate now ({getattr(exc, 'code', '')})")
    if kind.startswith("reply"):
        code, message = getattr(exc, "code", ""), _short(getattr(exc, "message", ""))
        return error(f"SMTP {stage} at {where}: {code} {message}")
    if kind == "certificate":
        cert = certificate_error(exc)
        assert cert is not None
        return certificate_failure(endpoint.host, endpoint.port, cert)
    if kind == "tls":
        reason = getattr(exc, "reason", None) or _short(str(exc))
        return error(f"TLS with {where} failed: {reason}")
    return error(f"SMTP {stage} at {where} failed: {_short(str(exc)) or exc.__class__.__name__}")


@contextlib.contextmanager
def _translated(endpoint: SmtpEndpoint, stage: str) -> Iterator[None]:
    """Turn aiosmtplib and network errors raised inside into threadsync's."""
    try:
        yield
    except ProviderError:
        raise
    except Exception as exc:
        error = translate(exc, endpoint, stage)
        if error is None:
            raise
        raise error from None


def _short(text: str) -> str:
    return " ".join(text.split())[:200]
