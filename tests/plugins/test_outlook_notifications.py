"""Change notifications: the answers to Graph's POSTs (validation handshake,
clientState, lifecycle events), subscriptions created through a real HTTPS
endpoint, renewed before they expire, and waking the connection."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from tests.fakes import FakeMicrosoft, ServerThread
from tests.fakes.server import Call, Reply
from tests.fakes.world import MAILBOX, opened, sign_in
from tests.kernelfixtures import CONTACT, make_mail
from tests.servers.tlscerts import TestCA
from threadsync.core.provider import Folder
from threadsync.plugins.outlook import HUB, NotificationHub, OutlookProvider

pytest_plugins = ["tests.fakes.fixtures"]
INBOX = Folder("inbox", "inbox")


class Target:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str | None]] = []

    def notified(self, subscription_id: str, lifecycle_event: str | None) -> None:
        self.calls.append((subscription_id, lifecycle_event))


def note(**item: Any) -> bytes:
    return json.dumps({"value": [item]}).encode()


def test_hub_answers_validation_and_checks_client_state() -> None:
    hub = NotificationHub()
    target = Target()
    hub.register("sub-1", "secret-state", target)
    echo = hub.handle(b"", {"validationToken": "Validation: Testing client application"})
    assert (echo.status, echo.content_type, echo.body) == (
        200, "text/plain", "Validation: Testing client application")
    assert hub.handle(b"{not json", {}).status == 400
    assert hub.handle(b'{"value": 3}', {}).status == 400
    forged = hub.handle(note(subscriptionId="sub-1", clientState="guess"), {})
    unknown = hub.handle(note(subscriptionId="sub-9", clientState="secret-state"), {})
    assert (forged.status, unknown.status, target.calls) == (202, 202, [])
    hub.handle(note(subscriptionId="sub-1", clientState="secret-state", changeType="created"), {})
    hub.handle(note(subscriptionId="sub-1", clientState="secret-state",
                    lifecycleEvent="missed"), {})
    assert target.calls == [("sub-1", None), ("sub-1", "missed")]


@pytest.fixture
def endpoint(test_ca: TestCA) -> Iterator[tuple[NotificationHub, ServerThread]]:
    """What the (later) HTTP API will be: an HTTPS endpoint that asks the hub."""
    hub = HUB

    async def app(call: Call) -> Reply:
        answer = hub.handle(call.body, call.query)
        return Reply(answer.status, answer.body.encode(), {"content-type": answer.content_type})

    server = ServerThread(app, test_ca).start()
    with hub.serving():
        yield hub, server
    server.stop()


@pytest.fixture
async def subscribed(
    ms: FakeMicrosoft, endpoint: tuple[NotificationHub, ServerThread]
) -> AsyncIterator[OutlookProvider]:
    _hub, server = endpoint
    account, settings = await sign_in(ms, notification_url=f"{server.base}/notify",
                                      lifecycle_url=f"{server.base}/lifecycle")
    async with opened(account, settings) as provider:
        await provider.changes(INBOX, None)
        assert await provider.wait_for_changes(0.05) is False  # subscribes first
        yield provider


async def test_subscriptions_are_created_per_folder_and_notifications_wake(
    subscribed: OutlookProvider, ms: FakeMicrosoft
) -> None:
    subs = ms.subscriptions.items
    assert sorted(s.folder for s in subs.values()) == ["inbox", "sentitems"]
    now = datetime.now(UTC)
    assert all(now + timedelta(minutes=4100) < s.expires <= now + timedelta(minutes=4230)
               for s in subs.values())
    stored = json.loads(subscribed.account.secrets["subscriptions"])
    assert {s["id"] for s in stored} == set(subs) and subscribed.account.secrets_changed
    raw, _ = make_mail(sender=CONTACT, to=MAILBOX, subject="s", body="b")
    waiting = asyncio.create_task(subscribed.wait_for_changes(10))
    await asyncio.sleep(0.05)
    ms.deliver(MAILBOX, raw)
    assert await asyncio.wait_for(waiting, 5) is True


async def test_lifecycle_events_renew_recreate_and_catch_up(
    subscribed: OutlookProvider, ms: FakeMicrosoft
) -> None:
    inbox_sub = next(s.id for s in ms.subscriptions.items.values() if s.folder == "inbox")
    ms.subscriptions.lifecycle(inbox_sub, "reauthorizationRequired")
    assert await subscribed.wait_for_changes(0.5) is False
    assert any(e.method == "PATCH" and inbox_sub in e.path for e in ms.requests())
    ms.subscriptions.lifecycle(inbox_sub, "subscriptionRemoved")
    assert await subscribed.wait_for_changes(5) is True  # a delta pass, in case of loss
    await subscribed.wait_for_changes(0.05)
    folders = sorted(s.folder for s in ms.subscriptions.items.values())
    assert folders == ["inbox", "sentitems"] and inbox_sub not in ms.subscriptions.items
    sent_sub = next(s.id for s in ms.subscriptions.items.values() if s.folder == "sentitems")
    ms.subscriptions.lifecycle(sent_sub, "missed")
    assert await subscribed.wait_for_changes(5) is True


async def test_subscriptions_are_renewed_before_they_expire(
    subscribed: OutlookProvider, ms: FakeMicrosoft
) -> None:
    subs = subscribed._subs
    assert subs is not None
    patches = sum(e.method == "PATCH" for e in ms.requests())
    await subs.maintain()  # fresh: nothing to do
    assert sum(e.method == "PATCH" for e in ms.requests()) == patches
    for item in subs.items:  # less than renew_before_minutes (a day) left
        item["expires"] = (datetime.now(UTC) + timedelta(hours=2)).isoformat()
    await subs.maintain()
    assert sum(e.method == "PATCH" for e in ms.requests()) == patches + 2
    assert all(s.expires > datetime.now(UTC) + timedelta(days=2)
               for s in ms.subscriptions.items.values())


async def test_wake_ends_the_wait_and_forget_deletes_subscriptions(
    subscribed: OutlookProvider, ms: FakeMicrosoft
) -> None:
    waiting = asyncio.create_task(subscribed.wait_for_changes(10))
    await asyncio.sleep(0.05)
    subscribed.wake()
    assert await asyncio.wait_for(waiting, 2) is False
    await subscribed.forget()
    assert ms.subscriptions.items == {}


async def test_a_notification_endpoint_that_does_not_echo_is_refused(
    ms: FakeMicrosoft, test_ca: TestCA
) -> None:
    async def wrong(call: Call) -> Reply:
        return Reply.text(200, "something else")

    server = ServerThread(wrong, test_ca).start()
    try:
        account, settings = await sign_in(ms, notification_url=f"{server.base}/notify")
        with HUB.serving():
            async with opened(account, settings) as provider:
                assert await provider.wait_for_changes(0.05) is False  # polling goes on
        assert ms.subscriptions.items == {}
        assert any(e.path == "/subscriptions" and e.status == 400 for e in ms.requests())
    finally:
        server.stop()


async def test_a_new_lifecycle_url_recreates_the_subscriptions_and_urls_are_kept(
    ms: FakeMicrosoft, endpoint: tuple[NotificationHub, ServerThread]
) -> None:
    hub, server = endpoint
    account, settings = await sign_in(ms, notification_url=f"{server.base}/notify")
    settings["notification_hub"] = hub
    async with opened(account, settings) as provider:
        await provider.wait_for_changes(0.05)
    old = set(ms.subscriptions.items)
    assert len(old) == 2
    assert all(s.lifecycle_url is None for s in ms.subscriptions.items.values())
    lifecycle = f"{server.base}/lifecycle"
    async with opened(account, {**settings, "lifecycle_url": lifecycle}) as provider:
        await provider.wait_for_changes(0.05)
    subs = ms.subscriptions.items
    assert len(subs) == 2 and not set(subs) & old  # recreated: PATCH cannot add it
    assert all(s.lifecycle_url == lifecycle for s in subs.values())
    stored = json.loads(account.secrets["subscriptions"])
    assert {(i["notification_url"], i["lifecycle_url"]) for i in stored} == {
        (f"{server.base}/notify", lifecycle)}
    assert not any(e.method == "PATCH" for e in ms.requests())


async def test_the_fake_lists_reads_reauthorizes_and_refuses_a_lifecycle_patch(
    subscribed: OutlookProvider, ms: FakeMicrosoft
) -> None:
    token = ms.identity.token_of(MAILBOX)
    base = subscribed.config.graph_url
    sub_id = next(iter(ms.subscriptions.items))
    async with httpx.AsyncClient(verify=ms.ca.client_context(),
                                 headers={"Authorization": f"Bearer {token}"}) as client:
        listed = (await client.get(f"{base}/subscriptions")).json()["value"]
        one = (await client.get(f"{base}/subscriptions/{sub_id}")).json()
        again = await client.post(f"{base}/subscriptions/{sub_id}/reauthorize")
        patched = await client.patch(f"{base}/subscriptions/{sub_id}",
                                     json={"lifecycleNotificationUrl": "https://x.test/l"})
        ms.identity.access_tokens[token].scopes = ("User.Read",)
        refused = await client.post(f"{base}/subscriptions", json={
            "changeType": "created", "resource": "me/mailFolders('inbox')/messages",
            "notificationUrl": one["notificationUrl"], "clientState": "s",
            "expirationDateTime": one["expirationDateTime"]})
    assert sorted(s["id"] for s in listed) == sorted(ms.subscriptions.items)
    assert one["id"] == sub_id and one["notificationUrl"].endswith("/notify")
    assert one["lifecycleNotificationUrl"].endswith("/lifecycle")
    assert again.status_code == 204 and ms.subscriptions.reauthorized == [sub_id]
    assert patched.status_code == 400
    assert refused.status_code == 403  # Mail.ReadBasic at least is needed
