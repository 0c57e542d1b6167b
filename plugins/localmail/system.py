"""The local mail system in one process: SMTP (aiosmtpd) and IMAP (pymap) over one data folder.

:class:`MailSystem` is the async core, started and stopped on the caller's
event loop (``threadsync mailserver``). :class:`MailSystemThread` runs one on
its own loop in a background thread for synchronous callers and for code whose
own loop must not be shared (the demo, tests), like aiosmtpd's ``Controller``.

The data folder::

    tls/         ca.pem, server.pem, server.key (made on first start)
    mailboxes/   users, password hashes and Maildir++ folders (pymap's layout)
    outside/     the outside world: mail to anyone who is not a local user
"""

from __future__ import annotations

import asyncio
import errno
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from threadsync.core.config import is_loopback
from threadsync.core.errors import ConfigError
from threadsync.plugins.localmail.imap import ImapListener
from threadsync.plugins.localmail.mailboxes import INBOX, Mailboxes, check_temp_dir, imap_config
from threadsync.plugins.localmail.outside import OutsideMessage, OutsideWorld, list_outside
from threadsync.plugins.localmail.settings import MailserverSettings, check_email
from threadsync.plugins.localmail.smtp import Handler, SmtpListener
from threadsync.plugins.localmail.tls import Certificate, ensure_certificate

T = TypeVar("T")


def _in_use(exc: OSError) -> bool:
    return exc.errno in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL)


class MailSystem:
    """SMTP and IMAP over the data folder of ``settings``; see the module docstring."""

    def __init__(self, settings: MailserverSettings) -> None:
        self.settings = settings
        self.data_dir = settings.data_dir
        self.host = settings.host
        self.smtp_port = 0
        self.imap_port = 0
        self.certificate: Certificate | None = None
        self.outside = OutsideWorld(self.data_dir / "outside")
        self._mailboxes: Mailboxes | None = None
        self._smtp: SmtpListener | None = None
        self._imap: ImapListener | None = None

    @property
    def mailboxes(self) -> Mailboxes:
        if self._mailboxes is None:
            raise RuntimeError("the mail system is not started")
        return self._mailboxes

    async def start(self) -> None:
        """Make the data folder and certificate if needed, add the configured users,
        and listen. A port that is taken is a :class:`~threadsync.core.errors.ConfigError`."""
        root = self.data_dir / "mailboxes"
        try:
            check_temp_dir(root)
            self.certificate = await asyncio.to_thread(ensure_certificate, self.data_dir / "tls")
            context = self.certificate.server_context()
            config = imap_config(root, self.host, self.settings.imap_port, context)
            self._mailboxes = Mailboxes(root, config)
            await self._mailboxes.load()
            for user in self.settings.users:
                await self._mailboxes.add(user.email, user.password)
        except OSError as exc:
            raise ConfigError(
                f"cannot use the mail folder {self.data_dir}: {exc.strerror or exc}"
            ) from None
        handler = Handler(self._mailboxes, self.outside, self.settings.relay_senders)
        self._smtp = SmtpListener(handler, context, plaintext_auth=is_loopback(self.host))
        self._imap = ImapListener(self._mailboxes)
        try:
            self.smtp_port = await self._smtp.start(self.host, self.settings.smtp_port)
            self.imap_port = await self._imap.start(self.host, self.settings.imap_port)
        except OSError as exc:
            await self.stop()
            if _in_use(exc):
                raise ConfigError(
                    f"cannot listen on {self.host} (SMTP port {self.settings.smtp_port}, IMAP "
                    f"port {self.settings.imap_port}): {exc.strerror}; is another mail server "
                    "running? Choose other ports with --smtp-port/--imap-port"
                ) from None
            raise ConfigError(f"cannot listen on {self.host}: {exc.strerror}") from None

    async def stop(self) -> None:
        """Close both listeners and every open connection. Idempotent."""
        smtp, self._smtp = self._smtp, None
        imap, self._imap = self._imap, None
        if imap is not None:
            await imap.stop()
        if smtp is not None:
            await smtp.stop()

    async def add_user(self, email: str, password: str) -> None:
        await self.mailboxes.add(check_email(email), password)

    async def deliver(self, email: str, raw: bytes, folder: str = INBOX) -> int:
        """Put ``raw`` into a local user's folder as it is (no envelope stamp)."""
        return await self.mailboxes.deliver(email, raw, folder)

    def outside_messages(self) -> list[OutsideMessage]:
        return list_outside(self.outside.root)

    def info(self) -> dict[str, Any]:
        """Where everything is, for people (``mailserver``) and programs (``--json``)."""
        ca = self.certificate.ca_file if self.certificate is not None else None
        return {
            "host": self.host,
            "smtp_port": self.smtp_port,
            "imap_port": self.imap_port,
            "users": self.mailboxes.users if self._mailboxes is not None else [],
            "data_dir": str(self.data_dir),
            "outside_dir": str(self.outside.root),
            "ca_file": str(ca) if ca is not None else None,
            "relay_senders": list(self.settings.relay_senders),
        }


class MailSystemThread:
    """A :class:`MailSystem` on its own event loop in a daemon thread.

    ``start()`` returns once both ports accept connections; ``stop()`` returns
    once they are closed and the loop is gone. Coroutines of the system run on
    its loop through :meth:`call`.
    """

    def __init__(self, settings: MailserverSettings) -> None:
        self.system = MailSystem(settings)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def host(self) -> str:
        return self.system.host

    @property
    def smtp_port(self) -> int:
        return self.system.smtp_port

    @property
    def imap_port(self) -> int:
        return self.system.imap_port

    def start(self, timeout: float = 30.0) -> MailSystemThread:
        if self._thread is not None:
            return self
        self._ready.clear()
        self._error = None
        self._thread = threading.Thread(target=self._run, name="localmail", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise ConfigError(f"the local mail system did not start within {timeout:.0f} s")
        if self._error is not None:
            self._thread.join()
            self._thread = None
            raise self._error
        return self

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stopping = asyncio.Event()
            try:
                await self.system.start()
            except BaseException as exc:
                self._error = exc
                self._ready.set()
                return
            self._ready.set()
            try:
                await self._stopping.wait()
            finally:
                await self.system.stop()

        try:
            asyncio.run(main())
        finally:
            self._loop = None

    def call(self, make: Callable[[], Awaitable[T]], timeout: float = 60.0) -> T:
        """Run ``make()`` on the mail system's loop and return its result."""
        loop = self._loop
        if loop is None:
            raise RuntimeError("the local mail system is not running")

        async def run() -> T:
            return await make()

        return asyncio.run_coroutine_threadsafe(run(), loop).result(timeout)

    def add_user(self, email: str, password: str) -> None:
        self.call(lambda: self.system.add_user(email, password))

    def deliver(self, email: str, raw: bytes, folder: str = INBOX) -> int:
        return self.call(lambda: self.system.deliver(email, raw, folder))

    def outside_messages(self) -> list[OutsideMessage]:
        return self.system.outside_messages()

    def info(self) -> dict[str, Any]:
        return self.system.info()

    def stop(self) -> None:
        """Stop listening, end every connection and the loop. Idempotent."""
        thread, loop, stopping = self._thread, self._loop, self._stopping
        if thread is None:
            return
        if loop is not None and stopping is not None:
            loop.call_soon_threadsafe(stopping.set)
        thread.join(30)
        if thread.is_alive():
            raise RuntimeError("the local mail system did not stop within 30 s")
        self._thread = None

    def __enter__(self) -> MailSystemThread:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
