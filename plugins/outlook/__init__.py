"""The built-in ``outlook`` provider: Microsoft 365 and outlook.com mailboxes
through Microsoft Graph, with OAuth 2.0 sign-in by MSAL.

Loaded through the ``threadsync`` entry-point group like any third-party plugin.
Modules: :mod:`.provider` (the Provider), :mod:`.config` (the ``[outlook]``
section), :mod:`.auth` (MSAL sign-in and token refresh), :mod:`.loopback` (the
sign-in redirect listener), :mod:`.graph` (the HTTP client: throttling,
batching, errors), :mod:`.changes` (delta queries), :mod:`.sending` (drafts from
MIME), :mod:`.notifications` (change notifications and subscriptions).
"""

from __future__ import annotations

from collections.abc import Callable

from threadsync.core.hookspecs import hookimpl
from threadsync.core.provider import Provider
from threadsync.plugins.outlook.notifications import NotificationHub, NotificationReply
from threadsync.plugins.outlook.provider import OutlookProvider

__all__ = ["NotificationHub", "NotificationReply", "OutlookProvider", "register_providers"]


@hookimpl
def register_providers(register: Callable[[type[Provider]], None]) -> None:
    """Register :class:`OutlookProvider` as ``outlook``."""
    register(OutlookProvider)
