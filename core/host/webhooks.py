"""The durable webhook queue: endpoints per sub-account, deliveries made from the
event log, their order, retries and dead letters.

Deliveries are made from the ``events`` table, not from the in-process hooks, so
an event committed by any process (the CLI, the API, a daemon that died right
after its commit) is delivered all the same. The enqueuer keeps a watermark:
every event at or below it was handled. PostgreSQL hands out ids before commit,
so id N may become visible after N+1: events above the watermark are marked when
handled, and the enqueuer stops at a missing id until it appears or the event
after it is ``settle_seconds`` old (its transaction rolled back), so that a
thread's events are queued in id order and none is skipped. The watermark only
moves past ids older than ``settle_seconds``.

A delivery is ``pending`` until it is ``delivered`` (2xx) or ``dead`` (still
failing ``retry_hours`` after its window began, or its endpoint was deleted).
Retries back off exponentially with jitter. Deliveries sharing an
``ordering_key`` (a thread; a user for connection events) go out strictly in
event order: a later one is not claimed while an earlier one is pending. A
worker leases what it claims (``host:pid``); a dead worker's lease is taken over
at once, an expired one by anybody. Delivery is at least once; receivers
deduplicate by event id.

Endpoints may not point into the operator's own network (loopback, private,
link-local, reserved addresses) unless ``allowed_networks`` or
``allow_private_targets`` opens it (:mod:`threadsync.core.host.webhook_targets`).
:func:`purge` deletes finished deliveries and idempotency records past their
retention, a batch at a time.

The HTTP transport and signing live in ``threadsync.plugins.http_api``; this module only
keeps state.
"""

from __future__ import annotations

import functools
import json
import random
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, delete, exists, func, or_, select, update
from sqlalchemy.orm import Session, aliased

from threadsync.core.errors import InvalidInput, NotFound
from threadsync.core.host.events import (
    CONNECTION_STATE_CHANGED,
    MESSAGE_SKIPPED,
    MESSAGE_SYNCED,
    THREAD_STOPPED,
)
from threadsync.core.host.webhook_targets import Network, check_url
from threadsync.core.kernel import Kernel, worker_is_dead
from threadsync.core.store.models import (
    Event,
    IdempotencyRecord,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookEventMark,
    WebhookState,
    iso,
    utcnow,
)

EVENT_TYPES = (MESSAGE_SYNCED, MESSAGE_SKIPPED, CONNECTION_STATE_CHANGED, THREAD_STOPPED)
STATUSES = ("pending", "delivered", "dead")
SECRET_PREFIX = "whsec_"


@dataclass(frozen=True)
class WebhookSettings:
    """The ``[webhooks]`` section of config.toml, and ``[http] idempotency_hours``
    (its records are purged by the same sweep)."""

    timeout_seconds: float = 10.0
    backoff_base_seconds: float = 5.0
    backoff_max_seconds: float = 3600.0
    retry_hours: float = 24.0
    lease_seconds: float = 120.0
    settle_seconds: float = 60.0
    poll_seconds: float = 1.0
    concurrency: int = 16
    #: Chains in flight for one sub-account at most: its slow endpoints never take
    #: every slot (fair scheduling across tenants).
    per_subaccount_concurrency: int = 4
    batch_size: int = 200
    chain_max: int = 10
    delivered_retention_days: float = 7.0
    dead_retention_days: float = 30.0
    idempotency_hours: float = 24.0
    #: Endpoints in these networks are allowed even when internal (on-premises CRMs).
    allowed_networks: tuple[Network, ...] = ()
    #: Every internal address is allowed, except unspecified and multicast ones.
    allow_private_targets: bool = False



# ---- endpoints ------------------------------------------------------------------------


def _check_types(types: Sequence[str]) -> list[str]:
    unknown = [t for t in types if t not in EVENT_TYPES]
    if unknown:
        raise InvalidInput(f"unknown event type {unknown[0]!r}; known: {', '.join(EVENT_TYPES)}")
    return list(dict.fromkeys(types))


