"""A small but real local mail system, and the demo that runs threadsync on it.

``threadsync mailserver`` starts :class:`~threadsync.plugins.localmail.system.MailSystem`:
SMTP on aiosmtpd (submission with AUTH, the CRM's relay, local delivery) and
IMAP on pymap over the same Maildirs, so the ``imap_smtp`` provider works
against it unchanged. Mail to anyone who is not a local user is kept in the
"outside world" (:mod:`.outside`). ``threadsync demo`` (:mod:`.demo`) tells the
whole product story on it. This package registers no provider: it is a peer
for trying threadsync out and for tests, not a mailbox kind.
"""

from __future__ import annotations

from threadsync.core.errors import ConfigError
from threadsync.plugins.localmail.commands import config_sections, register_commands

try:
    import pymap  # noqa: F401  (the IMAP server of the local mail system)
except ImportError:  # pragma: no cover - pymap is installed with threadsync
    raise ConfigError(
        "the local mail system needs pymap, which is missing: pip install pymap"
    ) from None

from threadsync.plugins.localmail.outside import OutsideMessage, list_outside
from threadsync.plugins.localmail.settings import (
    MailserverSettings,
    UserSpec,
    from_config,
    parse_user,
)
from threadsync.plugins.localmail.system import MailSystem, MailSystemThread

__all__ = [
    "MailSystem",
    "MailSystemThread",
    "MailserverSettings",
    "OutsideMessage",
    "UserSpec",
    "config_sections",
    "from_config",
    "list_outside",
    "parse_user",
    "register_commands",
]
