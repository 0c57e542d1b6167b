"""The ``[outlook]`` section of config.toml, checked and typed.

Every Outlook connection of a threadsync instance uses the same Azure app
registration: its client id, the tenant it signs users in from, and (for the
authorization-code flow of a hosted CRM) a client secret named by
``client_secret_env``. ``authority_host`` and ``graph_url`` point at Microsoft's
cloud by default and can be overridden (national clouds, or a local fake for
tests). The host process may add non-config objects to the section
(``notification_hub``); they are ignored here.

``max_concurrency`` (1-4) bounds the Graph requests in flight, ``$batch`` items
included, and ``concurrency_scope`` says what shares that bound: ``"app"`` (the
default, the stricter of the two readings of Microsoft's throttling page: all
mailboxes of this app in one process) or ``"mailbox"`` (each mailbox, across
all connections to it in the process).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from threadsync.core.config import is_loopback
from threadsync.core.errors import ConfigError

DEFAULT_AUTHORITY_HOST = "login.microsoftonline.com"
DEFAULT_GRAPH_URL = "https://graph.microsoft.com/v1.0"
DEFAULT_REDIRECT_URI = "http://localhost:8400/"
#: Longest lifetime Graph accepts for a subscription on messages (minutes).
MAX_SUBSCRIPTION_MINUTES = 4230
CONCURRENCY_SCOPES = ("app", "mailbox")


@dataclass(frozen=True)
class OutlookConfig:
    """Checked values of ``[outlook]``; see README "Outlook" for each key."""

    client_id: str
    tenant: str = "common"
    client_secret_env: str | None = None
    authority_host: str = DEFAULT_AUTHORITY_HOST
    graph_url: str = DEFAULT_GRAPH_URL
    redirect_uri: str = DEFAULT_REDIRECT_URI
    ca_file: str | None = None
    timeout_seconds: float = 30.0
    sign_in_timeout_seconds: float = 600.0
    max_concurrency: int = 4
    concurrency_scope: str = "app"
    max_retries: int = 4
    max_retry_wait_seconds: float = 120.0
    page_size: int = 100
    send_settle_seconds: float = 30.0
    notification_url: str | None = None
    lifecycle_url: str | None = None
    subscription_minutes: int = 4200
    renew_before_minutes: int = 1440

    @property
    def authority(self) -> str:
        """The MSAL authority URL (``https://host/tenant``)."""
        return f"https://{self.authority_host}/{self.tenant}"

    @property
    def verify(self) -> str | bool:
        """What TLS verification trusts: the system store, or ``ca_file``."""
        return self.ca_file or True

    def concurrency_key(self, mailbox: str) -> tuple[str, ...]:
        """What shares one concurrency limit in this process."""
        app = ("graph", self.graph_url, self.client_id)
        return app if self.concurrency_scope == "app" else (*app, mailbox.lower())

    @classmethod
    def from_section(cls, section: Mapping[str, Any]) -> OutlookConfig:
        """Validate ``[outlook]``; raises :class:`ConfigError` naming the bad key."""
        s = dict(section)
        client_id = _text(s, "client_id", None)
        if not client_id:
            raise ConfigError(
                "[outlook] client_id is missing: register an app in Microsoft Entra ID "
                "and put its Application (client) ID there (see README, Outlook)"
            )
        host = _text(s, "authority_host", DEFAULT_AUTHORITY_HOST) or DEFAULT_AUTHORITY_HOST
        if "/" in host or not host.strip() or any(c.isspace() for c in host):
            raise ConfigError(f"[outlook] authority_host must be a host name, not {host!r}")
        graph_url = (_text(s, "graph_url", DEFAULT_GRAPH_URL) or DEFAULT_GRAPH_URL).rstrip("/")
        _check_url(graph_url, "graph_url", https_only=True)
        redirect = _text(s, "redirect_uri", DEFAULT_REDIRECT_URI) or DEFAULT_REDIRECT_URI
        _check_url(redirect, "redirect_uri", https_only=True)
        ca_file = _text(s, "ca_file", None)
        if ca_file is not None:
            ca_file = os.path.abspath(ca_file)
            if not os.path.isfile(ca_file):
                raise ConfigError(f"[outlook] ca_file {ca_file} does not exist")
        notification_url = _text(s, "notification_url", None)
        lifecycle_url = _text(s, "lifecycle_url", None)
        for key, url in (("notification_url", notification_url), ("lifecycle_url", lifecycle_url)):
            if url is not None:
                _check_url(url, key, https_only=True, loopback_ok=False)
        minutes = _number(s, "subscription_minutes", 4200, int)
        if not 45 <= minutes <= MAX_SUBSCRIPTION_MINUTES:
            raise ConfigError(
                f"[outlook] subscription_minutes must be 45-{MAX_SUBSCRIPTION_MINUTES}"
            )
        config = cls(
            client_id=client_id,
            tenant=_text(s, "tenant", "common") or "common",
            client_secret_env=_text(s, "client_secret_env", None),
            authority_host=host,
            graph_url=graph_url,
            redirect_uri=redirect,
            ca_file=ca_file,
            timeout_seconds=_number(s, "timeout_seconds", 30.0, float),
            sign_in_timeout_seconds=_number(s, "sign_in_timeout_seconds", 600.0, float),
            max_concurrency=_number(s, "max_concurrency", 4, int),
            concurrency_scope=_text(s, "concurrency_scope", "app") or "app",
            max_retries=_number(s, "max_retries", 4, int),
            max_retry_wait_seconds=_number(s, "max_retry_wait_seconds", 120.0, float),
            page_size=_number(s, "page_size", 100, int),
            send_settle_seconds=_number(s, "send_settle_seconds", 30.0, float),
            notification_url=notification_url,
            lifecycle_url=lifecycle_url,
            subscription_minutes=minutes,
            renew_before_minutes=_number(s, "renew_before_minutes", 1440, int),
        )
        if not 1 <= config.max_concurrency <= 4:
            raise ConfigError("[outlook] max_concurrency must be 1-4 (Graph allows 4 per mailbox)")
        if config.concurrency_scope not in CONCURRENCY_SCOPES:
            raise ConfigError('[outlook] concurrency_scope must be "app" or "mailbox"')
        if not 1 <= config.page_size <= 1000:
            raise ConfigError("[outlook] page_size must be 1-1000")
        if not 0 <= config.send_settle_seconds <= 300:
            raise ConfigError("[outlook] send_settle_seconds must be 0-300")
        if config.max_retries < 0 or config.timeout_seconds <= 0:
            raise ConfigError("[outlook] max_retries and timeout_seconds must be positive")
        return config

    def client_secret(self, environ: Mapping[str, str]) -> str:
        """The app's client secret, read from the variable ``client_secret_env`` names."""
        if not self.client_secret_env:
            raise ConfigError(
                "[outlook] client_secret_env is missing: name the environment variable "
                "that holds the app's client secret (or sign in with --device-code)"
            )
        value = environ.get(self.client_secret_env, "")
        if not value:
            raise ConfigError(f"environment variable {self.client_secret_env} is not set")
        return value


def _text(section: dict[str, Any], key: str, default: str | None) -> str | None:
    value = section.get(key, default)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigError(f"[outlook] {key} must be a string, not {value!r}")
    return value.strip() or default


def _number(section: dict[str, Any], key: str, default: Any, kind: type) -> Any:
    value = section.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"[outlook] {key} must be a number, not {value!r}")
    if kind is int and not float(value).is_integer():
        raise ConfigError(f"[outlook] {key} must be a whole number, not {value!r}")
    return kind(value)


def _check_url(url: str, key: str, *, https_only: bool, loopback_ok: bool = True) -> None:
    """R11: https everywhere; plain http only towards loopback (local redirects, tests)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme not in ("https", "http") or not host:
        raise ConfigError(f"[outlook] {key} must be an absolute https URL, not {url!r}")
    if https_only and parts.scheme == "http" and not (loopback_ok and is_loopback(host)):
        raise ConfigError(f"[outlook] {key} must use https (plain http only for loopback)")
