"""The fake Graph accepts what Microsoft Graph accepts and refuses what it
refuses (as documented), so that passing against it means something.

Requests are made with a plain httpx client and a real token from the fake
identity platform, the way the official SDKs would make them.
"""

from __future__ import annotations

import base64
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tests.fakes import FakeMicrosoft
from tests.fakes.world import MAILBOX, sign_in
from tests.kernelfixtures import CONTACT, make_mail

pytest_plugins = ["tests.fakes.fixtures"]
IMMUTABLE = {"Prefer": 'IdType="ImmutableId"'}


@pytest.fixture
async def graph(ms: FakeMicrosoft) -> AsyncIterator[httpx.AsyncClient]:
    _, settings = await sign_in(ms)
    token = ms.identity.token_of(MAILBOX)
    async with httpx.AsyncClient(
        base_url=settings["graph_url"], verify=ms.ca.client_context(),
        headers={"Authorization": f"Bearer {token}", **IMMUTABLE},
    ) as client:
        yield client


def message(**extra: Any) -> dict[str, Any]:
    return {"subject": "Hi", "body": {"contentType": "Text", "content": "Hello"},
            "toRecipients": [{"emailAddress": {"address": CONTACT}}], **extra}


def code(response: httpx.Response) -> str:
    return str(response.json()["error"]["code"])


async def test_send_mail_accepts_the_sdks_capitalised_body(
    graph: httpx.AsyncClient, ms: FakeMicrosoft
) -> None:
    sdk = await graph.post("/me/sendMail", json={"Message": message(), "SaveToSentItems": True})
    plain = await graph.post("/me/sendMail", json={"message": message(),
                                                   "saveToSentItems": False})
    assert (sdk.status_code, plain.status_code) == (202, 202)
    assert len(ms.sent()) == 2 and len(ms.messages(MAILBOX, "sentitems")) == 1


async def test_json_headers_must_be_x_headers_and_at_most_five(graph: httpx.AsyncClient) -> None:
    threading = message(internetMessageHeaders=[{"name": "In-Reply-To", "value": "<a@b>"}])
    refused = await graph.post("/me/sendMail", json={"message": threading})
    assert refused.status_code == 400 and code(refused) == "InvalidInternetMessageHeader"
    custom = message(internetMessageHeaders=[{"name": "x-crm", "value": "1"}])
    assert (await graph.post("/me/messages", json=custom)).status_code == 201
    six = message(internetMessageHeaders=[{"name": f"x-h{n}", "value": "1"} for n in range(6)])
    too_many = await graph.post("/me/messages", json=six)
    assert code(too_many) == "InvalidInternetMessageHeaderCollection"


async def test_missing_auth_bad_prefer_and_oversized_requests_are_refused(
    graph: httpx.AsyncClient, ms: FakeMicrosoft
) -> None:
    anonymous = await graph.get("/me", headers={"Authorization": ""})
    assert anonymous.status_code == 401 and code(anonymous) == "InvalidAuthenticationToken"
    bad = await graph.get("/me", headers={"Prefer": "IdType=Immutable"})
    assert bad.status_code == 400
    huge = base64.b64encode(b"x" * 3_200_000)
    too_big = await graph.post("/me/messages", content=huge,
                               headers={"Content-Type": "text/plain"})
    assert too_big.status_code == 413
    many = [{"emailAddress": {"address": f"r{n}@example.net"}} for n in range(501)]
    crowded = await graph.post("/me/messages", json=message(toRecipients=many))
    assert crowded.status_code == 400


async def test_ids_are_immutable_only_when_asked_for(
    graph: httpx.AsyncClient, ms: FakeMicrosoft
) -> None:
    raw, _ = make_mail(sender=CONTACT, to=MAILBOX, subject="s", body="b")
    msg = ms.deliver(MAILBOX, raw)
    rest = (await graph.get("/me/mailFolders('inbox')/messages",
                            headers={"Prefer": 'IdType="RestId"'})).json()["value"][0]["id"]
    immutable = (await graph.get("/me/mailFolders/inbox/messages")).json()["value"][0]["id"]
    assert immutable == msg.id and rest != msg.id
    with ms.graph.lock:
        ms.graph.mailbox(MAILBOX).move(msg, "deleteditems")
    assert (await graph.get(f"/me/messages/{immutable}")).status_code == 200
    assert (await graph.get(f"/me/messages/{rest}")).status_code == 404