def endpoint_json(ep: WebhookEndpoint) -> dict[str, Any]:
    return {
        "id": ep.id,
        "subaccount": ep.subaccount_id,
        "url": ep.url,
        "description": ep.description,
        "events": list(ep.event_types or []),
        "active": ep.active,
        "created_at": iso(ep.created_at),
    }


def create_endpoint(
    k: Kernel,
    subaccount: str,
    url: str,
    events: Sequence[str] = (),
    description: str = "",
    *,
    settings: WebhookSettings | None = None,
    addresses: Sequence[str] = (),
) -> dict[str, Any]:
    """A new endpoint; the result carries its signing ``secret``, shown only here.
    ``settings`` and ``addresses`` are as for :func:`check_url`."""
    url = check_url(url, settings, addresses)
    types = _check_types(events)
    if len(description) > 255:
        raise InvalidInput("description must be at most 255 characters")
    secret = SECRET_PREFIX + secrets.token_urlsafe(32)

    def work(session: Session) -> dict[str, Any]:
        newest = session.scalar(select(func.max(Event.id))) or 0
        ep = WebhookEndpoint(
            subaccount_id=subaccount,
            url=url,
            description=description,
            secret=k.vault.seal({"secret": secret}),
            event_types=types,
            active=True,
            after_event_id=int(newest),
        )
        session.add(ep)
        session.flush()
        return {**endpoint_json(ep), "secret": secret}

    return k.store.call(work)


def _endpoint(session: Session, subaccount: str | None, endpoint_id: int) -> WebhookEndpoint:
    ep = session.get(WebhookEndpoint, endpoint_id)
    if ep is None or not ep.active or (subaccount is not None and ep.subaccount_id != subaccount):
        raise NotFound(f"webhook endpoint {endpoint_id} not found")
    return ep


def list_endpoints(k: Kernel, subaccount: str) -> dict[str, Any]:
    def work(session: Session) -> dict[str, Any]:
        rows = session.scalars(
            select(WebhookEndpoint)
            .where(WebhookEndpoint.subaccount_id == subaccount, WebhookEndpoint.active.is_(True))
            .order_by(WebhookEndpoint.id)
        )
        return {"webhooks": [endpoint_json(ep) for ep in rows]}

    return k.store.call(work)


def get_endpoint(k: Kernel, subaccount: str, endpoint_id: int) -> dict[str, Any]:
    return k.store.call(lambda s: endpoint_json(_endpoint(s, subaccount, endpoint_id)))


def delete_endpoint(k: Kernel, subaccount: str, endpoint_id: int) -> dict[str, Any]:
    """Stop delivering to an endpoint; what was still pending for it becomes dead."""

    def work(session: Session) -> dict[str, Any]:
        ep = _endpoint(session, subaccount, endpoint_id)
        ep.active = False
        ep.deleted_at = now = utcnow()
        session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.endpoint_id == ep.id, WebhookDelivery.status == "pending")
            .values(status="dead", last_error="endpoint deleted", finished_at=now)
        )
        return endpoint_json(ep)

    return k.store.call(work)


# ---- deliveries as the host sees them ---------------------------------------------------


def delivery_json(d: WebhookDelivery) -> dict[str, Any]:
    return {
        "id": d.id,
        "endpoint_id": d.endpoint_id,
        "event_id": d.event_id,
        "event": d.event_type,
        "status": d.status,
        "attempts": d.attempts,
        "next_attempt_at": iso(d.next_attempt_at) if d.status == "pending" else None,
        "last_status_code": d.last_status_code,
        "last_error": d.last_error,
        "created_at": iso(d.created_at),
        "finished_at": iso(d.finished_at),
    }


