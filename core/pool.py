"""Open providers kept between one-off deliveries of a long-lived process.

A host that embeds threadsync (or the HTTP API) sends CRM mail one message at a
time; logging in to IMAP and SMTP for each would cost more than the send. The
pool keeps one open provider per connection for a short while, serialises its
use, and drops it on any provider error, when the stored credentials change, or
after it sat idle (servers close idle sessions). The daemon does not use the
pool: its connection tasks own their providers.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from core.errors import ProviderError
from core.provider import Provider

if TYPE_CHECKING:
    from core.kernel import Kernel
    from core.models import Connection

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
        self._entries: dict[tuple[int, int], _Entry] = {}
        self._locks: dict[tuple[int, int], asyncio.Lock] = {}

    @asynccontextmanager
    async def borrow(
        self, k: Kernel, conn_id: int, conn: Connection | None = None
    ) -> AsyncIterator[Provider]:
        """An open provider of connection ``conn_id``; ``conn`` is its row when the
        caller has just read it (saves a query), else it is read here."""
        key = (id(asyncio.get_running_loop()), conn_id)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            if conn is None or conn.id != conn_id:
                conn = await k.store.run(lambda s: k.get_connection(s, conn_id))
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
                provider = await k.open_provider(conn)
                entry = self._entries[key] = _Entry(provider, fingerprint)
            try:
                yield entry.provider
            except ProviderError:
                await self._drop(key)
                raise
            finally:
                entry.used_at = time.monotonic()
                await k.keep_refreshed_secrets(conn_id, entry.provider)

    async def _drop(self, key: tuple[int, int]) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            await entry.provider.close()

    async def aclose(self) -> None:
        """Close every provider opened on the running event loop."""
        loop_id = id(asyncio.get_running_loop())
        for key in [k for k in self._entries if k[0] == loop_id]:
            await self._drop(key)
