"""Endpoints that outside services call: provider change notifications, as a
registry that providers plug into.

``/notifications/{provider}`` hands the raw body and query to the handler
registered under the provider's name and answers what it returns. The built-in
``outlook`` handler is the Outlook plugin's
:class:`threadsync.plugins.outlook.notifications.NotificationHub`: it echoes Graph's
``validationToken`` as ``text/plain``, checks each notification's
``clientState`` and answers ``202`` at once after waking the subscribed
connection (the sync loop does the work). The hub is put into the kernel's
``[outlook]`` provider settings, where the provider looks for it.

``/oauth/callback`` needs no registry: a provider that signs in through a
browser redirect implements ``begin_consent`` / ``finish_consent`` (see
:mod:`threadsync.core.provider`), and the kernel's
:mod:`threadsync.core.accounts.consent` finds the sign-in
by the redirect's ``state``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

log = logging.getLogger(__name__)


class Reply(Protocol):
    """What a notification or callback handler answers (``NotificationReply``)."""

    @property
    def status(self) -> int: ...

    @property
    def content_type(self) -> str: ...

    @property
    def body(self) -> str: ...


NotificationHandler = Callable[[bytes, Mapping[str, str]], Reply]


@dataclass
class Hosted:
    notifications: dict[str, NotificationHandler] = field(default_factory=dict)

    def add_notification_handler(self, provider: str, handler: NotificationHandler) -> None:
        self.notifications[provider] = handler


def install_outlook(hosted: Hosted, provider_settings: dict[str, dict[str, Any]]) -> bool:
    """Route ``/notifications/outlook`` to a new hub that Outlook connections of
    this process subscribe through. False when the Outlook plugin is absent or
    ``[outlook]`` is not configured (no ``client_id``): then nothing answers
    Graph's handshake, so the endpoint cannot echo text for anybody."""
    if not provider_settings.get("outlook", {}).get("client_id"):
        log.info("Outlook is not configured: no Graph notification endpoint")
        return False
    try:
        from threadsync.plugins.outlook.notifications import NotificationHub
    except ImportError:
        log.info("the Outlook plugin is not installed: no Graph notification endpoint")
        return False
    section = provider_settings.setdefault("outlook", {})
    hub = section.get("notification_hub")
    if not isinstance(hub, NotificationHub):
        hub = NotificationHub()
        section["notification_hub"] = hub
    hosted.add_notification_handler("outlook", hub.handle)
    return True
