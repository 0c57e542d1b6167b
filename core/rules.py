"""The product's rules as pure decisions, with no I/O: the names of every stored
state (connections, threads, messages, outbox entries), which connections are
worked on (the Labs gate R1, as a query condition), routing of CRM mail (the
table "Where CRM email goes"), the attachment limit (R8), connection state
changes with backoff (R2) and the Message-ID scheme that carries a thread's token.

Everything that decides a rule lives here or in the kernel modules that call it;
providers and the CLI only carry out what these functions return. The state
names are :class:`~enum.StrEnum` members, so what is stored and shown is exactly
the plain string (``"connected"``), and a string read back from the database
compares equal to its name.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Final, Literal

from sqlalchemy import ColumnElement, and_, select

from threadsync.core.store.models import Connection, SubAccount

Channel = Literal["mailbox", "default"]


class ConnectionState(StrEnum):
    """Where a connection stands (R2), as stored in ``connections.state``."""

    CONNECTED = "connected"
    #: Credentials rejected: nothing is lost, re-authorising catches up.
    NEEDS_REAUTH = "needs_reauth"
    #: Transient failures, retried with backoff.
    ERROR = "error"
    DISCONNECTED = "disconnected"
    REPLACED = "replaced"


#: States in which the connection still belongs to its user (one per user).
LIVE_STATES: Final = (
    ConnectionState.CONNECTED,
    ConnectionState.NEEDS_REAUTH,
    ConnectionState.ERROR,
)
#: Live states whose mailbox is worked on (read, used to send): all but the one
#: waiting for the user to re-authorise.
WORKING_STATES: Final = (ConnectionState.CONNECTED, ConnectionState.ERROR)


def worked_connections() -> ColumnElement[bool]:
    """Which connections are worked on (read, used to send), as a condition on
    :class:`Connection`: live and not waiting for re-authorisation, of a
    sub-account whose Labs flag is on (R1: turning it off pauses them all;
    turning it on resumes them). Their backoff is :func:`due`'s to decide."""
    labs_on = (
        select(SubAccount.id)
        .where(
            SubAccount.id == Connection.subaccount_id,
            SubAccount.two_way_email_sync.is_(True),
        )
        .exists()
    )
    return and_(Connection.state.in_(WORKING_STATES), labs_on)


def due(next_attempt_at: datetime | None, now: datetime) -> bool:
    """Whether something waiting for ``next_attempt_at`` may be tried ``now`` (R2)."""
    return next_attempt_at is None or next_attempt_at <= now


class ThreadState(StrEnum):
    """A synced thread's ``state``."""

    ACTIVE = "active"
    #: For good; ``stop_reason`` is the connection's end (disconnected, replaced).
    STOPPED = "stopped"
    #: Its first message went by the default channel; ``stop_reason`` says why.
    UNSYNCED = "unsynced"


class MessageState(StrEnum):
    """A stored message's ``state``; a skipped one carries its reason."""

    SYNCED = "synced"
    SKIPPED = "skipped"


class OutboxStatus(StrEnum):
    """An outbox entry's ``status`` (the delivery's steps, R9)."""

    PENDING = "pending"
    #: Leased by a worker, before any network call.
    CLAIMED = "claimed"
    #: Past the provider's checkpoint: it may have left, never sent again.
    TRANSMITTING = "transmitting"
    SENT = "sent"
    FAILED = "failed"


#: Statuses of an entry whose lease a worker holds (or held, if it died).
LEASED: Final = (OutboxStatus.CLAIMED, OutboxStatus.TRANSMITTING)


class SendStatus(StrEnum):
    """What ``send`` and ``reply`` report about a CRM message's delivery."""

    SENT = "sent"
    #: Stored in the outbox; the daemon delivers it.
    QUEUED = "queued"


# Reasons a message did not sync; shown to users and stored with messages.
ATTACHMENT_TOO_LARGE = "attachment_too_large"
LABS_DISABLED = "labs_disabled"
MESSAGE_TOO_LARGE = "message_too_large"
NO_CONNECTION = "no_connection"
#: A connection's end is the reason of what it stopped.
DISCONNECTED: Final = ConnectionState.DISCONNECTED
REPLACED: Final = ConnectionState.REPLACED
THREAD_STOPPED = "thread_stopped"
THREAD_NOT_SYNCED = "thread_not_synced"
UNPARSEABLE = "unparseable"


@dataclass(frozen=True)
class Route:
    """Where a CRM message goes and whether it syncs."""

    channel: Channel
    synced: bool
    reason: str | None
    #: True when the mailbox cannot take it now (needs_reauth / error): it waits
    #: in the outbox and goes through the mailbox once the connection recovers.
    queued: bool = False


def over_limit(sizes: Iterable[int], limit: int) -> bool:
    """R8: any attachment of more than ``limit`` decoded bytes (exactly ``limit`` syncs)."""
    return any(size > limit for size in sizes)


def message_too_large(size: int | None, limit: int) -> bool:
    """A message of ``size`` bytes as transmitted (RFC 5322, encoded) is over the
    message limit; exactly ``limit`` passes. An unknown size is not over: the
    caller measures the message once it has it."""
    return size is not None and size > limit


