"""Shared and delegated mailboxes: the signed-in user connects a mailbox they
have full access and send-as rights to (``--shared``); it is read and sent
through ``/users/{address}`` with the ``.Shared`` permissions, and its own Sent
Items keep what it sends."""

from __future__ import annotations

import httpx
import pytest

from tests.fakes import FakeMicrosoft
from tests.fakes.world import MAILBOX, opened
from tests.kernelfixtures import CONTACT, make_mail
from tests.plugins.test_outlook_sending import MID, Checkpoint, outgoing
from threadsync.core.errors import AuthenticationFailed
from threadsync.core.provider import Account, Folder
from threadsync.plugins.outlook import OutlookProvider

pytest_plugins = ["tests.fakes.fixtures"]
SALES = "sales@contoso.test"
INBOX = Folder("inbox", "inbox")


async def connect_shared(ms: FakeMicrosoft) -> tuple[Account, dict[str, object]]:
    settings = ms.provider_settings()
    try:
        account = await OutlookProvider.authorize(SALES, {"shared": True}, {},
                                                  ms.browser(MAILBOX), settings)
    finally:
        await ms.settle()
    return account, settings


async def test_a_shared_mailbox_is_read_and_sent_through_users(ms: FakeMicrosoft) -> None:
    ms.add_user(SALES)
    ms.graph.delegate(SALES, MAILBOX)
    account, settings = await connect_shared(ms)
    assert account.email == SALES and account.settings["shared"] is True
    async with opened(account, settings) as provider:
        cursor = (await provider.changes(INBOX, None)).cursor
        raw, mid = make_mail(sender=CONTACT, to=SALES, subject="Question", body="b")
        ms.deliver(SALES, raw)
        batch = await provider.changes(INBOX, cursor)
        body = await provider.fetch(INBOX, batch.headers[0].ref)
        await provider.send(outgoing(sender=SALES), Checkpoint(ms))
    assert [h.message_id for h in batch.headers] == [mid] and mid.encode() in body
    assert [t.mailbox for t in ms.sent(MID)] == [SALES]
    assert ms.message_ids(SALES, "sentitems") == [MID]
    assert ms.message_ids(MAILBOX, "sentitems") == [] and ms.messages(MAILBOX, "drafts") == []
    mail = [e for e in ms.requests() if e.path.startswith("/me/m")]
    assert mail and all(e.mailbox == SALES for e in mail)


async def test_without_delegate_rights_the_connection_is_refused(ms: FakeMicrosoft) -> None:
    ms.add_user(SALES)
    with pytest.raises(AuthenticationFailed, match="no access"):
        await connect_shared(ms)


async def test_the_fake_serves_users_by_id_only_with_delegation(ms: FakeMicrosoft) -> None:
    ms.add_user(SALES)
    ms.graph.delegate(SALES, MAILBOX)
    _, settings = await connect_shared(ms)


    token = ms.identity.token_of(MAILBOX)
    oid = ms.identity.user(SALES).oid
    async with httpx.AsyncClient(verify=ms.ca.client_context(),
                                 headers={"Authorization": f"Bearer {token}"}) as client:
        by_id = await client.get(f"{settings['graph_url']}/users/{oid}/mailFolders/inbox")
        by_upn = await client.get(f"{settings['graph_url']}/users/{SALES}/mailFolders/inbox")
        ms.graph.delegates.clear()
        refused = await client.get(f"{settings['graph_url']}/users/{oid}/mailFolders/inbox")
        unknown = await client.get(f"{settings['graph_url']}/users/nobody@x.test/messages")
    assert (by_id.status_code, by_upn.status_code) == (200, 200)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "ErrorAccessDenied"
    assert unknown.status_code == 404
