"""Settings of the local mail system: the ``[mailserver]`` section and ``--user`` options.

Everything has a default that works with the embedded ``config.toml``: the SMTP
port is the one ``[outbound.default]`` names when that relay is on loopback (so
the same server is the CRM's relay), IMAP listens on 1143, mail lives in
``var/mail`` beside the config file. Users come from ``--user ADDR:PASSWORD`` on
the command line or from ``users = [{email = ..., password_env = ...}]`` in the
section (passwords never live in the file); once added they are kept, hashed,
in the data folder, so a restart needs no ``--user`` again.

::

    [mailserver]
    data_dir = "var/mail"
    host = "127.0.0.1"
    smtp_port = 2525
    imap_port = 1143
    relay_senders = ["crm@threadsync.local"]   # may send unauthenticated from loopback
    users = [{ email = "alice@example.test", password_env = "ALICE_PASSWORD" }]
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from threadsync.core.config import Settings, is_loopback
from threadsync.core.errors import ConfigError, InvalidInput

DEFAULT_SMTP_PORT = 2525
DEFAULT_IMAP_PORT = 1143
DEFAULT_DATA_DIR = "var/mail"

_ADDRESS = re.compile(r"[A-Za-z0-9.!#$%&'*+=?^_`{|}~-]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*")


@dataclass(frozen=True)
class UserSpec:
    """A mailbox to create (or whose password to set) when the system starts."""

    email: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class MailserverSettings:
    """Where the local mail system keeps its files and where it listens.

    A port of 0 picks a free port (tests, the demo); the chosen ports are on
    :class:`threadsync.plugins.localmail.system.MailSystem` once it has started.
    """

    data_dir: Path
    host: str = "127.0.0.1"
    smtp_port: int = DEFAULT_SMTP_PORT
    imap_port: int = DEFAULT_IMAP_PORT
    users: tuple[UserSpec, ...] = ()
    relay_senders: tuple[str, ...] = ("crm@threadsync.local",)

    @property
    def outside_dir(self) -> Path:
        """The outside world's Maildir (see :mod:`threadsync.plugins.localmail.outside`)."""
        return self.data_dir / "outside"


def check_email(email: str) -> str:
    """A plain ``local@domain`` address, lower-cased; ``InvalidInput`` otherwise."""
    value = email.strip().lower()
    if not _ADDRESS.fullmatch(value) or value.startswith(".") or ".." in value:
        raise InvalidInput(f"{email!r} is not a plain e-mail address (local@domain)")
    return value


def parse_user(spec: str) -> UserSpec:
    """``ADDR:PASSWORD`` (the password may contain colons) as given to ``--user``."""
    email, sep, password = spec.partition(":")
    if not sep or not password:
        raise InvalidInput("--user takes ADDRESS:PASSWORD, e.g. alice@example.test:secret")
    if any(c in password for c in "\r\n\0"):
        raise InvalidInput("a password must not contain line breaks")
    return UserSpec(check_email(email), password)


def _port(section: Mapping[str, Any], key: str, default: int) -> int:
    value = section.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 65536:
        raise ConfigError(f"[mailserver] {key} must be a port number (0 picks a free one)")
    return value


def _users(section: Mapping[str, Any], environ: Mapping[str, str]) -> tuple[UserSpec, ...]:
    entries = section.get("users", [])
    if not isinstance(entries, list):
        raise ConfigError("[mailserver] users must be a list of {email, password_env}")
    users = []
    for entry in entries:
        if not isinstance(entry, dict) or not {"email", "password_env"} <= set(entry):
            raise ConfigError("[mailserver] users entries need email and password_env")
        var = str(entry["password_env"])
        if not environ.get(var):
            raise ConfigError(
                f"environment variable {var} (password of {entry['email']}) is not set"
            )
        try:
            users.append(UserSpec(check_email(str(entry["email"])), environ[var]))
        except InvalidInput as exc:
            raise ConfigError(f"[mailserver] users: {exc}") from None
    return tuple(users)


def from_config(settings: Settings, environ: Mapping[str, str]) -> MailserverSettings:
    """The ``[mailserver]`` section of a loaded config, with defaults that match the
    rest of it. Relative paths are relative to the config file's folder."""
    section = settings.section("mailserver")
    base = settings.path.resolve().parent if settings.path is not None else Path.cwd()
    data_dir = section.get("data_dir", DEFAULT_DATA_DIR)
    host = section.get("host", "127.0.0.1")
    if not isinstance(data_dir, str) or not data_dir.strip():
        raise ConfigError("[mailserver] data_dir must be a folder name")
    if not isinstance(host, str) or not host.strip():
        raise ConfigError("[mailserver] host must be a host name or address")
    relay = settings.default_channel
    smtp_default = relay.port if is_loopback(relay.host) else DEFAULT_SMTP_PORT
    senders = section.get("relay_senders", [relay.from_address])
    if not isinstance(senders, list) or not all(isinstance(s, str) for s in senders):
        raise ConfigError("[mailserver] relay_senders must be a list of addresses")
    return MailserverSettings(
        data_dir=(base / data_dir).resolve(),
        host=host,
        smtp_port=_port(section, "smtp_port", smtp_default),
        imap_port=_port(section, "imap_port", DEFAULT_IMAP_PORT),
        users=_users(section, environ),
        relay_senders=tuple(s.lower() for s in senders),
    )


def for_command(
    settings: Settings,
    environ: Mapping[str, str],
    *,
    users: Sequence[str] = (),
    data_dir: Path | None = None,
    host: str | None = None,
    smtp_port: int | None = None,
    imap_port: int | None = None,
) -> MailserverSettings:
    """``[mailserver]`` with the command line's options on top."""
    base = from_config(settings, environ)
    for name, port in (("--smtp-port", smtp_port), ("--imap-port", imap_port)):
        if port is not None and not 0 <= port < 65536:
            raise InvalidInput(f"{name} must be a port number (0 picks a free one)")
    return replace(
        base,
        data_dir=data_dir.resolve() if data_dir is not None else base.data_dir,
        host=host or base.host,
        smtp_port=base.smtp_port if smtp_port is None else smtp_port,
        imap_port=base.imap_port if imap_port is None else imap_port,
        users=(*base.users, *(parse_user(spec) for spec in users)),
    )
