"""The built-in ``exchange`` provider: mailboxes on an on-premises Exchange Server
through Exchange Web Services, with exchangelib.

Loaded through the ``threadsync`` entry-point group like any plugin. Modules:
:mod:`.provider` (the Provider and its connect options), :mod:`.ews` (the
exchangelib account, the worker pool, error translation), :mod:`.reading`
(SyncFolderItems and GetItem), :mod:`.sending` (CreateItem with SendAndSaveCopy,
FindItem in Sent Items), :mod:`.push` (pull subscription), :mod:`.autodiscover`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping

from threadsync.core.hookspecs import hookimpl
from threadsync.core.provider import Provider
from threadsync.plugins.exchange.provider import ExchangeProvider

__all__ = ["SETTINGS_KEYS", "ExchangeProvider", "config_sections", "register_providers"]

#: The keys of ``[exchange]`` (see :mod:`.provider` and :mod:`.oauth`).
SETTINGS_KEYS = (
    "timeout_seconds", "max_retry_wait_seconds", "event_poll_seconds",
    "client_id", "tenant", "authority_host", "oauth_scope", "identity_ca_file",
    "sign_in_timeout_seconds",
)


@hookimpl
def register_providers(register: Callable[[type[Provider]], None]) -> None:
    """Register :class:`ExchangeProvider` as ``exchange``."""
    register(ExchangeProvider)


@hookimpl
def config_sections() -> Mapping[str, Collection[str]]:
    """``[exchange]`` and its keys."""
    return {"exchange": SETTINGS_KEYS}
