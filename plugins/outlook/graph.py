"""A small Microsoft Graph client on httpx: one mailbox, its throttling rules,
and errors translated into :mod:`threadsync.core.errors`.

Every request carries ``Prefer: IdType="ImmutableId"`` (ids survive moves) and a
fresh bearer token. Outlook runs at most 4 requests at once, and Microsoft has
written that limit both per mailbox and per app; every item of a ``$batch``
counts on its own. So the requests in flight, batch items included, hold slots
of a :class:`Slots` limit that all clients of one process share (per app by
default, per mailbox when configured): a batch carries at most as many items as
the limit and holds one slot per item. ``429`` and ``503`` are retried after
their ``Retry-After``; when retries run out, or the wait is longer than
``max_retry_wait_seconds``, :class:`TransientProviderError` carries the wait to
the kernel's backoff. A ``401`` refreshes the token once. Batch items throttled
on their own are sent again, alone of their batch, after their ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import ssl
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx

from threadsync.core.errors import (
    AuthenticationFailed,
    ProviderError,
    ProviderProtocolError,
    TransientProviderError,
)

log = logging.getLogger(__name__)

IMMUTABLE_ID = 'IdType="ImmutableId"'
#: Most requests in one JSON batch (Graph's limit).
BATCH_LIMIT = 20
#: Statuses after which Graph did not act on the request and asks to come back.
RETRY_STATUSES = (429, 503)
#: Error codes meaning "this token may not do that any more": consent was revoked.
_ACCESS_DENIED = {"erroraccessdenied", "accessdenied", "authorization_requestdenied"}

TokenGetter = Callable[[bool], Awaitable[str]]


class GraphAmbiguous(TransientProviderError):
    """A write whose outcome is unknown (connection lost, gateway timeout)."""


class GraphRequestError(ProviderProtocolError):
    """Graph refused a request for good; ``status`` and ``code`` say why."""

    def __init__(self, message: str, *, status: int, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass(frozen=True)
class GraphError:
    """The ``error`` object of a Graph answer."""

    status: int
    code: str
    message: str

    @classmethod
    def of(cls, response: httpx.Response) -> GraphError:
        code, message = "", ""
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            code = str(body["error"].get("code") or "")
            message = str(body["error"].get("message") or "")
        return cls(response.status_code, code, message[:300])

    def __str__(self) -> str:
        what = f" {self.code}" if self.code else ""
        text = f": {self.message}" if self.message else ""
        return f"Microsoft Graph answered {self.status}{what}{text}"


def translate(error: GraphError, mailbox: str) -> ProviderError:
    """The :mod:`threadsync.core.errors` exception for a Graph error answer."""
    if error.status == 401:
        return AuthenticationFailed(f"Microsoft Graph refused the sign-in of {mailbox}: {error}")
    if error.status == 403 and error.code.lower() in _ACCESS_DENIED:
        return AuthenticationFailed(
            f"Microsoft Graph denied access to {mailbox} (consent revoked?): {error}"
        )
    if error.status in (408, 500, 502, 504) or error.status in RETRY_STATUSES:
        return TransientProviderError(str(error))
    return GraphRequestError(str(error), status=error.status, code=error.code)


def retry_after(response: httpx.Response) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    value = response.headers.get("retry-after")
    return parse_retry_after(value)


def parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))  # delta-seconds (Graph sends whole seconds)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


class Slots:
    """A counting limit where one holder may take several slots (a batch)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self.in_use = 0
        self.peak = 0
        self._freed = asyncio.Condition()

    @asynccontextmanager
    async def hold(self, count: int = 1) -> AsyncIterator[None]:
        count = min(max(1, count), self.capacity)
        async with self._freed:
            await self._freed.wait_for(lambda: self.in_use + count <= self.capacity)
            self.in_use += count
            self.peak = max(self.peak, self.in_use)
        try:
            yield
        finally:
            async with self._freed:
                self.in_use -= count
                self._freed.notify_all()


#: One set of limits per event loop (asyncio primitives belong to one loop).
_SHARED: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[str, ...], Slots]] = (
    weakref.WeakKeyDictionary()
)


def shared_slots(key: tuple[str, ...], capacity: int) -> Slots:
    """The process's limit named ``key`` (created with ``capacity`` on first use)."""
    limits = _SHARED.setdefault(asyncio.get_running_loop(), {})
    if key not in limits:
        limits[key] = Slots(capacity)
    return limits[key]