def encoded_size(text_bytes: int, html_bytes: int, attachment_bytes: Iterable[int]) -> int:
    """A lower bound on the size of a CRM message once built: bodies as they are,
    attachments in base64 (4 bytes per 3, 76-character lines). Headers and
    quoted-printable add a little; the limit is meant for megabytes, not bytes."""
    encoded = sum((size + 2) // 3 * 4 * 78 // 76 for size in attachment_bytes)
    return text_bytes + html_bytes + encoded


def route_first_message(
    *, labs_on: bool, connection_state: str | None, attachment_sizes: Iterable[int], limit: int
) -> Route:
    """Routing of a CRM message that starts a new thread (R1, R3, R8)."""
    if not labs_on:
        return Route("default", False, LABS_DISABLED)
    if connection_state is None:
        return Route("default", False, NO_CONNECTION)
    if connection_state in (DISCONNECTED, REPLACED):
        return Route("default", False, connection_state)
    if over_limit(attachment_sizes, limit):
        return Route("default", False, ATTACHMENT_TOO_LARGE)
    return Route("mailbox", True, None, queued=connection_state != ConnectionState.CONNECTED)


def route_reply(
    *,
    thread_state: str,
    labs_on: bool,
    connection_state: str | None,
    attachment_sizes: Iterable[int],
    limit: int,
) -> Route:
    """Routing of a CRM reply in an existing thread (R4, R6, R7, R8)."""
    if thread_state == ThreadState.STOPPED:
        return Route("default", False, THREAD_STOPPED)
    if thread_state != ThreadState.ACTIVE:
        return Route("default", False, THREAD_NOT_SYNCED)
    if not labs_on:
        return Route("default", False, LABS_DISABLED)
    if connection_state is None or connection_state in (DISCONNECTED, REPLACED):
        return Route("default", False, THREAD_STOPPED)
    if over_limit(attachment_sizes, limit):
        return Route("default", False, ATTACHMENT_TOO_LARGE)
    return Route("mailbox", True, None, queued=connection_state != ConnectionState.CONNECTED)


def backoff(failures: int, base: float, cap: float, now: datetime) -> datetime:
    """When to try again after ``failures`` consecutive transient failures (R2)."""
    delay = min(cap, base * (2 ** max(0, failures - 1)))
    return now + timedelta(seconds=delay)


# ---- connection state changes (R2) -----------------------------------------------------


@dataclass(frozen=True)
class ConnectionChange:
    """What a live connection's row becomes: its state, its count of consecutive
    transient failures and when it may be tried again (``None``: at once)."""

    state: ConnectionState
    failures: int
    next_attempt_at: datetime | None


def connected() -> ConnectionChange:
    """A connection that works (signed in again, or recovered): no failures, no wait."""
    return ConnectionChange(ConnectionState.CONNECTED, 0, None)


def after_failure(
    *,
    failures: int,
    next_attempt_at: datetime | None,
    credentials_rejected: bool,
    retry_after: float | None,
    base: float,
    cap: float,
    now: datetime,
) -> ConnectionChange:
    """What a provider failure means for a live connection (R2).

    Rejected credentials -> ``needs_reauth``, everything else kept: nothing is
    lost, and re-authorising catches up from the stored cursors. Anything else
    -> ``error`` with one more failure and exponential backoff, never sooner
    than the server's ``retry_after`` seconds.
    """
    if credentials_rejected:
        return ConnectionChange(ConnectionState.NEEDS_REAUTH, failures, next_attempt_at)
    failures += 1
    when = backoff(failures, base, cap, now)
    if retry_after:
        when = max(when, backoff(1, retry_after, retry_after, now))
    return ConnectionChange(ConnectionState.ERROR, failures, when)


def after_success(
    *, state: str, next_attempt_at: datetime | None, now: datetime
) -> ConnectionChange | None:
    """What a completed pass means for a live connection (R2); ``None``: no change.

    A connection in ``error`` recovers, unless a failure recorded during this
    same pass (SMTP down while IMAP works) set a backoff that has not passed.
    """
    if state == ConnectionState.ERROR and due(next_attempt_at, now):
        return connected()
    return None


def fair_share(connections: int, workers: int) -> int:
    """How many of ``connections`` one of ``workers`` live workers may hold: an
    equal share rounded up, so that the shares together cover every connection."""
    return -(-connections // max(1, workers))


# ---- Message-IDs carrying the thread token ---------------------------------------------

_TOKEN_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"


def new_token() -> str:
    """A thread token: 16 characters of base32, 80 random bits."""
    return "".join(secrets.choice(_TOKEN_ALPHABET) for _ in range(16))


def new_thread_id() -> str:
    return "th_" + secrets.token_hex(10)


def make_message_id(token: str, domain: str) -> str:
    """``<random.token@domain>``: any later reply naming it points at the thread,
    even when its References kept only part of the chain."""
    return f"<{secrets.token_hex(8)}.{token}@{domain}>"


def token_of(message_id: str, domain: str) -> str | None:
    """The thread token inside one of our Message-IDs, or ``None``."""
    m = re.fullmatch(r"<?([0-9a-f]{16})\.([a-z2-7]{16})@([^>]+)>?", message_id.strip())
    if m is None or m.group(3).lower() != domain.lower():
        return None
    return m.group(2)


def reply_subject(subject: str) -> str:
    s = subject.strip()
    return s if re.match(r"(?i)^(re|aw|sv|antw)\s*:", s) else f"Re: {s}"


def references_for_reply(chain: list[str], limit: int = 20) -> list[str]:
    """References for a reply: the root and the most recent ids, at most ``limit``,
    so headers stay short while the root (our token) is always kept."""
    unique = list(dict.fromkeys(chain))
    if len(unique) <= limit:
        return unique
    return [unique[0], *unique[-(limit - 1) :]]
