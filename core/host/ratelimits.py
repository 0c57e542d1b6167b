"""Token buckets kept in the database, so that every process serving the HTTP
API on one database counts against the same buckets (an API key's requests, a
client address's failed sign-ins).

A bucket holds at most ``burst`` tokens and refills at ``rate`` per second; a
request takes one. :func:`take` is one conditional ``UPDATE`` in the common
case: the refill and the take happen in the statement itself, so concurrent
processes never lose a take (the row is locked by the update on PostgreSQL, the
database by it on SQLite). A missing row is a full bucket. Times are seconds
since the epoch (``time.time()``), comparable across processes on one host or
with synchronised clocks. :func:`purge` drops buckets idle long enough to be
full again.
"""

from __future__ import annotations

import functools
import time

from sqlalchemy import Update, case, delete, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from threadsync.core.store.database import Store
from threadsync.core.store.models import RateLimitBucket


def _refill(tokens: float, updated: float, rate: float, burst: int, now: float) -> float:
    return min(float(burst), tokens + max(0.0, now - updated) * rate)


def _take_update(key: str, rate: float, burst: int, now: float) -> Update:
    b = RateLimitBucket
    refilled = b.tokens + (now - b.updated) * rate
    level = case((refilled > burst, float(burst)), else_=refilled)
    return (
        update(b)
        .where(b.key == key, level >= 1.0)
        .values(tokens=level - 1.0, updated=now)
        .execution_options(synchronize_session=False)
    )


def take(store: Store, key: str, rate: float, burst: int, now: float | None = None) -> float | None:
    """Take a token from bucket ``key``: ``None`` when allowed, else the seconds
    until one is free."""
    moment = time.time() if now is None else now

    def taken(session: Session) -> bool:
        result = session.execute(_take_update(key, rate, burst, moment))
        return int(result.rowcount) == 1  # type: ignore[attr-defined]

    def work(session: Session) -> float | None:
        if taken(session):
            return None
        row = session.get(RateLimitBucket, key)
        if row is None:
            try:
                with session.begin_nested():
                    session.add(RateLimitBucket(key=key, tokens=burst - 1.0, updated=moment))
                return None
            except IntegrityError:  # another process made it meanwhile
                if taken(session):
                    return None
                row = session.get(RateLimitBucket, key, populate_existing=True)
                assert row is not None
        level = _refill(row.tokens, row.updated, rate, burst, moment)
        return (1.0 - level) / rate

    return store.call(work)


def wait(store: Store, key: str, rate: float, burst: int, now: float | None = None) -> float | None:
    """Like :func:`take` without taking: ``None`` when a token is there."""
    moment = time.time() if now is None else now

    def work(session: Session) -> float | None:
        row = session.get(RateLimitBucket, key)
        if row is None:
            return None
        level = _refill(row.tokens, row.updated, rate, burst, moment)
        return None if level >= 1.0 else (1.0 - level) / rate

    return store.call(work)


def purge(store: Store, idle_seconds: float, now: float | None = None) -> int:
    """Delete buckets untouched for ``idle_seconds`` (full again by then)."""
    before = (time.time() if now is None else now) - idle_seconds
    statement = delete(RateLimitBucket).where(RateLimitBucket.updated < before)
    return store.call(lambda s: int(s.execute(statement).rowcount))  # type: ignore[attr-defined]


class RateLimits:
    """The buckets of one instance (``Threadsync.rate_limits``): the functions of
    this module with its store bound."""

    def __init__(self, store: Store) -> None:
        self.take = functools.partial(take, store)
        self.wait = functools.partial(wait, store)
        self.purge = functools.partial(purge, store)
