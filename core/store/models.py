"""SQLAlchemy 2.0 models: the whole persistent state of threadsync.

The constraints here are what make R9 (exactly once) hold at the database level,
whatever the code above them does:

* one message per Message-ID per thread (``uq_message_thread_mid``);
* one outbox entry per CRM message (``uq_outbox_message``);
* one cursor per connection and folder role (``uq_cursor_role``);
* at most one live connection per user (``uq_connection_live``, partial index).

Schema changes are Alembic migrations in ``core/store/migrations``; never
``create_all`` outside tests of the models themselves.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def iso(value: datetime | None) -> str | None:
    """A stored (naive UTC) time as shown to the host: ISO 8601 with ``Z``."""
    return value.isoformat() + "Z" if value is not None else None


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class SubAccount(Base):
    """A tenant of the CRM and its Labs flag (R1)."""

    __tablename__ = "subaccounts"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    two_way_email_sync: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    labs_changed_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class Connection(Base):
    """One user's link to one mailbox address through one provider (R2)."""

    __tablename__ = "connections"
    __table_args__ = (
        # The live states of ``rules.LIVE_STATES``, as the migration wrote them.
        Index(
            "uq_connection_live",
            "subaccount_id",
            "user_id",
            unique=True,
            sqlite_where=text("state IN ('connected', 'needs_reauth', 'error')"),
            postgresql_where=text("state IN ('connected', 'needs_reauth', 'error')"),
        ),
        Index("ix_connection_user", "subaccount_id", "user_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    subaccount_id: Mapped[str] = mapped_column(ForeignKey("subaccounts.id"))
    user_id: Mapped[str] = mapped_column(String(255))
    provider: Mapped[str] = mapped_column(String(64))
    email: Mapped[str] = mapped_column(String(320))
    state: Mapped[str] = mapped_column(String(32))
    since: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    last_sync_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    settings: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    #: Fernet token of the JSON secrets; ``None`` once deleted (R6, R7).
    secrets: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    failures: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    ended_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)

    cursors: Mapped[list[Cursor]] = relationship(
        back_populates="connection", cascade="all, delete-orphan"
    )


class Cursor(Base):
    """Where reading a folder of a connection stopped (opaque provider data)."""

    __tablename__ = "cursors"
    __table_args__ = (UniqueConstraint("connection_id", "role", name="uq_cursor_role"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    connection_id: Mapped[int] = mapped_column(ForeignKey("connections.id", ondelete="CASCADE"))
    role: Mapped[str] = mapped_column(String(16))
    folder: Mapped[str] = mapped_column(String(512))
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)

    connection: Mapped[Connection] = relationship(back_populates="cursors")


class SyncedThread(Base):
    """An email thread started from the CRM.

    ``state``: ``active`` (synced), ``stopped`` (for good; ``stop_reason``
    ``disconnected`` or ``replaced``) or ``unsynced`` (its first message went by
    the default channel; ``stop_reason`` says why).
    """

    __tablename__ = "threads"
    __table_args__ = (Index("ix_thread_owner", "subaccount_id", "user_id"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    token: Mapped[str] = mapped_column(String(64), unique=True)
    subaccount_id: Mapped[str] = mapped_column(ForeignKey("subaccounts.id"))
    user_id: Mapped[str] = mapped_column(String(255))
    connection_id: Mapped[int | None] = mapped_column(
        ForeignKey("connections.id"), nullable=True, index=True
    )
    email: Mapped[str | None] = mapped_column(String(320), nullable=True)
    state: Mapped[str] = mapped_column(String(16))
    stop_reason: Mapped[str | None] = mapped_column(String(64), nullable=True)
    subject: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)

    messages: Mapped[list[Message]] = relationship(back_populates="thread", order_by="Message.id")


class Message(Base):
    """One message of a thread, inbound or outbound, synced or skipped."""

    __tablename__ = "messages"
    __table_args__ = (
        UniqueConstraint("thread_id", "message_id", name="uq_message_thread_mid"),
        Index("ix_message_mid", "message_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    thread_id: Mapped[str] = mapped_column(ForeignKey("threads.id"))
    subaccount_id: Mapped[str] = mapped_column(String(255))
    #: The Message-ID header with angle brackets.
    message_id: Mapped[str] = mapped_column(String(998))
    direction: Mapped[str] = mapped_column(String(16))
    origin: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(String(64), nullable=True)
    sender: Mapped[str | None] = mapped_column(String(998), nullable=True)
    to: Mapped[list[Any]] = mapped_column(JSON, default=list)
    cc: Mapped[list[Any]] = mapped_column(JSON, default=list)
    subject: Mapped[str] = mapped_column(Text, default="")
    date: Mapped[str | None] = mapped_column(String(64), nullable=True)
    #: In-Reply-To and References as lists (membership of later replies).
    headers: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    #: Where the message was seen: {"inbox": "uid", "sent": "uid"}.
    provider_refs: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    text: Mapped[str | None] = mapped_column(Text, nullable=True)
    html: Mapped[str | None] = mapped_column(Text, nullable=True)
    #: What the MIME parser had to drop or repair, for people (empty: read whole).
    defects: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)

    thread: Mapped[SyncedThread] = relationship(back_populates="messages")
    attachments: Mapped[list[Attachment]] = relationship(
        back_populates="message", order_by="Attachment.id", cascade="all, delete-orphan"
    )


class Attachment(Base):
    """Attachment metadata; ``content`` only for synced messages (R8)."""

    __tablename__ = "attachments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    message_pk: Mapped[int] = mapped_column(
        ForeignKey("messages.id", ondelete="CASCADE"), index=True
    )
    filename: Mapped[str | None] = mapped_column(Text, nullable=True)
    content_type: Mapped[str] = mapped_column(String(255))
    size: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    inline: Mapped[bool] = mapped_column(Boolean, default=False)
    #: Loaded only when read (downloads): listings and events need the metadata only.
    content: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True, deferred=True)

    message: Mapped[Message] = relationship(back_populates="attachments")


class OutboxEntry(Base):
    """A CRM message waiting to leave, stored with its Message-ID before any
    network call (the transactional outbox).

    ``status``: ``pending`` (not tried, or tried and certainly not sent),
    ``transmitting`` (the provider reached its point of no return; after a crash
    the Sent folder is checked before any re-send), ``sent``, ``failed``.
    """

    __tablename__ = "outbox"
    __table_args__ = (
        UniqueConstraint("message_pk", name="uq_outbox_message"),
        UniqueConstraint("request_key", name="uq_outbox_request_key"),
        Index("ix_outbox_due", "status", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    message_pk: Mapped[int] = mapped_column(ForeignKey("messages.id"))
    connection_id: Mapped[int | None] = mapped_column(
        ForeignKey("connections.id"), nullable=True, index=True
    )
    channel: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default="pending")
    sender: Mapped[str] = mapped_column(String(998))
    recipients: Mapped[list[Any]] = mapped_column(JSON, default=list)
    #: The whole MIME message; loaded only by the claim that delivers it.
    raw: Mapped[bytes] = mapped_column(LargeBinary, deferred=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    sent_copy_stored: Mapped[bool] = mapped_column(Boolean, default=False)
    #: Who is delivering it (``host:pid``) and until when; a dead holder's lease
    #: is taken over at once, a live one's only after it expires.
    lease_owner: Mapped[str | None] = mapped_column(String(255), nullable=True)
    lease_until: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    #: SHA-256 of the caller's idempotency key and what it was for (sub-account,
    #: user or thread): a second send or reply with it gets this message instead.
    request_key: Mapped[str | None] = mapped_column(String(64), nullable=True)


class Event(Base):
    """The event log: every event for the host, in order, per sub-account."""

    __tablename__ = "events"
    __table_args__ = (Index("ix_event_subaccount", "subaccount_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    subaccount_id: Mapped[str] = mapped_column(String(255))
    type: Mapped[str] = mapped_column(String(64))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


# ---- the HTTP API and webhooks ---------------------------------------------------------


class ApiKey(Base):
    """A key for the HTTP API: one sub-account's, or an operator's (``subaccount_id``
    ``None``, admin). Only the SHA-256 of the key is kept (R11); ``key_id`` is its
    public, non-secret name."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key_id: Mapped[str] = mapped_column(String(32), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    subaccount_id: Mapped[str | None] = mapped_column(String(255), nullable=True, index=True)
    label: Mapped[str] = mapped_column(String(255), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class IdempotencyRecord(Base):
    """The answer to a ``send``/``reply`` made with an ``Idempotency-Key``, so that a
    retried request is answered again instead of sending twice (R9).

    ``state``: ``started`` (the request is running, or died with an unknown
    outcome: never run again) or ``done`` (``status_code`` and ``response`` kept).
    """

    __tablename__ = "idempotency_keys"
    __table_args__ = (
        UniqueConstraint("subaccount_id", "key", name="uq_idempotency_key"),
        Index("ix_idempotency_created", "created_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    subaccount_id: Mapped[str] = mapped_column(String(255))
    key: Mapped[str] = mapped_column(String(255))
    request_hash: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))
    status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    response: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class WebhookEndpoint(Base):
    """A sub-account's webhook URL. ``secret`` is the Fernet token of the signing
    secret (R11); ``event_types`` empty means every event; only events after
    ``after_event_id`` (the newest when it was created) are delivered to it."""

    __tablename__ = "webhook_endpoints"
    __table_args__ = (Index("ix_webhook_endpoint_owner", "subaccount_id", "active"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    subaccount_id: Mapped[str] = mapped_column(String(255))
    url: Mapped[str] = mapped_column(String(2048))
    description: Mapped[str] = mapped_column(String(255), default="")
    secret: Mapped[bytes] = mapped_column(LargeBinary)
    event_types: Mapped[list[Any]] = mapped_column(JSON, default=list)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    after_event_id: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class WebhookDelivery(Base):
    """One event for one endpoint: the durable webhook queue.

    ``status``: ``pending`` (to be tried at ``next_attempt_at``), ``delivered`` or
    ``dead`` (retries exhausted or the endpoint deleted). Deliveries with the same
    ``ordering_key`` (the thread, or the user for connection events) go out in
    event order: a later one waits while an earlier one is pending.
    """

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        UniqueConstraint("endpoint_id", "event_id", name="uq_webhook_delivery_event"),
        Index("ix_webhook_delivery_due", "status", "next_attempt_at"),
        Index("ix_webhook_delivery_order", "endpoint_id", "ordering_key", "status", "event_id"),
        Index("ix_webhook_delivery_owner", "subaccount_id", "status", "id"),
        Index("ix_webhook_delivery_finished", "status", "finished_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    endpoint_id: Mapped[int] = mapped_column(ForeignKey("webhook_endpoints.id"))
    event_id: Mapped[int] = mapped_column(Integer)
    subaccount_id: Mapped[str] = mapped_column(String(255))
    event_type: Mapped[str] = mapped_column(String(64))
    ordering_key: Mapped[str] = mapped_column(String(320))
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    #: When the current retry window began (creation, or a manual retry).
    retry_from: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    last_status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    lease_owner: Mapped[str | None] = mapped_column(String(255), nullable=True)
    lease_until: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class WebhookEventMark(Base):
    """An event above the watermark that was already turned into deliveries.

    Event ids need not become visible in id order (concurrent PostgreSQL
    transactions), so the enqueuer marks each event it handled and moves the
    watermark only past settled ids; marks below the watermark are deleted.
    """

    __tablename__ = "webhook_event_marks"

    event_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)


class WebhookState(Base):
    """Named integers of the webhook queue: the enqueue ``watermark`` (every event
    at or below it was handled) and rows that serialise workers (``*_lock``)."""

    __tablename__ = "webhook_state"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[int] = mapped_column(Integer, default=0)


class PendingSignIn(Base):
    """A connect or update-email waiting for the user's consent in a browser.

    Created when a provider's :meth:`~threadsync.core.provider.Provider.begin_consent`
    answers a consent URL; the redirect to ``/oauth/callback`` finds it by the
    SHA-256 of its OAuth ``state`` and finishes it, in whichever process and
    however many restarts later, until ``expires_at``. ``flow`` (the PKCE
    verifier and nonce, encrypted like credentials) is deleted once used.

    ``status``: ``pending``, ``finishing`` (the redirect arrived), ``connected``,
    ``failed`` (``error`` holds the code and detail) or ``expired``.
    """

    __tablename__ = "sign_ins"
    __table_args__ = (Index("ix_sign_in_owner", "subaccount_id", "user_id"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    subaccount_id: Mapped[str] = mapped_column(String(255))
    user_id: Mapped[str] = mapped_column(String(255))
    provider: Mapped[str] = mapped_column(String(64))
    email: Mapped[str] = mapped_column(String(320))
    purpose: Mapped[str] = mapped_column(String(16))
    options: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    state_hash: Mapped[str] = mapped_column(String(64), unique=True)
    flow: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    consent_url: Mapped[str] = mapped_column(Text)
    connection: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class Worker(Base):
    """A running ``threadsync run`` process that shares the connections with the
    others on the same database. ``id`` is its host and process id (the holder
    name of outbox leases too); a worker whose ``heartbeat_at`` is older than
    ``[sync] worker_lease_seconds`` is gone, and so are its leases."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class ConnectionLease(Base):
    """Which worker works on a connection, until when. Taken with the connection's
    row locked (so never while another worker's write on it is in flight), renewed
    with the worker's heartbeat, free once ``lease_until`` has passed."""

    __tablename__ = "connection_leases"
    __table_args__ = (Index("ix_connection_lease_worker", "worker_id"),)

    connection_id: Mapped[int] = mapped_column(
        ForeignKey("connections.id", ondelete="CASCADE"), primary_key=True
    )
    worker_id: Mapped[str] = mapped_column(String(255))
    lease_until: Mapped[datetime] = mapped_column(DateTime)


class RateLimitBucket(Base):
    """A token bucket of the HTTP API's rate limits (an API key's, or a client
    address's failed sign-ins), shared by every API process on the database.
    ``tokens`` as of ``updated`` (seconds since the epoch)."""

    __tablename__ = "rate_limits"

    key: Mapped[str] = mapped_column(String(128), primary_key=True)
    tokens: Mapped[float] = mapped_column(Float)
    updated: Mapped[float] = mapped_column(Float, index=True)
