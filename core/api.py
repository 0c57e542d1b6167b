"""The Python API: everything the command line does, importable and async.

A CRM that embeds threadsync in-process uses :class:`Threadsync`::

    from threadsync import Threadsync, Draft

    ts = Threadsync.from_config("config.toml", plugins=[MyEventHandlers()])
    ts.init()
    ts.labs("acme", enabled=True)
    await ts.connect("acme", "u1", "imap_smtp", email="me@example.com", options={...})
    sent = await ts.send("acme", "u1", Draft(to=["c@example.org"], subject="Hi", text="..."))
    await ts.run_once()

Host events arrive through the hooks in :mod:`threadsync.core.hookspecs` on the plugins
passed in.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from threadsync.core.accounts import connections as accounts
from threadsync.core.accounts import consent
from threadsync.core.config import Settings, load
from threadsync.core.host import apikeys, ratelimits, reports, views, webhooks
from threadsync.core.host.routes import PluginRoute
from threadsync.core.kernel import Kernel
from threadsync.core.outbox import compose
from threadsync.core.outbox.compose import Draft
from threadsync.core.provider import ProviderOption
from threadsync.core.store import keys
from threadsync.core.store.database import Store
from threadsync.core.sync import daemon, workers


def _log_notice(text: str) -> None:
    logging.getLogger("threadsync").warning("%s", text)


class Threadsync:
    """One threadsync instance over one database and one secret key."""

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        #: API keys and idempotency records (the HTTP API's).
        self.api_keys = apikeys.ApiKeys(kernel.store)
        self.rate_limits = ratelimits.RateLimits(kernel.store)
        #: Webhook endpoints, deliveries and the queue.
        self.webhooks = webhooks.Webhooks(kernel)

    @property
    def settings(self) -> Settings:
        return self.kernel.settings

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        plugins: Iterable[object] = (),
        load_entry_points: bool = True,
        environ: Mapping[str, str] | None = None,
    ) -> Threadsync:
        return cls(
            Kernel.build(
                settings,
                plugins=tuple(plugins),
                load_entry_points=load_entry_points,
                environ=environ,
            )
        )

    @classmethod
    def from_config(cls, path: str | Path | None = None, **kwargs: Any) -> Threadsync:
        return cls.from_settings(load(path), **kwargs)

    @staticmethod
    def init(settings: Settings) -> dict[str, Any]:
        """Create or upgrade the database and the secret key; idempotent. Never
        makes a new key while secrets encrypted with a lost one are stored."""
        store = Store(settings.database_url)
        try:
            store.upgrade()
            revision = store.current_revision()
            made_key = keys.ensure_key(store, settings.secret_key_file)
        finally:
            store.dispose()
        return {
            "database": "ready",
            "revision": revision,
            "secret_key_file": str(settings.secret_key_file),
            "secret_key_created": made_key,
        }

    @staticmethod
    def rotate_key(settings: Settings) -> dict[str, Any]:
        """Re-encrypt every stored secret under a new secret key, in one
        transaction, then keep only the new key. Stop other processes first:
        they hold the old key in memory."""
        store = Store(settings.database_url)
        try:
            return keys.rotate(store, settings.secret_key_file)
        finally:
            store.dispose()

    def check_ready(self) -> None:
        self.kernel.store.check_ready()

    def close(self) -> None:
        """Release the database. Call :meth:`aclose` first from async code, so
        that mailbox sessions kept open between sends are logged out."""
        self.kernel.store.dispose()

    async def aclose(self) -> None:
        """Log out of every mailbox session kept open, then release the database."""
        await self.close_sessions()
        self.close()

    async def close_sessions(self) -> None:
        """Log out of the mailbox sessions kept open between sends on this event loop."""
        await self.kernel.pool.aclose()

    def provider_options(self, provider: str) -> tuple[ProviderOption, ...]:
        """The connect options of a registered provider (``NotFound``-like
        ``ConfigError`` for an unknown name)."""
        return tuple(self.kernel.provider_class(provider).options)

    # ---- Labs ------------------------------------------------------------------------

    def labs(self, subaccount: str, *, enabled: bool) -> dict[str, Any]:
        return accounts.set_labs(self.kernel, subaccount, enabled)

    def labs_status(self, subaccount: str) -> dict[str, Any]:
        return accounts.labs_status(self.kernel, subaccount)

    # ---- connections -------------------------------------------------------------------

    async def connect(
        self,
        subaccount: str,
        user: str,
        provider: str,
        *,
        email: str,
        options: Mapping[str, Any],
        notify: Callable[[str], None] = _log_notice,
        credentials: Mapping[str, str] | None = None,
        tenant: bool = False,
    ) -> dict[str, Any]:
        """Connect a mailbox. ``notify`` shows what an interactive sign-in needs
        (a consent URL or a device code). ``credentials`` gives secrets directly,
        by name without ``_env`` (``{"password": ...}``), instead of naming
        environment variables in ``options`` (``password_env``). ``tenant``: the
        caller acts for a tenant, so the hosts it names are held to the
        ``[network]`` policy (no internal addresses unless allowed)."""
        return await accounts.connect(
            self.kernel, subaccount, user, provider, email, options, notify, credentials,
            tenant,
        )  # fmt: skip

    async def update_email(
        self,
        subaccount: str,
        user: str,
        provider: str,
        *,
        email: str,
        options: Mapping[str, Any],
        notify: Callable[[str], None] = _log_notice,
        credentials: Mapping[str, str] | None = None,
        tenant: bool = False,
    ) -> dict[str, Any]:
        """Replace the user's connected address (R7); ``credentials`` and ``tenant``
        as in :meth:`connect`."""
        return await accounts.update_email(
            self.kernel, subaccount, user, provider, email, options, notify, credentials,
            tenant,
        )  # fmt: skip

    async def begin_sign_in(
        self,
        subaccount: str,
        user: str,
        provider: str,
        *,
        email: str,
        options: Mapping[str, Any],
        redirect_uri: str,
        update: bool = False,
        credentials: Mapping[str, str] | None = None,
    ) -> dict[str, Any] | None:
        """Start a connect (or update-email with ``update``) that the user finishes
        in a browser coming back to ``redirect_uri``: the pending sign-in with its
        ``consent_url``, or ``None`` when this provider and these options sign in
        without a redirect (use :meth:`connect`). ``credentials`` as in
        :meth:`connect`, kept encrypted with the sign-in for its second half."""
        return await consent.begin(
            self.kernel, subaccount, user, provider, email, options, redirect_uri,
            update=update, credentials=credentials,
        )  # fmt: skip

    async def finish_sign_in(self, params: Mapping[str, str]) -> dict[str, Any]:
        """Finish the sign-in named by the redirect's ``state`` with its parameters."""
        return await consent.finish(self.kernel, params)

    def sign_in(self, subaccount: str, sign_in_id: str) -> dict[str, Any]:
        """A sign-in started by :meth:`begin_sign_in` (NotFound for another sub-account)."""
        return consent.get(self.kernel, subaccount, sign_in_id)

    async def disconnect(self, subaccount: str, user: str) -> dict[str, Any]:
        return await accounts.disconnect(self.kernel, subaccount, user)

    def status(self, subaccount: str, user: str | None = None) -> dict[str, Any]:
        return accounts.status(self.kernel, subaccount, user)

    # ---- mail ------------------------------------------------------------------------

    async def send(
        self, subaccount: str, user: str, draft: Draft, *, idempotency_key: str | None = None
    ) -> dict[str, Any]:
        """Start a thread from the CRM. With ``idempotency_key``, calling again
        (after a timeout, a crash) returns the first call's message and never
        sends a second one."""
        return await compose.send(self.kernel, subaccount, user, draft, idempotency_key)

    async def reply(
        self, thread_id: str, draft: Draft, *, idempotency_key: str | None = None
    ) -> dict[str, Any]:
        """Reply in a thread; ``idempotency_key`` as for :meth:`send`."""
        return await compose.reply(self.kernel, thread_id, draft, idempotency_key)

    def threads(self, subaccount: str, user: str | None = None) -> dict[str, Any]:
        return views.threads(self.kernel, subaccount, user)

    def thread(self, thread_id: str, subaccount: str | None = None) -> dict[str, Any]:
        return views.thread(self.kernel, thread_id, subaccount)

    def events(self, subaccount: str, after: int = 0, limit: int = 100) -> dict[str, Any]:
        return views.events(self.kernel, subaccount, after, limit)

    def attachment(
        self, thread_id: str, message_id: str, index: int, subaccount: str | None = None
    ) -> views.AttachmentContent:
        """Attachment ``index`` (0-based, as the thread lists them) of a message; only
        synced messages keep attachment content (R8), otherwise NotFound."""
        return views.attachment(self.kernel, thread_id, message_id, index, subaccount)

    # ---- the operator's reports (every sub-account) ------------------------------------

    def overview(self, recent: int = 50) -> dict[str, Any]:
        """Connections of every sub-account and the newest messages."""
        return reports.overview(self.kernel, recent)

    def numbers(self) -> reports.Numbers:
        """Counts behind ``/metrics``: messages, connections, sync lag, outbox, errors."""
        return reports.numbers(self.kernel)

    def workers(self) -> dict[str, Any]:
        """The ``run`` processes sharing the connections: each one's heartbeat,
        whether it counts as live and how many connections it holds."""
        return {"workers": workers.list_workers(self.kernel)}

    # ---- the daemon --------------------------------------------------------------------

    async def run_once(self) -> daemon.OnceReport:
        return await daemon.run_once(self.kernel)

    def daemon(self, extra: Iterable[Callable[[], Awaitable[None]]] = ()) -> daemon.Daemon:
        """The daemon; ``extra`` coroutines run beside the sync loop until it stops."""
        return daemon.Daemon(self.kernel, extra=list(extra))

    # ---- plugins -----------------------------------------------------------------------

    def register_plugin(self, plugin: object, name: str | None = None) -> None:
        """Add an in-process plugin (event handlers, say) to this instance."""
        self.kernel.pm.register(plugin, name=name)

    def plugin_routes(self) -> list[PluginRoute]:
        """HTTP endpoints plugins contribute (``register_routes``)."""
        found = self.kernel.pm.hook.register_routes(threadsync=self)
        return [route for routes in found if routes for route in routes]

    def daemon_services(
        self, options: Mapping[str, Any]
    ) -> list[Callable[[], Awaitable[None]]]:
        """Coroutines plugins run beside ``threadsync run`` (``daemon_services``),
        given the values of the run command's options."""
        found = self.kernel.pm.hook.daemon_services(threadsync=self, options=options)
        return [service for services in found if services for service in services]


__all__ = ["Draft", "Threadsync"]