async def test_delta_with_parentheses_and_removed_and_gone(
    graph: httpx.AsyncClient, ms: FakeMicrosoft
) -> None:
    raw, _ = make_mail(sender=CONTACT, to=MAILBOX, subject="s", body="b")
    msg = ms.deliver(MAILBOX, raw)
    first = (await graph.get("/me/mailFolders('inbox')/messages/delta()",
                             params={"$select": "subject"})).json()
    assert [v["id"] for v in first["value"]] == [msg.id] and "@odata.deltaLink" in first
    assert set(first["value"][0]) == {"id", "@odata.etag", "subject"}
    with ms.graph.lock:
        ms.graph.mailbox(MAILBOX).delete(msg)
    second = (await graph.get(first["@odata.deltaLink"])).json()
    assert second["value"] == [{"@odata.type": "#microsoft.graph.message", "id": msg.id,
                                "@removed": {"reason": "deleted"}}]
    ms.graph.expire_delta_tokens(MAILBOX, "inbox")
    gone = await graph.get(second["@odata.deltaLink"])
    assert gone.status_code == 410 and code(gone) == "SyncStateNotFound"


async def test_batch_limits(graph: httpx.AsyncClient) -> None:
    item = {"id": "1", "method": "GET", "url": "/me?$select=mail"}
    ok = (await graph.post("/$batch", json={"requests": [item]})).json()
    assert ok["responses"][0]["status"] == 200 and ok["responses"][0]["body"]["mail"] == MAILBOX
    too_many = await graph.post("/$batch", json={"requests": [
        {**item, "id": str(n)} for n in range(21)]})
    assert too_many.status_code == 400
    versioned = (await graph.post("/$batch", json={"requests": [
        {**item, "url": "/v1.0/me"}]})).json()
    assert versioned["responses"][0]["status"] == 400


async def test_create_reply_threads_and_send_moves_to_sent_items(
    graph: httpx.AsyncClient, ms: FakeMicrosoft
) -> None:
    raw, parent = make_mail(sender=CONTACT, to=MAILBOX, subject="Offer", body="b",
                            headers={"References": "<root@x>"})
    original = ms.deliver(MAILBOX, raw)
    draft = (await graph.post(f"/me/messages/{original.id}/createReply",
                              json={"comment": "Thanks"})).json()
    assert draft["isDraft"] is True
    assert (await graph.post(f"/me/messages/{draft['id']}/send")).status_code == 202
    [sent] = ms.messages(MAILBOX, "sentitems")
    assert sent.id == draft["id"] and not sent.is_draft
    assert sent.header("In-Reply-To") == parent
    assert sent.header("References") == f"<root@x> {parent}"
    again = await graph.post(f"/me/messages/{draft['id']}/send")
    assert again.status_code == 400  # a sent draft cannot go out twice
    patched = await graph.patch(f"/me/messages/{draft['id']}", json={"internetMessageId": "<n@x>"})
    assert code(patched) == "ErrorInvalidPropertyUpdateSentMessage"


async def test_upload_sessions_refuse_an_authorization_header(
    graph: httpx.AsyncClient, ms: FakeMicrosoft
) -> None:
    draft = (await graph.post("/me/messages", json=message())).json()
    session = (await graph.post(f"/me/messages/{draft['id']}/attachments/createUploadSession",
                                json={"AttachmentItem": {"attachmentType": "file",
                                                         "name": "a.bin", "size": 4}})).json()
    async with httpx.AsyncClient(verify=ms.ca.client_context()) as plain:
        refused = await plain.put(session["uploadUrl"], content=b"abcd", headers={
            "Content-Range": "bytes 0-3/4", "Authorization": "Bearer x"})
        done = await plain.put(session["uploadUrl"], content=b"abcd",
                               headers={"Content-Range": "bytes 0-3/4"})
    assert (refused.status_code, done.status_code) == (401, 201)


async def test_subscriptions_are_validated_and_bounded(graph: httpx.AsyncClient) -> None:
    body = {"changeType": "created", "resource": "me/mailFolders('inbox')/messages",
            "notificationUrl": "https://127.0.0.1:9/nowhere", "clientState": "s",
            "expirationDateTime": "2999-01-01T00:00:00Z"}
    too_long = await graph.post("/subscriptions", json=body)
    assert too_long.status_code == 400 and "4230" in too_long.text
    body["expirationDateTime"] = "2020-01-01T00:00:00Z"
    assert (await graph.post("/subscriptions", json=body)).status_code == 400


