"""Webhook endpoints may not reach into the operator's own network: a URL naming
or resolving to a loopback, private, link-local, ... address is refused when it
is registered (422 naming the reason) and again at every delivery, where the
checked address is the one connected to (no DNS rebinding), with Host and TLS
still naming the host. ``allowed_networks`` and ``allow_private_targets`` open
it for on-premises setups."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.kernelfixtures import SUB, World
from tests.servers.tlscerts import make_test_ca
from tests.test_http_api_support import (  # noqa: F401 (fixtures)
    LOOPBACK,
    Api,
    Receiver,
    api_factory_fixture,
    receiver_fixture,
    wait_for,
)
from threadsync.core.config import from_mapping
from threadsync.core.errors import ConfigError, InvalidInput
from threadsync.core.host import webhooks
from threadsync.core.host.webhook_targets import address_refusal, check_url
from threadsync.core.host.webhooks import WebhookSettings
from threadsync.core.store.models import Event
from threadsync.plugins.http_api.dispatcher import Dispatcher, GuardedTransport, TargetRefused
from threadsync.plugins.http_api.settings import http_settings
from threadsync.plugins.http_api.signatures import sign

STRICT = WebhookSettings()


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("192.168.0.10", "private"),
        ("fc00::1", "private"),
        ("169.254.169.254", "link-local"),  # cloud metadata
        ("fe80::1%eth0", "link-local"),
        ("224.0.0.1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("100.64.0.1", "non-public"),
        ("::ffff:127.0.0.1", "carries 127.0.0.1, a loopback"),
        ("::ffff:169.254.169.254", "carries 169.254.169.254, a link-local"),
        ("64:ff9b::a01:203", "carries 10.1.2.3, a private"),  # NAT64
        ("2002:7f00:1::1", "carries 127.0.0.1, a loopback"),  # 6to4
    ],
)
def test_internal_addresses_are_refused(address: str, kind: str) -> None:
    refusal = address_refusal(address, STRICT)
    assert refusal is not None and kind in refusal, refusal


@pytest.mark.parametrize("address", ["93.184.216.34", "2606:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_pass(address: str) -> None:
    assert address_refusal(address, STRICT) is None


def test_the_operator_opens_networks() -> None:
    ten = WebhookSettings(allowed_networks=(ipaddress.ip_network("10.0.0.0/8"),))
    assert address_refusal("10.1.2.3", ten) is None
    assert address_refusal("::ffff:10.1.2.3", ten) is None
    assert address_refusal("127.0.0.1", ten) is not None
    private = WebhookSettings(allow_private_targets=True)
    assert address_refusal("127.0.0.1", private) is None
    assert address_refusal("169.254.169.254", private) is None
    assert address_refusal("0.0.0.0", private) is not None  # never a target
    assert address_refusal("224.0.0.1", private) is not None


@pytest.mark.parametrize(
    ("url", "addresses", "says"),
    [
        ("http://127.0.0.1:8080/hook", (), "127.0.0.1 is a loopback address"),
        ("http://localhost:8080/hook", (), "(an address of localhost)"),
        ("https://127.1/hook", (), "127.0.0.1 is a loopback address (an address of 127.1)"),
        ("https://0x7f000001/hook", (), "loopback"),
        ("https://[::ffff:127.0.0.1]/hook", (), "carries 127.0.0.1"),
        ("https://169.254.169.254/latest/meta-data", (), "link-local"),
        ("https://db.internal:5432/", ("93.184.216.34", "10.0.0.5"), "10.0.0.5 is a private"),
        ("https://user:pw@crm.example.com/hook", (), "credentials"),
        ("ftp://crm.example.com/hook", (), "absolute https URL"),
        ("http://crm.example.com/hook", ("93.184.216.34",), "must use https"),
    ],
)
def test_registration_refuses(url: str, addresses: tuple[str, ...], says: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        check_url(url, STRICT, addresses)
    assert says in str(caught.value)


def test_registration_accepts_a_public_or_allowed_target() -> None:
    assert check_url("https://crm.example.com/hook", STRICT, ["93.184.216.34"])
    assert check_url("http://127.0.0.1:8080/hook", WebhookSettings(allowed_networks=LOOPBACK))


def test_the_api_answers_422_naming_the_reason(api_factory: Callable[..., Api]) -> None:
    api = api_factory(webhooks=STRICT)
    url = "/v1/subaccounts/acme/webhooks"
    with api.client(api.key) as c:
        for target, reason in [
            ("http://127.0.0.1:5432/", "127.0.0.1 is a loopback address"),
            ("http://localhost:8080/hook", "(an address of localhost)"),
            ("https://169.254.169.254/latest/meta-data", "link-local"),
            ("https://[::ffff:10.0.0.1]/hook", "carries 10.0.0.1, a private address"),
        ]:
            r = c.post(url, json={"url": target})
            assert r.status_code == 422, r.text
            assert r.headers["content-type"] == "application/problem+json"
            problem = r.json()
            assert problem["code"] == "invalid_input"
            assert reason in problem["detail"], problem
            assert "internal address" in problem["detail"]
            # ... and how to allow it: the setting is named.
            assert "[webhooks] allowed_networks" in problem["detail"], problem
            assert problem["errors"][0]["field"] == "url"
        assert c.get(url).json() == {"webhooks": []}
    opened = api_factory(webhooks=WebhookSettings(allowed_networks=LOOPBACK))
    with opened.client(opened.key) as c:
        assert c.post(url, json={"url": "http://localhost:8080/hook"}).status_code == 201


# ---- at delivery time ------------------------------------------------------------------------


def fixed(answers: dict[str, list[str]], calls: list[str] | None = None) -> Any:
    """A resolver that answers from ``answers`` and notes every lookup."""

    async def resolve(host: str, port: int) -> list[str]:
        if calls is not None:
            calls.append(host)
        if host not in answers:
            raise OSError(f"{host} does not resolve")
        return answers[host]

    return resolve


def signed_post(receiver: Receiver) -> dict[str, Any]:
    body = b'{"id":1}'
    signature = sign(receiver.secret, body)
    return {
        "content": body,
        "headers": {"Threadsync-Event-Id": "1", "Threadsync-Signature": signature},
    }


async def test_the_checked_address_is_the_one_connected_to(receiver: Receiver) -> None:
    """The name resolves once, to the address that is checked and then used: the
    request reaches the receiver through a name no other resolver knows, and the
    receiver sees that name in Host."""
    calls: list[str] = []
    allowed = WebhookSettings(allowed_networks=LOOPBACK)
    resolver = fixed({"hooks.crm.test": ["127.0.0.1"]}, calls)
    url = receiver.url_for("hooks.crm.test")
    async with httpx.AsyncClient(transport=GuardedTransport(allowed, resolver=resolver)) as c:
        r = await c.post(url, **signed_post(receiver))
    assert r.status_code == 200 and calls == ["hooks.crm.test"]
    assert receiver.got[0].host == f"hooks.crm.test:{receiver.port}"

    # One internal address among the answers is enough to refuse.
    mixed = fixed({"hooks.crm.test": ["93.184.216.34", "127.0.0.1"]})
    async with httpx.AsyncClient(transport=GuardedTransport(STRICT, resolver=mixed)) as c:
        with pytest.raises(TargetRefused, match=r"127\.0\.0\.1 is a loopback address"):
            await c.post(url, **signed_post(receiver))
    assert len(receiver.got) == 1


async def test_a_second_dns_answer_cannot_rebind_the_request() -> None:
    """A rebinding name answers a public address, then loopback: the request goes
    to the address that was checked, and the next request is checked anew."""
    answers = iter([["93.184.216.34"], ["127.0.0.1"]])
    lookups: list[str] = []

    async def rebinding(host: str, port: int) -> list[str]:
        lookups.append(host)
        return next(answers)

    sent: list[tuple[str, str, Any]] = []

    def peer(request: httpx.Request) -> httpx.Response:
        sent.append(
            (request.url.host, request.headers["host"], request.extensions.get("sni_hostname"))
        )
        return httpx.Response(204)

    transport = GuardedTransport(STRICT, httpx.MockTransport(peer), rebinding)
    async with httpx.AsyncClient(transport=transport) as c:
        assert (await c.post("https://hooks.crm.example/t", content=b"{}")).status_code == 204
        with pytest.raises(TargetRefused, match="loopback"):
            await c.post("https://hooks.crm.example/t", content=b"{}")
    assert lookups == ["hooks.crm.example"] * 2
    assert sent == [("93.184.216.34", "hooks.crm.example", "hooks.crm.example")]


async def test_tls_names_the_host_while_connecting_to_the_address(tmp_path: Path) -> None:
    ca = make_test_ca(tmp_path / "tls")
    seen: list[str | None] = []
    server_context = ca.server_context()
    server_context.sni_callback = lambda sock, name, ctx: seen.append(name)  # type: ignore[assignment,misc]
    receiver = Receiver(tls=server_context).start()
    try:
        allowed = WebhookSettings(allowed_networks=LOOPBACK)
        # The certificate names localhost and 127.0.0.1, not other.test.
        resolver = fixed({"localhost": ["127.0.0.1"], "other.test": ["127.0.0.1"]})

        def transport() -> GuardedTransport:
            inner = httpx.AsyncHTTPTransport(verify=ca.client_context())
            return GuardedTransport(allowed, inner, resolver)

        async with httpx.AsyncClient(transport=transport()) as c:
            r = await c.post(receiver.url_for("localhost"), **signed_post(receiver))
        assert r.status_code == 200
        assert seen == ["localhost"]  # SNI names the host, not the address
        assert receiver.got[0].host == f"localhost:{receiver.port}"
        # Verified against the name: 127.0.0.1 is in the certificate, other.test is not.
        async with httpx.AsyncClient(transport=transport()) as c:
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await c.post(receiver.url_for("other.test"), **signed_post(receiver))
    finally:
        receiver.stop()


async def test_a_refused_delivery_fails_and_goes_dead(world: World, receiver: Receiver) -> None:
    """Registered while loopback was allowed; the operator closed it since. Every
    attempt fails with the reason, the delivery ends dead, nothing is posted."""
    k = world.ts.kernel
    opened = WebhookSettings(allowed_networks=LOOPBACK)
    made = webhooks.create_endpoint(k, SUB, receiver.url_for("localhost"), settings=opened)
    receiver.secret = made["secret"]
    k.store.call(
        lambda s: s.add(
            Event(subaccount_id=SUB, type="thread.stopped",
                  payload={"event": "thread.stopped", "subaccount": SUB, "thread_id": "th"})
        )
    )  # fmt: skip
    closed = WebhookSettings(
        backoff_base_seconds=0.05, backoff_max_seconds=0.1, poll_seconds=0.05,
        settle_seconds=0.01, retry_hours=0.5 / 3600,
    )  # fmt: skip
    dispatcher = Dispatcher(webhooks.Webhooks(k), closed)
    task = asyncio.create_task(dispatcher.run())

    def dead() -> list[dict[str, Any]]:
        return list(webhooks.list_deliveries(k, SUB, status="dead")["deliveries"])

    try:
        await wait_for(lambda: len(dead()) == 1, 15, "the delivery to die")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    (letter,) = dead()
    assert letter["attempts"] >= 2 and letter["last_status_code"] is None
    assert letter["last_error"] == (
        "target refused: 127.0.0.1 is a loopback address (an address of localhost)"
    )
    assert receiver.got == [] and dispatcher.delivered == 0


def test_operator_settings_are_read_from_config(tmp_path: Path) -> None:
    def read(webhooks_section: dict[str, Any]) -> WebhookSettings:
        raw = {
            "database": {"url": "sqlite:///unused.db"},
            "security": {"secret_key_file": "unused.key"},
            "webhooks": webhooks_section,
        }
        return http_settings(from_mapping(raw, base=tmp_path)).webhooks

    assert read({}).allowed_networks == () and read({}).allow_private_targets is False
    got = read({"allowed_networks": ["127.0.0.0/8", "fd00::/8"], "allow_private_targets": True})
    assert got.allowed_networks == (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("fd00::/8"),
    )
    assert got.allow_private_targets is True
    for bad in ({"allowed_networks": "10.0.0.0/8"}, {"allowed_networks": ["10.0.0.300/8"]},
                {"allow_private_targets": "yes"}):  # fmt: skip
        with pytest.raises(ConfigError):
            read(bad)


async def test_an_unresolvable_host_names_the_url(
    world: World, api_factory: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    """A delivery to a host that does not resolve: the dead letter, as the HTTP API
    lists it, and the log line say which URL failed and why."""
    k = world.ts.kernel
    url = "https://no-such-host.invalid/hook"
    webhooks.create_endpoint(k, SUB, url)
    k.store.call(
        lambda s: s.add(
            Event(subaccount_id=SUB, type="thread.stopped",
                  payload={"event": "thread.stopped", "subaccount": SUB, "thread_id": "th"})
        )
    )  # fmt: skip
    fast = WebhookSettings(
        backoff_base_seconds=0.05, backoff_max_seconds=0.1, poll_seconds=0.05,
        settle_seconds=0.01, retry_hours=0.5 / 3600,
    )  # fmt: skip
    dispatcher = Dispatcher(webhooks.Webhooks(k), fast)
    task = asyncio.create_task(dispatcher.run())
    api = api_factory()
    listing = f"/v1/subaccounts/{SUB}/webhook-deliveries"

    def dead() -> list[dict[str, Any]]:
        with api.client(api.key) as c:
            return list(c.get(listing, params={"status": "dead"}).json()["deliveries"])

    with caplog.at_level("INFO", logger="threadsync"):
        try:
            await wait_for(lambda: len(dead()) == 1, 30, "the delivery to die")
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    (letter,) = dead()
    assert url in letter["last_error"] and "no-such-host.invalid" in letter["last_error"]
    assert "no response" not in letter["last_error"], letter
    logged = [r for r in caplog.records if "webhook delivery" in r.getMessage()]
    assert logged and url in logged[0].getMessage(), [r.getMessage() for r in logged]
