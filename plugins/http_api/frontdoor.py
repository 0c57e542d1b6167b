"""The API's front door: what a connection may hold before it is a request.

uvicorn limits requests in flight (``limit_concurrency``, checked only once a
request's headers are in) and idle keep-alive connections
(``timeout_keep_alive``), but nothing bounds a connection that never finishes
its headers, nor how many connections one client holds: 300 half-open
connections were all kept. :func:`protocol_class` makes uvicorn's h11 protocol
do both: a client address may hold ``[http] max_connections_per_client``
connections (``max_connections`` in all; more are answered 503 and closed at
once), and a connection must deliver each request's headers within
``header_timeout_seconds`` of starting to wait for them (else it is closed),
however slowly the bytes trickle in. Behind a TLS proxy the client address is
the proxy's: size the limits for it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from threadsync.plugins.http_api.settings import HttpSettings

log = logging.getLogger(__name__)
REFUSED = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nRetry-After: 1\r\n"
    b"Connection: close\r\n\r\n"
)
#: At most one warning about refused connections per this many seconds.
LOG_EVERY_SECONDS = 10.0


class FrontDoor:
    """Open connections per client address, for one server's event loop."""

    def __init__(self, http: HttpSettings) -> None:
        self.per_client = http.max_connections_per_client
        self.total = http.max_connections
        self.header_timeout = http.header_timeout_seconds
        self.open: dict[str, int] = {}
        self.count = 0
        self.refused = 0
        self.timed_out = 0
        self._logged = 0.0

    def admit(self, address: str) -> bool:
        if self.count >= self.total or self.open.get(address, 0) >= self.per_client:
            self.refused += 1
            now = time.monotonic()
            if now - self._logged > LOG_EVERY_SECONDS:
                self._logged = now
                log.warning(
                    "connections refused: over the per-client or total limit",
                    extra={"client": address, "refused_total": self.refused},
                )
            return False
        self.open[address] = self.open.get(address, 0) + 1
        self.count += 1
        return True

    def leave(self, address: str) -> None:
        left = self.open.get(address, 0) - 1
        if left > 0:
            self.open[address] = left
        else:
            self.open.pop(address, None)
        self.count -= 1


def protocol_class(http: HttpSettings) -> type[H11Protocol]:
    """uvicorn's h11 protocol with the limits of ``http`` (one door per server)."""
    door = FrontDoor(http)

    class GuardedH11(H11Protocol):
        front_door = door

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._address = self.client[0] if self.client else ""
            self._admitted = door.admit(self._address)
            self._header_timer: asyncio.TimerHandle | None = None
            self._request: Any = None
            if not self._admitted:
                transport.write(REFUSED)
                transport.close()
                return
            self._wait_for_headers()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._admitted:
                self._admitted = False
                door.leave(self._address)
            self._stop_header_timer()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if not self._admitted:
                return
            super().data_received(data)
            if self.cycle is not None and self.cycle is not self._request:
                self._request = self.cycle  # a request's headers are in
                self._stop_header_timer()
            elif self.cycle is None or self.cycle.response_complete:
                self._wait_for_headers()  # the next request has begun to arrive

        def _wait_for_headers(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(
                    door.header_timeout, self._headers_too_slow
                )

        def _stop_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            waiting = self.cycle is None or (
                self.cycle is self._request and self.cycle.response_complete
            )
            if waiting:
                door.timed_out += 1
                self.transport.close()

    return GuardedH11
