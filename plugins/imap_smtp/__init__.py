"""The built-in ``imap_smtp`` provider: any mailbox over IMAP (reading) and SMTP (sending).

Loaded through the ``threadsync`` entry-point group like any third-party plugin.
Modules: :mod:`.provider` (the Provider), :mod:`.options` (connect options),
:mod:`.imap` (typed IMAP session), :mod:`.imap_syntax` (quoting and parsing),
:mod:`.wire` (aioimaplib protocol fixes), :mod:`.smtp` (sending), :mod:`.tls`.
"""

from __future__ import annotations

from collections.abc import Callable

from threadsync.core.hookspecs import hookimpl
from threadsync.core.provider import Provider
from threadsync.plugins.imap_smtp.provider import ImapSmtpProvider

__all__ = ["ImapSmtpProvider", "register_providers"]


@hookimpl
def register_providers(register: Callable[[type[Provider]], None]) -> None:
    """Register :class:`ImapSmtpProvider` as ``imap_smtp``."""
    register(ImapSmtpProvider)