async def test_unknown_select_properties_are_refused(
    graph: httpx.AsyncClient, ms: FakeMicrosoft
) -> None:
    raw, _ = make_mail(sender=CONTACT, to=MAILBOX, subject="s", body="b")
    msg = ms.deliver(MAILBOX, raw)
    known = await graph.get(f"/me/messages/{msg.id}", params={"$select": "subject,isRead"})
    unknown = await graph.get(f"/me/messages/{msg.id}", params={"$select": "subject,threadId"})
    in_delta = await graph.get("/me/mailFolders/inbox/messages/delta",
                               params={"$select": "inReplyTo"})
    assert known.status_code == 200 and set(known.json()) == {"@odata.etag", "id", "subject",
                                                              "isRead"}
    assert unknown.status_code == 400 and "threadId" in unknown.json()["error"]["message"]
    assert in_delta.status_code == 400


async def test_lists_honour_top_and_page_with_next_links(
    graph: httpx.AsyncClient, ms: FakeMicrosoft
) -> None:
    for n in range(5):
        raw, _ = make_mail(sender=CONTACT, to=MAILBOX, subject=f"s{n}", body="b")
        ms.deliver(MAILBOX, raw)
    pages = []
    url: str | None = "/me/mailFolders/inbox/messages?$top=2&$select=subject"
    while url:
        page = (await graph.get(url)).json()
        pages.append([m["subject"] for m in page["value"]])
        url = page.get("@odata.nextLink")
    assert pages == [["s0", "s1"], ["s2", "s3"], ["s4"]]
    default = (await graph.get("/me/mailFolders/inbox/messages")).json()
    assert len(default["value"]) == 5 and "@odata.nextLink" not in default


async def test_create_and_create_reply_answer_with_the_whole_message(
    graph: httpx.AsyncClient, ms: FakeMicrosoft
) -> None:
    created = (await graph.post("/me/messages", json=message())).json()
    assert created["toRecipients"] == [{"emailAddress": {"name": CONTACT, "address": CONTACT}}]
    assert {"from", "body", "conversationId", "ccRecipients", "bccRecipients",
            "internetMessageId", "parentFolderId", "isDraft"} <= set(created)
    raw, _ = make_mail(sender=CONTACT, to=MAILBOX, subject="Offer", body="b")
    original = ms.deliver(MAILBOX, raw)
    reply = (await graph.post(f"/me/messages/{original.id}/createReply", json={})).json()
    assert reply["toRecipients"][0]["emailAddress"]["address"] == CONTACT
    assert reply["subject"] == "RE: Offer" and reply["isDraft"] is True


async def test_filtered_delta_is_capped_and_ordered_newest_first_on_request(
    graph: httpx.AsyncClient, ms: FakeMicrosoft
) -> None:
    ms.graph.filtered_delta_cap = 2
    for n in range(4):
        raw, _ = make_mail(sender=CONTACT, to=MAILBOX, subject=f"s{n}", body="b")
        ms.deliver(MAILBOX, raw)
    since = {"$select": "subject", "$filter": "receivedDateTime ge 2000-01-01T00:00:00Z"}
    plain = (await graph.get("/me/mailFolders/inbox/messages/delta", params=since)).json()
    newest = (await graph.get("/me/mailFolders/inbox/messages/delta", params={
        **since, "$orderby": "receivedDateTime desc"})).json()
    everything = (await graph.get("/me/mailFolders/inbox/messages/delta",
                                  params={"$select": "subject"})).json()
    wrong = await graph.get("/me/mailFolders/inbox/messages/delta",
                            params={"$orderby": "subject"})
    assert [m["subject"] for m in plain["value"]] == ["s0", "s1"]
    assert [m["subject"] for m in newest["value"]] == ["s3", "s2"]
    assert len(everything["value"]) == 4  # the cap applies to filtered deltas only
    assert wrong.status_code == 400


async def test_batch_items_keep_their_content_type(graph: httpx.AsyncClient) -> None:
    item = {"id": "1", "method": "GET", "url": "/me?$select=mail"}
    answer = (await graph.post("/$batch", json={"requests": [item]})).json()["responses"][0]
    assert answer["headers"]["content-type"].startswith("application/json")


