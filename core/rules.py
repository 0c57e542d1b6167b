"""The product's rules as pure decisions, with no I/O: routing of CRM mail (the
table "Where CRM email goes"), the attachment limit (R8), connection state
changes with backoff (R2) and the Message-ID scheme that carries a thread's token.

Everything that decides a rule lives here or in the kernel modules that call it;
providers and the CLI only carry out what these functions return.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

Channel = Literal["mailbox", "default"]

# Reasons a message did not sync; shown to users and stored with messages.
ATTACHMENT_TOO_LARGE = "attachment_too_large"
LABS_DISABLED = "labs_disabled"
NO_CONNECTION = "no_connection"
DISCONNECTED = "disconnected"
REPLACED = "replaced"
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
    return Route("mailbox", True, None, queued=connection_state != "connected")


def route_reply(
    *,
    thread_state: str,
    labs_on: bool,
    connection_state: str | None,
    attachment_sizes: Iterable[int],
    limit: int,
) -> Route:
    """Routing of a CRM reply in an existing thread (R4, R6, R7, R8)."""
    if thread_state == "stopped":
        return Route("default", False, THREAD_STOPPED)
    if thread_state != "active":
        return Route("default", False, THREAD_NOT_SYNCED)
    if not labs_on:
        return Route("default", False, LABS_DISABLED)
    if connection_state is None or connection_state in (DISCONNECTED, REPLACED):
        return Route("default", False, THREAD_STOPPED)
    if over_limit(attachment_sizes, limit):
        return Route("default", False, ATTACHMENT_TOO_LARGE)
    return Route("mailbox", True, None, queued=connection_state != "connected")


def backoff(failures: int, base: float, cap: float, now: datetime) -> datetime:
    """When to try again after ``failures`` consecutive transient failures (R2)."""
    delay = min(cap, base * (2 ** max(0, failures - 1)))
    return now + timedelta(seconds=delay)


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
