"""The ``exchange`` provider against the fake Exchange Server: connect options,
what reading asks for, throttling (ErrorServerBusy with BackOffMilliseconds),
errors translated at the boundary, sending with Bcc, and push."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.fakes.ews import FakeEws
from tests.fakes.ews_world import MAILBOX, PASSWORD, PASSWORD_ENV, account, opened
from tests.servers.tlscerts import TestCA
from threadsync.core.errors import (
    AuthenticationFailed,
    ConfigError,
    TransientProviderError,
)
from threadsync.core.provider import Folder, OutgoingMail
from threadsync.plugins.exchange import ExchangeProvider
from threadsync.plugins.exchange.ews import EwsSession
from threadsync.testing import make_message

pytest_plugins = ["tests.fakes.ews_fixtures"]

INBOX = Folder("inbox", "inbox")
SENT = Folder("sentitems", "sent")


async def checkpoint() -> None:
    return None


# ---- connect options ---------------------------------------------------------------------


@pytest.mark.parametrize("url", [
    "https://outlook.office365.com/EWS/Exchange.asmx",
    "https://outlook.office.com/EWS/Exchange.asmx",
    "https://contoso.mail.protection.outlook.com/EWS/Exchange.asmx",
])
def test_exchange_online_is_refused_at_connect(url: str) -> None:
    with pytest.raises(ConfigError, match="--provider outlook"):
        ExchangeProvider.prepare(MAILBOX, {"ews_url": url, "password_env": "P"},
                                 {"password": "x"})


def test_options_are_checked_without_network(tmp_path: Any) -> None:
    env = {"password": "secret"}
    with pytest.raises(ConfigError, match="https"):
        ExchangeProvider.prepare(MAILBOX, {"ews_url": "http://mail.contoso.test/EWS/Exchange.asmx",
                                           "password_env": "P"}, env)
    with pytest.raises(ConfigError, match="--password-env"):
        ExchangeProvider.prepare(MAILBOX, {"auth": "ntlm"}, {})
    with pytest.raises(ConfigError, match="--ews-url"):
        ExchangeProvider.prepare(MAILBOX, {"auth": "oauth"}, env)
    with pytest.raises(ConfigError, match="auth must be one of"):
        ExchangeProvider.prepare(MAILBOX, {"auth": "kerberos", "password_env": "P"}, env)
    with pytest.raises(ConfigError, match="cannot be read"):
        ExchangeProvider.prepare(MAILBOX, {"password_env": "P",
                                           "ca_file": str(tmp_path / "none.pem")}, env)
    acct = ExchangeProvider.prepare(MAILBOX, {"password_env": "P", "impersonate": "yes",
                                              "username": "CONTOSO\\svc"}, env)
    assert acct.secrets == {"password": "secret"}
    assert acct.settings["impersonate"] is True and acct.settings["auth"] == "ntlm"
    assert "secret" not in str(acct.settings)


# ---- reading --------------------------------------------------------------------------------


async def test_reading_asks_for_ids_and_threading_fields_only(
    ews: FakeEws, test_ca: TestCA
) -> None:
    async with opened(account(ews, test_ca)) as provider:
        inbox_cursor = (await provider.changes(INBOX, None)).cursor
        sent_cursor = (await provider.changes(SENT, None)).cursor
        ews.deliver(MAILBOX, make_message("<in@x.test>", in_reply_to="<a@x.test>",
                                          references=["<root@x.test>", "<a@x.test>"]))
        # Outlook's own sent mail: no transport headers; threading from the item.
        ews.file_in_sent(MAILBOX, make_message("<out@x.test>", sender=MAILBOX,
                                               in_reply_to="<in@x.test>",
                                               references=["<root@x.test>", "<in@x.test>"]))
        inbox = await provider.changes(INBOX, inbox_cursor)
        sent = await provider.changes(SENT, sent_cursor)
    assert [(h.message_id, h.in_reply_to, h.references) for h in inbox.headers] == [
        ("<in@x.test>", ("<a@x.test>",), ("<root@x.test>", "<a@x.test>"))]
    assert [(h.message_id, h.in_reply_to, h.references) for h in sent.headers] == [
        ("<out@x.test>", ("<in@x.test>",), ("<root@x.test>", "<in@x.test>"))]
    assert ews.bodies_read() == set()
    assert {e.operation for e in ews.log} == {"SyncFolderItems"}


async def test_a_new_connection_skips_history_with_ids_only(ews: FakeEws, test_ca: TestCA) -> None:
    for n in range(600):  # more than one SyncFolderItems page (512)
        ews.deliver(MAILBOX, make_message(f"<old-{n}@x.test>"))
    async with opened(account(ews, test_ca)) as provider:
        batch = await provider.changes(INBOX, None)
        assert batch.headers == []
        ews.deliver(MAILBOX, make_message("<new@x.test>"))
        after = await provider.changes(INBOX, batch.cursor)
    assert [h.message_id for h in after.headers] == ["<new@x.test>"]
    assert ews.count("SyncFolderItems") == 3 and ews.bodies_read() == set()


async def test_fetch_many_is_one_getitem_request(ews: FakeEws, test_ca: TestCA) -> None:
    async with opened(account(ews, test_ca)) as provider:
        cursor = (await provider.changes(INBOX, None)).cursor
        for n in range(3):
            ews.deliver(MAILBOX, make_message(f"<m{n}@x.test>", body=f"body {n}\n"))
        refs = [h.ref for h in (await provider.changes(INBOX, cursor)).headers]
        raws = await provider.fetch_many(INBOX, refs)
    assert [b"body %d" % n in raws[ref] for n, ref in enumerate(refs)] == [True] * 3
    assert ews.count("GetItem") == 1 and ews.bodies_read() == set(refs)


# ---- throttling and errors ---------------------------------------------------------------


async def test_server_busy_back_off_is_honoured(
    ews: FakeEws, test_ca: TestCA
) -> None:
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        await asyncio.sleep(0)

    async with opened(account(ews, test_ca)) as provider:
        assert isinstance(provider._session, EwsSession)
        provider._session.sleep = sleep
        cursor = (await provider.changes(INBOX, None)).cursor
        ews.deliver(MAILBOX, make_message("<busy@x.test>"))
        ews.throttle(2, back_off_ms=750)
        batch = await provider.changes(INBOX, cursor)
        assert [h.message_id for h in batch.headers] == ["<busy@x.test>"]
        assert waits == [0.75, 0.75]
        # Longer than max_retry_wait_seconds (2 in tests): the wait goes to the kernel.
        ews.throttle(10, back_off_ms=1500)
        with pytest.raises(TransientProviderError) as info:
            await provider.changes(INBOX, batch.cursor)
        assert info.value.retry_after == 1.5


@pytest.mark.parametrize("code", ["ErrorMailboxMoveInProgress", "ErrorMailboxStoreUnavailable",
                                  "ErrorTimeoutExpired"])
async def test_temporary_exchange_errors_are_transient(
    ews: FakeEws, test_ca: TestCA, code: str
) -> None:
    async with opened(account(ews, test_ca)) as provider:
        cursor = (await provider.changes(INBOX, None)).cursor
        ews.fail_next(code)
        with pytest.raises(TransientProviderError, match=code):
            await provider.changes(INBOX, cursor)
        assert (await provider.changes(INBOX, cursor)).headers == []


async def test_a_timeout_is_transient(ews: FakeEws, test_ca: TestCA) -> None:
    provider = ExchangeProvider(account(ews, test_ca), {"timeout_seconds": 1})
    await provider.open()
    try:
        ews.delay = 2.5
        with pytest.raises(TransientProviderError):
            await provider.changes(INBOX, None)
    finally:
        ews.delay = 0.0
        await provider.close()


async def test_401_is_authentication_failed_without_the_secret(
    ews: FakeEws, test_ca: TestCA
) -> None:
    provider = ExchangeProvider(account(ews, test_ca, password="Wrong-Pass-9"), {})
    await provider.open()
    try:
        with pytest.raises(AuthenticationFailed) as info:
            await provider.verify()
    finally:
        await provider.close()
    assert "Wrong-Pass-9" not in str(info.value) and PASSWORD not in str(info.value)
    assert [e.status for e in ews.log] == [401]


async def test_the_server_checks_the_request_server_version(ews: FakeEws, test_ca: TestCA) -> None:
    import httpx

    async with httpx.AsyncClient(verify=test_ca.client_context()) as client:
        answer = await client.post(ews.url, auth=(MAILBOX, PASSWORD), content=(
            b'<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body>'
            b'<m:GetFolder xmlns:m="http://schemas.microsoft.com/exchange/services/2006/messages"'
            b'/></s:Body></s:Envelope>'), headers={"content-type": "text/xml"})
    assert answer.status_code == 500 and b"ErrorInvalidServerVersion" in answer.content


# ---- sending and push --------------------------------------------------------------------


async def test_send_keeps_our_message_id_and_bcc_stays_out_of_the_mime(
    ews: FakeEws, test_ca: TestCA
) -> None:
    raw = make_message("<ours@crm.test>", sender=MAILBOX, to="contact@example.org")
    mail = OutgoingMail(raw, "<ours@crm.test>", MAILBOX, ("contact@example.org",
                                                          "hidden@example.org"))
    order: list[str] = []

    async def mark() -> None:
        order.append(f"checkpoint after {ews.count('CreateItem')} CreateItem")

    async with opened(account(ews, test_ca)) as provider:
        await provider.send(mail, mark)
        assert await provider.find_sent("<ours@crm.test>") is True
    (out,) = ews.sent()
    assert out.message_id == "<ours@crm.test>" and b"hidden@example.org" not in out.raw
    assert sorted(out.recipients) == ["contact@example.org", "hidden@example.org"]
    assert order == ["checkpoint after 0 CreateItem"]
    assert ews.message_ids(MAILBOX, "sentitems") == ["<ours@crm.test>"]


async def test_a_lost_send_answer_is_looked_up_and_not_repeated(
    ews: FakeEws, test_ca: TestCA
) -> None:
    raw = make_message("<lost@crm.test>", sender=MAILBOX, to="contact@example.org")
    mail = OutgoingMail(raw, "<lost@crm.test>", MAILBOX, ("contact@example.org",))
    ews.lose_next_send_answer = True
    async with opened(account(ews, test_ca)) as provider:
        await provider.send(mail, checkpoint)
    assert len(ews.sent("<lost@crm.test>")) == 1 and ews.count("CreateItem") == 1
    assert ews.count("FindItem") >= 1


async def test_a_lost_subscription_falls_back_to_polling_and_resubscribes(
    ews: FakeEws, test_ca: TestCA
) -> None:
    async with opened(account(ews, test_ca)) as provider:
        await provider.changes(INBOX, None)
        assert await provider.wait_for_changes(0.3) is False
        assert len(ews.store.subscriptions) == 1
        ews.store.subscriptions.clear()  # the server restarted: subscriptions are gone
        assert await provider.wait_for_changes(0.5) is False
        ews.deliver(MAILBOX, make_message("<after@x.test>"))
        assert await provider.wait_for_changes(10) is True
        assert ews.count("Subscribe") == 2
        await provider.forget()
    assert ews.store.subscriptions == {}


async def test_impersonation_needs_the_role(ews: FakeEws, test_ca: TestCA) -> None:
    ews.store.add_user("svc@contoso.test", "Svc-1")
    acct = ExchangeProvider.prepare(MAILBOX, {
        "ews_url": ews.url, "auth": "basic", "username": "svc@contoso.test",
        "password_env": PASSWORD_ENV, "ca_file": str(test_ca.ca_file), "impersonate": True,
    }, {"password": "Svc-1"})
    provider = ExchangeProvider(acct, {})
    await provider.open()
    try:
        with pytest.raises(AuthenticationFailed, match="impersonate"):
            await provider.verify()
        ews.store.impersonators.add("svc@contoso.test")
        await provider.verify()
    finally:
        await provider.close()


async def test_a_resync_keeps_mail_received_in_the_second_the_connection_started(
    ews: FakeEws, test_ca: TestCA
) -> None:
    """EWS gives DateTimeReceived in whole seconds; the connection time has
    microseconds. Mail of that same second must survive the resync filter."""
    async with opened(account(ews, test_ca)) as provider:
        cursor = dict((await provider.changes(INBOX, None)).cursor)
        started = datetime(2026, 3, 2, 10, 0, 0, 500000, tzinfo=UTC)
        cursor["since"] = started.isoformat()
        item = ews.deliver(MAILBOX, make_message("<same-second@x.test>"))
        item.received = started + timedelta(microseconds=200000)  # 10:00:00.7
        ews.store.forget_sync_states(MAILBOX, "inbox")
        batch = await provider.changes(INBOX, cursor)
    assert batch.reset is True
    assert [h.message_id for h in batch.headers] == ["<same-second@x.test>"]
