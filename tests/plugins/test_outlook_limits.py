"""Graph's concurrency limit with batches and several connections: every
``$batch`` item counts toward the 4 requests at once, throttled items come back
429 on their own, and one limit is shared by all connections of the process
(per app by default, per mailbox when configured)."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.fakes import FakeMicrosoft
from tests.fakes.world import MAILBOX, opened, sign_in
from tests.kernelfixtures import CONTACT, make_mail
from threadsync.core.errors import ConfigError
from threadsync.core.provider import Folder
from threadsync.plugins.outlook.config import OutlookConfig

pytest_plugins = ["tests.fakes.fixtures"]
INBOX = Folder("inbox", "inbox")
SENT = Folder("sentitems", "sent")
BOB = "bob@contoso.test"


def own_mail(ms: FakeMicrosoft, n: int) -> str:
    raw, mid = make_mail(sender=MAILBOX, to=CONTACT, subject=f"Re: {n}", body=f"mine {n}",
                         headers={"In-Reply-To": "<root@threadsync.local>",
                                  "References": "<root@threadsync.local>"})
    ms.client_send(MAILBOX, raw)
    return mid


def contact_mail(ms: FakeMicrosoft, to: str, n: int) -> str:
    raw, mid = make_mail(sender=CONTACT, to=to, subject=f"Re: {n}", body=f"body {n}")
    ms.deliver(to, raw)
    return mid


async def test_the_fake_throttles_batch_items_beyond_four_at_once(ms: FakeMicrosoft) -> None:
    _, settings = await sign_in(ms)
    token = ms.identity.token_of(MAILBOX)
    requests = [{"id": str(n), "method": "GET", "url": "/me/mailFolders/inbox?$select=id"}
                for n in range(20)]
    async with httpx.AsyncClient(verify=ms.ca.client_context()) as client:
        answer = await client.post(f"{settings['graph_url']}/$batch", json={"requests": requests},
                                   headers={"Authorization": f"Bearer {token}"})
    items = answer.json()["responses"]
    assert answer.status_code == 200
    assert sorted(i["status"] for i in items) == [200] * 4 + [429] * 16
    throttled = [i for i in items if i["status"] == 429]
    assert all(float(i["headers"]["retry-after"]) > 0 for i in throttled)
    assert {i["body"]["error"]["code"] for i in throttled} == {"ApplicationThrottled"}
    assert all(i["headers"]["content-type"].startswith("application/json") for i in items)


async def test_only_throttled_batch_items_are_sent_again_and_no_page_is_lost(
    ms: FakeMicrosoft,
) -> None:
    account, settings = await sign_in(ms, page_size=10)
    async with opened(account, settings) as provider:
        cursor = (await provider.changes(SENT, None)).cursor
        wanted = {own_mail(ms, n) for n in range(25)}
        ms.graph.throttle(3, retry_after=0.1, when=lambda c: c.in_batch)
        ms.graph.throttle(1, retry_after=0.1, when=lambda c: "$skiptoken" in c.query)
        seen: list[str] = []
        while True:
            batch = await provider.changes(SENT, cursor)
            seen += [h.message_id or "" for h in batch.headers]
            cursor = batch.cursor
            if not batch.more:
                break
    assert sorted(seen) == sorted(wanted)
    items = [e for e in ms.requests() if e.in_batch]
    assert len(items) == 25 + 3  # the three throttled items, and only they, again
    assert [e.status for e in items].count(429) == 3
    assert ms.graph.max_in_flight[MAILBOX] <= 4


def test_the_limit_is_per_app_unless_configured_per_mailbox() -> None:
    assert OutlookConfig.from_section({"client_id": "app"}).concurrency_scope == "app"
    per_mailbox = OutlookConfig.from_section({"client_id": "app",
                                              "concurrency_scope": "mailbox"})
    assert per_mailbox.concurrency_key("A@x.test") != per_mailbox.concurrency_key("b@x.test")
    app = OutlookConfig.from_section({"client_id": "app"})
    assert app.concurrency_key("a@x.test") == app.concurrency_key("b@x.test")
    with pytest.raises(ConfigError, match="concurrency_scope"):
        OutlookConfig.from_section({"client_id": "app", "concurrency_scope": "tenant"})


async def bodies_at_once(ms: FakeMicrosoft, **over: object) -> None:
    """Two mailboxes of one app, each reading 8 bodies at once."""
    ann, ann_settings = await sign_in(ms, **over)
    bob, bob_settings = await sign_in(ms, BOB, **over)
    async with opened(ann, ann_settings) as first, opened(bob, bob_settings) as second:
        refs = {}
        for provider, address in ((first, MAILBOX), (second, BOB)):
            cursor = (await provider.changes(INBOX, None)).cursor
            for n in range(8):
                contact_mail(ms, address, n)
            refs[address] = [h.ref for h in (await provider.changes(INBOX, cursor)).headers]
        ms.graph.latency = 0.05
        bodies = await asyncio.gather(
            *(first.fetch(INBOX, ref) for ref in refs[MAILBOX]),
            *(second.fetch(INBOX, ref) for ref in refs[BOB]))
    assert len(bodies) == 16 and all(b"body" in b for b in bodies)


async def test_connections_of_one_process_share_the_per_app_limit(ms: FakeMicrosoft) -> None:
    ms.add_user(BOB)
    ms.graph.concurrency_scope = "app"
    await bodies_at_once(ms)
    assert max(ms.graph.max_in_flight_app.values()) == 4
    assert 429 not in [e.status for e in ms.requests()]


async def test_a_per_mailbox_limit_lets_each_mailbox_have_four(ms: FakeMicrosoft) -> None:
    ms.add_user(BOB)
    await bodies_at_once(ms, concurrency_scope="mailbox")
    assert max(ms.graph.max_in_flight_app.values()) == 8
    assert ms.graph.max_in_flight[MAILBOX] == ms.graph.max_in_flight[BOB] == 4
    assert 429 not in [e.status for e in ms.requests()]
