"""Open providers kept between one-off deliveries of a long-lived process.

A host that embeds threadsync (or the HTTP API) sends CRM mail one message at a
time; logging in to IMAP and SMTP for each would cost more than the send. The
pool keeps one open provider per connection for a short while, serialises its
use, and drops it on any provider error, when the stored credentials change, or
after it sat idle (servers close idle sessions). The daemon does not use the
pool: its connection tasks own their providers. The pool knows its owner only
through three callables (load a row, open a provider, after use), never the kernel.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from threadsync.core.errors import ProviderError
from threadsync.core.provider import Provider

if TYPE_CHECKING:
    from threadsync.core.store.models import Connection

#: Reads a connection's row (``NotFound`` when it is gone).
LoadConnection = Callable[[int], Awaitable["Connection"]]
#: Opens (logs in) a provider for a connection's row.
OpenProvider = Callable[["Connection"], Awaitable[Provider]]
#: Called after every use with the connection id and the provider (stores a
#: refreshed token).
AfterUse = Callable[[int, Provider], Awaitable[None]]

IDLE_SECONDS = 60.0


@dataclass
class _Entry:
    provider: Provider
    fingerprint: str
    used_at: float = field(default_factory=time.monotonic)


class ProviderPool:
    """One open provider per (event loop, connection), reused while fresh."""

    def __init__(self, idle_seconds: float = IDLE_SECONDS) -> None:
        self.idle_seconds = idle_seconds
        self._load: LoadConnection | None = None
        self._open: OpenProvider | None = None
        self._after_use: AfterUse | None = None
        self._entries: dict[tuple[int, int], _Entry] = {}
        self._locks: dict[tuple[int, int], asyncio.Lock] = {}

    @property
    def bound(self) -> bool:
        return self._load is not None

    def bind(self, load: LoadConnection, open: OpenProvider, after_use: AfterUse) -> None:
        """Give the pool its owner's three callables (once, by the kernel)."""
        self._load, self._open, self._after_use = load, open, after_use

    @asynccontextmanager
    async def borrow(
        self, conn_id: int, conn: Connection | None = None
    ) -> AsyncIterator[Provider]:
        """An open provider of connection ``conn_id``; ``conn`` is its row when the
        caller has just read it (saves a query), else it is read here."""
        assert self._load and self._open and self._after_use, "ProviderPool.bind first"
        key = (id(asyncio.get_running_loop()), conn_id)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            if conn is None or conn.id != conn_id:
                conn = await self._load(conn_id)
            fingerprint = hashlib.sha256(conn.secrets or b"").hexdigest()
            entry = self._entries.get(key)
            stale = entry is not None and (
                entry.fingerprint != fingerprint
                or time.monotonic() - entry.used_at > self.idle_seconds
            )
            if entry is not None and stale:
                await self._drop(key)
                entry = None
            if entry is None:
                provider = await self._open(conn)
                entry = self._entries[key] = _Entry(provider, fingerprint)
            try:
                yield entry.provider
            except ProviderError:
                await self._drop(key)
                raise
            finally:
                entry.used_at = time.monotonic()
                await self._after_use(conn_id, entry.provider)

    async def _drop(self, key: tuple[int, int]) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            await entry.provider.close()

    async def aclose(self) -> None:
        """Close every provider opened on the running event loop."""
        loop_id = id(asyncio.get_running_loop())
        for key in [k for k in self._entries if k[0] == loop_id]:
            await self._drop(key)
