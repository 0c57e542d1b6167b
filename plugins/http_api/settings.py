"""The ``[http]`` and ``[webhooks]`` sections of config.toml, checked and typed.

``core.config`` hands sections it does not know to plugins (they arrive in
``Settings.providers``), so both are read from there. The API is off unless
``[http] listen`` (or ``run --listen``) names an address; it listens on loopback
unless told otherwise, and a non-loopback address needs TLS (``tls_cert_file``
and ``tls_key_file``) or an explicit ``behind_tls_proxy = true`` (R11).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from core.config import Settings, is_loopback
from core.errors import ConfigError
from core.webhooks import WebhookSettings


@dataclass(frozen=True)
class HttpSettings:
    """Checked values of ``[http]``."""

    listen: str | None = None
    rate_per_second: float = 50.0
    burst: int = 100
    max_body_bytes: int = 25 * 1024 * 1024
    metrics_public: bool = False
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    behind_tls_proxy: bool = False
    session_hours: float = 12.0
    webhooks: WebhookSettings = field(default_factory=WebhookSettings)

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8080`` for IPv6) into its parts."""
    host, sep, port = value.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"listen address must be HOST:PORT, not {value!r}")
    return host, int(port)


def _typed(section: str, data: dict[str, Any], key: str, kind: type, default: Any) -> Any:
    value = data.get(key, default)
    if value is None:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ConfigError(f"[{section}] {key} must be a {kind.__name__}, not {value!r}")
    return value


def _section(settings: Settings, name: str) -> dict[str, Any]:
    value = settings.providers.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"[{name}] must be a table")
    return value


def _file(settings: Settings, value: str | None, key: str) -> str | None:
    if value is None:
        return None
    path = Path(value)
    if not path.is_absolute() and settings.path is not None:
        path = settings.path.resolve().parent / path
    if not path.is_file():
        raise ConfigError(f"[http] {key} {path} does not exist")
    return str(path)


def webhook_settings(settings: Settings) -> WebhookSettings:
    raw = _section(settings, "webhooks")
    known = {f.name: f for f in fields(WebhookSettings)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigError(f"[webhooks] has no setting {unknown[0]!r}")
    values: dict[str, Any] = {}
    for name, f in known.items():
        kind = int if f.type in ("int", int) else float
        values[name] = _typed("webhooks", raw, name, kind, f.default)
        if values[name] <= 0:
            raise ConfigError(f"[webhooks] {name} must be positive")
    return WebhookSettings(**values)


def http_settings(settings: Settings, listen: str | None = None) -> HttpSettings:
    """Read ``[http]`` and ``[webhooks]``; ``listen`` (from ``run --listen``) wins."""
    raw = _section(settings, "http")
    address = listen or _typed("http", raw, "listen", str, None)
    result = HttpSettings(
        listen=address,
        rate_per_second=_typed("http", raw, "rate_per_second", float, 50.0),
        burst=_typed("http", raw, "burst", int, 100),
        max_body_bytes=_typed("http", raw, "max_body_bytes", int, 25 * 1024 * 1024),
        metrics_public=_typed("http", raw, "metrics_public", bool, False),
        tls_cert_file=_file(
            settings, _typed("http", raw, "tls_cert_file", str, None), "tls_cert_file"
        ),
        tls_key_file=_file(
            settings, _typed("http", raw, "tls_key_file", str, None), "tls_key_file"
        ),
        behind_tls_proxy=_typed("http", raw, "behind_tls_proxy", bool, False),
        session_hours=_typed("http", raw, "session_hours", float, 12.0),
        webhooks=webhook_settings(settings),
    )
    if result.rate_per_second <= 0 or result.burst < 1:
        raise ConfigError("[http] rate_per_second and burst must be positive")
    if result.max_body_bytes < 1024:
        raise ConfigError("[http] max_body_bytes must be at least 1024")
    if (result.tls_cert_file is None) != (result.tls_key_file is None):
        raise ConfigError("[http] tls_cert_file and tls_key_file go together")
    if address is not None:
        host, _ = parse_listen(address)
        if not is_loopback(host) and not (result.tls or result.behind_tls_proxy):
            raise ConfigError(
                f"[http] listening on {host} needs TLS (tls_cert_file, tls_key_file) or "
                "behind_tls_proxy = true: API keys and mailbox passwords cross this socket"
            )
    return result
