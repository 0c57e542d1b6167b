"""Loads ``config.toml`` into typed settings, with clear errors for bad values.

The embedded default (``config.toml`` at the project root) runs as it is. Relative
paths are resolved against the config file's folder. Secrets are never in the
file: ``password_env`` names an environment variable. Nothing below ``core`` reads
the environment or the file itself; settings are passed in.

The kernel's sections (``[database]``, ``[security]``, ``[sync]``,
``[outbound.default]``) are typed here; every other section belongs to a plugin
(``Settings.sections``), which declares it with the ``config_sections`` hook.
:func:`check_sections` refuses a section or key nobody knows, naming the closest
valid one, so that a typo is an error instead of a silently ignored setting.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import tomllib
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from threadsync.core.errors import ConfigError

SECURITY_CHOICES = ("tls", "starttls", "none")


@dataclass(frozen=True)
class DefaultChannel:
    """The CRM's own outbound SMTP relay."""

    host: str = "127.0.0.1"
    port: int = 2525
    security: str = "none"
    from_address: str = "crm@threadsync.local"
    username: str | None = None
    password_env: str | None = None
    timeout_seconds: float = 30.0


@dataclass(frozen=True)
class SyncSettings:
    poll_interval_seconds: float = 30.0
    max_attachment_bytes: int = 3_145_728
    #: A message's whole size as transmitted (inbound and CRM-written). 25 MiB is
    #: the common sending limit of the big mailbox services (Gmail, Exchange Online
    #: by default): larger mail rarely arrives anywhere, and holding it would cost
    #: the shared process its memory.
    max_message_bytes: int = 26_214_400
    message_id_domain: str = "threadsync.local"
    batch_size: int = 250
    backoff_base_seconds: float = 5.0
    backoff_max_seconds: float = 900.0
    idle_seconds: float = 300.0
    lease_seconds: float = 120.0
    #: How often a worker renews its connection leases (several ``run`` processes).
    worker_heartbeat_seconds: float = 10.0
    #: How long a connection lease lasts without renewal: a worker gone for this
    #: long loses its connections to the others.
    worker_lease_seconds: float = 30.0


@dataclass(frozen=True)
class Settings:
    database_url: str
    secret_key_file: Path
    sync: SyncSettings = field(default_factory=SyncSettings)
    default_channel: DefaultChannel = field(default_factory=DefaultChannel)
    #: Every section that is not the kernel's, as written: each belongs to a
    #: plugin (``[http]``) or a provider (``[outlook]``); see :func:`check_sections`.
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)
    path: Path | None = None

    def section(self, name: str) -> dict[str, Any]:
        """A plugin's section (empty when absent)."""
        return self.sections.get(name, {})


#: The kernel's own sections and their keys.
KERNEL_SECTIONS: dict[str, frozenset[str]] = {
    "database": frozenset({"url"}),
    "security": frozenset({"secret_key_file"}),
    "sync": frozenset(f.name for f in fields(SyncSettings)),
    "outbound": frozenset({"default"}),
    "outbound.default": frozenset(f.name for f in fields(DefaultChannel)),
}


#: Sections the kernel reads as written, in another module (``[network]``: the
#: policy for hosts a tenant names, :mod:`threadsync.core.network`).
KERNEL_RAW_SECTIONS: dict[str, frozenset[str]] = {
    "network": frozenset({"allowed_networks", "allow_private_targets"}),
}


def _closest(word: str, choices: Iterable[str]) -> str:
    found = difflib.get_close_matches(word, sorted(choices), n=1, cutoff=0.6)
    return f"; did you mean {found[0]!r}?" if found else ""


def check_keys(section: str, data: Mapping[str, Any], known: Collection[str]) -> None:
    """Refuse a key of ``[section]`` that is not in ``known``, naming the closest."""
    for key in data:
        if key not in known:
            valid = ", ".join(sorted(known)) or "none"
            raise ConfigError(
                f"unknown key {key!r} in [{section}]{_closest(key, known)} "
                f"(valid keys: {valid})"
            )