def client_tls(ca_file: str | None) -> ssl.SSLContext:
    """Certificate-verifying TLS, trusting the system store (and ``ca_file``)."""
    context = ssl.create_default_context()
    if ca_file:
        context.load_verify_locations(cafile=ca_file)
    return context


class GraphClient:
    """Requests to Graph for one mailbox, with auth, throttling and retries."""

    def __init__(
        self,
        base_url: str,
        token: TokenGetter,
        *,
        mailbox: str,
        tls: ssl.SSLContext,
        timeout: float = 30.0,
        max_concurrency: int = 4,
        max_retries: int = 4,
        max_retry_wait: float = 120.0,
        slots: Slots | None = None,
        root: str = "me",
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.mailbox = mailbox
        #: ``me``, or ``users/{id or UPN}`` for a mailbox the user has delegate rights to.
        self.root = root
        self._token = token
        self.slots = slots or Slots(max_concurrency)
        self._max_retries = max_retries
        self._max_wait = max_retry_wait
        self._http = httpx.AsyncClient(verify=tls, timeout=timeout, follow_redirects=False)
        origin = urlsplit(self.base_url)
        self._origin = (origin.scheme, origin.netloc.lower())

    async def aclose(self) -> None:
        await self._http.aclose()

    def url(self, path_or_url: str) -> str:
        """An absolute Graph URL. Links Graph handed out (``@odata.nextLink``) are
        used verbatim, but only towards Graph itself: the token never goes elsewhere."""
        if path_or_url.startswith(("https://", "http://")):
            parts = urlsplit(path_or_url)
            if (parts.scheme, parts.netloc.lower()) != self._origin:
                raise ProviderProtocolError("Graph returned a link to another host; not followed")
            return path_or_url
        return self.base_url + "/" + path_or_url.lstrip("/")

    # ---- single requests ----------------------------------------------------------------

    async def request(
        self,
        method: str,
        path_or_url: str,
        *,
        params: Mapping[str, str] | None = None,
        json: Any = None,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        prefer: Sequence[str] = (),
        idempotent: bool = True,
        slots: int = 1,
    ) -> httpx.Response:
        """One request, retried after throttling; returns a 2xx response.

        ``idempotent=False`` (a send) is never repeated after a lost connection or a
        gateway timeout: :class:`GraphAmbiguous` says the outcome is unknown. A
        connection that could not be made at all carried nothing and is retried.
        ``slots`` is how many concurrency slots it holds (a batch: one per item).
        """
        url = self.url(path_or_url)
        sent_headers = {"Prefer": ", ".join([IMMUTABLE_ID, *prefer])}
        sent_headers.update(headers or {})
        refreshed = False
        attempt = 0
        while True:
            token = await self._token(False)
            sent_headers["Authorization"] = f"Bearer {token}"
            try:
                async with self.slots.hold(slots):
                    response = await self._http.request(
                        method, url, params=params, json=json, content=content,
                        headers=sent_headers,
                    )
            except httpx.HTTPError as exc:
                attempt += 1
                if not idempotent and not isinstance(exc, httpx.ConnectError):
                    raise GraphAmbiguous(f"lost Microsoft Graph during {method}: {exc}") from None
                if attempt > self._max_retries:
                    raise TransientProviderError(
                        f"cannot reach Microsoft Graph: {exc.__class__.__name__}"
                    ) from None
                await asyncio.sleep(min(2.0 ** (attempt - 1), 8.0))
                continue
            if response.is_success:
                return response
            if response.status_code == 401 and not refreshed:
                refreshed = True
                await self._token(True)
                continue
            if response.status_code in RETRY_STATUSES:
                attempt += 1
                await self._wait_or_raise(response, attempt)
                continue
            if not idempotent and response.status_code in (502, 504):
                raise GraphAmbiguous(str(GraphError.of(response)))
            raise translate(GraphError.of(response), self.mailbox)

    async def _wait_or_raise(self, response: httpx.Response, attempt: int) -> None:
        wait = retry_after(response)
        delay = wait if wait is not None else min(2.0 ** (attempt - 1), 30.0)
        if attempt > self._max_retries or delay > self._max_wait:
            raise TransientProviderError(
                f"Microsoft Graph is throttling {self.mailbox} "
                f"({response.status_code}; retry after {delay:g} s)",
                retry_after=delay,
            )
        log.info(
            "Graph throttled; waiting",
            extra={"mailbox": self.mailbox, "status": response.status_code, "wait": delay},
        )
        await asyncio.sleep(delay)

    async def get_json(
        self, path_or_url: str, params: Mapping[str, str] | None = None, prefer: Sequence[str] = ()
    ) -> dict[str, Any]:
        response = await self.request("GET", path_or_url, params=params, prefer=prefer)
        return json_object(response)

    async def upload_range(self, upload_url: str, data: bytes, start: int, total: int) -> int:
        """PUT one byte range to an attachment upload session; returns the status.

        The upload URL carries its own credential: no ``Authorization`` header is
        sent there (Graph refuses one), and it may be on another host.
        """
        headers = {
            "Content-Range": f"bytes {start}-{start + len(data) - 1}/{total}",
            "Content-Type": "application/octet-stream",
        }
        attempt = 0
        while True:
            try:
                async with self.slots.hold():
                    response = await self._http.put(upload_url, content=data, headers=headers)
            except httpx.HTTPError as exc:
                attempt += 1
                if attempt > self._max_retries:
                    raise TransientProviderError(
                        f"attachment upload failed: {exc.__class__.__name__}"
                    ) from None
                continue
            if response.is_success:
                return response.status_code
            if response.status_code in RETRY_STATUSES:
                attempt += 1
                await self._wait_or_raise(response, attempt)
                continue
            raise translate(GraphError.of(response), self.mailbox)

    # ---- JSON batching ------------------------------------------------------------------

    async def batch_get(self, paths: Sequence[str]) -> list[tuple[int, dict[str, Any]]]:
        """GET each relative path through ``$batch``; ``(status, body)`` in order.

        Items throttled on their own (429/503 inside the batch) are sent again after
        their ``Retry-After``; other item errors are returned for the caller.
        """
        results: list[tuple[int, dict[str, Any]] | None] = [None] * len(paths)
        size = min(BATCH_LIMIT, self.slots.capacity)
        for start in range(0, len(paths), size):
            pending = list(range(start, min(start + size, len(paths))))
            attempt = 0
            while pending:
                answers = await self._batch_once([(i, paths[i]) for i in pending])
                waits: list[float] = []
                again: list[int] = []
                for index in pending:
                    status, headers, body = answers.get(index, (0, {}, {}))
                    if status in RETRY_STATUSES or status == 0:
                        again.append(index)
                        waits.append(parse_retry_after(headers.get("retry-after")) or 1.0)
                    else:
                        results[index] = (status, body)
                pending = again
                if pending:
                    attempt += 1
                    delay = max(waits)
                    if attempt > self._max_retries or delay > self._max_wait:
                        raise TransientProviderError(
                            f"Microsoft Graph is throttling {self.mailbox} (batch items)",
                            retry_after=delay,
                        )
                    await asyncio.sleep(delay)
        return [r if r is not None else (0, {}) for r in results]

    async def _batch_once(
        self, items: list[tuple[int, str]]
    ) -> dict[int, tuple[int, dict[str, str], dict[str, Any]]]:
        body = {
            "requests": [
                {
                    "id": str(index),
                    "method": "GET",
                    "url": "/" + path.lstrip("/"),
                    # Headers of the outer request do not apply to the items.
                    "headers": {"Prefer": IMMUTABLE_ID},
                }
                for index, path in items
            ]
        }
        response = await self.request("POST", "$batch", json=body, slots=len(items))
        data = json_object(response)
        answers: dict[int, tuple[int, dict[str, str], dict[str, Any]]] = {}
        for item in data.get("responses") or []:
            if not isinstance(item, dict):
                continue
            try:
                index = int(item.get("id", ""))
                status = int(item.get("status", 0))
            except (TypeError, ValueError):
                continue
            headers = {str(k).lower(): str(v) for k, v in (item.get("headers") or {}).items()}
            payload = item.get("body")
            answers[index] = (status, headers, payload if isinstance(payload, dict) else {})
        return answers


def json_object(response: httpx.Response) -> dict[str, Any]:
    """The JSON object of a Graph answer, or ProviderProtocolError."""
    try:
        data = response.json()
    except ValueError:
        raise ProviderProtocolError(
            f"Microsoft Graph answered {response.status_code} without JSON"
        ) from None
    if not isinstance(data, dict):
        raise ProviderProtocolError("Microsoft Graph answered JSON that is not an object")
    return data
