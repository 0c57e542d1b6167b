"""Autodiscover against the fake Exchange Server: exchangelib's SOAP autodiscover
(GetUserSettings, NTLM) finds the EWS URL when ``--ews-url`` is left out, and
the POX endpoint answers as documented. The address's domain is the fake's
loopback ``host:port``; only the DNS lookup of that name is skipped."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from exchangelib.autodiscover.discovery import Autodiscovery
from lxml import etree

from tests.fakes.ews import FakeEws
from tests.fakes.ews_world import PASSWORD, PASSWORD_ENV, SETTINGS
from tests.servers.tlscerts import TestCA
from threadsync.core.errors import AuthenticationFailed
from threadsync.core.provider import Folder
from threadsync.plugins.exchange import ExchangeProvider
from threadsync.plugins.exchange.autodiscover import discover_ews_url
from threadsync.testing import make_message

pytest_plugins = ["tests.fakes.ews_fixtures"]


@pytest.fixture
def loopback_address(ews: FakeEws, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A mailbox whose domain is the fake's ``127.0.0.1:port``."""
    monkeypatch.setattr(Autodiscovery, "_ensure_valid_hostname", lambda self, url: None)
    address = f"ann@{ews.base.split('//', 1)[1]}"
    ews.store.add_user(address, PASSWORD)
    yield address


async def test_soap_autodiscover_finds_the_ews_url(
    ews: FakeEws, test_ca: TestCA, loopback_address: str
) -> None:
    url = await discover_ews_url(loopback_address, "CONTOSO\\ann", PASSWORD,
                                 str(test_ca.ca_file), 10)
    assert url == ews.url
    assert ews.ntlm.handshakes >= 1
    assert [e.operation for e in ews.log if e.status == 200] == ["(autodiscover)"]


async def test_a_provider_without_ews_url_autodiscovers_and_reads(
    ews: FakeEws, test_ca: TestCA, loopback_address: str
) -> None:
    acct = ExchangeProvider.prepare(loopback_address, {
        "username": "CONTOSO\\ann", "password_env": PASSWORD_ENV,
        "ca_file": str(test_ca.ca_file)}, {"password": PASSWORD})
    assert "ews_url" not in acct.settings and acct.settings["auth"] == "ntlm"
    provider = ExchangeProvider(acct, SETTINGS)
    await provider.open()
    try:
        inbox = Folder("inbox", "inbox")
        cursor = (await provider.changes(inbox, None)).cursor
        ews.deliver(loopback_address, make_message("<found@x.test>", to=loopback_address))
        batch = await provider.changes(inbox, cursor)
    finally:
        await provider.close()
    assert [h.message_id for h in batch.headers] == ["<found@x.test>"]


async def test_soap_autodiscover_with_a_wrong_password_is_refused(
    test_ca: TestCA, loopback_address: str
) -> None:
    with pytest.raises(AuthenticationFailed) as info:
        await discover_ews_url(loopback_address.replace("ann@", "bob@"), "CONTOSO\\ann", "Not-It-1",
                               str(test_ca.ca_file), 10)
    assert "Not-It-1" not in str(info.value)


async def test_pox_autodiscover_answers_with_the_ews_url(ews: FakeEws, test_ca: TestCA) -> None:
    request = (
        b'<?xml version="1.0" encoding="utf-8"?><Autodiscover xmlns="http://schemas.microsoft'
        b'.com/exchange/autodiscover/outlook/requestschema/2006"><Request><EMailAddress>'
        b"ann@contoso.test</EMailAddress><AcceptableResponseSchema>http://schemas.microsoft."
        b"com/exchange/autodiscover/outlook/responseschema/2006a</AcceptableResponseSchema>"
        b"</Request></Autodiscover>")
    async with httpx.AsyncClient(verify=test_ca.client_context()) as client:
        url = f"{ews.base}/autodiscover/autodiscover.xml"
        anonymous = await client.post(url, content=request)
        answer = await client.post(url, content=request, auth=("ann@contoso.test", PASSWORD))
    assert anonymous.status_code == 401
    assert answer.status_code == 200
    ns = {"a": "http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a"}
    root = etree.fromstring(answer.content)
    assert root.findtext(".//a:User/a:AutoDiscoverSMTPAddress", namespaces=ns) == (
        "ann@contoso.test")
    assert root.xpath("//a:Protocol[a:Type='EXCH']/a:EwsUrl/text()", namespaces=ns) == [ews.url]