def list_deliveries(
    k: Kernel,
    subaccount: str,
    *,
    status: str | None = None,
    endpoint_id: int | None = None,
    after: int = 0,
    limit: int = 100,
) -> dict[str, Any]:
    """A sub-account's deliveries, oldest first (``status="dead"``: the dead letters)."""
    if status is not None and status not in STATUSES:
        raise InvalidInput(f"status must be one of {', '.join(STATUSES)}")

    def work(session: Session) -> dict[str, Any]:
        query = select(WebhookDelivery).where(
            WebhookDelivery.subaccount_id == subaccount, WebhookDelivery.id > after
        )
        if status is not None:
            query = query.where(WebhookDelivery.status == status)
        if endpoint_id is not None:
            query = query.where(WebhookDelivery.endpoint_id == endpoint_id)
        rows = session.scalars(query.order_by(WebhookDelivery.id).limit(limit))
        return {"deliveries": [delivery_json(d) for d in rows]}

    return k.store.call(work)


def retry_delivery(k: Kernel, subaccount: str, delivery_id: int) -> dict[str, Any]:
    """Send a dead delivery again now, with a fresh retry window."""

    def work(session: Session) -> dict[str, Any]:
        d = session.get(WebhookDelivery, delivery_id)
        if d is None or d.subaccount_id != subaccount:
            raise NotFound(f"webhook delivery {delivery_id} not found")
        _endpoint(session, subaccount, d.endpoint_id)
        if d.status == "dead":
            d.status = "pending"
            d.next_attempt_at = d.retry_from = utcnow()
            d.finished_at = None
        return delivery_json(d)

    return k.store.call(work)


def backlog(k: Kernel) -> dict[str, Any]:
    """Counts per status and the age of the oldest pending delivery (metrics)."""

    def work(session: Session) -> dict[str, Any]:
        counts = dict.fromkeys(STATUSES, 0)
        for status, n in session.execute(
            select(WebhookDelivery.status, func.count()).group_by(WebhookDelivery.status)
        ):
            counts[status] = int(n)
        oldest = session.scalar(
            select(func.min(WebhookDelivery.created_at)).where(WebhookDelivery.status == "pending")
        )
        age = (utcnow() - oldest).total_seconds() if oldest is not None else 0.0
        return {"counts": counts, "oldest_pending_seconds": max(age, 0.0)}

    return k.store.call(work)


# ---- the queue: enqueue ------------------------------------------------------------------


def _lock(session: Session, name: str) -> None:
    """Serialise workers: an update of this row holds a row lock (PostgreSQL) or the
    write lock (SQLite) until commit, and later reads see what others committed."""
    session.execute(
        update(WebhookState).where(WebhookState.name == name).values(value=WebhookState.value + 1)
    )


def ordering_key(payload: dict[str, Any]) -> str:
    if payload.get("thread_id"):
        return f"thread:{payload['thread_id']}"
    if payload.get("user") is not None:
        return f"user:{payload['user']}"
    return "subaccount"


