"""The built-in ``outlook`` provider: Microsoft 365 and outlook.com mailboxes
through Microsoft Graph, with OAuth 2.0 sign-in by MSAL.

Loaded through the ``threadsync`` entry-point group like any third-party plugin.
Modules: :mod:`.provider` (the Provider), :mod:`.config` (the ``[outlook]``
section), :mod:`.auth` (MSAL sign-in and token refresh), :mod:`.loopback` (the
sign-in redirect listener), :mod:`.graph` (the HTTP client: throttling,
batching, errors), :mod:`.changes` (delta queries), :mod:`.sending` (drafts from
MIME), :mod:`.notifications` (change notifications and subscriptions). Besides
the provider, the plugin declares its config section and, when Outlook is
configured, serves Graph's change notifications at ``/notifications/outlook``
through the HTTP API.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import fields
from typing import Any

from threadsync.core.hookspecs import hookimpl
from threadsync.core.host.routes import PluginRoute, RouteReply, RouteRequest
from threadsync.core.provider import Provider
from threadsync.plugins.outlook.config import OutlookConfig
from threadsync.plugins.outlook.notifications import HUB, NotificationHub, NotificationReply
from threadsync.plugins.outlook.provider import OutlookProvider

__all__ = ["HUB", "NotificationHub", "NotificationReply", "OutlookProvider", "register_providers"]

#: Graph's notification bodies are small; anything larger is not from Graph.
NOTIFICATION_BODY_LIMIT = 1024 * 1024


@hookimpl
def register_providers(register: Callable[[type[Provider]], None]) -> None:
    """Register :class:`OutlookProvider` as ``outlook``."""
    register(OutlookProvider)


@hookimpl
def config_sections() -> Mapping[str, Collection[str]]:
    return {"outlook": [f.name for f in fields(OutlookConfig)]}


@hookimpl
def register_routes(threadsync: Any) -> list[PluginRoute]:
    """``/notifications/outlook`` for Graph, only where Outlook is configured."""
    if not threadsync.settings.section("outlook"):
        return []

    async def notified(request: RouteRequest) -> RouteReply:
        answer = HUB.handle(request.body, request.query)
        # The validation token is echoed as text: never let a browser sniff it.
        return RouteReply(
            answer.status,
            answer.content_type,
            answer.body,
            {"X-Content-Type-Options": "nosniff"},
        )

    HUB.serve_for_good()
    return [PluginRoute("/notifications/outlook", ("POST",), notified, NOTIFICATION_BODY_LIMIT)]
