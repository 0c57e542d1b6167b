"""Fixtures for the HTTP API tests: the app over the ``world`` fixture's
threadsync, served by a real uvicorn on a free loopback port, API keys, and a
webhook receiver (a real HTTP server) that verifies signatures.

No tests here; the ``test_http_api*`` and ``test_webhooks*`` modules import the
fixtures.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from tests.kernelfixtures import CONTACT, SUB, USER, World
from threadsync.core.host import apikeys
from threadsync.core.host.webhooks import WebhookSettings
from threadsync.core.network import NetworkPolicy
from threadsync.core.outbox.compose import Draft
from threadsync.plugins.http_api.app import create_app
from threadsync.plugins.http_api.server import ThreadedServer
from threadsync.plugins.http_api.settings import HttpSettings
from threadsync.plugins.http_api.signatures import verify

OTHER = "other"


@dataclass
class Api:
    """A running API: its base URL and keys (admin, SUB's, OTHER's)."""

    url: str
    admin: str
    key: str
    other: str
    world: World

    def client(self, key: str | None = None, **kw: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30, **kw)


#: The webhook receivers of these tests listen on loopback, which is refused unless
#: the operator opens it: every test that delivers says so explicitly.
LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


def http_settings(**over: Any) -> HttpSettings:
    values: dict[str, Any] = {
        "rate_per_second": 10_000.0,
        "burst": 10_000,
        "webhooks": WebhookSettings(allowed_networks=LOOPBACK),
        **over,
    }
    return HttpSettings(**values)


@pytest.fixture(name="api_factory")
def api_factory_fixture(world: World) -> Iterator[Callable[..., Api]]:
    servers: list[ThreadedServer] = []

    # The mailbox servers of these tests are on loopback too: the operator opens it
    # for hosts that tenants name (threadsync.core.network).
    world.ts.kernel.network = NetworkPolicy(allowed_networks=LOOPBACK)

    def make(**over: Any) -> Api:
        app, _ = create_app(world.ts, http_settings(**over))
        server = ThreadedServer(app, http_settings(**over)).start()
        servers.append(server)
        store = world.ts.kernel.store
        return Api(
            url=server.url,
            admin=apikeys.create(store, None, "operator")["key"],
            key=apikeys.create(store, SUB, "crm")["key"],
            other=apikeys.create(store, OTHER, "crm")["key"],
            world=world,
        )

    yield make
    for server in servers:
        server.stop()


@pytest.fixture(name="api")
def api_fixture(api_factory: Callable[..., Api]) -> Api:
    return api_factory()


async def synced_thread(world: World, subject: str = "Offer") -> dict[str, Any]:
    """Connect SUB/USER, send from the CRM, let the contact reply: a synced thread of two."""
    if not world.ts.status(SUB, USER)["connections"]:
        await world.connect()
    sent = await world.ts.send(SUB, USER, Draft(to=[CONTACT], subject=subject, text="hello"))
    world.contact_replies(sent["message_id"], attachments=[("terms.pdf", b"%PDF-1.4 terms")])
    await world.ts.run_once()
    return sent


# ---- a webhook receiver ---------------------------------------------------------------------


@dataclass
class Received:
    event_id: int
    body: dict[str, Any]
    signature_ok: bool
    attempt: int
    host: str = ""  # the Host header


@dataclass
class Receiver:
    """A real HTTP server on loopback that checks every signature and can be told
    to fail (answer 500, or not answer in time); HTTPS when given a TLS context."""

    secret: str = ""
    failing: bool = False
    delay: float = 0.0
    got: list[Received] = field(default_factory=list)
    refused: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None
    tls: ssl.SSLContext | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.server_address[1])

    @property
    def url(self) -> str:
        return self.url_for("127.0.0.1")

    def url_for(self, host: str) -> str:
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}/hook"

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                raw = self.rfile.read(length)
                if receiver.delay:
                    time.sleep(receiver.delay)
                with receiver.lock:
                    if receiver.failing:
                        receiver.refused += 1
                        self.send_response(500)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    ok = verify(receiver.secret, raw, self.headers.get("Threadsync-Signature", ""))
                    receiver.got.append(
                        Received(
                            int(self.headers["Threadsync-Event-Id"]),
                            json.loads(raw),
                            ok,
                            int(self.headers.get("Threadsync-Attempt", "0")),
                            self.headers.get("Host", ""),
                        )
                    )
                self.send_response(200 if ok else 400)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        if self.tls is not None:
            self.server.socket = self.tls.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def unique(self) -> list[Received]:
        """What arrived, duplicates (at-least-once) removed by event id."""
        seen: set[int] = set()
        out = []
        with self.lock:
            for r in self.got:
                if r.event_id not in seen:
                    seen.add(r.event_id)
                    out.append(r)
        return out


@pytest.fixture(name="receiver")
def receiver_fixture() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.stop()


async def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)