def enqueue(k: Kernel, settings: WebhookSettings, limit: int = 500) -> int:
    """Turn new events into deliveries for the matching endpoints, in id order;
    returns how many events were handled.

    Everything up to the newest marked id has been handled, and a gap below it
    was given up on (or has filled since: that late event is handled at once).
    Above it, a missing id stops the pass while the event after the gap is
    younger than ``settle_seconds``: its transaction may still commit, and
    queueing the later event first would let it overtake an earlier one of the
    same thread."""

    def idle(session: Session) -> bool:
        watermark = session.get(WebhookState, "watermark")
        newer = select(Event.id).where(Event.id > (watermark.value if watermark else 0))
        return session.scalar(newer.limit(1)) is None

    def work(session: Session) -> int:
        _lock(session, "enqueue_lock")
        watermark = session.get(WebhookState, "watermark")
        assert watermark is not None, "migration 0002 seeds the watermark"
        marked = exists().where(WebhookEventMark.event_id == Event.id)
        found = session.execute(
            select(Event.id, Event.created_at, Event.subaccount_id, Event.type, Event.payload)
            .where(Event.id > watermark.value, ~marked)
            .order_by(Event.id)
            .limit(limit)
        ).all()
        now = utcnow()
        settled_before = now - timedelta(seconds=settings.settle_seconds)
        newest_mark = session.scalar(select(func.max(WebhookEventMark.event_id)))
        handled_up_to = max(watermark.value, newest_mark or 0)
        rows = []
        for row in found:
            if row.id > handled_up_to + 1 and row.created_at >= settled_before:
                break  # a lower id may still commit: wait for it, or for the settle time
            rows.append(row)
            handled_up_to = max(handled_up_to, row.id)
        endpoints: dict[str, list[WebhookEndpoint]] = {}
        if rows:
            for ep in session.scalars(
                select(WebhookEndpoint).where(WebhookEndpoint.active.is_(True))
            ):
                endpoints.setdefault(ep.subaccount_id, []).append(ep)
        for event_id, _, subaccount, kind, payload in rows:
            for ep in endpoints.get(subaccount, ()):
                if event_id <= ep.after_event_id or (ep.event_types and kind not in ep.event_types):
                    continue
                session.add(
                    WebhookDelivery(
                        endpoint_id=ep.id,
                        event_id=event_id,
                        subaccount_id=subaccount,
                        event_type=kind,
                        ordering_key=ordering_key(payload or {}),
                        status="pending",
                        attempts=0,
                        next_attempt_at=now,
                        retry_from=now,
                    )
                )
            session.add(WebhookEventMark(event_id=event_id))
        session.flush()
        _advance(session, watermark, settled_before)
        return len(rows)

    if k.store.call(idle):  # nothing above the watermark: no write, no lock
        return 0
    return k.store.call(work)


def _advance(session: Session, watermark: WebhookState, settled_before: datetime) -> None:
    """Move the watermark past every handled event older than the settle time."""
    marked = exists().where(WebhookEventMark.event_id == Event.id)
    first_open = session.scalar(
        select(func.min(Event.id)).where(Event.id > watermark.value, ~marked)
    )
    query = select(func.max(Event.id)).where(
        Event.id > watermark.value, Event.created_at < settled_before
    )
    if first_open is not None:
        query = query.where(Event.id < first_open)
    new = session.scalar(query)
    if new is not None and new > watermark.value:
        watermark.value = int(new)
        session.execute(delete(WebhookEventMark).where(WebhookEventMark.event_id <= new))


# ---- the queue: claim and record ----------------------------------------------------------


@dataclass(frozen=True)
class Outgoing:
    """One claimed delivery, ready to post."""

    delivery_id: int
    endpoint_id: int
    ordering_key: str
    subaccount: str
    url: str
    secret: str
    event_id: int
    event_type: str
    body: bytes
    attempt: int


def event_body(event: Event) -> bytes:
    """The JSON posted for an event: the event log entry with its id and time."""
    data = {"id": event.id, **event.payload, "created_at": iso(event.created_at)}
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False, default=str).encode()


