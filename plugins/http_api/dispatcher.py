"""Posts webhook deliveries: the worker beside the sync loop (``run --listen``,
or any process that runs :meth:`Dispatcher.run`).

Each pass enqueues new events (:func:`threadsync.core.host.webhooks.enqueue`), claims due
deliveries and posts them, one chain per ordering key so that a thread's events
arrive in order, many chains at once (``concurrency``). A chain stops at its
first failure; the rest is released untouched and waits for the retry. Outcomes
are stored in one transaction per finished chain. Each endpoint origin has its
own small connection pool, so a slow receiver holds up only its own deliveries.
A sub-account has at most ``per_subaccount_concurrency`` chains in flight (the
claim leaves the rest for later), so one tenant's slow endpoints never hold
every slot. An attempt has one deadline (``timeout_seconds``) for connecting,
sending and reading the answer, however slowly the receiver drips it; at most
``RESPONSE_READ_LIMIT`` bytes of the answer are read, then the connection is
dropped. Redirects are not followed;
any 2xx is success; ``Retry-After`` on 429/503 is honoured up to the backoff cap.
An attempt that fails in an unexpected way is logged with its traceback and
recorded as a failure like any other, so it backs off and retries.
A pass runs every ``poll_seconds``, or at once when :meth:`wake` is called (the
API does so after writing, and the host hooks after every committed event).

Every post goes through :class:`GuardedTransport`, which resolves the host
itself, refuses when any address is internal
(:func:`threadsync.core.host.webhook_targets.address_refusal`)
and connects to the address it checked, so a second DNS answer cannot rebind
the request elsewhere. Every ``SWEEP_EVERY_SECONDS`` a pass also deletes what
is past its retention (:func:`threadsync.core.host.webhooks.purge`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import httpx

from threadsync.core.errors import ThreadsyncError
from threadsync.core.hookspecs import hookimpl
from threadsync.core.host import webhook_targets, webhooks
from threadsync.core.host.webhooks import Outcome, Outgoing, Webhooks, WebhookSettings
from threadsync.plugins.http_api.signatures import HEADER, sign

log = logging.getLogger(__name__)
USER_AGENT = "threadsync-webhooks/1"
RELEASE_EVERY_SECONDS = 10.0
SWEEP_EVERY_SECONDS = 300.0
SWEEP_BATCHES_PER_PASS = 10
PER_ORIGIN_CONNECTIONS = 4
#: Bytes of a receiver's answer read at most; nothing in it is used.
RESPONSE_READ_LIMIT = 64 * 1024
#: Addresses of one host tried in turn when connecting fails.
MAX_ADDRESSES = 4

Resolver = Callable[[str, int], Awaitable[list[str]]]


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "")
    return float(value) if value.isdigit() else None


async def resolve(host: str, port: int) -> list[str]:
    """The addresses of ``host``, as the system resolver answers (an IP literal
    stands for itself). Raises :class:`OSError` when the name does not resolve."""
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class TargetRefused(httpx.TransportError):
    """The endpoint's host resolves to an address the operator did not allow."""


class GuardedTransport(httpx.AsyncBaseTransport):
    """Sends a request only to an address that passed the target rules.

    The host is resolved here, once per request; if any address is internal the
    request is refused (:class:`TargetRefused`), else it is sent to the checked
    address itself: the URL's host is replaced by that address, the ``Host``
    header keeps the name, and TLS gets the name for SNI and for verifying the
    certificate (httpx's ``sni_hostname`` extension). Nothing resolves the name a
    second time, so DNS rebinding cannot switch the target after the check. The
    connection pool of ``inner`` is keyed by address, so one transport serves one
    origin (the dispatcher keeps one per endpoint origin).
    """

    def __init__(
        self,
        settings: WebhookSettings,
        inner: httpx.AsyncBaseTransport | None = None,
        resolver: Resolver = resolve,
    ) -> None:
        self.settings = settings
        self._owns_inner = inner is None
        self.inner = inner or httpx.AsyncHTTPTransport(
            limits=httpx.Limits(max_connections=PER_ORIGIN_CONNECTIONS)
        )
        self.resolver = resolver

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        host = url.host
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            addresses = await self.resolver(host, port)
        except OSError as exc:
            raise httpx.ConnectError(f"cannot resolve {host}: {exc}", request=request) from None
        if not addresses:
            raise httpx.ConnectError(f"{host} has no address", request=request)
        for address in addresses:
            refusal = webhook_targets.address_refusal(address, self.settings)
            if refusal is not None:
                of_host = "" if address == host else f" (an address of {host})"
                raise TargetRefused(f"target refused: {refusal}{of_host}", request=request)
        failure: httpx.ConnectError | None = None
        for address in addresses[:MAX_ADDRESSES]:
            pinned = httpx.Request(
                request.method,
                url.copy_with(host=address),
                headers=request.headers,  # Host still names the endpoint's host
                stream=request.stream,
                extensions={**request.extensions, "sni_hostname": host},
            )
            try:
                return await self.inner.handle_async_request(pinned)
            except httpx.ConnectError as exc:  # nothing was sent: the next address
                failure = exc
        assert failure is not None
        raise failure

    async def aclose(self) -> None:
        if self._owns_inner:
            await self.inner.aclose()


