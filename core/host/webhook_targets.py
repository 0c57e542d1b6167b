"""Where webhooks may go: an endpoint must not point into the operator's own
network (loopback, private, link-local, reserved, multicast, unspecified
addresses, also when embedded in IPv6 as IPv4-mapped, NAT64 or 6to4) unless
``[webhooks] allowed_networks`` or ``allow_private_targets`` opens it.

:func:`check_url` runs when an endpoint is registered; :func:`address_refusal`
for every address a delivery connects to (the dispatcher resolves the name
once and connects to the address it checked, so DNS cannot rebind it).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from typing import Protocol
from urllib.parse import urlsplit

from threadsync.core.config import is_loopback
from threadsync.core.errors import InvalidInput

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class TargetPolicy(Protocol):
    """What the operator opened for internal targets (``WebhookSettings`` has it)."""

    @property
    def allowed_networks(self) -> tuple[Network, ...]: ...

    @property
    def allow_private_targets(self) -> bool: ...

#: IPv6 prefixes that carry an IPv4 address a packet may end up at: NAT64 (6to4 and
#: IPv4-mapped addresses have their own properties in :mod:`ipaddress`).
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.ipv4_mapped or ip.sixtofour


def _internal_kind(ip: IPAddress) -> str | None:
    """What makes ``ip`` internal, or ``None`` for a public address. Multicast is
    checked first: parts of it count as global."""
    kinds = (
        ("unspecified", ip.is_unspecified),
        ("multicast", ip.is_multicast),
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("private", ip.is_private),
        ("reserved", ip.is_reserved),
        ("non-public", not ip.is_global),
    )
    return next((name for name, hit in kinds if hit), None)


def address_refusal(address: str, settings: TargetPolicy) -> str | None:
    """Why a webhook must not go to ``address`` (an IP address), or ``None`` when it
    may: public, or opened by ``allowed_networks`` or ``allow_private_targets``. An
    IPv6 address carrying an IPv4 one (IPv4-mapped, NAT64, 6to4) is judged by both."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # without an IPv6 zone
    except ValueError:
        return f"{address!r} is not an IP address"
    inner = _embedded_ipv4(ip)
    candidates = [ip] if inner is None else [ip, inner]
    if any(c in net for c in candidates for net in settings.allowed_networks):
        return None
    # An IPv4-mapped address is "private" only as a range; what it reaches decides.
    kind = _internal_kind(inner) if inner is not None else _internal_kind(ip)
    if kind is None:
        return None
    if settings.allow_private_targets and kind not in ("unspecified", "multicast"):
        return None
    what = f"{'an' if kind[0] in 'aeiou' else 'a'} {kind} address"
    if inner is not None:
        return f"{address} carries {inner}, {what}"
    return f"{address} is {what}"


def _literal_address(host: str) -> str | None:
    """``host`` as an IP address when it is one, including the legacy IPv4 forms
    (``127.1``, ``0x7f000001``) that resolvers accept."""
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    if host and all(c in "0123456789abcdefx." for c in host):
        try:
            return socket.inet_ntoa(socket.inet_aton(host))
        except OSError:
            return None
    return None


def _network_of(address: str) -> str:
    try:
        return str(ipaddress.ip_network(address.split("%", 1)[0]))
    except ValueError:
        return address


def _check_target(host: str, settings: TargetPolicy, addresses: Sequence[str]) -> None:
    literal = _literal_address(host)
    if literal is not None:
        targets = [literal]
    elif host == "localhost" or host.endswith(".localhost"):
        targets = ["127.0.0.1", *addresses]  # RFC 6761: always loopback
    else:
        targets = list(addresses)
    for address in targets:
        refusal = address_refusal(address, settings)
        if refusal is not None:
            of_host = "" if address == host else f" (an address of {host})"
            raise InvalidInput(
                f"webhook url must not point at an internal address: {refusal}{of_host}; "
                "to allow it, list its network in the config's [webhooks] allowed_networks "
                f'(e.g. allowed_networks = ["{_network_of(address)}"])'
            )


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
    if settings is not None:
        _check_target(host, settings, addresses)
    if parts.scheme == "http" and not is_loopback(host):
        raise InvalidInput("webhook url must use https (plain http only towards loopback)")
    return url
