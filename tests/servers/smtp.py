"""An SMTP submission server for tests, built on aiosmtpd.

:class:`SmtpServer` runs aiosmtpd's ``SMTP`` protocol on its own event loop
in a background thread, listening on a free loopback port (the listening
socket is bound to port 0 by the loop itself, which avoids both aiosmtpd's
broken ``Controller(port=0)`` and the pick-a-port race). Every accepted
message is recorded as a :class:`Received`.

* ``users``: accounts for AUTH PLAIN/LOGIN. AUTH is offered on plaintext
  connections too (``auth_require_tls=False``), as on loopback submission.
* ``require_auth``: MAIL FROM before a successful AUTH gets ``530``. This is
  enforced in the handler rather than with aiosmtpd's ``auth_required``,
  which would emit a warning (an error under this suite's warning filter).
* ``ca``: STARTTLS with the CA's server certificate; with ``implicit_tls``,
  TLS from the first byte instead (SMTPS) and no STARTTLS.
* ``deliver_to``: an :class:`~tests.servers.ImapServer`; recipients that are
  users of it also get the message in their INBOX (a local MTA), others are
  only recorded. Delivery happens before the server answers DATA, so a
  client's ``send_message`` returning means the mail is already in the INBOX.

The server is thread-based so it serves both sync and async tests; use
:meth:`SmtpServer.wait_for` from async tests to wait for messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from email.policy import compat32
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from . import ImapServer
from .tlscerts import TestCA

__all__ = ["Received", "SmtpServer"]


@dataclass
class Received:
    """One message accepted by the server."""

    mail_from: str
    rcpt_tos: list[str]
    raw: bytes
    auth_login: str | None
    delivered_to: list[str] = field(default_factory=list)

    @property
    def message_id(self) -> str | None:
        """The Message-ID header without angle brackets, if present."""
        value = BytesHeaderParser(policy=compat32).parsebytes(self.raw).get("Message-ID")
        return _normalise_message_id(value) if value else None


def _normalise_message_id(value: str) -> str:
    return str(value).strip().strip("<>").strip()


class _Handler:
    """aiosmtpd handler: records messages and delivers local recipients."""

    def __init__(self, server: SmtpServer) -> None:
        self._server = server

    async def handle_MAIL(
        self,
        smtp: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        if self._server.require_auth and not session.authenticated:
            return "530 5.7.0 Authentication required"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_DATA(self, smtp: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        if isinstance(envelope.content, bytes) and not raw:
            raw = envelope.content
        login: str | None = None
        if isinstance(session.auth_data, LoginPassword):
            login = session.auth_data.login.decode("utf-8", "replace")
        received = Received(
            mail_from=envelope.mail_from or "",
            rcpt_tos=list(envelope.rcpt_tos),
            raw=raw,
            auth_login=login,
        )
        target = self._server.deliver_to
        if target is not None:
            loop = asyncio.get_running_loop()
            for rcpt in received.rcpt_tos:
                if target.has_user(rcpt):
                    try:
                        await loop.run_in_executor(None, target.deliver, rcpt, raw, "INBOX")
                    except (OSError, RuntimeError) as exc:
                        return f"451 4.3.0 Local delivery to {rcpt} failed: {exc}"
                    received.delivered_to.append(rcpt)
        self._server._record(received)
        return "250 2.0.0 Message accepted for delivery"


class SmtpServer:
    """An aiosmtpd server on a loopback port, in a background thread."""

    def __init__(
        self,
        *,
        users: dict[str, str] | None = None,
        ca: TestCA | None = None,
        implicit_tls: bool = False,
        require_auth: bool = False,
        deliver_to: ImapServer | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        if implicit_tls and ca is None:
            raise ValueError("implicit_tls needs a ca")
        if require_auth and not users:
            raise ValueError("require_auth needs users")
        self.host = host
        self.port = 0
        self.users = dict(users or {})
        self.ca = ca
        self.implicit_tls = implicit_tls
        self.require_auth = require_auth
        self.deliver_to = deliver_to
        self.received: list[Received] = []
        self._received_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._protocols: set[SMTP] = set()
        self._handler = _Handler(self)
        self._server_ssl = ca.server_context() if ca is not None else None

    # ------------------------------------------------------------ lifecycle

    def start(self) -> SmtpServer:
        """Start listening; returns self once the port accepts connections.

        The first start binds a free port chosen by the kernel (no race); a
        start after :meth:`stop` binds the same port again (``port`` may also
        be set before starting). ``received`` is kept across restarts.
        """
        if self._thread is not None:
            return self
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        error: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                self._server = loop.run_until_complete(
                    loop.create_server(
                        self._factory,
                        host=self.host,
                        # A restart keeps the port, as a real server would.
                        port=self.port,
                        reuse_address=True,
                        ssl=self._server_ssl if self.implicit_tls else None,
                    )
                )
            except OSError as exc:
                error.append(exc)
                ready.set()
                loop.close()
                return
            self.port = self._server.sockets[0].getsockname()[1]
            loop.call_soon(ready.set)
            loop.run_forever()
            self._shutdown(loop)

        self._loop = loop
        self._thread = threading.Thread(target=run, name="test-smtp-server", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise TimeoutError("SMTP server did not start within 10 s")
        if error:
            self._thread.join()
            self._thread = None
            raise error[0]
        return self

    def _factory(self) -> SMTP:
        smtp = SMTP(
            self._handler,
            hostname="localhost",
            ident="threadsync test SMTP",
            tls_context=None if self.implicit_tls else self._server_ssl,
            authenticator=self._authenticate if self.users else None,
            auth_require_tls=False,
            data_size_limit=64 * 1024 * 1024,
            enable_SMTPUTF8=True,
            loop=self._loop,
        )
        self._protocols.add(smtp)
        return smtp

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        if isinstance(auth_data, LoginPassword):
            login = auth_data.login.decode("utf-8", "replace")
            password = auth_data.password.decode("utf-8", "replace")
            if login in self.users and self.users[login] == password:
                return AuthResult(success=True, auth_data=auth_data)
        return AuthResult(success=False, handled=False)

    def _abort_connections(self, loop: asyncio.AbstractEventLoop) -> None:
        for smtp in list(self._protocols):
            if isinstance(smtp.transport, asyncio.Transport):
                smtp.transport.abort()
        # Connections no SMTP object knows yet (just accepted, or an implicit
        # TLS handshake in progress) are only known to the loop; abort them
        # too, or their sockets leak (a ResourceWarning). Server.abort_clients()
        # does this publicly, but only from Python 3.13.
        for transport in list(getattr(loop, "_transports", {}).values()):
            if transport is not None and not transport.is_closing():
                transport.abort()

    def _shutdown(self, loop: asyncio.AbstractEventLoop) -> None:
        """Runs in the server thread once the loop has stopped."""
        assert self._server is not None
        # Stop accepting, then let accepts already in flight create their
        # transports before closing the server: a connection accepted just
        # before Server.close() would otherwise hit a closed server in
        # asyncio's accept task and its socket would leak.
        for sock in self._server.sockets:
            loop.remove_reader(sock.fileno())
        for _ in range(3):
            loop.run_until_complete(asyncio.sleep(0))
        self._server.close()
        for _ in range(3):  # aborts schedule connection_lost callbacks
            self._abort_connections(loop)
            loop.run_until_complete(asyncio.sleep(0))
        tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        self._abort_connections(loop)
        loop.run_until_complete(asyncio.sleep(0))
        loop.run_until_complete(self._server.wait_closed())
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()
        self._protocols.clear()

    def stop(self) -> None:
        """Close the listener and all connections, then join the thread. Idempotent."""
        if self._thread is None or self._loop is None:
            return
        with contextlib.suppress(RuntimeError):  # loop already closed
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        if self._thread.is_alive():
            raise RuntimeError("SMTP server thread did not stop")
        self._thread = None
        self._loop = None
        self._server = None

    def __enter__(self) -> SmtpServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -------------------------------------------------------------- results

    def _record(self, received: Received) -> None:
        with self._received_lock:
            self.received.append(received)

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        """Wait until at least *count* messages arrived; return all of them."""
        deadline = time.monotonic() + timeout
        while True:
            with self._received_lock:
                if len(self.received) >= count:
                    return list(self.received)
                have = len(self.received)
            if time.monotonic() >= deadline:
                raise TimeoutError(f"expected {count} messages, got {have} in {timeout} s")
            await asyncio.sleep(0.02)

    def wait_for_sync(self, count: int, timeout: float = 10.0) -> list[Received]:
        """Blocking variant of :meth:`wait_for` for synchronous tests."""
        deadline = time.monotonic() + timeout
        while True:
            with self._received_lock:
                if len(self.received) >= count:
                    return list(self.received)
                have = len(self.received)
            if time.monotonic() >= deadline:
                raise TimeoutError(f"expected {count} messages, got {have} in {timeout} s")
            time.sleep(0.02)

    def by_message_id(self, message_id: str) -> list[Received]:
        """Messages whose Message-ID matches (angle brackets optional)."""
        wanted = _normalise_message_id(message_id)
        with self._received_lock:
            return [r for r in self.received if r.message_id == wanted]

    def __repr__(self) -> str:
        mode = "smtps" if self.implicit_tls else ("starttls" if self.ca else "plain")
        return f"<SmtpServer {self.host}:{self.port} {mode} received={len(self.received)}>"
