"""The ``[http]`` and ``[webhooks]`` sections of config.toml, checked and typed.

Both sections belong to this plugin (declared with the ``config_sections`` hook,
read with ``Settings.section``). The API is off unless
``[http] listen`` (or ``run --listen``) names an address; it listens on loopback
unless told otherwise, and a non-loopback address needs TLS (``tls_cert_file``
and ``tls_key_file``) or an explicit ``behind_tls_proxy = true`` (R11).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from threadsync.core.config import Settings, is_loopback, typed
from threadsync.core.errors import ConfigError
from threadsync.core.host.webhooks import WebhookSettings
from threadsync.core.network import network_policy


@dataclass(frozen=True)
class HttpSettings:
    """Checked values of ``[http]``."""

    listen: str | None = None
    rate_per_second: float = 50.0
    burst: int = 100
    #: Requests with a missing or unknown key, per client address (checked before
    #: any key lookup, so guessing keys costs the database nothing once refused).
    auth_failures_per_second: float = 1.0
    auth_failures_burst: int = 20
    #: Open connections: per client address, and in all.
    max_connections_per_client: int = 64
    max_connections: int = 1024
    #: A connection must send a request's headers within this time (the first
    #: request, and each next one once it begins).
    header_timeout_seconds: float = 10.0
    #: An idle keep-alive connection is closed after this time.
    keep_alive_seconds: float = 5.0
    max_body_bytes: int = 25 * 1024 * 1024
    #: Requests in progress at once, and request body bytes being received or
    #: worked on at once (:mod:`threadsync.plugins.http_api.limits`).
    max_concurrent_requests: int = 64
    max_inflight_body_bytes: int = 32 * 1024 * 1024
    metrics_public: bool = False
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    behind_tls_proxy: bool = False
    session_hours: float = 12.0
    #: The address browsers and Microsoft reach this API at (``https://sync.example.com``);
    #: the OAuth redirect goes to its ``/oauth/callback``. Unset: the request's own.
    public_url: str | None = None
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


def _section(settings: Settings, name: str) -> dict[str, Any]:
    value = settings.section(name)
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


#: WebhookSettings fields that are not numbers, or not read from ``[webhooks]``.
_NOT_NUMBERS = ("allowed_networks", "allow_private_targets", "idempotency_hours")


def webhook_settings(settings: Settings) -> WebhookSettings:
    raw = _section(settings, "webhooks")
    known = {f.name: f for f in fields(WebhookSettings) if f.name != "idempotency_hours"}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigError(f"[webhooks] has no setting {unknown[0]!r}")
    values: dict[str, Any] = {}
    for name, f in known.items():
        if name in _NOT_NUMBERS:
            continue
        kind = int if f.type in ("int", int) else float
        values[name] = typed("webhooks", raw, name, kind, f.default)
        if values[name] <= 0:
            raise ConfigError(f"[webhooks] {name} must be positive")
    # The one network policy: [network] and, as before, [webhooks].
    policy = network_policy(settings)
    values["allowed_networks"] = policy.allowed_networks
    values["allow_private_targets"] = policy.allow_private_targets
    hours = typed("http", _section(settings, "http"), "idempotency_hours", float, 24.0)
    if hours <= 0:
        raise ConfigError("[http] idempotency_hours must be positive")
    return WebhookSettings(**values, idempotency_hours=hours)


def _public_url(value: str | None) -> str | None:
    if value is None:
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or (
        parts.fragment or parts.username
    ):
        raise ConfigError(
            f"[http] public_url must be an http(s) address like https://sync.example.com, "
            f"not {value!r}"
        )
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        raise ConfigError(
            "[http] public_url must use https: Microsoft sends sign-in codes only to https "
            "addresses (or to loopback)"
        )
    return value.rstrip("/")


def http_settings(settings: Settings, listen: str | None = None) -> HttpSettings:
    """Read ``[http]`` and ``[webhooks]``; ``listen`` (from ``run --listen``) wins."""
    raw = _section(settings, "http")
    address = listen or typed("http", raw, "listen", str, None)
    result = HttpSettings(
        listen=address,
        rate_per_second=typed("http", raw, "rate_per_second", float, 50.0),
        burst=typed("http", raw, "burst", int, 100),
        auth_failures_per_second=typed("http", raw, "auth_failures_per_second", float, 1.0),
        auth_failures_burst=typed("http", raw, "auth_failures_burst", int, 20),
        max_connections_per_client=typed("http", raw, "max_connections_per_client", int, 64),
        max_connections=typed("http", raw, "max_connections", int, 1024),
        header_timeout_seconds=typed("http", raw, "header_timeout_seconds", float, 10.0),
        keep_alive_seconds=typed("http", raw, "keep_alive_seconds", float, 5.0),
        max_body_bytes=typed("http", raw, "max_body_bytes", int, 25 * 1024 * 1024),
        max_concurrent_requests=typed("http", raw, "max_concurrent_requests", int, 64),
        max_inflight_body_bytes=typed(
            "http", raw, "max_inflight_body_bytes", int, 32 * 1024 * 1024
        ),
        metrics_public=typed("http", raw, "metrics_public", bool, False),
        tls_cert_file=_file(
            settings, typed("http", raw, "tls_cert_file", str, None), "tls_cert_file"
        ),
        tls_key_file=_file(
            settings, typed("http", raw, "tls_key_file", str, None), "tls_key_file"
        ),
        behind_tls_proxy=typed("http", raw, "behind_tls_proxy", bool, False),
        session_hours=typed("http", raw, "session_hours", float, 12.0),
        public_url=_public_url(typed("http", raw, "public_url", str, None)),
        webhooks=webhook_settings(settings),
    )
    if result.rate_per_second <= 0 or result.burst < 1:
        raise ConfigError("[http] rate_per_second and burst must be positive")
    if result.auth_failures_per_second <= 0 or result.auth_failures_burst < 1:
        raise ConfigError(
            "[http] auth_failures_per_second and auth_failures_burst must be positive"
        )
    if (
        min(result.max_connections_per_client, result.max_connections) < 1
        or min(result.header_timeout_seconds, result.keep_alive_seconds) <= 0
    ):
        raise ConfigError(
            "[http] max_connections(_per_client), header_timeout_seconds and "
            "keep_alive_seconds must be positive"
        )
    if result.max_body_bytes < 1024:
        raise ConfigError("[http] max_body_bytes must be at least 1024")
    if result.max_concurrent_requests < 1:
        raise ConfigError("[http] max_concurrent_requests must be at least 1")
    if result.max_inflight_body_bytes < result.max_body_bytes:
        raise ConfigError("[http] max_inflight_body_bytes must be at least max_body_bytes")
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
