"""Mail servers a tenant names are held to the same network policy as webhooks:
internal addresses are refused unless the operator opens them in config, the
check runs again at every connect, and the tenant learns no more than "could not
connect" (closed, silent and refused ports look the same). The operator's own
commands stay trusted: the rest of the suite connects to loopback servers."""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.kernelfixtures import SUB, World
from tests.plugins.test_imap_smtp import INBOX, make_provider, opened
from tests.servers import ImapServer
from tests.servers.smtp import SmtpServer
from tests.servers.tlscerts import TestCA
from tests.test_http_api_support import (  # noqa: F401 (fixtures)
    LOOPBACK,
    Api,
    api_factory_fixture,
    api_fixture,
)
from threadsync.core.config import from_mapping
from threadsync.core.errors import InvalidInput, TransientProviderError
from threadsync.core.network import NetworkPolicy, network_policy, open_socket
from threadsync.core.outbox.smtp import SmtpEndpoint, check_login


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections and never says a word."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield int(s.getsockname()[1])


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def request(world: World, **options: Any) -> dict[str, Any]:
    opts = world.options(**options)
    opts.pop("password_env")
    return {
        "provider": "imap_smtp",
        "email": world.email,
        "options": opts,
        "credentials": {"password": world.password},
    }


async def test_tenant_cannot_probe_internal_servers(
    api: Api, world: World, silent_port: int
) -> None:
    world.ts.kernel.provider_settings.setdefault("imap_smtp", {})["timeout"] = 2
    world.ts.kernel.network = NetworkPolicy()  # as config.toml ships: nothing internal
    url = f"/v1/subaccounts/{SUB}/users/u1/connection"
    answers = {}
    with api.client(api.key) as crm:
        for name, port in (
            ("imap", world.imap.port),  # a real IMAP server that would accept the password
            ("closed", closed_port()),
            ("silent", silent_port),
        ):
            r = crm.post(url, json=request(world, imap_port=port))
            assert r.status_code >= 400, (name, r.text)
            answers[name] = r.json()["detail"].replace(str(port), "PORT")
    assert len(set(answers.values())) == 1, answers
    detail = answers["imap"]
    assert "could not connect" in detail
    for word in ("refused", "internal", "loopback", "timed", "answer", "TLS"):
        assert word not in detail, detail
    assert world.ts.status(SUB)["connections"] == []


async def test_operator_opens_loopback_and_the_check_repeats_at_every_connect(
    api: Api, world: World
) -> None:
    world.ts.kernel.network = NetworkPolicy(allowed_networks=LOOPBACK)
    url = f"/v1/subaccounts/{SUB}/users/u1/connection"
    with api.client(api.key) as crm:
        r = crm.post(url, json=request(world, imap_host="localhost", smtp_host="localhost"))
        assert r.status_code == 201, r.text
    assert world.ts.status(SUB)["connections"][0]["state"] == "connected"
    await world.ts.run_once()
    assert world.ts.status(SUB)["connections"][0]["state"] == "connected"

    # The operator closes loopback again: the next connect the daemon makes is refused.
    world.ts.kernel.network = NetworkPolicy()
    report = await world.ts.run_once()
    conn = world.ts.status(SUB)["connections"][0]
    assert conn["state"] == "error" and "could not connect" in conn["last_error"]
    assert report.errors


async def test_operator_commands_are_trusted(world: World) -> None:
    """The operator's own connect (CLI, Python API) reaches loopback servers."""
    connected = await world.connect()
    assert connected["state"] == "connected"
    await world.ts.run_once()
    assert world.ts.status(SUB)["connections"][0]["state"] == "connected"


async def test_open_socket_pins_checked_addresses() -> None:
    with pytest.raises(InvalidInput, match="loopback"):
        await open_socket("localhost", 1, NetworkPolicy(), 1)
    with pytest.raises(InvalidInput, match="link-local"):
        await open_socket("169.254.169.254", 80, NetworkPolicy(), 1)
    with pytest.raises(InvalidInput, match=r"carries 127\.0\.0\.1"):
        await open_socket("::ffff:127.0.0.1", 80, NetworkPolicy(), 1)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        sock = await open_socket("localhost", port, NetworkPolicy(allowed_networks=LOOPBACK), 1)
        with sock:
            assert sock.getpeername() == ("127.0.0.1", port)


def test_network_section_and_webhooks_keys(tmp_path: Path) -> None:
    base = {"database": {"url": "sqlite:///x.db"}, "security": {"secret_key_file": "k"}}
    settings = from_mapping(
        {
            **base,
            "network": {"allowed_networks": ["10.0.0.0/8"]},
            "webhooks": {"allowed_networks": ["192.168.0.0/16"], "allow_private_targets": False},
        },
        base=tmp_path,
    )
    policy = network_policy(settings)
    assert [str(n) for n in policy.allowed_networks] == ["10.0.0.0/8", "192.168.0.0/16"]
    assert not policy.allow_private_targets
    assert network_policy(from_mapping(base, base=tmp_path)) == NetworkPolicy()


async def test_pinned_connections_keep_the_tls_host_name(
    imap_server: ImapServer,
    mailbox: tuple[str, str],
    smtp_server: SmtpServer,
    test_ca: TestCA,
) -> None:
    """Through the policy the socket goes to the checked address, and TLS still
    verifies the name the tenant gave (the test certificate is for localhost)."""
    policy = NetworkPolicy(allowed_networks=LOOPBACK)
    for security, port in (("starttls", imap_server.port), ("tls", imap_server.tls_port)):
        if port is None:
            continue
        provider = make_provider(
            imap_server, mailbox, security=security, imap_port=port, imap_host="localhost"
        )
        provider.account.network = policy
        async with opened(provider):
            assert (await provider.folders())[0] == INBOX
    email, password = mailbox
    endpoint = SmtpEndpoint(
        "localhost",
        smtp_server.port,
        "starttls",
        test_ca.client_context(),
        username=email,
        password=password,
        network=policy,
    )
    await check_login(endpoint)
    with pytest.raises(TransientProviderError, match=r"^could not connect to SMTP server"):
        await check_login(dataclasses.replace(endpoint, network=NetworkPolicy()))
