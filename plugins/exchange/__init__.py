"""The built-in ``exchange`` provider: mailboxes on an on-premises Exchange Server
through Exchange Web Services, with exchangelib.

Loaded through the ``threadsync`` entry-point group like any plugin. Modules:
:mod:`.provider` (the Provider and its connect options), :mod:`.ews` (the
exchangelib account, the worker pool, error translation), :mod:`.reading`
(SyncFolderItems and GetItem), :mod:`.sending` (CreateItem with SendAndSaveCopy,
FindItem in Sent Items), :mod:`.push` (pull subscription), :mod:`.autodiscover`.
"""

from __future__ import annotations

from collections.abc import Callable

from threadsync.core.hookspecs import hookimpl
from threadsync.core.provider import Provider
from threadsync.plugins.exchange.provider import ExchangeProvider

__all__ = ["ExchangeProvider", "register_providers"]


@hookimpl
def register_providers(register: Callable[[type[Provider]], None]) -> None:
    """Register :class:`ExchangeProvider` as ``exchange``."""
    register(ExchangeProvider)
