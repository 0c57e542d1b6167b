"""The default channel: the CRM's own SMTP relay (``[outbound.default]``).

Used whenever a CRM message cannot or must not go through the user's mailbox. It
goes through threadsync's one SMTP client (:mod:`.smtp`), with the same error
map as the mailbox's submission server. TLS verifies certificates; plaintext is
refused by the config loader unless the relay is on loopback (R11).
"""

from __future__ import annotations

import ssl

from threadsync.core.config import DefaultChannel
from threadsync.core.errors import ConfigError
from threadsync.core.outbox.smtp import SmtpEndpoint, SmtpSession
from threadsync.core.provider import Checkpoint, OutgoingMail


def relay_endpoint(channel: DefaultChannel, password: str | None) -> SmtpEndpoint:
    """Where the relay is and how to log in to it (when it has a username)."""
    if channel.username and password is None:
        raise ConfigError(f"[outbound.default] password_env {channel.password_env!r} is not set")
    return SmtpEndpoint(
        host=channel.host,
        port=channel.port,
        security=channel.security,
        ssl_context=ssl.create_default_context() if channel.security != "none" else None,
        username=channel.username or "",
        password=password,
        timeout=channel.timeout_seconds,
        label="relay",
    )


async def send_via_relay(
    channel: DefaultChannel, mail: OutgoingMail, password: str | None, checkpoint: Checkpoint
) -> None:
    """Send ``mail`` through the relay; ``checkpoint`` is awaited inside DATA,
    right before the line that ends it (:func:`threadsync.core.outbox.smtp_data.send_data`)."""
    endpoint = relay_endpoint(channel, password)
    session = SmtpSession()
    try:
        await session.send(endpoint, mail, checkpoint)
    finally:
        await session.close()
