"""Interactive sign-ins over HTTP that a browser redirect does not finish
(a device code, or a plugin's own ``notify`` flow).

Providers with a redirect sign-in (Outlook's consent page) go through
:mod:`threadsync.core.accounts.consent` instead, kept in the database. A provider whose
``authorize`` needs the user otherwise says so through ``notify(text)`` and
then waits for the user. The request cannot wait that long:
:meth:`SignIns.start` runs the connect as a task and answers as soon as either
the connect finished (no interaction was needed) or the provider asked for the
user, in which case the caller gets a sign-in id, the text and the URL found in
it, and polls ``GET /v1/subaccounts/{subaccount}/sign-ins/{id}`` for the
outcome.

These sign-ins live in the API process only (a device-code poll cannot be
resumed by another process anyway); finished ones are forgotten after an hour.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from threadsync.core.errors import ThreadsyncError

Notify = Callable[[str], None]
KEEP_SECONDS = 3600.0
_URL = re.compile(r"https?://[^\s\"'<>]+")


@dataclass
class SignIn:
    id: str
    subaccount: str
    user: str
    state: str = "pending"
    message: str | None = None
    consent_url: str | None = None
    connection: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    finished_at: float | None = None
    task: asyncio.Task[dict[str, Any]] | None = field(default=None, repr=False)

    def json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "subaccount": self.subaccount,
            "user": self.user,
            "state": self.state,
            "message": self.message,
            "consent_url": self.consent_url,
            "connection": self.connection,
            "error": self.error,
        }


@dataclass
class Started:
    """The outcome of :meth:`SignIns.start`: a finished connection, or a pending sign-in."""

    connection: dict[str, Any] | None = None
    pending: SignIn | None = None


class SignIns:
    def __init__(self) -> None:
        self._items: dict[str, SignIn] = {}

    def get(self, subaccount: str, sign_in_id: str) -> SignIn | None:
        item = self._items.get(sign_in_id)
        return item if item is not None and item.subaccount == subaccount else None

    def _prune(self) -> None:
        now = time.monotonic()
        for key, item in list(self._items.items()):
            if item.finished_at is not None and now - item.finished_at > KEEP_SECONDS:
                del self._items[key]

    async def start(
        self,
        subaccount: str,
        user: str,
        run: Callable[[Notify], Awaitable[dict[str, Any]]],
        problem_of: Callable[[ThreadsyncError], dict[str, Any]],
    ) -> Started:
        """Run ``run(notify)``; errors before any interaction are raised here."""
        self._prune()
        item = SignIn(id="si_" + secrets.token_urlsafe(12), subaccount=subaccount, user=user)
        asked = asyncio.Event()

        def notify(text: str) -> None:
            item.message = text
            found = _URL.search(text)
            item.consent_url = found.group(0).rstrip(".,;)") if found else None
            asked.set()

        task = asyncio.ensure_future(run(notify))
        item.task = task
        waiter = asyncio.ensure_future(asked.wait())
        try:
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiter
        if task.done():
            return Started(connection=task.result())

        def finished(done: asyncio.Task[dict[str, Any]]) -> None:
            item.finished_at = time.monotonic()
            if done.cancelled():
                item.state, item.error = "failed", {"detail": "the sign-in was cancelled"}
                return
            exc = done.exception()
            if exc is None:
                item.state, item.connection = "connected", done.result()
            elif isinstance(exc, ThreadsyncError):
                item.state, item.error = "failed", problem_of(exc)
            else:
                item.state, item.error = "failed", {"detail": "an internal error occurred"}

        task.add_done_callback(finished)
        self._items[item.id] = item
        return Started(pending=item)

    async def close(self) -> None:
        """Cancel sign-ins still waiting (at shutdown)."""
        tasks = [i.task for i in self._items.values() if i.task is not None and not i.task.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