async def test_identity_errors_carry_trace_correlation_and_error_uri(
    ms: FakeMicrosoft,
) -> None:
    url = f"{ms.server.base}/{ms.identity.tenant_id}/oauth2/v2.0/token"
    async with httpx.AsyncClient(verify=ms.ca.client_context()) as client:
        answer = await client.post(url, data={"grant_type": "refresh_token",
                                              "client_id": "no-such-app",
                                              "refresh_token": "x"})
    error = answer.json()
    assert answer.status_code >= 400 and error["error"]
    assert error["trace_id"] in error["error_description"]
    assert error["correlation_id"] in error["error_description"]
    assert error["error_uri"].startswith("https://") and error["error_codes"]


# ---- Microsoft's own client ------------------------------------------------------------------


class _Credential:
    """An async token credential (azure-core's protocol) handing out a fake token."""

    def __init__(self, token: str) -> None:
        self.token = token

    async def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        from azure.core.credentials import AccessToken

        return AccessToken(self.token, int(time.time()) + 3600)

    async def close(self) -> None:
        return None

    async def __aenter__(self) -> _Credential:
        return self

    async def __aexit__(self, *args: object) -> None:
        return None


@pytest.fixture
async def sdk(ms: FakeMicrosoft) -> AsyncIterator[Any]:
    """``GraphServiceClient`` of the official SDK (msgraph-sdk), unmodified, pointed
    at the fake with a token of the fake identity platform."""
    pytest.importorskip("msgraph", reason="msgraph-sdk is not installed (pip install "
                                          "msgraph-sdk, or the test extra)")
    from kiota_authentication_azure.azure_identity_authentication_provider import (
        AzureIdentityAuthenticationProvider,
    )
    from msgraph import GraphRequestAdapter, GraphServiceClient
    from msgraph.graph_request_adapter import options
    from msgraph_core import GraphClientFactory

    _, settings = await sign_in(ms)
    auth = AzureIdentityAuthenticationProvider(
        _Credential(ms.identity.token_of(MAILBOX)),
        scopes=["https://graph.microsoft.com/.default"], allowed_hosts=["127.0.0.1"])
    transport = httpx.AsyncHTTPTransport(verify=ms.ca.client_context())
    http = GraphClientFactory.create_with_default_middleware(
        client=httpx.AsyncClient(transport=transport), options=options)
    adapter = GraphRequestAdapter(auth, client=http)
    adapter.base_url = settings["graph_url"]
    try:
        yield GraphServiceClient(request_adapter=adapter)
    finally:
        await http.aclose()
        await transport.aclose()  # the SDK's middleware transport does not close it


def _immutable(config_class: Any, **query: Any) -> Any:
    """Request configuration with ``Prefer: IdType="ImmutableId"`` (and a query)."""
    from kiota_abstractions.base_request_configuration import RequestConfiguration

    config: Any = RequestConfiguration(query_parameters=config_class(**query) if query
                                       else None)
    config.headers.add("Prefer", 'IdType="ImmutableId"')
    return config


#: The SDK's generated code warns about its own deprecated classes on import.
SDK_WARNINGS = pytest.mark.filterwarnings(
    "ignore:GetQueryParameters is deprecated:DeprecationWarning",
    "ignore:This class is deprecated:DeprecationWarning")