def check_sections(settings: Settings, known: Mapping[str, Collection[str]]) -> None:
    """Refuse a plugin section or key that no plugin declared (``known``: section
    -> keys, gathered from the ``config_sections`` hook)."""
    known = {**KERNEL_RAW_SECTIONS, **known}
    for name, data in settings.sections.items():
        if name not in known:
            valid = sorted({*KERNEL_SECTIONS, *known} - {"outbound"})
            raise ConfigError(
                f"unknown section [{name}] in the config file{_closest(name, valid)} "
                f"(known sections: {', '.join(valid)})"
            )
        check_keys(name, data, known[name])


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (where plaintext is allowed)."""
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_security(security: str, host: str, what: str) -> None:
    """R11: plaintext only towards loopback addresses."""
    if security not in SECURITY_CHOICES:
        raise ConfigError(f"{what}: security must be tls, starttls or none, not {security!r}")
    if security == "none" and not is_loopback(host):
        raise ConfigError(
            f"{what}: security 'none' (plaintext) is allowed only towards loopback, "
            f"not {host!r}; use tls or starttls"
        )


def default_config_path() -> Path:
    env = os.environ.get("THREADSYNC_CONFIG")
    return Path(env) if env else Path("config.toml")


def load(path: Path | str | None = None) -> Settings:
    """Read and validate a config file."""
    p = Path(path) if path is not None else default_config_path()
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {p} not found (use --config PATH)") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {p} is not valid TOML: {exc}") from None
    return from_mapping(raw, base=p.resolve().parent, path=p)


#: The public name of :func:`load` (``from threadsync import load_settings``).
load_settings = load


def _section(raw: dict[str, Any], name: str) -> dict[str, Any]:
    value = raw.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"[{name}] must be a table")
    check_keys(name, value, KERNEL_SECTIONS[name])
    return value


def typed(section: str, data: dict[str, Any], key: str, kind: type, default: Any) -> Any:
    """``data[key]`` of ``[section]`` checked to be a ``kind`` (ints accepted as floats)."""
    value = data.get(key, default)
    if value is None:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ConfigError(f"[{section}] {key} must be a {kind.__name__}, not {value!r}")
    return value


def from_mapping(raw: dict[str, Any], *, base: Path, path: Path | None = None) -> Settings:
    """Build settings from parsed TOML; relative paths resolve against ``base``."""
    db = _section(raw, "database")
    url = typed("database", db, "url", str, "sqlite:///var/threadsync.db")
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        rel = url.removeprefix("sqlite:///")
        if rel and rel != ":memory:":
            url = "sqlite:///" + str((base / rel).resolve())
    sec = _section(raw, "security")
    key_file = Path(typed("security", sec, "secret_key_file", str, "var/secret.key"))
    if not key_file.is_absolute():
        key_file = (base / key_file).resolve()

    s = _section(raw, "sync")
    sync = SyncSettings(
        poll_interval_seconds=typed("sync", s, "poll_interval_seconds", float, 30.0),
        max_attachment_bytes=typed("sync", s, "max_attachment_bytes", int, 3_145_728),
        max_message_bytes=typed("sync", s, "max_message_bytes", int, 26_214_400),
        message_id_domain=typed("sync", s, "message_id_domain", str, "threadsync.local"),
        batch_size=typed("sync", s, "batch_size", int, 250),
        backoff_base_seconds=typed("sync", s, "backoff_base_seconds", float, 5.0),
        backoff_max_seconds=typed("sync", s, "backoff_max_seconds", float, 900.0),
        idle_seconds=typed("sync", s, "idle_seconds", float, 300.0),
        lease_seconds=typed("sync", s, "lease_seconds", float, 120.0),
        worker_heartbeat_seconds=typed("sync", s, "worker_heartbeat_seconds", float, 10.0),
        worker_lease_seconds=typed("sync", s, "worker_lease_seconds", float, 30.0),
    )
    if sync.poll_interval_seconds <= 0:
        raise ConfigError("[sync] poll_interval_seconds must be positive")
    if not 0 < 2 * sync.worker_heartbeat_seconds <= sync.worker_lease_seconds:
        raise ConfigError(
            "[sync] worker_heartbeat_seconds must be positive and at most half of "
            "worker_lease_seconds"
        )
    if sync.max_attachment_bytes < 0:
        raise ConfigError("[sync] max_attachment_bytes must not be negative")
    if sync.max_message_bytes < 1024:
        raise ConfigError("[sync] max_message_bytes must be at least 1024")
    if not 1 <= sync.batch_size <= 1000:
        raise ConfigError("[sync] batch_size must be between 1 and 1000")
    if "@" in sync.message_id_domain or not sync.message_id_domain.strip():
        raise ConfigError("[sync] message_id_domain must be a bare domain name")

    outbound = _section(raw, "outbound")
    if not isinstance(outbound.get("default", {}), dict):
        raise ConfigError("[outbound.default] must be a table")
    d = outbound.get("default", {})
    check_keys("outbound.default", d, KERNEL_SECTIONS["outbound.default"])
    channel = DefaultChannel(
        host=typed("outbound.default", d, "host", str, "127.0.0.1"),
        port=typed("outbound.default", d, "port", int, 2525),
        security=typed("outbound.default", d, "security", str, "none"),
        from_address=typed("outbound.default", d, "from_address", str, "crm@threadsync.local"),
        username=typed("outbound.default", d, "username", str, None),
        password_env=typed("outbound.default", d, "password_env", str, None),
        timeout_seconds=typed("outbound.default", d, "timeout_seconds", float, 30.0),
    )
    check_security(channel.security, channel.host, "[outbound.default]")

    sections: dict[str, dict[str, Any]] = {}
    for name, value in raw.items():
        if name in KERNEL_SECTIONS:
            continue
        if not isinstance(value, dict):
            raise ConfigError(
                f"{name!r} at the top of the config file must be a [section]"
                f"{_closest(name, KERNEL_SECTIONS)}"
            )
        sections[name] = value
    return Settings(
        database_url=url,
        secret_key_file=key_file,
        sync=sync,
        default_channel=channel,
        sections=sections,
        path=path,
    )
