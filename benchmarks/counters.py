"""Counts what a piece of work costs besides time: IMAP commands and connections,
SMTP connections, database transactions and the time spent inside them.

:func:`install` wraps a few methods at runtime (nothing in ``core/`` or
``plugins/`` is edited): aioimaplib's ``IMAP4ClientProtocol.execute`` and
``connection_made`` (threadsync's IMAP protocol and the bare floor clients both
go through them, so one IMAP command is one request/response round trip, the
greeting being one more per connection), ``aiosmtplib.SMTP.connect`` and
``core.store.Store.call`` (every unit of kernel work is one transaction). The
wrappers only bump counters, which costs well under a microsecond per call.
"""

from __future__ import annotations

import functools
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

_counts: Counter[str] = Counter()
_lock = threading.Lock()
_installed = False


def _bump(key: str, amount: float = 1) -> None:
    with _lock:
        _counts[key] += amount  # type: ignore[assignment]


def install() -> None:
    global _installed
    if _installed:
        return
    _installed = True

    import aiosmtplib
    from aioimaplib import aioimaplib

    from core.store import Store

    protocol = aioimaplib.IMAP4ClientProtocol
    execute, made = protocol.execute, protocol.connection_made

    @functools.wraps(execute)
    async def counted_execute(self: Any, command: Any, *args: Any, **kwargs: Any) -> Any:
        _bump("imap_commands")
        _bump(f"imap:{command.name}")
        return await execute(self, command, *args, **kwargs)

    @functools.wraps(made)
    def counted_made(self: Any, transport: Any) -> Any:
        _bump("imap_connections")
        return made(self, transport)

    protocol.execute = counted_execute
    protocol.connection_made = counted_made

    connect = aiosmtplib.SMTP.connect

    @functools.wraps(connect)
    async def counted_connect(self: Any, *args: Any, **kwargs: Any) -> Any:
        _bump("smtp_connections")
        return await connect(self, *args, **kwargs)

    aiosmtplib.SMTP.connect = counted_connect

    call: Callable[..., Any] = Store.call

    @functools.wraps(call)
    def counted_call(self: Any, fn: Any) -> Any:
        start = time.perf_counter()
        try:
            return call(self, fn)
        finally:
            _bump("db_transactions")
            _bump("db_seconds", time.perf_counter() - start)

    Store.call = counted_call  # type: ignore[method-assign]


def snapshot() -> Counter[str]:
    with _lock:
        return Counter(_counts)


def since(before: Counter[str]) -> dict[str, float]:
    """What was counted after ``before`` was taken."""
    now = snapshot()
    return {k: now[k] - before.get(k, 0) for k in now if now[k] != before.get(k, 0)}

