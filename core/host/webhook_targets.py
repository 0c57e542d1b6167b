"""Where webhooks may go: an endpoint must not point into the operator's own
network (loopback, private, link-local, reserved, multicast, unspecified
addresses, also when embedded in IPv6 as IPv4-mapped, NAT64 or 6to4) unless
``[webhooks] allowed_networks`` or ``allow_private_targets`` opens it.

:func:`check_url` runs when an endpoint is registered; :func:`address_refusal`
for every address a delivery connects to (the dispatcher resolves the name
once and connects to the address it checked, so DNS cannot rebind it). The
policy itself is the kernel's one network policy (:mod:`threadsync.core.network`),
shared with the mail servers a tenant names.
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Sequence
from urllib.parse import urlsplit

import idna

from threadsync.core.config import is_loopback
from threadsync.core.errors import InvalidInput
from threadsync.core.network import (
    IPAddress,
    Network,
    TargetPolicy,
    address_refusal,
    host_refusal,
)

__all__ = ["IPAddress", "Network", "TargetPolicy", "address_refusal", "check_url"]


def _check_target(host: str, settings: TargetPolicy, addresses: Sequence[str]) -> None:
    refusal = host_refusal(host, settings, addresses)
    if refusal is not None:
        raise InvalidInput(f"webhook url must not point at an internal address: {refusal}")


_LABEL = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_")


def _encodable(host: str) -> bool:
    """Whether a delivery can be addressed to ``host``: an IP address, or labels
    that are ASCII letters, digits, ``-`` and ``_`` (not at either end of a label),
    ``xn--`` labels that decode and Unicode labels that encode under IDNA 2008,
    as the HTTP client requires at delivery time."""
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(host)
        return True
    for label in host.lower().split("."):
        try:
            if not label.isascii():
                label = idna.encode(label).decode("ascii")
            if label.startswith("xn--"):
                idna.decode(label)
        except idna.IDNAError:
            return False
        if not label or not set(label) <= _LABEL or label[0] == "-" or label[-1] == "-":
            return False
    return True


def check_url(
    url: str, settings: TargetPolicy | None = None, addresses: Sequence[str] = ()
) -> str:
    """An endpoint URL as stored: http or https, no credentials, plain http only
    towards loopback (R11), and, given the operator's ``settings``, not towards an
    internal address they do not allow. ``addresses`` are what the host name
    resolves to now (the HTTP side resolves it). The HTTP API always passes its
    settings; without them (the operator's own Python code) only the first rules
    apply. Every delivery checks its target again, whoever registered it."""
    url = url.strip()
    parts = urlsplit(url)
    try:
        host = (parts.hostname or "").rstrip(".") if parts.port != 0 else ""
    except ValueError:  # a port that is not a number or out of range
        host = ""
    if len(url) > 2048 or parts.scheme not in ("https", "http") or not host:
        raise InvalidInput("webhook url must be an absolute https URL")
    if parts.username or parts.password or "@" in parts.netloc:
        raise InvalidInput("webhook url must not carry credentials")
    if not _encodable(host):
        raise InvalidInput(f"webhook url has a host name that cannot be encoded: {host!r}")
    if settings is not None:
        _check_target(host, settings, addresses)
    if parts.scheme == "http" and not is_loopback(host):
        raise InvalidInput("webhook url must use https (plain http only towards loopback)")
    return url