@SDK_WARNINGS
async def test_the_sdk_reads_what_the_provider_reads(sdk: Any, ms: FakeMicrosoft) -> None:
    from msgraph.generated.users.item.mail_folders.item.messages.delta.delta_request_builder import (  # noqa: E501
        DeltaRequestBuilder,
    )
    from msgraph.generated.users.item.messages.item.message_item_request_builder import (
        MessageItemRequestBuilder,
    )
    from msgraph.generated.users.item.user_item_request_builder import UserItemRequestBuilder

    me = await sdk.me.get(_immutable(
        UserItemRequestBuilder.UserItemRequestBuilderGetQueryParameters,
        select=["mail", "userPrincipalName", "proxyAddresses"]))
    assert me.mail == MAILBOX and me.proxy_addresses == [f"SMTP:{MAILBOX}"]
    inbox = await sdk.me.mail_folders.by_mail_folder_id("inbox").get()
    assert inbox.id
    raw, mid = make_mail(sender=CONTACT, to=MAILBOX, subject="Hi", body="b",
                         headers={"In-Reply-To": "<p@x>", "References": "<p@x>"})
    msg = ms.deliver(MAILBOX, raw)
    delta = await sdk.me.mail_folders.by_mail_folder_id("inbox").messages.delta.get(_immutable(
        DeltaRequestBuilder.DeltaRequestBuilderGetQueryParameters,
        select=["internetMessageId", "subject", "from", "internetMessageHeaders"],
        filter="receivedDateTime ge 2000-01-01T00:00:00Z", orderby=["receivedDateTime desc"]))
    [item] = delta.value
    assert item.id == msg.id and item.internet_message_id == mid
    assert {h.name: h.value for h in item.internet_message_headers}["In-Reply-To"] == "<p@x>"
    assert delta.odata_delta_link
    again = await sdk.me.mail_folders.by_mail_folder_id("inbox").messages.delta.with_url(
        delta.odata_delta_link).get()
    assert again.value == []
    props = await sdk.me.messages.by_message_id(msg.id).get(_immutable(
        MessageItemRequestBuilder.MessageItemRequestBuilderGetQueryParameters,
        select=["internetMessageId"],
        expand=["singleValueExtendedProperties($filter=id eq 'String 0x1042')"]))
    assert [p.value for p in props.single_value_extended_properties] == ["<p@x>"]
    mime = await sdk.me.messages.by_message_id(msg.id).content.get()
    assert mid.encode() in mime
    shared = await sdk.users.by_user_id(MAILBOX).mail_folders.by_mail_folder_id("inbox").get()
    assert shared.id == inbox.id


@SDK_WARNINGS
async def test_the_sdk_writes_what_the_provider_writes(sdk: Any, ms: FakeMicrosoft) -> None:
    from msgraph.generated.models.email_address import EmailAddress
    from msgraph.generated.models.file_attachment import FileAttachment
    from msgraph.generated.models.message import Message
    from msgraph.generated.models.recipient import Recipient
    from msgraph.generated.users.item.mail_folders.item.messages.messages_request_builder import (
        MessagesRequestBuilder,
    )

    draft = await sdk.me.messages.post(Message(
        subject="Offer", to_recipients=[Recipient(email_address=EmailAddress(address=CONTACT))]))
    assert draft.is_draft and draft.to_recipients[0].email_address.address == CONTACT
    patched = await sdk.me.messages.by_message_id(draft.id).patch(
        Message(internet_message_id="<ours@threadsync.local>"))
    assert patched.internet_message_id == "<ours@threadsync.local>"
    attachment = await sdk.me.messages.by_message_id(draft.id).attachments.post(FileAttachment(
        odata_type="#microsoft.graph.fileAttachment", name="a.txt", content_bytes=b"hello",
        content_type="text/plain"))
    assert attachment.name == "a.txt"
    await sdk.me.messages.by_message_id(draft.id).send.post()
    found = await sdk.me.mail_folders.by_mail_folder_id("sentitems").messages.get(_immutable(
        MessagesRequestBuilder.MessagesRequestBuilderGetQueryParameters,
        filter="internetMessageId eq '<ours@threadsync.local>'", select=["id"], top=1))
    assert [m.id for m in found.value] == [ms.id_of(MAILBOX, "<ours@threadsync.local>")]
    assert len(ms.sent("<ours@threadsync.local>")) == 1
    other = await sdk.me.messages.post(Message(subject="Unsent"))
    await sdk.me.messages.by_message_id(other.id).delete()
    assert ms.messages(MAILBOX, "drafts") == []


@SDK_WARNINGS
async def test_the_sdk_parses_batches_with_throttled_items(sdk: Any, ms: FakeMicrosoft) -> None:
    from kiota_abstractions.method import Method
    from kiota_abstractions.request_information import RequestInformation
    from msgraph_core.requests.batch_request_content import BatchRequestContent
    from msgraph_core.requests.batch_request_item import BatchRequestItem

    items = {}
    for n in range(6):
        info = RequestInformation()
        info.http_method = Method.GET
        info.url = f"{sdk.request_adapter.base_url}/me/mailFolders/inbox?$select=id"
        items[str(n)] = BatchRequestItem(request_information=info, id=str(n))
    answer = await sdk.batch.post(BatchRequestContent(items))
    statuses = sorted(r.status for r in answer.responses.values())
    assert statuses == [200] * 4 + [429] * 2
    throttled = [r for r in answer.responses.values() if r.status == 429]
    assert all(r.headers["retry-after"] for r in throttled)
