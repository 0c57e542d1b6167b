"""Connect options of the ``imap_smtp`` provider and their validation.

:data:`OPTIONS` is what ``connect`` accepts (the CLI shows ``--imap-host`` and so
on). :meth:`MailboxSettings.from_account` turns the stored settings into typed,
checked values: ports defaulted by security, ``none`` only towards loopback
(R11), credentials present for the chosen ``auth``, the CA file readable. It is
used both when connecting (``prepare``, no network) and on every start.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

from threadsync.core.config import SECURITY_CHOICES, check_security
from threadsync.core.errors import ConfigError, InvalidInput
from threadsync.core.provider import Account, ProviderOption, option_bool

AUTH_CHOICES = ("password", "xoauth2")
_IMAP_PORTS = {"tls": 993, "starttls": 143, "none": 143}
_SMTP_PORTS = {"tls": 465, "starttls": 587, "none": 25}

OPTIONS: tuple[ProviderOption, ...] = (
    ProviderOption("imap_host", "IMAP server host name", required=True),
    ProviderOption("imap_port", "IMAP port (default 993 with tls, 143 otherwise)", type=int),
    ProviderOption("smtp_host", "SMTP submission server host name", required=True),
    ProviderOption(
        "smtp_port", "SMTP port (default 465 with tls, 587 with starttls, 25 with none)", type=int
    ),
    ProviderOption("username", "login name for IMAP and SMTP (default: the email address)"),
    ProviderOption("password_env", "environment variable holding the password", secret_env=True),
    ProviderOption(
        "security",
        "tls, starttls or none (plaintext, loopback hosts only)",
        default="tls",
        choices=SECURITY_CHOICES,
    ),
    ProviderOption("sent_folder", "name of the Sent folder, instead of discovering it"),
    ProviderOption("auth", "password or xoauth2", default="password", choices=AUTH_CHOICES),
    ProviderOption(
        "access_token_env",
        "environment variable holding an OAuth 2.0 access token (auth xoauth2)",
        secret_env=True,
    ),
    ProviderOption("ca_file", "extra trusted CA certificate file (PEM) for a private CA"),
    ProviderOption(
        "append_sent",
        "file a copy of sent mail in Sent: true, or false when the server does it itself",
        default="true",
    ),
)


@dataclass(frozen=True)
class MailboxSettings:
    """The checked, non-secret settings of one connection."""

    imap_host: str
    imap_port: int
    smtp_host: str
    smtp_port: int
    username: str
    security: str
    auth: str
    sent_folder: str | None
    ca_file: str | None
    append_sent: bool

    @classmethod
    def from_account(cls, account: Account) -> MailboxSettings:
        """Validate ``account`` (settings and the presence of its secrets)."""
        s = account.settings
        security = str(s.get("security") or "tls")
        auth = str(s.get("auth") or "password")
        if auth not in AUTH_CHOICES:
            raise ConfigError(f"auth must be password or xoauth2, not {auth!r}")
        imap_host = _host(s.get("imap_host"), "--imap-host")
        smtp_host = _host(s.get("smtp_host"), "--smtp-host")
        check_security(security, imap_host, "imap_smtp IMAP")
        check_security(security, smtp_host, "imap_smtp SMTP")
        secret = "password" if auth == "password" else "access_token"
        if not account.secrets.get(secret):
            flag = "--password-env" if auth == "password" else "--access-token-env"
            raise ConfigError(f"imap_smtp with auth {auth} needs {flag} VAR (a non-empty value)")
        username = str(s.get("username") or account.email)
        _one_line("username", username)
        _one_line(secret, account.secrets[secret])
        ca_file = s.get("ca_file") or None
        if ca_file is not None:
            ca_file = os.path.abspath(str(ca_file))
            if not os.path.isfile(ca_file):
                raise ConfigError(f"CA file {ca_file} does not exist")
        sent = str(s.get("sent_folder") or "").strip() or None
        return cls(
            imap_host=imap_host,
            imap_port=_port(s.get("imap_port"), _IMAP_PORTS[security], "--imap-port"),
            smtp_host=smtp_host,
            smtp_port=_port(s.get("smtp_port"), _SMTP_PORTS[security], "--smtp-port"),
            username=username,
            security=security,
            auth=auth,
            sent_folder=sent,
            ca_file=ca_file,
            append_sent=option_bool(s.get("append_sent", True), "--append-sent"),
        )

    def as_settings(self) -> dict[str, Any]:
        """The normalised values, as stored in ``Account.settings``."""
        return asdict(self)


def _one_line(name: str, value: str) -> None:
    """IMAP LOGIN and SMTP AUTH cannot carry CR, LF or NUL: such a value would end
    the command early (an injection), so it is the caller's mistake, refused
    before any network call. The message names the field, never the value."""
    if any(c in value for c in "\r\n\x00"):
        raise InvalidInput(f"{name} must not contain line breaks or NUL characters")


def _host(value: Any, flag: str) -> str:
    host = str(value or "").strip()
    if not host or any(c.isspace() for c in host):
        raise ConfigError(f"imap_smtp needs a valid {flag}")
    return host


def _port(value: Any, default: int, flag: str) -> int:
    if value is None or value == "":
        return default
    try:
        port = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{flag} must be a number, not {value!r}") from None
    if isinstance(value, bool) or not 0 < port < 65536:
        raise ConfigError(f"{flag} must be between 1 and 65535, not {value!r}")
    return port



def secrets_of(account: Account, auth: str) -> tuple[str | None, str | None]:
    """``(password, access_token)`` for the chosen ``auth``; the other is None."""
    if auth == "xoauth2":
        return None, account.secrets.get("access_token")
    return account.secrets.get("password"), None


def normalise(account: Account) -> Account:
    """Replace ``account.settings`` with the validated, defaulted values."""
    checked = MailboxSettings.from_account(account)
    account.settings = checked.as_settings()
    return account
