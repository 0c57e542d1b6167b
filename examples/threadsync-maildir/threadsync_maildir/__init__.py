"""threadsync-maildir: an example third-party provider plugin for threadsync.

Installing the package registers this module in the ``threadsync`` entry-point
group (see ``pyproject.toml``); threadsync then calls :func:`register_providers`
and ``threadsync plugins`` lists the ``maildir`` provider. The provider reads a
local Maildir and sends by dropping files into a pickup folder
(:mod:`threadsync_maildir.provider`).
"""

from __future__ import annotations

from collections.abc import Callable

from threadsync import Provider, hookimpl
from threadsync_maildir.provider import MaildirProvider

__all__ = ["MaildirProvider", "register_providers"]


@hookimpl
def register_providers(register: Callable[[type[Provider]], None]) -> None:
    """Give threadsync the ``maildir`` provider."""
    register(MaildirProvider)