def claim(
    k: Kernel,
    settings: WebhookSettings,
    limit: int,
    in_flight: Mapping[str, int] | None = None,
) -> list[Outgoing]:
    """Lease up to ``limit`` due deliveries, each the earliest pending of its
    ordering key or following it in a chain (at most ``chain_max`` per key).

    ``in_flight`` counts the caller's chains still running per sub-account; new
    chains are given to a sub-account only up to ``per_subaccount_concurrency``
    in all, so one tenant's slow endpoints cannot hold every slot while another
    tenant's deliveries wait."""
    running = dict(in_flight or {})
    cap = settings.per_subaccount_concurrency
    full = sorted(sub for sub, n in running.items() if n >= cap)

    def idle(session: Session) -> bool:
        now = utcnow()
        due = select(WebhookDelivery.id).where(
            WebhookDelivery.status == "pending",
            WebhookDelivery.next_attempt_at <= now,
            or_(WebhookDelivery.lease_until.is_(None), WebhookDelivery.lease_until <= now),
        )
        return session.scalar(due.limit(1)) is None

    def work(session: Session) -> list[Outgoing]:
        _lock(session, "claim_lock")
        now = utcnow()
        w, d = WebhookDelivery, aliased(WebhookDelivery)
        free = or_(w.lease_until.is_(None), w.lease_until <= now)
        blocked = exists().where(
            d.endpoint_id == w.endpoint_id,
            d.ordering_key == w.ordering_key,
            d.status == "pending",
            d.event_id < w.event_id,
            or_(d.next_attempt_at > now, and_(d.lease_until.is_not(None), d.lease_until > now)),
        )
        query = select(w).where(w.status == "pending", w.next_attempt_at <= now, free, ~blocked)
        if full:
            query = query.where(w.subaccount_id.not_in(full))
        rows = session.scalars(query.order_by(w.event_id, w.id).limit(limit)).all()
        per_key: dict[tuple[int, str], int] = {}
        chains = dict(running)
        chosen: list[WebhookDelivery] = []
        for row in rows:
            key = (row.endpoint_id, row.ordering_key)
            if key not in per_key:
                if chains.get(row.subaccount_id, 0) >= cap:
                    continue  # this tenant has its share of chains; others go first
                chains[row.subaccount_id] = chains.get(row.subaccount_id, 0) + 1
            if per_key.get(key, 0) < settings.chain_max:
                per_key[key] = per_key.get(key, 0) + 1
                chosen.append(row)
        if not chosen:
            return []
        until = now + timedelta(seconds=settings.lease_seconds)
        for row in chosen:
            row.lease_owner, row.lease_until = k.worker, until
        events = {
            e.id: e
            for e in session.scalars(
                select(Event).where(Event.id.in_({r.event_id for r in chosen}))
            )
        }
        eps = {
            ep.id: ep
            for ep in session.scalars(
                select(WebhookEndpoint).where(
                    WebhookEndpoint.id.in_({r.endpoint_id for r in chosen})
                )
            )
        }
        secrets_by_ep = {i: str(k.vault.open(ep.secret).get("secret", "")) for i, ep in eps.items()}
        return [
            Outgoing(
                delivery_id=r.id,
                endpoint_id=r.endpoint_id,
                ordering_key=r.ordering_key,
                subaccount=r.subaccount_id,
                url=eps[r.endpoint_id].url,
                secret=secrets_by_ep[r.endpoint_id],
                event_id=r.event_id,
                event_type=r.event_type,
                body=event_body(events[r.event_id]),
                attempt=r.attempts + 1,
            )
            for r in chosen
        ]

    if k.store.call(idle):
        return []
    return k.store.call(work)


@dataclass(frozen=True)
class Outcome:
    """What happened to one claimed delivery. ``attempted=False``: not tried (an
    earlier one of its chain failed); it is only released."""

    delivery_id: int
    attempted: bool
    ok: bool = False
    status_code: int | None = None
    error: str | None = None
    retry_after: float | None = None


def backoff_seconds(attempts: int, settings: WebhookSettings, rng: random.Random) -> float:
    """Exponential backoff with "equal jitter": between half and all of the step."""
    step = min(
        settings.backoff_max_seconds, settings.backoff_base_seconds * 2.0 ** min(attempts - 1, 60)
    )
    return step / 2 + rng.uniform(0, step / 2)