class Dispatcher:
    def __init__(
        self,
        queue: Webhooks,
        settings: WebhookSettings,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        resolver: Resolver = resolve,
    ) -> None:
        self.queue = queue
        self.settings = settings
        self.transport = transport  # under the guard; shared by every origin
        self.resolver = resolver
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        self._chains_of: dict[str, int] = {}  # chains in flight per sub-account
        self._released_at = 0.0
        self._swept_at: float | None = None
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
                transport=GuardedTransport(self.settings, self.transport, self.resolver),
                headers={"User-Agent": USER_AGENT},
            )
        return client

    async def run(self) -> None:
        """Work until cancelled."""
        self._loop = asyncio.get_running_loop()
        try:
            while True:
                await self._pass()
                await self._sweep()
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
                await asyncio.to_thread(self.queue.release_dead_leases)
            while await asyncio.to_thread(self.queue.enqueue, self.settings) >= 500:
                pass
            free = self.settings.batch_size - len(self._inflight)
            if free <= 0:
                return
            claimed = await asyncio.to_thread(
                self.queue.claim, self.settings, free, dict(self._chains_of)
            )
        except ThreadsyncError as exc:  # the database hiccuped; try again next pass
            log.warning("webhook pass failed: %s", exc)
            return
        chains: dict[tuple[int, str], list[Outgoing]] = {}
        for item in claimed:
            chains.setdefault((item.endpoint_id, item.ordering_key), []).append(item)
        for chain in chains.values():
            subaccount = chain[0].subaccount
            self._chains_of[subaccount] = self._chains_of.get(subaccount, 0) + 1
            task = asyncio.create_task(self._chain(chain))
            self._inflight.add(task)
            task.add_done_callback(functools.partial(self._chain_done, subaccount=subaccount))

    def _chain_done(self, task: asyncio.Task[None], *, subaccount: str) -> None:
        self._inflight.discard(task)
        left = self._chains_of.get(subaccount, 0) - 1
        if left > 0:
            self._chains_of[subaccount] = left
        else:
            self._chains_of.pop(subaccount, None)
        if not task.cancelled() and task.exception() is not None:
            # The leases expire and the deliveries are tried again; never silent.
            log.error("webhook chain failed", exc_info=task.exception())

    async def _sweep(self) -> None:
        """Purge what is past its retention, a batch per statement; a large backlog
        is worked off over several passes, never holding a pass up for long."""
        now = time.monotonic()
        if self._swept_at is not None and now - self._swept_at < SWEEP_EVERY_SECONDS:
            return
        try:
            for _ in range(SWEEP_BATCHES_PER_PASS):
                removed = await asyncio.to_thread(self.queue.purge, self.settings)
                if any(removed.values()):
                    log.info("retention sweep removed rows", extra={"removed": removed})
                if max(removed.values()) < webhooks.PURGE_BATCH:
                    self._swept_at = now
                    return
        except ThreadsyncError as exc:
            log.warning("retention sweep failed: %s", exc)
            self._swept_at = now

    async def _chain(self, chain: Sequence[Outgoing]) -> None:
        outcomes: list[Outcome] = []
        async with self._limit:
            for item in chain:
                if outcomes and not outcomes[-1].ok:
                    outcomes.append(Outcome(item.delivery_id, attempted=False))
                    continue
                outcomes.append(await self._post(item))
        try:
            done = await asyncio.to_thread(self.queue.record, self.settings, outcomes)
        except ThreadsyncError as exc:  # leases expire; the deliveries are tried again
            log.warning("webhook outcomes not stored: %s", exc)
            return
        self.delivered += done["delivered"]
        self.failed += done["retry"] + done["dead"]
        if done["retry"] or done["dead"]:
            self.wake()  # later chains may be unblocked (dead) or due
        elif done["delivered"] == len(chain):
            self.wake()  # more of these keys may be waiting

    async def _send(self, item: Outgoing, headers: dict[str, str]) -> httpx.Response:
        """Post and read at most ``RESPONSE_READ_LIMIT`` bytes of the answer; the
        connection is dropped when more comes (a huge answer is never read)."""
        client = self._client(item.url)
        request = client.build_request("POST", item.url, content=item.body, headers=headers)
        response = await client.send(request, stream=True)
        try:
            read = 0
            async for chunk in response.aiter_raw():
                read += len(chunk)
                if read > RESPONSE_READ_LIMIT:
                    break
        finally:
            await response.aclose()
        return response

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
        deadline = self.settings.timeout_seconds
        try:
            async with asyncio.timeout(deadline):
                response = await self._send(item, headers)
        except TimeoutError:
            log.info("webhook delivery timed out", extra=extra)
            return Outcome(item.delivery_id, True, error=f"timed out after {deadline:g} s")
        except TargetRefused as exc:  # retried all the same: DNS answers may change
            log.warning("webhook delivery refused: %s", exc, extra=extra)
            return Outcome(item.delivery_id, True, error=str(exc))
        except httpx.HTTPError as exc:
            log.info("webhook delivery failed: %s", exc.__class__.__name__, extra=extra)
            return Outcome(item.delivery_id, True, error=f"{exc.__class__.__name__}: no response")
        except Exception as exc:  # a bug or a library surprise: recorded, backed off
            log.warning("webhook delivery failed unexpectedly", extra=extra, exc_info=True)
            error = f"internal error: {exc.__class__.__name__}"
            return Outcome(item.delivery_id, True, error=error)
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
