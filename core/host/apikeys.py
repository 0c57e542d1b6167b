"""API keys of the HTTP API and the idempotency records of its write requests.

A key is ``tsk_<key_id>_<secret>``: ``key_id`` is a public name (listed, used to
revoke), the secret part carries 256 bits from :mod:`secrets`. The key is shown
once, at creation; only its SHA-256 is stored (R11), which is enough for a key of
that entropy and lets a request be authenticated with one indexed lookup. A key
belongs to one sub-account (it reaches nothing of any other, R10) or, with
``subaccount=None``, to an operator (admin).

An idempotency record keeps the answer to a ``send`` or ``reply`` made with an
``Idempotency-Key`` header, per sub-account. It is written as ``started``
before the kernel is called and completed afterwards; a request that died in
between left an unknown outcome and is never run again under that key (R9: no
CRM message is sent twice).
"""

from __future__ import annotations

import functools
import hashlib
import secrets
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from threadsync.core.errors import InvalidInput, NotFound
from threadsync.core.store.database import Store
from threadsync.core.store.models import ApiKey, IdempotencyRecord, iso, utcnow

PREFIX = "tsk_"


@dataclass(frozen=True)
class Principal:
    """Who a request comes from: a sub-account's key, or an admin key."""

    key_id: str
    subaccount: str | None

    @property
    def admin(self) -> bool:
        return self.subaccount is None

    def may_see(self, subaccount: str) -> bool:
        """R10: a sub-account key reaches only its own sub-account."""
        return self.subaccount is None or self.subaccount == subaccount


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()



def key_json(row: ApiKey) -> dict[str, Any]:
    """A key as listed: never the key itself, nor its hash."""
    return {
        "key_id": row.key_id,
        "subaccount": row.subaccount_id,
        "admin": row.subaccount_id is None,
        "label": row.label,
        "created_at": iso(row.created_at),
        "revoked_at": iso(row.revoked_at),
    }


def _check_subaccount(subaccount: str | None) -> None:
    if subaccount is not None and (
        not subaccount or len(subaccount) > 255 or any(c in subaccount for c in "\r\n\0")
    ):
        raise InvalidInput("sub-account id must be 1-255 characters without line breaks")


def create(store: Store, subaccount: str | None, label: str = "") -> dict[str, Any]:
    """Make a key; the result's ``key`` is the only time the key is ever shown."""
    _check_subaccount(subaccount)
    if len(label) > 255:
        raise InvalidInput("label must be at most 255 characters")
    key_id = secrets.token_hex(6)
    key = f"{PREFIX}{key_id}_{secrets.token_urlsafe(32)}"

    def work(session: Session) -> dict[str, Any]:
        row = ApiKey(key_id=key_id, key_hash=key_hash(key), subaccount_id=subaccount, label=label)
        session.add(row)
        session.flush()
        return {**key_json(row), "key": key}

    return store.call(work)


def list_keys(store: Store, subaccount: str | None = None) -> dict[str, Any]:
    """Every key (or one sub-account's), revoked ones too, oldest first."""

    def work(session: Session) -> dict[str, Any]:
        query = select(ApiKey).order_by(ApiKey.id)
        if subaccount is not None:
            query = query.where(ApiKey.subaccount_id == subaccount)
        return {"keys": [key_json(k) for k in session.scalars(query)]}

    return store.call(work)


def revoke(store: Store, key_id: str) -> dict[str, Any]:
    def work(session: Session) -> dict[str, Any]:
        row = session.scalars(select(ApiKey).where(ApiKey.key_id == key_id)).first()
        if row is None:
            raise NotFound(f"API key {key_id!r} not found")
        if row.revoked_at is None:
            row.revoked_at = utcnow()
        return key_json(row)

    return store.call(work)


def authenticate(store: Store, key: str) -> Principal | None:
    """The principal of a presented key, or ``None`` (unknown, malformed, revoked)."""
    if not key.startswith(PREFIX) or len(key) > 200:
        return None
    digest = key_hash(key)

    def work(session: Session) -> Principal | None:
        row = session.scalars(select(ApiKey).where(ApiKey.key_hash == digest)).first()
        if row is None or row.revoked_at is not None:
            return None
        return Principal(key_id=row.key_id, subaccount=row.subaccount_id)

    return store.call(work)


def principal_of(store: Store, key_id: str) -> Principal | None:
    """The principal of a key by its public id, if it is not revoked (sessions)."""

    def work(session: Session) -> Principal | None:
        row = session.scalars(select(ApiKey).where(ApiKey.key_id == key_id)).first()
        if row is None or row.revoked_at is not None:
            return None
        return Principal(key_id=row.key_id, subaccount=row.subaccount_id)

    return store.call(work)


# ---- idempotency -------------------------------------------------------------------------


@dataclass(frozen=True)
class Replay:
    """What an idempotency key already holds: a finished answer, or ``None`` for a
    request under that key that is still running or ended without one."""

    status_code: int | None
    response: dict[str, Any] | None
    same_request: bool


def begin(store: Store, subaccount: str, key: str, request_hash: str) -> Replay | None:
    """Claim ``key`` for a new request (``None``), or return what it already holds."""
    if not key or len(key) > 255 or not key.isprintable():
        raise InvalidInput("Idempotency-Key must be 1-255 printable characters")

    def existing(session: Session) -> Replay | None:
        row = session.scalars(
            select(IdempotencyRecord).where(
                IdempotencyRecord.subaccount_id == subaccount, IdempotencyRecord.key == key
            )
        ).first()
        if row is None:
            return None
        same = row.request_hash == request_hash
        if row.state != "done":
            return Replay(None, None, same)
        return Replay(row.status_code, row.response, same)

    def claim(session: Session) -> None:
        session.add(
            IdempotencyRecord(
                subaccount_id=subaccount, key=key, request_hash=request_hash, state="started"
            )
        )

    found = store.call(existing)
    if found is not None:
        return found
    try:
        store.call(claim)
    except IntegrityError:  # another request claimed it in between
        return store.call(existing)
    return None


def finish(
    store: Store, subaccount: str, key: str, status_code: int, response: dict[str, Any]
) -> None:
    """Keep the answer of the request that claimed ``key``."""

    def work(session: Session) -> None:
        row = session.scalars(
            select(IdempotencyRecord).where(
                IdempotencyRecord.subaccount_id == subaccount, IdempotencyRecord.key == key
            )
        ).first()
        if row is not None:
            row.state = "done"
            row.status_code = status_code
            row.response = response

    store.call(work)


def abandon(store: Store, subaccount: str, key: str) -> None:
    """Release ``key`` after a request that certainly changed nothing (refused by a
    rule, bad input), so that a corrected retry can use it."""

    def work(session: Session) -> None:
        row = session.scalars(
            select(IdempotencyRecord).where(
                IdempotencyRecord.subaccount_id == subaccount,
                IdempotencyRecord.key == key,
                IdempotencyRecord.state == "started",
            )
        ).first()
        if row is not None:
            session.delete(row)

    store.call(work)


class ApiKeys:
    """The API keys and idempotency records of one instance, as the HTTP API and
    the command line reach them (``Threadsync.api_keys``): the functions of this
    module with its store bound."""

    def __init__(self, store: Store) -> None:
        self.create = functools.partial(create, store)
        self.list_keys = functools.partial(list_keys, store)
        self.revoke = functools.partial(revoke, store)
        self.authenticate = functools.partial(authenticate, store)
        self.principal_of = functools.partial(principal_of, store)
        self.begin = functools.partial(begin, store)
        self.finish = functools.partial(finish, store)
        self.abandon = functools.partial(abandon, store)
