"""``/metrics`` in the Prometheus text exposition format (version 0.0.4), written
by hand: a handful of families do not justify a dependency.

From the database (so every process shows the same truth): messages synced and
skipped per reason and direction, connections per state, sync lag of the
connections being synced, outbox depth, webhook backlog and dead letters,
provider errors per kind, and the live workers with the connections each
holds. From this process: HTTP requests per route and status, and webhook posts.

Provider errors are counted from the event log: every provider failure that
moves a connection into ``needs_reauth`` or ``error`` records a
``connection.state_changed`` event whose ``error_code`` is the failure's
:attr:`~threadsync.core.errors.ThreadsyncError.code`, in the same transaction as the state
(``threadsync.core.kernel``). Reading them back from the database rather than counting in
memory keeps the number right whichever process made the failure (the daemon's
sync loop beside the API, another worker, the CLI) and across restarts. A
failure while the connection is already in that state changes nothing and is not
counted again; events recorded before ``error_code`` existed count by the state
they caused (``needs_reauth`` as ``authentication_failed``, ``error`` as
``provider_error``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from threadsync.core.errors import (
    AuthenticationFailed,
    ProviderError,
    ProviderProtocolError,
    TransientProviderError,
    UnexpectedFailure,
)
from threadsync.plugins.http_api.context import ApiContext

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Provider error kinds always exposed, at 0 until one happens, so that a rate or
#: an alert on a kind works before its first failure.
PROVIDER_ERROR_KINDS = tuple(
    cls.code
    for cls in (
        AuthenticationFailed,
        TransientProviderError,
        ProviderProtocolError,
        UnexpectedFailure,
        ProviderError,
    )
)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(pairs: Iterable[tuple[str, str]]) -> str:
    inner = ",".join(f'{k}="{_label(v)}"' for k, v in pairs)
    return "{" + inner + "}" if inner else ""


class Exposition:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, value: float, **labels: str) -> None:
        number = repr(float(value)) if not float(value).is_integer() else str(int(value))
        self.lines.append(f"{name}{_labels(sorted(labels.items()))} {number}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def collect(ctx: ApiContext, dispatched: tuple[int, int] | None) -> str:
    """Every family, from one read of the database (blocking: call in a thread)."""
    nums = ctx.ts.numbers()
    queue = ctx.ts.webhooks.backlog()
    out = Exposition()

    out.family(
        "threadsync_messages_total",
        "counter",
        "Messages of synced threads stored, by state (synced or skipped), reason and direction.",
    )
    for (state, reason, direction), n in sorted(nums.messages.items()):
        out.sample("threadsync_messages_total", n, state=state, reason=reason, direction=direction)

    out.family("threadsync_connections", "gauge", "Connections by state.")
    for state, n in sorted(nums.connections.items()):
        out.sample("threadsync_connections", n, state=state)

    out.family(
        "threadsync_sync_lag_seconds_max",
        "gauge",
        "Longest time since a connection being synced last completed a pass.",
    )
    out.sample("threadsync_sync_lag_seconds_max", round(nums.sync_lag_max, 3))
    out.family(
        "threadsync_sync_lag_seconds_avg",
        "gauge",
        "Average time since connections being synced last completed a pass.",
    )
    avg = nums.sync_lag_sum / nums.sync_lag_count if nums.sync_lag_count else 0.0
    out.sample("threadsync_sync_lag_seconds_avg", round(avg, 3))

    out.family(
        "threadsync_outbox_depth", "gauge", "CRM messages not yet sent, by status and channel."
    )
    for (status, channel), n in sorted(nums.outbox.items()):
        out.sample("threadsync_outbox_depth", n, status=status, channel=channel)
    if not nums.outbox:
        out.sample("threadsync_outbox_depth", 0, status="pending", channel="mailbox")

    out.family(
        "threadsync_webhook_deliveries",
        "gauge",
        "Webhook deliveries by status (pending is the backlog, dead the dead letters).",
    )
    for status, n in sorted(queue["counts"].items()):
        out.sample("threadsync_webhook_deliveries", n, status=status)
    out.family(
        "threadsync_webhook_oldest_pending_seconds",
        "gauge",
        "Age of the oldest webhook delivery still pending.",
    )
    out.sample(
        "threadsync_webhook_oldest_pending_seconds", round(queue["oldest_pending_seconds"], 3)
    )

    out.family(
        "threadsync_provider_errors_total",
        "counter",
        "Provider failures that changed a connection's state, by error code.",
    )
    errors = {kind: 0 for kind in PROVIDER_ERROR_KINDS} | nums.provider_errors
    for kind, n in sorted(errors.items()):
        out.sample("threadsync_provider_errors_total", n, kind=kind)

    fleet = [w for w in ctx.ts.workers()["workers"] if w["live"]]
    out.family("threadsync_workers", "gauge", "Live daemons sharing the connections.")
    out.sample("threadsync_workers", len(fleet))
    out.family("threadsync_worker_connections", "gauge", "Connections held, by live worker.")
    for w in fleet:
        out.sample("threadsync_worker_connections", w["connections"], worker=w["id"])
    out.family(
        "threadsync_worker_heartbeat_age_seconds",
        "gauge",
        "Time since each live worker's last heartbeat.",
    )
    for w in fleet:
        out.sample(
            "threadsync_worker_heartbeat_age_seconds", w["heartbeat_age_seconds"], worker=w["id"]
        )

    if dispatched is not None:
        out.family(
            "threadsync_webhook_posts_total",
            "counter",
            "Webhook posts made by this process, by outcome.",
        )
        out.sample("threadsync_webhook_posts_total", dispatched[0], outcome="delivered")
        out.sample("threadsync_webhook_posts_total", dispatched[1], outcome="failed")

    out.family("threadsync_http_requests_total", "counter", "HTTP requests served by this process.")
    for (method, route, code), n in sorted(ctx.counters.counts.items()):
        out.sample(
            "threadsync_http_requests_total", n, method=method, route=route, status=str(code)
        )
    out.family(
        "threadsync_http_request_seconds_total",
        "counter",
        "Time spent serving HTTP requests, by route.",
    )
    for (method, route), seconds in sorted(ctx.counters.seconds.items()):
        out.sample(
            "threadsync_http_request_seconds_total", round(seconds, 6), method=method, route=route
        )
    out.family("threadsync_process_start_time_seconds", "gauge", "Start of this API process.")
    out.sample("threadsync_process_start_time_seconds", int(ctx.started))
    out.family("threadsync_scrape_time_seconds", "gauge", "When these numbers were read.")
    out.sample("threadsync_scrape_time_seconds", int(time.time()))
    return out.text()