def record(
    k: Kernel,
    settings: WebhookSettings,
    outcomes: Sequence[Outcome],
    rng: random.Random | None = None,
) -> dict[str, int]:
    """Store the outcomes of claimed deliveries (one transaction) and release them."""
    rng = rng or random.Random()

    def work(session: Session) -> dict[str, int]:
        now = utcnow()
        window = timedelta(hours=settings.retry_hours)
        done = {"delivered": 0, "retry": 0, "dead": 0}
        for o in outcomes:
            d = session.get(WebhookDelivery, o.delivery_id)
            if d is None or d.status != "pending" or d.lease_owner != k.worker:
                continue  # our lease was taken over; its new holder decides
            d.lease_owner = d.lease_until = None
            if not o.attempted:
                continue
            d.attempts += 1
            d.last_status_code = o.status_code
            d.last_error = o.error
            if o.ok:
                d.status, d.finished_at = "delivered", now
                done["delivered"] += 1
            elif now - d.retry_from >= window:
                d.status, d.finished_at = "dead", now
                done["dead"] += 1
            else:
                delay = backoff_seconds(d.attempts, settings, rng)
                if o.retry_after:
                    delay = max(delay, min(o.retry_after, settings.backoff_max_seconds))
                d.next_attempt_at = now + timedelta(seconds=delay)
                done["retry"] += 1
        return done

    return k.store.call(work)


def release_dead_leases(k: Kernel) -> int:
    """Free the leases of workers on this host that died (kill -9, a crash)."""

    def work(session: Session) -> int:
        owners = session.scalars(
            select(WebhookDelivery.lease_owner)
            .where(WebhookDelivery.status == "pending", WebhookDelivery.lease_owner.is_not(None))
            .distinct()
        ).all()
        dead = [o for o in owners if o is not None and worker_is_dead(o)]
        if not dead:
            return 0
        result = session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.lease_owner.in_(dead))
            .values(lease_owner=None, lease_until=None)
        )
        return int(result.rowcount)  # type: ignore[attr-defined]

    return k.store.call(work)


# ---- retention ------------------------------------------------------------------------------

PURGE_BATCH = 1000


def purge(k: Kernel, settings: WebhookSettings, batch: int = PURGE_BATCH) -> dict[str, int]:
    """Delete at most ``batch`` rows of each kind past its retention: delivered and
    dead deliveries (by when they finished), idempotency records (by when their
    request came; a key is remembered for ``idempotency_hours``). Each kind is one
    statement in its own short transaction, so a large backlog never holds a lock
    for long; call again while a count equals ``batch``."""
    now = utcnow()
    d, r = WebhookDelivery, IdempotencyRecord

    def deliveries(status: str, days: float) -> int:
        before = now - timedelta(days=days)
        return _delete_some(k, d, batch, d.status == status, d.finished_at < before)

    return {
        "delivered": deliveries("delivered", settings.delivered_retention_days),
        "dead": deliveries("dead", settings.dead_retention_days),
        "idempotency": _delete_some(
            k, r, batch, r.created_at < now - timedelta(hours=settings.idempotency_hours)
        ),
    }


def _delete_some(
    k: Kernel, model: type[WebhookDelivery | IdempotencyRecord], batch: int, *where: Any
) -> int:
    ids = select(model.id).where(*where).order_by(model.id).limit(batch).scalar_subquery()
    statement = delete(model).where(model.id.in_(ids)).execution_options(synchronize_session=False)
    return k.store.call(lambda s: int(s.execute(statement).rowcount))  # type: ignore[attr-defined]


class Webhooks:
    """The webhook endpoints, deliveries and queue of one instance, as the HTTP API
    and its dispatcher reach them (``Threadsync.webhooks``): the functions of this
    module with the kernel bound."""

    def __init__(self, k: Kernel) -> None:
        self.create_endpoint = functools.partial(create_endpoint, k)
        self.list_endpoints = functools.partial(list_endpoints, k)
        self.get_endpoint = functools.partial(get_endpoint, k)
        self.delete_endpoint = functools.partial(delete_endpoint, k)
        self.list_deliveries = functools.partial(list_deliveries, k)
        self.retry_delivery = functools.partial(retry_delivery, k)
        self.backlog = functools.partial(backlog, k)
        self.enqueue = functools.partial(enqueue, k)
        self.claim = functools.partial(claim, k)
        self.record = functools.partial(record, k)
        self.release_dead_leases = functools.partial(release_dead_leases, k)
        self.purge = functools.partial(purge, k)
