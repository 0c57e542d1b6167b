"""``OutlookProvider``: a Microsoft 365 or outlook.com mailbox through Microsoft
Graph.

Sign-in is OAuth 2.0 with MSAL (:mod:`.auth`): the authorization-code flow with
PKCE, its redirect received on a loopback listener (command line) or at the HTTP
API's ``/oauth/callback`` (:meth:`begin_consent` / :meth:`finish_consent`), or
the device-code flow for headless machines (``--device-code``). The signed-in
account must own the address being connected, unless it is connected as a
shared or delegated mailbox (``shared``): then the signed-in account needs full
access to it, the ``.Shared`` permissions are asked for, and every request goes
to ``/users/{address}`` instead of ``/me``. Reading uses per-folder delta
queries, headers only (:mod:`.changes`); bodies are downloaded as MIME only when
the kernel asks for a member (R5). Sending creates a draft from the kernel's
MIME and sends it (:mod:`.sending`); Graph files the copy in Sent Items itself.
When the host runs a notification endpoint, change notifications wake the
connection early (:mod:`.notifications`); without one, the kernel polls.

The ``[outlook]`` section of config.toml arrives as the provider settings; see
:mod:`.config`. The kernel passes the app's client secret there as
``client_secret`` (read from ``client_secret_env``); connections made by older
versions may still carry one stored at connect time, used as a fallback.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar
from urllib.parse import quote

from threadsync.core.errors import (
    AuthenticationFailed,
    ProviderError,
    ProviderProtocolError,
)
from threadsync.core.provider import (
    Account,
    ChangeBatch,
    Checkpoint,
    ConsentRequest,
    Folder,
    OutgoingMail,
    Provider,
    ProviderOption,
    option_bool,
)
from threadsync.plugins.outlook.auth import (
    SignIn,
    TokenSource,
    begin_browser_sign_in,
    finish_browser_sign_in,
    scopes_for,
    sign_in_with_browser,
    sign_in_with_device_code,
)
from threadsync.plugins.outlook.changes import FolderDelta
from threadsync.plugins.outlook.config import OutlookConfig
from threadsync.plugins.outlook.graph import (
    GraphClient,
    GraphRequestError,
    client_tls,
    shared_slots,
)
from threadsync.plugins.outlook.notifications import (
    HUB,
    REAUTHORIZE,
    NotificationHub,
    Subscriptions,
)
from threadsync.plugins.outlook.sending import Sender

log = logging.getLogger(__name__)

#: Graph's well-known folder names: stable across languages and renames.
INBOX = "inbox"
SENT_ITEMS = "sentitems"
#: How often, at most, subscriptions are checked for renewal while waiting.
MAINTENANCE_SECONDS = 300.0

OPTIONS: tuple[ProviderOption, ...] = (
    ProviderOption(
        "device_code",
        "sign in with a device code shown here, for machines without a browser",
        type=bool,
        default=False,
    ),
    ProviderOption(
        "shared",
        "the address is a shared or delegated mailbox the signed-in account has full "
        "access (and send-as) rights to; it is read and sent through /users/{address}",
        type=bool,
        default=False,
    ),
)



def _shared(options: Mapping[str, Any]) -> bool:
    return option_bool(options.get("shared"), "--shared")


class OutlookProvider(Provider):
    """Microsoft Graph for reading and sending; OAuth 2.0 through MSAL."""

    name: ClassVar[str] = "outlook"
    title: ClassVar[str] = "Microsoft 365 / outlook.com through Microsoft Graph (OAuth 2.0)"
    options: ClassVar[Sequence[ProviderOption]] = OPTIONS
    files_sent_copy: ClassVar[bool] = True

    def __init__(self, account: Account, settings: Mapping[str, Any] | None = None) -> None:
        super().__init__(account, settings)
        self._graph: GraphClient | None = None
        self._tokens: TokenSource | None = None
        self._subs: Subscriptions | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._signal = asyncio.Event()
        self._change_pending = False
        self._wake_pending = False
        self._next_maintenance = 0.0
        self._config: OutlookConfig | None = None

    # ---- connect ------------------------------------------------------------------------

    @classmethod
    def prepare(
        cls, email: str, options: Mapping[str, Any], credentials: Mapping[str, str]
    ) -> Account:
        """Check the options (no network); the tokens come from :meth:`authorize`."""
        device_code = option_bool(options.get("device_code"), "--device-code")
        kind = "public" if device_code else "confidential"
        settings: dict[str, Any] = {"client_kind": kind}
        if _shared(options):
            settings["shared"] = True
        return Account(email=email, settings=settings)

    @classmethod
    async def authorize(
        cls,
        email: str,
        options: Mapping[str, Any],
        credentials: Mapping[str, str],
        notify: Callable[[str], None],
        settings: Mapping[str, Any],
    ) -> Account:
        """Sign the user in (browser redirect on loopback, or device code) and check
        that the account owns ``email``; returns the account with its token cache."""
        config = OutlookConfig.from_section(settings)
        shared = _shared(options)
        scopes = scopes_for(shared)
        if option_bool(options.get("device_code"), "--device-code"):
            signed = await sign_in_with_device_code(config, email, notify, scopes)
            return await _account(config, email, signed, None, settings, shared)
        secret = _client_secret(config, settings)
        signed = await sign_in_with_browser(config, email, secret, notify, scopes)
        return await _account(config, email, signed, secret, settings, shared)

    @classmethod
    async def begin_consent(
        cls,
        email: str,
        options: Mapping[str, Any],
        credentials: Mapping[str, str],
        settings: Mapping[str, Any],
        redirect_uri: str,
    ) -> ConsentRequest | None:
        """The consent URL of an authorization-code sign-in whose redirect comes
        to the host's ``redirect_uri``; ``None`` for a device-code sign-in."""
        if option_bool(options.get("device_code"), "--device-code"):
            return None
        config = OutlookConfig.from_section(settings)
        secret = _client_secret(config, settings)
        flow = await begin_browser_sign_in(config, email, secret, redirect_uri,
                                           scopes_for(_shared(options)))
        return ConsentRequest(
            url=str(flow["auth_uri"]),
            state=str(flow["state"]),
            flow=flow,
            expires_in=config.sign_in_timeout_seconds,
        )

    @classmethod
    async def finish_consent(
        cls,
        email: str,
        options: Mapping[str, Any],
        credentials: Mapping[str, str],
        settings: Mapping[str, Any],
        flow: Mapping[str, Any],
        params: Mapping[str, str],
    ) -> Account:
        config = OutlookConfig.from_section(settings)
        secret = _client_secret(config, settings)
        signed = await finish_browser_sign_in(config, email, secret, flow, params,
                                              scopes_for(_shared(options)))
        return await _account(config, email, signed, secret, settings,
                              _shared(options))

    # ---- session ------------------------------------------------------------------------

    @property
    def config(self) -> OutlookConfig:
        """The checked ``[outlook]`` settings (ConfigError when they are unusable)."""
        if self._config is None:
            self._config = OutlookConfig.from_section(self.settings)
        return self._config

    @property
    def root(self) -> str:
        """``me``, or ``users/{address}`` for a shared or delegated mailbox."""
        return _root(self.account.email, bool(self.account.settings.get("shared")))

    async def open(self) -> None:
        if self._graph is not None:
            return
        config = self.config
        secret = self.settings.get("client_secret") or self.account.secrets.get("client_secret")
        tokens = TokenSource(config, self.account, str(secret) if secret else None)
        tls = await asyncio.to_thread(client_tls, config.ca_file)
        graph = GraphClient(
            config.graph_url,
            tokens,
            mailbox=self.account.email,
            tls=tls,
            timeout=config.timeout_seconds,
            max_concurrency=config.max_concurrency,
            max_retries=config.max_retries,
            max_retry_wait=config.max_retry_wait_seconds,
            slots=shared_slots(config.concurrency_key(self.account.email),
                               config.max_concurrency),
            root=self.root,
        )
        try:
            await tokens()  # a silent refresh now, so rejected sign-ins fail here
        except BaseException:
            await graph.aclose()
            tokens.close()
            raise
        self._tokens, self._graph = tokens, graph
        self._loop = asyncio.get_running_loop()
        if HUB.served and config.notification_url:
            self._subs = Subscriptions(graph, self.account, config, HUB, self)

    async def verify(self) -> None:
        """Read the Inbox folder once: proves the mail permissions were granted."""
        await self._client().get_json(f"{self.root}/mailFolders/{INBOX}", {"$select": "id"})

    async def close(self) -> None:
        subs, self._subs = self._subs, None
        if subs is not None:
            subs.detach()
        graph, self._graph = self._graph, None
        if graph is not None:
            await graph.aclose()
        tokens, self._tokens = self._tokens, None
        if tokens is not None:
            tokens.close()

    def _client(self) -> GraphClient:
        if self._graph is None:
            raise ProviderProtocolError("the Outlook provider is not open")
        return self._graph

    # ---- reading ------------------------------------------------------------------------

    async def folders(self) -> list[Folder]:
        return [Folder(INBOX, "inbox"), Folder(SENT_ITEMS, "sent")]

    async def changes(
        self, folder: Folder, cursor: Mapping[str, Any] | None, limit: int = 250
    ) -> ChangeBatch:
        delta = FolderDelta(self._client(), folder.name, self.config.page_size)
        return await delta.changes(cursor, limit)

    async def fetch(self, folder: Folder, ref: str) -> bytes:
        """The MIME of message ``ref`` (an immutable id; the folder does not matter)."""
        try:
            response = await self._client().request(
                "GET", f"{self.root}/messages/{quote(ref, safe='')}/$value"
            )
        except GraphRequestError as exc:
            if exc.status == 404:
                raise ProviderProtocolError(
                    f"message {ref[:24]}... is no longer in the mailbox"
                ) from None
            raise
        return response.content

    # ---- writing ------------------------------------------------------------------------

    async def send(self, mail: OutgoingMail, checkpoint: Checkpoint) -> None:
        await Sender(self._client(), self.config.send_settle_seconds).send(mail, checkpoint)

    async def find_sent(self, message_id: str) -> bool:
        return await Sender(self._client(), self.config.send_settle_seconds).find_sent(message_id)

    async def forget(self) -> None:
        """Delete this connection's Graph subscriptions (at disconnect, R6), also
        from a process that serves no notification endpoint."""
        subs = self._subs or Subscriptions(
            self._client(), self.account, self.config, NotificationHub(), self
        )
        await subs.remove_all()

    # ---- waiting ------------------------------------------------------------------------

    async def wait_for_changes(self, timeout: float) -> bool:
        """Wait for a change notification (True), :meth:`wake` or ``timeout`` (False).

        Subscriptions are created and renewed here when the host serves a
        notification endpoint; without one this is a plain, wakeable sleep.
        """
        if timeout <= 0:
            return False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if self._subs is not None and (
                self._subs.flagged or loop.time() >= self._next_maintenance
            ):
                await self._maintain(loop)
            if self._change_pending:
                self._change_pending = False
                return True
            if self._wake_pending:
                self._wake_pending = False
                return False
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            self._signal.clear()
            try:
                await asyncio.wait_for(self._signal.wait(), remaining)
            except TimeoutError:
                return False

    async def _maintain(self, loop: asyncio.AbstractEventLoop) -> None:
        assert self._subs is not None
        self._next_maintenance = loop.time() + MAINTENANCE_SECONDS
        try:
            await self._subs.maintain()
        except ProviderError as exc:
            # Notifications only save time; polling goes on without them.
            log.warning("Graph subscriptions could not be kept: %s", exc,
                        extra={"mailbox": self.account.email})

    def wake(self) -> None:
        self._wake_pending = True
        self._signal.set()

    def notified(self, subscription_id: str, lifecycle_event: str | None) -> None:
        """Called by the :class:`NotificationHub`, from any thread."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        loop.call_soon_threadsafe(self._on_notification, subscription_id, lifecycle_event)

    def _on_notification(self, subscription_id: str, lifecycle_event: str | None) -> None:
        if lifecycle_event not in (None, "missed") and self._subs is not None:
            self._subs.flag(subscription_id, str(lifecycle_event))
        if lifecycle_event != REAUTHORIZE:
            self._change_pending = True  # a change, or changes possibly missed
        self._signal.set()


def _client_secret(
    config: OutlookConfig, settings: Mapping[str, Any]
) -> str:
    # The kernel reads ``client_secret_env`` into ``client_secret`` (app-wide
    # secrets are read per process); without it, say which variable is missing.
    return str(settings.get("client_secret") or "") or config.client_secret({})


async def _account(
    config: OutlookConfig,
    email: str,
    signed: SignIn,
    secret: str | None,
    settings: Mapping[str, Any],
    shared: bool = False,
) -> Account:
    """The connection's account once ``signed`` is known to own ``email`` (or, for
    a shared mailbox, to have access to it). The app's client secret is not kept
    with the connection: the kernel hands it to the provider with its settings,
    so rotating it needs no reconnect."""
    if shared:
        await _check_delegate(config, email, signed)
    else:
        await _check_address(config, email, signed)
    values: dict[str, Any] = {"client_kind": signed.client_kind,
                              "home_account_id": signed.home_account_id}
    if shared:
        values["shared"] = True
    return Account(email=email, settings=values, secrets={"token_cache": signed.cache})


def _root(email: str, shared: bool) -> str:
    return f"users/{quote(email, safe='@')}" if shared else "me"


async def _check_delegate(config: OutlookConfig, email: str, signed: SignIn) -> None:
    """Refuse a sign-in that cannot open the shared mailbox ``email``."""

    async def token(_force: bool) -> str:
        return signed.access_token

    tls = await asyncio.to_thread(client_tls, config.ca_file)
    graph = GraphClient(config.graph_url, token, mailbox=email, tls=tls,
                        timeout=config.timeout_seconds, max_retries=config.max_retries,
                        max_retry_wait=config.max_retry_wait_seconds, root=_root(email, True),
                        slots=shared_slots(config.concurrency_key(email), config.max_concurrency))
    try:
        await graph.get_json(f"{graph.root}/mailFolders/{INBOX}", {"$select": "id"})
    except (GraphRequestError, AuthenticationFailed) as exc:
        if isinstance(exc, GraphRequestError) and exc.status not in (403, 404):
            raise
        who = signed.claims.get("preferred_username", "the account that signed in")
        raise AuthenticationFailed(
            f"{who} has no access to the mailbox {email}: ask its owner or an administrator "
            "for full access (and send-as) rights, then connect again"
        ) from None
    finally:
        await graph.aclose()


async def _check_address(config: OutlookConfig, email: str, signed: SignIn) -> None:
    """Refuse a sign-in whose account does not own ``email``."""

    async def token(_force: bool) -> str:
        return signed.access_token

    tls = await asyncio.to_thread(client_tls, config.ca_file)
    graph = GraphClient(config.graph_url, token, mailbox=email, tls=tls,
                        timeout=config.timeout_seconds, max_retries=config.max_retries,
                        max_retry_wait=config.max_retry_wait_seconds,
                        slots=shared_slots(config.concurrency_key(email), config.max_concurrency))
    try:
        me = await graph.get_json("me", {"$select": "mail,userPrincipalName,proxyAddresses"})
    finally:
        await graph.aclose()
    owned = {str(me.get("mail") or "").lower(), str(me.get("userPrincipalName") or "").lower()}
    for proxy in me.get("proxyAddresses") or []:
        owned.add(str(proxy).split(":", 1)[-1].lower())
    for claim in ("preferred_username", "email"):  # the ID token says the same account
        owned.add(str(signed.claims.get(claim) or "").lower())
    owned.discard("")
    if email.lower() not in owned:
        who = me.get("mail") or me.get("userPrincipalName") or signed.claims.get(
            "preferred_username", "another account"
        )
        raise AuthenticationFailed(
            f"the Microsoft account that signed in is {who}, not {email}: "
            f"sign in with the account of {email} to connect it"
        )
