"""The fake Exchange Server checks what a real one checks, seen from a plain
HTTPS client: credentials, the SOAP envelope, RequestServerVersion, and that a
sync state is one it issued for that folder."""

from __future__ import annotations

import httpx
from lxml import etree

from tests.fakes.ews import FakeEws
from tests.fakes.ews_world import MAILBOX, PASSWORD
from tests.servers.tlscerts import TestCA

pytest_plugins = ["tests.fakes.ews_fixtures"]

NS = {"s": "http://schemas.xmlsoap.org/soap/envelope/",
      "m": "http://schemas.microsoft.com/exchange/services/2006/messages",
      "t": "http://schemas.microsoft.com/exchange/services/2006/types"}


def sync_request(state: str | None, folder: str = "inbox",
                 version: str = "Exchange2016") -> bytes:
    state_xml = f"<m:SyncState>{state}</m:SyncState>" if state is not None else ""
    return (
        f'<s:Envelope xmlns:s="{NS["s"]}" xmlns:m="{NS["m"]}" xmlns:t="{NS["t"]}">'
        f'<s:Header><t:RequestServerVersion Version="{version}"/></s:Header><s:Body>'
        "<m:SyncFolderItems><m:ItemShape><t:BaseShape>IdOnly</t:BaseShape></m:ItemShape>"
        f'<m:SyncFolderId><t:DistinguishedFolderId Id="{folder}"/></m:SyncFolderId>'
        f"{state_xml}<m:MaxChangesReturned>10</m:MaxChangesReturned></m:SyncFolderItems>"
        "</s:Body></s:Envelope>"
    ).encode()


async def post(ews: FakeEws, ca: TestCA, body: bytes, auth: tuple[str, str] | None = (
        MAILBOX, PASSWORD)) -> httpx.Response:
    async with httpx.AsyncClient(verify=ca.client_context()) as client:
        return await client.post(ews.url, content=body, auth=auth,
                                 headers={"content-type": "text/xml; charset=utf-8"})


def response_code(answer: httpx.Response) -> str | None:
    root = etree.fromstring(answer.content)
    return root.findtext(".//m:ResponseCode", namespaces=NS)


async def test_credentials_are_required_and_both_methods_offered(
    ews: FakeEws, test_ca: TestCA
) -> None:
    anonymous = await post(ews, test_ca, sync_request(None), auth=None)
    wrong = await post(ews, test_ca, sync_request(None), auth=(MAILBOX, "nope"))
    assert anonymous.status_code == wrong.status_code == 401
    offered = anonymous.headers["www-authenticate"]
    assert "NTLM" in offered and "Basic" in offered


async def test_only_issued_sync_states_are_accepted(ews: FakeEws, test_ca: TestCA) -> None:
    first = await post(ews, test_ca, sync_request(None))
    assert first.status_code == 200 and response_code(first) == "NoError"
    state = etree.fromstring(first.content).findtext(".//m:SyncState", namespaces=NS)
    assert state
    again = await post(ews, test_ca, sync_request(state))
    assert response_code(again) == "NoError"
    forged = await post(ews, test_ca, sync_request("AAAAforged=="))
    other_folder = await post(ews, test_ca, sync_request(state, folder="sentitems"))
    assert response_code(forged) == response_code(other_folder) == "ErrorInvalidSyncStateData"
    ews.store.forget_sync_states(MAILBOX, "inbox")
    assert response_code(await post(ews, test_ca, sync_request(state))) == (
        "ErrorInvalidSyncStateData")


async def test_envelope_and_server_version_are_checked(ews: FakeEws, test_ca: TestCA) -> None:
    not_soap = await post(ews, test_ca, b"<hello/>")
    assert not_soap.status_code == 400
    unknown = await post(ews, test_ca, sync_request(None, version="Exchange2003"))
    assert unknown.status_code == 500 and b"ErrorInvalidServerVersion" in unknown.content


async def test_throttling_on_demand_carries_back_off(ews: FakeEws, test_ca: TestCA) -> None:
    ews.throttle(1, back_off_ms=1234)
    busy = await post(ews, test_ca, sync_request(None))
    root = etree.fromstring(busy.content)
    value = root.find(".//t:MessageXml/t:Value", namespaces=NS)
    assert busy.status_code == 500 and value is not None
    assert (value.get("Name"), value.text) == ("BackOffMilliseconds", "1234")
    assert (await post(ews, test_ca, sync_request(None))).status_code == 200
