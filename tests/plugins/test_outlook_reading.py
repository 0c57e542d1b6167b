"""Reading an Outlook mailbox: delta rounds and links, headers through
``internetMessageHeaders`` or MAPI properties in ``$batch``, removals, ``410``
resync, bodies, throttling and the per-mailbox concurrency limit."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.fakes import FakeMicrosoft
from tests.fakes.world import MAILBOX, opened, sign_in
from tests.kernelfixtures import CONTACT, make_mail
from threadsync.core.errors import ProviderProtocolError, TransientProviderError
from threadsync.core.provider import Folder

pytest_plugins = ["tests.fakes.fixtures"]
INBOX = Folder("inbox", "inbox")
SENT = Folder("sentitems", "sent")


def contact_mail(ms: FakeMicrosoft, n: int, parent: str = "<root@threadsync.local>") -> str:
    raw, mid = make_mail(sender=CONTACT, to=MAILBOX, subject=f"Re: {n}", body=f"body {n}",
                         headers={"In-Reply-To": parent, "References": parent})
    ms.deliver(MAILBOX, raw)
    return mid


def own_mail(ms: FakeMicrosoft, n: int, parent: str = "<root@threadsync.local>") -> str:
    raw, mid = make_mail(sender=MAILBOX, to=CONTACT, subject=f"Re: {n}", body=f"mine {n}",
                         headers={"In-Reply-To": parent, "References": f"<a@b> {parent}"})
    ms.client_send(MAILBOX, raw)
    return mid


async def test_placing_the_cursor_reads_no_history_and_keeps_links_verbatim(
    ms: FakeMicrosoft,
) -> None:
    for n in range(30):
        contact_mail(ms, n)
    account, settings = await sign_in(ms, page_size=10)
    async with opened(account, settings) as provider:
        placed = await provider.changes(INBOX, None)
        assert placed.headers == [] and not placed.more
        link = placed.cursor["link"]
        assert link.startswith(settings["graph_url"]) and "$deltatoken=" in link
        quiet = await provider.changes(INBOX, placed.cursor)
        assert quiet.headers == [] and quiet.cursor["link"].startswith(settings["graph_url"])
    delta = [e for e in ms.requests() if e.path.endswith("/delta")]
    assert len(delta) == 4  # three pages to place the cursor, one empty round
    assert not ms.graph.bodies_read() and ms.graph.prefer_missing == 0


async def test_delta_pages_follow_next_links_and_carry_threading_headers(
    ms: FakeMicrosoft,
) -> None:
    account, settings = await sign_in(ms, page_size=10)
    async with opened(account, settings) as provider:
        cursor = (await provider.changes(INBOX, None)).cursor
        wanted = {contact_mail(ms, n) for n in range(25)}
        seen: list[str] = []
        rounds = 0
        while True:
            batch = await provider.changes(INBOX, cursor, limit=250)
            rounds += 1
            assert len(batch.headers) <= 10
            seen += [h.message_id or "" for h in batch.headers]
            assert all(h.in_reply_to == ("<root@threadsync.local>",) for h in batch.headers)
            assert all(h.sender == CONTACT for h in batch.headers)
            cursor = batch.cursor
            if not batch.more:
                break
    assert rounds == 3 and sorted(seen) == sorted(wanted)
    assert not any(e.in_batch for e in ms.requests())  # received mail: no extra reads


async def test_sent_items_threading_from_mapi_properties_in_batches_within_the_limit(
    ms: FakeMicrosoft,
) -> None:
    """Each batch item is a request against the 4-at-once limit: batches of at
    most 4 items, holding the slots of their items, are never throttled."""
    account, settings = await sign_in(ms)
    async with opened(account, settings) as provider:
        cursor = (await provider.changes(SENT, None)).cursor
        wanted = {own_mail(ms, n) for n in range(45)}
        batch = await provider.changes(SENT, cursor)
    assert {h.message_id for h in batch.headers} == wanted
    assert all(h.references == ("<a@b>", "<root@threadsync.local>") for h in batch.headers)
    batches = [e for e in ms.requests() if e.path == "/$batch"]
    items = [e for e in ms.requests() if e.in_batch]
    assert len(batches) == 12 and len(items) == 45
    assert 429 not in [e.status for e in ms.requests()]
    assert ms.graph.max_in_flight[MAILBOX] <= 4
    assert all("singleValueExtendedProperties" in e.query["$expand"] for e in items)
    assert not ms.graph.bodies_read()


async def test_removed_messages_are_reported_as_vanished(ms: FakeMicrosoft) -> None:
    account, settings = await sign_in(ms)
    async with opened(account, settings) as provider:
        cursor = (await provider.changes(INBOX, None)).cursor
        mid = contact_mail(ms, 1)
        first = await provider.changes(INBOX, cursor)
        ref = first.headers[0].ref
        with ms.graph.lock:
            box = ms.graph.mailbox(MAILBOX)
            box.delete(box.messages[ref])
        second = await provider.changes(INBOX, first.cursor)
    assert [h.message_id for h in first.headers] == [mid]
    assert second.headers == [] and second.vanished == [ref]


async def test_gone_delta_state_resyncs_since_the_connection(ms: FakeMicrosoft) -> None:
    account, settings = await sign_in(ms)
    async with opened(account, settings) as provider:
        cursor = (await provider.changes(INBOX, None)).cursor
        b = contact_mail(ms, 2)
        seen = await provider.changes(INBOX, cursor)
        ms.graph.expire_delta_tokens(MAILBOX, "inbox")
        c = contact_mail(ms, 3)
        again = await provider.changes(INBOX, seen.cursor)
    assert [h.message_id for h in seen.headers] == [b] and not seen.reset
    assert again.reset and {b, c} <= {h.message_id for h in again.headers}
    assert again.cursor["since"] == cursor["since"]
    assert [e.status for e in ms.requests() if e.path.endswith("/delta")].count(410) == 1


async def test_fetch_reads_mime_only_and_never_marks_read(ms: FakeMicrosoft) -> None:
    account, settings = await sign_in(ms)
    async with opened(account, settings) as provider:
        cursor = (await provider.changes(INBOX, None)).cursor
        mid = contact_mail(ms, 1)
        header = (await provider.changes(INBOX, cursor)).headers[0]
        raw = await provider.fetch(INBOX, header.ref)
        assert mid.encode() in raw and b"body 1" in raw
        with ms.graph.lock:
            box = ms.graph.mailbox(MAILBOX)
            box.delete(box.messages[header.ref])
            box.delete(box.messages[header.ref])  # emptied from Deleted Items too
        with pytest.raises(ProviderProtocolError, match="no longer"):
            await provider.fetch(INBOX, header.ref)
    assert not any(m.is_read for m in ms.messages(MAILBOX, "inbox"))
    assert ms.graph.bodies_read() == {header.ref}


async def test_throttling_is_ridden_out_after_retry_after(ms: FakeMicrosoft) -> None:
    account, settings = await sign_in(ms)
    async with opened(account, settings) as provider:
        cursor = (await provider.changes(SENT, None)).cursor
        own_mail(ms, 1)
        ms.graph.throttle(2, retry_after=0.1, when=lambda c: c.path.endswith("/delta"))
        ms.graph.throttle(2, status=503, retry_after=0.1, when=lambda c: c.in_batch)
        started = time.monotonic()
        batch = await provider.changes(SENT, cursor)
        assert len(batch.headers) == 1 and time.monotonic() - started >= 0.2
    statuses = [e.status for e in ms.requests()]
    assert statuses.count(429) == 2 and statuses.count(503) == 2


async def test_long_throttling_is_handed_to_the_kernel_with_retry_after(
    ms: FakeMicrosoft,
) -> None:
    account, settings = await sign_in(ms)
    async with opened(account, settings) as provider:
        ms.graph.throttle(1, retry_after=90)
        with pytest.raises(TransientProviderError) as info:
            await provider.changes(INBOX, None)
        assert info.value.retry_after == 90
        ms.graph.throttle(10, status=503, retry_after=0.05)
        with pytest.raises(TransientProviderError):
            await provider.changes(INBOX, None)


async def test_at_most_four_requests_per_mailbox_at_once(ms: FakeMicrosoft) -> None:
    account, settings = await sign_in(ms)
    async with opened(account, settings) as provider:
        cursor = (await provider.changes(INBOX, None)).cursor
        for n in range(12):
            contact_mail(ms, n)
        refs = [h.ref for h in (await provider.changes(INBOX, cursor)).headers]
        ms.graph.latency = 0.05
        bodies = await asyncio.gather(*(provider.fetch(INBOX, ref) for ref in refs))
    assert len(bodies) == 12 and ms.graph.max_in_flight[MAILBOX] == 4
    assert 429 not in [e.status for e in ms.requests()]


async def test_the_fake_enforces_the_mailbox_concurrency_limit(ms: FakeMicrosoft) -> None:
    _, settings = await sign_in(ms)
    token = ms.identity.token_of(MAILBOX)
    ms.graph.latency = 0.1
    async with httpx.AsyncClient(verify=ms.ca.client_context()) as client:
        answers = await asyncio.gather(*(
            client.get(f"{settings['graph_url']}/me",
                       headers={"Authorization": f"Bearer {token}"}) for _ in range(6)))
    assert sorted(a.status_code for a in answers) == [200] * 4 + [429] * 2


async def test_one_mailbox_throttled_never_stalls_another(ms: FakeMicrosoft) -> None:
    ms.add_user("bob@contoso.test")
    ann, ann_settings = await sign_in(ms)
    bob, bob_settings = await sign_in(ms, "bob@contoso.test")
    async with opened(ann, ann_settings) as slow, opened(bob, bob_settings) as fast:
        ms.graph.throttle(2, retry_after=0.5, when=lambda c: c.ctx["mailbox"] == MAILBOX)

        async def timed(coro: object) -> float:
            started = time.monotonic()
            await coro  # type: ignore[misc]
            return time.monotonic() - started

        slow_time, fast_time = await asyncio.gather(
            timed(slow.changes(INBOX, None)), timed(fast.changes(INBOX, None)))
    assert slow_time >= 1.0 and fast_time < 0.5


async def test_partial_and_replayed_delta_entries_are_neither_new_nor_read(
    ms: FakeMicrosoft,
) -> None:
    """Later rounds list updated messages with only the changed properties, and
    replay items: no header for a partial update, no request spent on either (a
    replayed message may be listed again; the kernel skips a known Message-ID)."""
    account, settings = await sign_in(ms, page_size=2)
    async with opened(account, settings) as provider:
        cursor = (await provider.changes(INBOX, None)).cursor
        first = [contact_mail(ms, n) for n in range(2)]
        listed = await provider.changes(INBOX, cursor)
        with ms.graph.lock:  # the user reads both
            box = ms.graph.mailbox(MAILBOX)
            for header in listed.headers:
                box.messages[header.ref].is_read = True
                box.changed(box.messages[header.ref], "isRead")
        ms.graph.replay = True
        newer = contact_mail(ms, 9)
        before = len(ms.requests())
        rounds, seen = [], []
        cursor = listed.cursor
        while True:
            batch = await provider.changes(INBOX, cursor)
            rounds.append(batch)
            seen += [h.message_id for h in batch.headers]
            cursor = batch.cursor
            if not batch.more:
                break
        later = ms.requests()[before:]
    assert sorted(h.message_id or "" for h in listed.headers) == sorted(first)
    assert newer in seen and first[0] not in seen and len(seen) == len(set(seen))
    assert all(e.path.endswith("/delta") for e in later)  # no other request
    assert not any(e.in_batch for e in ms.requests())


async def test_the_fake_sends_partial_updates(ms: FakeMicrosoft) -> None:
    _, settings = await sign_in(ms)
    token = ms.identity.token_of(MAILBOX)
    mid = contact_mail(ms, 1)
    async with httpx.AsyncClient(verify=ms.ca.client_context(), headers={
            "Authorization": f"Bearer {token}", "Prefer": 'IdType="ImmutableId"'}) as client:
        first = (await client.get(f"{settings['graph_url']}/me/mailFolders/inbox/messages/delta",
                                  params={"$select": "internetMessageId,isRead,subject"})).json()
        ref = first["value"][0]["id"]
        with ms.graph.lock:
            box = ms.graph.mailbox(MAILBOX)
            box.messages[ref].is_read = True
            box.changed(box.messages[ref], "isRead")
        second = (await client.get(first["@odata.deltaLink"])).json()
    assert first["value"][0]["internetMessageId"] == mid
    [update] = second["value"]
    assert update["id"] == ref and update["isRead"] is True
    assert "internetMessageId" not in update and "subject" not in update


async def test_resync_after_gone_asks_newest_first_within_the_filtered_cap(
    ms: FakeMicrosoft,
) -> None:
    ms.graph.filtered_delta_cap = 3
    account, settings = await sign_in(ms, page_size=2)
    async with opened(account, settings) as provider:
        cursor = (await provider.changes(INBOX, None)).cursor
        arrived = [contact_mail(ms, n) for n in range(6)]
        ms.graph.expire_delta_tokens(MAILBOX, "inbox")
        seen: list[str] = []
        while True:
            batch = await provider.changes(INBOX, cursor)
            seen += [h.message_id or "" for h in batch.headers]
            cursor = batch.cursor
            if not batch.more:
                break
    assert sorted(seen) == sorted(arrived[-3:])  # the cap cut off the oldest
    first_requests = [e for e in ms.requests()
                      if e.path.endswith("/delta") and "$filter" in e.query]
    assert len(first_requests) == 2  # placing the cursor, and the resync
    assert all(e.query["$orderby"] == "receivedDateTime desc" for e in first_requests)


async def test_sent_items_headers_without_threading_fall_back_to_mapi(
    ms: FakeMicrosoft,
) -> None:
    account, settings = await sign_in(ms)
    async with opened(account, settings) as provider:
        cursor = (await provider.changes(SENT, None)).cursor
        raw, mid = make_mail(sender=MAILBOX, to=CONTACT, subject="Re: x", body="b",
                             headers={"In-Reply-To": "<root@threadsync.local>",
                                      "References": "<a@b> <root@threadsync.local>"})
        ms.client_send(MAILBOX, raw, partial_headers=True)
        batch = await provider.changes(SENT, cursor)
    [header] = batch.headers
    assert header.message_id == mid
    assert header.in_reply_to == ("<root@threadsync.local>",)
    assert header.references == ("<a@b>", "<root@threadsync.local>")
    assert len([e for e in ms.requests() if e.in_batch]) == 1
