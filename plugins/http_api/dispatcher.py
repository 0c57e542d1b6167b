"""Posts webhook deliveries: the worker beside the sync loop (``run --listen``,
or any process that runs :meth:`Dispatcher.run`).

Each pass enqueues new events (:func:`core.webhooks.enqueue`), claims due
deliveries and posts them, one chain per ordering key so that a thread's events
arrive in order, many chains at once (``concurrency``). A chain stops at its
first failure; the rest is released untouched and waits for the retry. Outcomes
are stored in one transaction per finished chain. Each endpoint origin has its
own small connection pool, so a slow receiver holds up only its own deliveries.
Redirects are not followed;
any 2xx is success; ``Retry-After`` on 429/503 is honoured up to the backoff cap.
A pass runs every ``poll_seconds``, or at once when :meth:`wake` is called (the
API does so after writing, and the host hooks after every committed event).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Any

import httpx

from core import webhooks
from core.errors import ThreadsyncError
from core.hookspecs import hookimpl
from core.kernel import Kernel
from core.webhooks import Outcome, Outgoing, WebhookSettings
from plugins.http_api.signatures import HEADER, sign

log = logging.getLogger(__name__)
USER_AGENT = "threadsync-webhooks/1"
RELEASE_EVERY_SECONDS = 10.0
PER_ORIGIN_CONNECTIONS = 4


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "")
    return float(value) if value.isdigit() else None


class Dispatcher:
    def __init__(
        self,
        k: Kernel,
        settings: WebhookSettings,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.k = k
        self.settings = settings
        self.transport = transport
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        self._released_at = 0.0
        self._limit = asyncio.Semaphore(settings.concurrency)
        self._clients: dict[str, httpx.AsyncClient] = {}
        self.delivered = 0
        self.failed = 0

    # ---- waking ----------------------------------------------------------------------

    def wake(self) -> None:
        """Run a pass soon; safe from any thread."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._wake.set()
        else:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._wake.set)

    @hookimpl
    def message_synced(self, payload: dict[str, Any]) -> None:
        self.wake()

    @hookimpl
    def message_skipped(self, payload: dict[str, Any]) -> None:
        self.wake()

    @hookimpl
    def connection_state_changed(self, payload: dict[str, Any]) -> None:
        self.wake()

    @hookimpl
    def thread_stopped(self, payload: dict[str, Any]) -> None:
        self.wake()

    # ---- the loop --------------------------------------------------------------------

    def _client(self, url: str) -> httpx.AsyncClient:
        """One small connection pool per endpoint origin: a slow endpoint ties up
        its own connections only (and httpx pools get slow when large)."""
        parts = httpx.URL(url)
        origin = f"{parts.scheme}://{parts.host}:{parts.port}"
        client = self._clients.get(origin)
        if client is None:
            client = self._clients[origin] = httpx.AsyncClient(
                timeout=self.settings.timeout_seconds,
                follow_redirects=False,
                limits=httpx.Limits(max_connections=PER_ORIGIN_CONNECTIONS),
                transport=self.transport,
                headers={"User-Agent": USER_AGENT},
            )
        return client

    async def run(self) -> None:
        """Work until cancelled."""
        self._loop = asyncio.get_running_loop()
        try:
            while True:
                await self._pass()
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a
                # cancellation that arrives as the event is set, and never stop.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.settings.poll_seconds):
                        await self._wake.wait()
                self._wake.clear()
        finally:
            for task in self._inflight:
                task.cancel()
            await asyncio.gather(*self._inflight, return_exceptions=True)
            clients, self._clients = self._clients, {}
            for client in clients.values():
                await client.aclose()

    async def _pass(self) -> None:
        try:
            now = time.monotonic()
            if now - self._released_at > RELEASE_EVERY_SECONDS:
                self._released_at = now
                await asyncio.to_thread(webhooks.release_dead_leases, self.k)
            while await asyncio.to_thread(webhooks.enqueue, self.k, self.settings) >= 500:
                pass
            free = self.settings.batch_size - len(self._inflight)
            if free <= 0:
                return
            claimed = await asyncio.to_thread(webhooks.claim, self.k, self.settings, free)
        except ThreadsyncError as exc:  # the database hiccuped; try again next pass
            log.warning("webhook pass failed: %s", exc)
            return
        chains: dict[tuple[int, str], list[Outgoing]] = {}
        for item in claimed:
            chains.setdefault((item.endpoint_id, item.ordering_key), []).append(item)
        for chain in chains.values():
            task = asyncio.create_task(self._chain(chain))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    async def _chain(self, chain: Sequence[Outgoing]) -> None:
        outcomes: list[Outcome] = []
        async with self._limit:
            for item in chain:
                if outcomes and not outcomes[-1].ok:
                    outcomes.append(Outcome(item.delivery_id, attempted=False))
                    continue
                outcomes.append(await self._post(item))
        try:
            done = await asyncio.to_thread(webhooks.record, self.k, self.settings, outcomes)
        except ThreadsyncError as exc:  # leases expire; the deliveries are tried again
            log.warning("webhook outcomes not stored: %s", exc)
            return
        self.delivered += done["delivered"]
        self.failed += done["retry"] + done["dead"]
        if done["retry"] or done["dead"]:
            self.wake()  # later chains may be unblocked (dead) or due
        elif done["delivered"] == len(chain):
            self.wake()  # more of these keys may be waiting

    async def _post(self, item: Outgoing) -> Outcome:
        headers = {
            "Content-Type": "application/json",
            HEADER: sign(item.secret, item.body),
            "Threadsync-Event-Id": str(item.event_id),
            "Threadsync-Event": item.event_type,
            "Threadsync-Delivery": str(item.delivery_id),
            "Threadsync-Attempt": str(item.attempt),
        }
        extra = {"delivery_id": item.delivery_id, "endpoint_id": item.endpoint_id}
        try:
            response = await self._client(item.url).post(
                item.url, content=item.body, headers=headers
            )
        except httpx.HTTPError as exc:
            log.info("webhook delivery failed: %s", exc.__class__.__name__, extra=extra)
            return Outcome(item.delivery_id, True, error=f"{exc.__class__.__name__}: no response")
        if 200 <= response.status_code < 300:
            return Outcome(item.delivery_id, True, ok=True, status_code=response.status_code)
        log.info("webhook endpoint answered %d", response.status_code, extra=extra)
        return Outcome(
            item.delivery_id,
            True,
            status_code=response.status_code,
            error=f"HTTP {response.status_code}",
            retry_after=_retry_after(response) if response.status_code in (429, 503) else None,
        )
