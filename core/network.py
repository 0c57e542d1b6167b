"""Where a tenant may make threadsync connect: the one network policy shared by
webhook endpoints and the mail servers a tenant names for a mailbox.

An address inside the operator's own network (loopback, private, link-local,
reserved, multicast, unspecified, also when carried inside an IPv6 address as
IPv4-mapped, NAT64 or 6to4) is refused unless the operator opens it in config:
``[network] allowed_networks = ["10.0.0.0/8"]`` or ``allow_private_targets =
true``. The same keys under ``[webhooks]`` are still honoured (they were the
first home of this policy) and add to ``[network]``.

Who is held to it: whatever a tenant names (a webhook URL registered with a
sub-account's API key; the IMAP and SMTP hosts of a mailbox connected through
the HTTP API with a sub-account's key). Hosts the operator names themselves
(the ``threadsync connect`` command, the Python API, an admin API key) are
trusted, as the config file is: the operator can reach their own network
anyway, and local mail servers on loopback are a normal operator setup (the
demo, tests, an on-premises relay). A connection remembers that its hosts came
from a tenant, so the policy is applied again at every connect the daemon makes,
with the config of that moment.

Names are resolved once per connect and the connection goes to an address that
was checked (:func:`open_socket`), so a DNS answer cannot change between the
check and the connect; TLS still verifies the name that was given.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from threadsync.core.config import Settings
from threadsync.core.errors import ConfigError, InvalidInput

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class TargetPolicy(Protocol):
    """What the operator opened for internal targets."""

    @property
    def allowed_networks(self) -> tuple[Network, ...]: ...

    @property
    def allow_private_targets(self) -> bool: ...


@dataclass(frozen=True)
class NetworkPolicy:
    """The operator's ``[network]`` settings (see the module docstring)."""

    allowed_networks: tuple[Network, ...] = ()
    allow_private_targets: bool = False


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
    """Why threadsync must not connect to ``address`` (an IP address) for a tenant,
    or ``None`` when it may: public, or opened by ``allowed_networks`` or
    ``allow_private_targets``. An IPv6 address carrying an IPv4 one (IPv4-mapped,
    NAT64, 6to4) is judged by both."""
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


def literal_address(host: str) -> str | None:
    """``host`` as an IP address when it is one, including the legacy IPv4 forms
    (``127.1``, ``0x7f000001``) that resolvers accept."""
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
        return host
    except ValueError:
        pass
    if host and all(c in "0123456789abcdefx." for c in host.lower()):
        try:
            return socket.inet_ntoa(socket.inet_aton(host))
        except OSError:
            return None
    return None


def host_refusal(host: str, settings: TargetPolicy, addresses: Sequence[str]) -> str | None:
    """Why ``host``, which resolves to ``addresses``, must not be connected to for
    a tenant; ``None`` when every address it may reach is allowed."""
    literal = literal_address(host)
    if literal is not None:
        targets = [literal]
    elif host.lower() == "localhost" or host.lower().endswith(".localhost"):
        targets = ["127.0.0.1", *addresses]  # RFC 6761: always loopback
    else:
        targets = list(addresses)
    for address in targets:
        refusal = address_refusal(address, settings)
        if refusal is not None:
            return refusal if address == host else f"{refusal} (an address of {host})"
    return None


# ---- config ------------------------------------------------------------------------


def parse_networks(raw: dict[str, Any], section: str) -> tuple[Network, ...]:
    """``allowed_networks`` of a config section, checked."""
    value = raw.get("allowed_networks", [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f'[{section}] allowed_networks must be a list like ["10.0.0.0/8"]')
    try:
        return tuple(ipaddress.ip_network(v.strip(), strict=False) for v in value)
    except ValueError as exc:
        raise ConfigError(f"[{section}] allowed_networks: {exc}") from None


def _flag(raw: dict[str, Any], section: str) -> bool:
    value = raw.get("allow_private_targets", False)
    if not isinstance(value, bool):
        raise ConfigError(f"[{section}] allow_private_targets must be true or false")
    return value


def network_policy(settings: Settings) -> NetworkPolicy:
    """The policy of ``settings``: ``[network]``, plus the same keys of ``[webhooks]``."""
    raw = settings.section("network")
    hooks = settings.section("webhooks")
    return NetworkPolicy(
        allowed_networks=parse_networks(raw, "network") + parse_networks(hooks, "webhooks"),
        allow_private_targets=_flag(raw, "network") or _flag(hooks, "webhooks"),
    )


# ---- connecting ------------------------------------------------------------------------


async def checked_addresses(
    host: str, port: int, policy: TargetPolicy
) -> list[tuple[int, tuple[Any, ...]]]:
    """Resolve ``host`` once and check every address: ``(family, sockaddr)`` to
    connect to. :class:`InvalidInput` (with the reason, for the operator's log)
    when any address is refused or the name does not resolve."""
    loop = asyncio.get_running_loop()
    literal = literal_address(host)
    try:
        infos = await loop.getaddrinfo(
            literal or host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )
    except (OSError, UnicodeError) as exc:
        raise InvalidInput(f"{host} does not resolve: {exc}") from None
    addresses = [str(info[4][0]) for info in infos]
    refusal = host_refusal(host, policy, addresses)
    if refusal is not None:
        raise InvalidInput(f"connecting to an internal address is not allowed: {refusal}")
    return [(info[0], info[4]) for info in infos]


async def open_socket(host: str, port: int, policy: TargetPolicy, timeout: float) -> socket.socket:
    """A TCP socket connected to an address of ``host`` that ``policy`` allows,
    the address being the one checked. :class:`InvalidInput` when refused,
    ``OSError``/``TimeoutError`` when no address answers."""
    loop = asyncio.get_running_loop()
    last: BaseException | None = None
    for family, sockaddr in await checked_addresses(host, port, policy):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, sockaddr), timeout)
        except (OSError, TimeoutError) as exc:
            sock.close()
            last = exc
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    raise last if last is not None else OSError(f"{host} has no address")
