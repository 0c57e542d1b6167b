"""Counts what a piece of work costs besides wall time: IMAP commands (and the
time waited for each kind), IMAP and SMTP connections, SMTP steps, database
transactions and the time spent inside them.

:func:`install` wraps a few methods at runtime (nothing in ``core/`` or
``plugins/`` is edited): aioimaplib's ``IMAP4ClientProtocol.execute`` and
``connection_made`` (threadsync's IMAP protocol and the bare floor clients both
go through them, so one IMAP command is one request/response round trip, plus
the greeting of each connection), the connect step of both IMAP clients, the
``aiosmtplib.SMTP`` steps (connect, EHLO, AUTH, MAIL, RCPT, DATA, QUIT) and
``threadsync.core.store.database.Store.call`` (every unit of kernel work is one transaction). The
wrappers cost about a microsecond per call. Times of nested steps overlap
(``login`` includes the ``ehlo`` it sends), so they are a breakdown to read, not
to add up.
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

    from threadsync.core.store.database import Store
    from threadsync.plugins.imap_smtp.imap import ImapSession

    protocol = aioimaplib.IMAP4ClientProtocol
    execute, made = protocol.execute, protocol.connection_made

    @functools.wraps(execute)
    async def counted_execute(self: Any, command: Any, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return await execute(self, command, *args, **kwargs)
        finally:
            _bump("imap_commands")
            _bump(f"imap:{command.name}")
            _bump(f"imap_s:{command.name}", time.perf_counter() - start)

    @functools.wraps(made)
    def counted_made(self: Any, transport: Any) -> Any:
        _bump("imap_connections")
        return made(self, transport)

    protocol.execute = counted_execute
    protocol.connection_made = counted_made
    _timed_method(aioimaplib.IMAP4, "wait_hello_from_server", "imap_s:connect")
    session_connect = ImapSession.connect.__func__  # type: ignore[attr-defined]

    async def timed_session_connect(cls: Any, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return await session_connect(cls, *args, **kwargs)
        finally:
            _bump("imap_s:connect", time.perf_counter() - start)

    ImapSession.connect = classmethod(timed_session_connect)  # type: ignore[assignment]

    _timed_method(aiosmtplib.SMTP, "connect", "smtp_s:connect", count="smtp_connections")
    for name in ("ehlo", "login", "mail", "rcpt", "data", "quit"):
        _timed_method(aiosmtplib.SMTP, name, f"smtp_s:{name}")
    # threadsync's own DATA (threadsync.core.outbox.smtp_data.send_data, the checkpoint's commit
    # included), where the modules that use it look it up.
    import threadsync.core.outbox.relay
    import threadsync.core.outbox.smtp

    for module in (threadsync.core.outbox.relay, threadsync.core.outbox.smtp):
        _timed_function(module, "send_data", "smtp_s:data")

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


def _timed_method(cls: type, name: str, key: str, count: str | None = None) -> None:
    original = getattr(cls, name)

    @functools.wraps(original)
    async def timed(self: Any, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return await original(self, *args, **kwargs)
        finally:
            if count:
                _bump(count)
            _bump(key, time.perf_counter() - start)

    setattr(cls, name, timed)


def _timed_function(module: Any, name: str, key: str) -> None:
    original = getattr(module, name)

    @functools.wraps(original)
    async def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return await original(*args, **kwargs)
        finally:
            _bump(key, time.perf_counter() - start)

    setattr(module, name, timed)


def snapshot() -> Counter[str]:
    with _lock:
        return Counter(_counts)


def since(before: Counter[str]) -> dict[str, float]:
    """What was counted after ``before`` was taken."""
    now = snapshot()
    return {k: now[k] - before.get(k, 0) for k in now if now[k] != before.get(k, 0)}

