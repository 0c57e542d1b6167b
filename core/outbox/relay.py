"""The default channel: the CRM's own SMTP relay (``[outbound.default]``).

Used whenever a CRM message cannot or must not go through the user's mailbox.
aiosmtplib errors are translated into :mod:`threadsync.core.errors` here. TLS verifies
certificates; plaintext is refused by the config loader unless the relay is on
loopback (R11).
"""

from __future__ import annotations

import ssl

import aiosmtplib

from threadsync.core.config import DefaultChannel
from threadsync.core.errors import (
    AuthenticationFailed,
    ConfigError,
    ProviderProtocolError,
    TransientProviderError,
)
from threadsync.core.outbox.smtp_data import send_data
from threadsync.core.provider import Checkpoint, OutgoingMail


async def send_via_relay(
    channel: DefaultChannel, mail: OutgoingMail, password: str | None, checkpoint: Checkpoint
) -> None:
    """Send ``mail`` through the relay; ``checkpoint`` is awaited inside DATA,
    right before the line that ends it (:func:`threadsync.core.outbox.smtp_data.send_data`)."""
    if channel.username and password is None:
        raise ConfigError(f"[outbound.default] password_env {channel.password_env!r} is not set")
    context = ssl.create_default_context()
    smtp = aiosmtplib.SMTP(
        hostname=channel.host,
        port=channel.port,
        use_tls=channel.security == "tls",
        start_tls=channel.security == "starttls",
        tls_context=context if channel.security != "none" else None,
        timeout=channel.timeout_seconds,
    )
    where = f"relay {channel.host}:{channel.port}"
    try:
        await smtp.connect()
        if channel.username and password is not None:
            await smtp.login(channel.username, password)
        await smtp.mail(mail.sender)
        accepted = 0
        for rcpt in mail.recipients:
            try:
                await smtp.rcpt(rcpt)
                accepted += 1
            except aiosmtplib.SMTPRecipientRefused as exc:
                if exc.code < 500:
                    raise TransientProviderError(f"{where} deferred {rcpt}: {exc.code}") from None
        if not accepted:
            raise ProviderProtocolError(f"{where} refused every recipient")
        await send_data(smtp, mail.raw, checkpoint)
    except aiosmtplib.SMTPAuthenticationError as exc:
        raise AuthenticationFailed(f"{where} rejected the login ({exc.code})") from None
    except aiosmtplib.SMTPResponseException as exc:
        if exc.code >= 500:
            raise ProviderProtocolError(f"{where} refused the message: {exc.code}") from None
        raise TransientProviderError(f"{where} deferred the message: {exc.code}") from None
    except (TimeoutError, aiosmtplib.SMTPException, OSError, ssl.SSLError) as exc:
        raise TransientProviderError(f"{where} unreachable: {exc.__class__.__name__}") from None
    finally:
        if smtp.is_connected:
            try:
                await smtp.quit()
            except (TimeoutError, aiosmtplib.SMTPException, OSError):
                smtp.close()
