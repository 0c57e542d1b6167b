"""``ExchangeProvider``: a mailbox on an on-premises Exchange Server through
Exchange Web Services (EWS), with exchangelib.

For Exchange Server 2016, 2019 and Subscription Edition (and hybrid tenants that
still allow EWS). Exchange Online is refused at connect: Microsoft 365 mailboxes
are reached with ``--provider outlook`` (Microsoft Graph). Reading is
SyncFolderItems on Inbox and Sent Items, headers only (:mod:`.reading`); bodies
are fetched as MIME for thread members only. Sending is CreateItem with
SendAndSaveCopy from the kernel's MIME (:mod:`.sending`); Exchange files the
copy in Sent Items itself. A pull subscription on both folders wakes the
connection early (:mod:`.push`); when it is lost the provider polls and
subscribes again. Every exchangelib call runs in a bounded worker pool
(:mod:`.ews`).

Settings (the ``[exchange]`` section of config.toml, all optional):
``timeout_seconds`` (60), ``max_retry_wait_seconds`` (10: longest total wait for
ErrorServerBusy inside one call), ``event_poll_seconds`` (5: how often the pull
subscription is asked for events while waiting).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar
from urllib.parse import urlsplit

from threadsync.core.errors import ConfigError, ProviderProtocolError, TransientProviderError
from threadsync.core.provider import (
    Account,
    ChangeBatch,
    Checkpoint,
    Folder,
    OutgoingMail,
    Provider,
    ProviderOption,
    option_bool,
)
from threadsync.plugins.exchange import oauth
from threadsync.plugins.exchange.autodiscover import discover_ews_url
from threadsync.plugins.exchange.ews import EwsSession, Throttled, run_in_worker
from threadsync.plugins.exchange.push import PullEvents
from threadsync.plugins.exchange.reading import FolderSync, fetch_mime
from threadsync.plugins.exchange.sending import (
    find_in_blocking,
    find_sent_blocking,
    send_blocking,
)
from threadsync.plugins.outlook.auth import TokenSource

log = logging.getLogger(__name__)

INBOX = "inbox"
SENT_ITEMS = "sentitems"
#: Hosts of Exchange Online: EWS there is being retired; use Graph.
ONLINE_HOSTS = ("outlook.office365.com", "outlook.office.com", "outlook.live.com")
ONLINE_SUFFIXES = (".office365.com", ".outlook.com", ".office.com", ".microsoft.com")
#: A Message-ID no mailbox holds: looked for once at connect to prove access.
VERIFY_ID = "<threadsync-verify@invalid>"
#: Most items one GetItem request asks the MIME of.
FETCH_BATCH = 25

OPTIONS: tuple[ProviderOption, ...] = (
    ProviderOption("ews_url", "the EWS endpoint, https://mail.example.com/EWS/Exchange.asmx "
                              "(found by autodiscover when left out)"),
    ProviderOption("username", "the login: user@example.com, DOMAIN\\user or the address "
                               "(default: the address)"),
    ProviderOption("password_env", "name of the environment variable holding the password",
                   secret_env=True),
    ProviderOption("auth", "how to log in", default="ntlm", choices=("ntlm", "basic", "oauth")),
    ProviderOption("ca_file", "a PEM file of CA certificates the EWS server's certificate is "
                              "checked against (an internal CA)"),
    ProviderOption("impersonate", "log in as a service account holding the "
                                  "ApplicationImpersonation role and act as the mailbox",
                   type=bool, default=False),
)


def refuse_exchange_online(url: str) -> None:
    host = (urlsplit(url).hostname or "").lower()
    if host in ONLINE_HOSTS or host.endswith(ONLINE_SUFFIXES):
        raise ConfigError(
            f"{host} is Exchange Online, where Microsoft blocks EWS: connect Microsoft 365 "
            f"mailboxes with --provider outlook (Microsoft Graph) instead"
        )



class ExchangeProvider(Provider):
    """Exchange Server on premises through EWS (exchangelib)."""

    name: ClassVar[str] = "exchange"
    title: ClassVar[str] = "Exchange Server on premises through EWS (NTLM, Basic or OAuth 2.0)"
    options: ClassVar[Sequence[ProviderOption]] = OPTIONS
    files_sent_copy: ClassVar[bool] = True

    def __init__(self, account: Account, settings: Mapping[str, Any] | None = None) -> None:
        super().__init__(account, settings)
        self._session: EwsSession | None = None
        self._push: PullEvents | None = None
        self._tokens: TokenSource | None = None
        self._token: str | None = None
        self._build: Callable[[], EwsSession] | None = None
        #: EWS requests made by this provider (reading, fetching, sending).
        self.requests = 0

    @classmethod
    def prepare(
        cls, email: str, options: Mapping[str, Any], credentials: Mapping[str, str]
    ) -> Account:
        """Check the options (no network): the URL is https and not Exchange
        Online, the password or token variable is set, the CA file exists."""
        opts = dict(options)
        opts["impersonate"] = option_bool(opts.get("impersonate"), "--impersonate")
        auth = str(opts.get("auth") or "ntlm").lower()
        opts["auth"] = auth
        if auth == "oauth" and not opts.get("ews_url"):
            raise ConfigError("--auth oauth needs --ews-url (autodiscover needs a password)")
        if auth == "oauth":
            opts.pop("password_env", None)
            credentials = {}
        elif not credentials.get("password"):
            raise ConfigError(f"provider 'exchange' needs --password-env with --auth {auth}")
        url = opts.get("ews_url")
        if url:
            if urlsplit(str(url)).scheme != "https":
                raise ConfigError("--ews-url must be an https:// URL")
            refuse_exchange_online(str(url))
        ca = opts.get("ca_file")
        if ca:
            try:
                with open(str(ca), "rb"):
                    pass
            except OSError as exc:
                raise ConfigError(f"--ca-file {ca} cannot be read: {exc.strerror}") from None
        return super().prepare(email, opts, credentials)

    @classmethod
    async def authorize(
        cls,
        email: str,
        options: Mapping[str, Any],
        credentials: Mapping[str, str],
        notify: Callable[[str], None],
        settings: Mapping[str, Any],
    ) -> Account:
        """``--auth oauth``: a delegated sign-in by device code (:mod:`.oauth`);
        otherwise the checked options and the password, no interaction."""
        account = cls.prepare(email, options, credentials)
        if account.settings.get("auth") == "oauth":
            account = await oauth.sign_in(account, settings, notify)
        return account

    # ---- session ------------------------------------------------------------------------

    async def open(self) -> None:
        if self._session is not None:
            return
        s = self.account.settings
        auth = str(s.get("auth", "ntlm"))
        username = s.get("username") or self.account.email
        password = self.account.secrets.get("password")
        url = s.get("ews_url")
        ca = s.get("ca_file")
        timeout = float(self.settings.get("timeout_seconds", 60))
        if not url:
            url = await discover_ews_url(self.account.email, str(username), password, ca, timeout)
            refuse_exchange_online(url)

        if auth == "oauth":
            tokens = oauth.token_source(self.account, self.settings)
            try:
                self._token = await tokens()  # a silent refresh: a revoked sign-in fails here
            except BaseException:
                tokens.close()
                raise
            self._tokens = tokens

        def build() -> EwsSession:
            return EwsSession(
                self.account.email, str(url), username=str(username), password=password,
                auth=auth, token=self._token,
                impersonate=option_bool(s.get("impersonate"), "--impersonate"),
                ca_file=str(ca) if ca else None,
                timeout=timeout,
                max_retry_wait=float(self.settings.get("max_retry_wait_seconds", 10)),
            )

        self._session = await run_in_worker(build)
        self._build = build
        self._push = PullEvents(self._session, [f for f in self._session.folders.values()],
                                float(self.settings.get("event_poll_seconds", 5)))

    async def verify(self) -> None:
        """FindItem in Inbox and Sent Items: proves the login may read both."""
        session = await self._fresh()
        for name in (INBOX, SENT_ITEMS):
            await self._call(f"{self.account.email} {name}",
                             lambda n=name: find_in_blocking(session, n, VERIFY_ID))

    async def close(self) -> None:
        push, self._push = self._push, None
        if push is not None:
            push.cancel()
        session, self._session = self._session, None
        if session is not None:
            await run_in_worker(session.close)
        tokens, self._tokens = self._tokens, None
        if tokens is not None:
            tokens.close()

    def _client(self) -> EwsSession:
        if self._session is None:
            raise ProviderProtocolError("the Exchange provider is not open")
        return self._session

    async def _fresh(self) -> EwsSession:
        """The session, rebuilt first when OAuth refreshed the access token
        (silently, minutes before it expires)."""
        session = self._client()
        if self._tokens is not None and self._build is not None:
            token = await self._tokens()
            if token != self._token:
                self._token = token
                session = self._session = await run_in_worker(self._build)
                if self._push is not None:
                    self._push.rebind(session)
        return session

    async def _call(self, what: str, fn: Any) -> Any:
        self.requests += 1
        return await self._client().call(what, fn)

    # ---- reading ------------------------------------------------------------------------

    async def folders(self) -> list[Folder]:
        return [Folder(INBOX, "inbox"), Folder(SENT_ITEMS, "sent")]

    async def changes(
        self, folder: Folder, cursor: Mapping[str, Any] | None, limit: int = 250
    ) -> ChangeBatch:
        session = await self._fresh()
        if folder.name not in session.folders:
            raise ProviderProtocolError(f"unknown folder {folder.name!r}")
        sync = FolderSync(session, session.folders[folder.name])
        what = f"{self.account.email} {folder.name}"
        if cursor is None:
            batch: ChangeBatch = await self._call(what, sync.to_the_end)
        else:
            batch = await self._call(what, lambda: sync.changes(cursor, limit))
        self.requests += max(sync.requests - 1, 0)
        return batch

    async def fetch(self, folder: Folder, ref: str) -> bytes:
        return (await self.fetch_many(folder, [ref]))[ref]

    async def fetch_many(self, folder: Folder, refs: Sequence[str]) -> dict[str, bytes]:
        """The MIME of ``refs``, up to :data:`FETCH_BATCH` per GetItem request."""
        session = await self._fresh()
        found: dict[str, bytes] = {}
        for start in range(0, len(refs), FETCH_BATCH):
            chunk = list(refs[start:start + FETCH_BATCH])
            found.update(await self._call(f"{self.account.email} fetch",
                                          lambda c=chunk: fetch_mime(session, c)))
        return found

    # ---- writing ------------------------------------------------------------------------

    async def send(self, mail: OutgoingMail, checkpoint: Checkpoint) -> None:
        """CreateItem with SendAndSaveCopy, the checkpoint right before it. When
        the answer is lost the outcome is unknown: the copy in Sent Items (by
        InternetMessageId) says it went, and then it is not sent again."""
        session = await self._fresh()
        await checkpoint()
        try:
            await self._call(f"{self.account.email} send", lambda: send_blocking(session, mail))
        except Throttled:
            raise  # ErrorServerBusy: the server did not take it
        except TransientProviderError as exc:
            if await self._went_out(mail.message_id):
                log.info("EWS send answer lost; the message is in Sent Items", extra={
                    "mailbox": self.account.email, "message_id": mail.message_id})
                return
            raise TransientProviderError(f"{exc}; the message is not in Sent Items") from None

    async def _went_out(self, message_id: str) -> bool:
        """Whether Sent Items shows ``message_id``, asked a few times: Exchange
        files the copy right after submitting the message."""
        for wait in (0.0, 0.5, 1.5):
            await asyncio.sleep(wait)
            if await self.find_sent(message_id):
                return True
        return False

    async def find_sent(self, message_id: str) -> bool:
        session = await self._fresh()
        return bool(await self._call(f"{self.account.email} find in Sent Items",
                                     lambda: find_sent_blocking(session, message_id)))

    async def forget(self) -> None:
        """Drop the pull subscription; Exchange forgets it anyway after its timeout."""
        if self._push is not None:
            await self._push.unsubscribe()

    # ---- waiting ------------------------------------------------------------------------

    async def wait_for_changes(self, timeout: float) -> bool:
        """A pull subscription on Inbox and Sent Items asked every
        ``event_poll_seconds``: True on an event, False on timeout or :meth:`wake`.
        When the subscription cannot be kept this is a plain, wakeable sleep."""
        if timeout <= 0 or self._push is None:
            return await super().wait_for_changes(max(timeout, 0))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if self._woken.is_set():
                self._woken.clear()
                return False
            if await self._push.changed():
                return True
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(self._woken.wait(), min(remaining, self._push.interval))
            except TimeoutError:
                continue


__all__ = ["ExchangeProvider", "refuse_exchange_online"]
