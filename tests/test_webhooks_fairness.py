"""Webhooks: one tenant's receivers cannot delay everyone's, and no receiver can
make the dispatcher hang, swell or crash.

Against real loopback servers (:mod:`tests.servers.webhook_peers`): an attempt
has a total deadline however slowly the receiver drips; only a small part of
a huge answer is read; one sub-account's slow endpoints take only its share of
the concurrency slots; a URL that cannot be encoded is refused at registration;
a delivery that raises something unexpected is recorded and retried, never a
crashed task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from tests.kernelfixtures import SUB, World
from tests.servers.webhook_peers import Peer
from tests.test_http_api import is_problem
from tests.test_http_api_support import (  # noqa: F401 (fixtures)
    LOOPBACK,
    OTHER,
    Api,
    Receiver,
    api_factory_fixture,
    receiver_fixture,
    wait_for,
)
from threadsync.core.errors import InvalidInput
from threadsync.core.host import webhooks
from threadsync.core.host.webhook_targets import check_url
from threadsync.core.host.webhooks import WebhookSettings
from threadsync.core.kernel import Kernel
from threadsync.core.store.models import Event, WebhookEndpoint
from threadsync.plugins.http_api.dispatcher import Dispatcher

QUICK = WebhookSettings(
    timeout_seconds=1.5,
    backoff_base_seconds=30,
    backoff_max_seconds=60,
    poll_seconds=0.05,
    settle_seconds=0.01,
    allowed_networks=LOOPBACK,
)


def add_event(k: Kernel, subaccount: str, thread_id: str) -> None:
    payload = {"event": "thread.stopped", "subaccount": subaccount, "thread_id": thread_id}
    k.store.call(lambda s: s.add(Event(subaccount_id=subaccount, type="thread.stopped",
                                       payload=payload)))  # fmt: skip


def deliveries(k: Kernel, subaccount: str = SUB) -> list[dict[str, Any]]:
    return list(webhooks.list_deliveries(k, subaccount)["deliveries"])


@contextlib.asynccontextmanager
async def dispatching(k: Kernel, settings: WebhookSettings) -> AsyncIterator[Dispatcher]:
    dispatcher = Dispatcher(webhooks.Webhooks(k), settings)
    task = asyncio.create_task(dispatcher.run())
    try:
        yield dispatcher
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.fixture
def peers() -> Iterator[Callable[..., Peer]]:
    started: list[Peer] = []

    def make(mode: str, **kw: Any) -> Peer:
        peer = Peer(mode, **kw).start()
        started.append(peer)
        return peer

    yield make
    for peer in started:
        peer.stop()


@pytest.mark.parametrize("mode", ["drip-headers", "drip-body"])
async def test_an_attempt_has_a_total_deadline(
    world: World, peers: Callable[..., Peer], mode: str
) -> None:
    """A byte every 0.2 s keeps every single read alive; the attempt still ends."""
    k = world.ts.kernel
    peer = peers(mode)
    webhooks.create_endpoint(k, SUB, peer.url(), settings=QUICK)
    add_event(k, SUB, "th-slow")
    async with dispatching(k, QUICK):
        await wait_for(lambda: deliveries(k)[0]["attempts"] == 1 if deliveries(k) else False,
                       15, "the first attempt to be cut off")  # fmt: skip
    (d,) = deliveries(k)
    assert d["status"] == "pending" and d["last_status_code"] is None
    assert "timed out" in d["last_error"]
    await wait_for(lambda: peer.finished == 1, 5, "the dispatcher to hang up")


async def test_only_a_small_part_of_a_huge_answer_is_read(
    world: World, peers: Callable[..., Peer]
) -> None:
    k = world.ts.kernel
    size = 256 * 1024 * 1024
    peer = peers("big", size=size)
    webhooks.create_endpoint(k, SUB, peer.url(), settings=QUICK)
    add_event(k, SUB, "th-big")
    async with dispatching(k, QUICK) as dispatcher:
        await wait_for(lambda: dispatcher.delivered == 1, 15, "the delivery")
    await wait_for(lambda: peer.finished == 1, 10, "the dispatcher to hang up")
    assert deliveries(k)[0]["status"] == "delivered"
    # What the kernel's socket buffers took before the hang-up, not the body.
    assert peer.sent[0] < size // 8, peer.sent


async def test_one_tenants_slow_endpoints_do_not_take_every_slot(
    world: World, peers: Callable[..., Peer], receiver: Receiver
) -> None:
    """SUB has 6 endpoints that never finish answering, and events for each; OTHER's
    one delivery still goes out while all of SUB's are hanging."""
    k = world.ts.kernel
    settings = WebhookSettings(
        timeout_seconds=60, concurrency=4, per_subaccount_concurrency=2, poll_seconds=0.05,
        settle_seconds=0.01, allowed_networks=LOOPBACK,
    )  # fmt: skip
    slow = [peers("drip-headers", every=0.5) for _ in range(6)]
    for peer in slow:
        webhooks.create_endpoint(k, SUB, peer.url(), settings=settings)
    for n in range(12):
        add_event(k, SUB, f"th-{n}")
    receiver.secret = webhooks.create_endpoint(k, OTHER, receiver.url, settings=settings)["secret"]
    add_event(k, OTHER, "th-innocent")
    async with dispatching(k, settings):
        await wait_for(lambda: len(receiver.got) == 1, 15, "the other tenant's delivery")
        hanging = sum(p.requests for p in slow)
        finished = sum(p.finished for p in slow)
    assert finished == 0, "no slow attempt ended before the innocent delivery arrived"
    assert 1 <= hanging <= 2, hanging
    assert receiver.got[0].signature_ok


def test_a_url_that_cannot_be_encoded_is_refused(api_factory: Callable[..., Api]) -> None:
    for url in ("https://xn--localhost-/", "https://xn--a.example.com/hook", "https://-a.example/"):
        with pytest.raises(InvalidInput, match="host name"):
            check_url(url, QUICK, ["93.184.216.34"])
    assert check_url("https://münchen.example/hook", QUICK, ["93.184.216.34"])
    api = api_factory()
    with api.client(api.key) as c:
        r = c.post(f"/v1/subaccounts/{SUB}/webhooks", json={"url": "https://xn--localhost-/"})
        problem = is_problem(r, 422, "invalid_input")
        assert "host name" in problem["detail"]
        assert c.get(f"/v1/subaccounts/{SUB}/webhooks").json() == {"webhooks": []}


async def test_an_unexpected_failure_is_recorded_and_backed_off(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """An endpoint stored before its URL was checked as strictly (so the HTTP
    library raises something that is not a transport error): the attempt is
    counted, the error stored, the retry scheduled; no task dies with it."""
    caplog.set_level(logging.WARNING)
    k = world.ts.kernel

    def old_endpoint(session: Any) -> None:
        session.add(WebhookEndpoint(
            subaccount_id=SUB, url="https://xn--localhost-/hook", description="",
            secret=k.vault.seal({"secret": "whsec_x"}), event_types=[], active=True,
            after_event_id=0,
        ))  # fmt: skip

    k.store.call(old_endpoint)
    add_event(k, SUB, "th-odd")
    async with dispatching(k, QUICK):
        await wait_for(lambda: bool(deliveries(k)) and deliveries(k)[0]["attempts"] >= 1,
                       10, "the attempt to be recorded")  # fmt: skip
    (d,) = deliveries(k)
    assert d["status"] == "pending" and d["next_attempt_at"] is not None
    assert d["last_error"] and "internal error" in d["last_error"]
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]
