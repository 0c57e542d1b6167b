"""R10 over HTTP: for every route of the API, a key of sub-account A gets 404
(or 403 on operator routes) for sub-account B's objects, B's things stay as they
were, and B's own key reaches the same objects (so they really exist)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any
from urllib.parse import quote

import pytest

from tests.kernelfixtures import CONTACT, SUB, USER, World
from tests.test_http_api_support import (
    OTHER,
    Api,
    http_settings,
)
from threadsync.core.host import apikeys, webhooks
from threadsync.core.mime import AttachmentIn
from threadsync.core.outbox.compose import Draft
from threadsync.core.store.models import PendingSignIn, utcnow
from threadsync.plugins.http_api.app import create_app
from threadsync.plugins.http_api.openapi import document
from threadsync.plugins.http_api.server import ThreadedServer
from threadsync.plugins.http_api.signins import SignIn

BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("put", "/v1/subaccounts/{subaccount}/labs"): {"two_way_email_sync": False},
    ("post", "/v1/subaccounts/{subaccount}/users/{user}/connection"): {
        "provider": "imap_smtp", "email": "x@example.org",
        "options": {"imap_host": "127.0.0.1", "smtp_host": "127.0.0.1", "security": "none"},
        "credentials": {"password": "pw"},
    },
    ("post", "/v1/subaccounts/{subaccount}/users/{user}/send"): {
        "to": [CONTACT], "subject": "from A", "text": "A writes as B?",
    },
    ("post", "/v1/threads/{thread_id}/reply"): {"text": "A replies in B's thread?"},
    ("post", "/v1/subaccounts/{subaccount}/webhooks"): {"url": "http://127.0.0.1:9/a"},
    ("post", "/v1/api-keys"): {"subaccount": OTHER},
}  # fmt: skip
BODIES[("put", "/v1/subaccounts/{subaccount}/users/{user}/connection")] = BODIES[
    ("post", "/v1/subaccounts/{subaccount}/users/{user}/connection")
]
#: Operator routes: a sub-account key is refused outright.
ADMIN_ONLY = {"/v1/api-keys", "/v1/api-keys/{key_id}"}


def v1_operations() -> list[tuple[str, str]]:
    paths = document()["paths"]
    return sorted(
        (method, path)
        for path, item in paths.items()
        if path.startswith("/v1/")
        for method in item
        if method in ("get", "put", "post", "delete", "patch")
    )


@pytest.mark.parametrize("scenario_database_url", ["sqlite", "postgresql"], indirect=True)
async def test_a_key_of_a_reaches_nothing_of_b(world: World) -> None:
    # B: Labs on, a connection, a synced thread with an attachment, a webhook
    # endpoint with a delivery, a pending sign-in and an API key.
    world.ts.labs(OTHER, enabled=True)
    await world.ts.connect(OTHER, USER, "imap_smtp", email=world.email, options=world.options())
    pdf = AttachmentIn(filename="b-secret.pdf", content_type="application/pdf", data=b"B only")
    sent = await world.ts.send(
        OTHER, USER, Draft(to=[CONTACT], subject="B's deal", text="b", attachments=[pdf])
    )
    k = world.ts.kernel
    endpoint = webhooks.create_endpoint(k, OTHER, "http://127.0.0.1:9/b")
    await world.ts.send(OTHER, "u2", Draft(to=[CONTACT], subject="event", text="e"))
    webhooks.enqueue(k, webhooks.WebhookSettings(settle_seconds=0))
    (delivery,) = webhooks.list_deliveries(k, OTHER)["deliveries"]
    b_key = apikeys.create(k.store, OTHER)

    http = http_settings()
    app, ctx = create_app(world.ts, http)
    ctx.signins._items["si_b"] = SignIn("si_b", OTHER, USER)
    k.store.call(lambda session: session.add(PendingSignIn(
        id="si_b_db", subaccount_id=OTHER, user_id=USER, provider="outlook", email=world.email,
        purpose="connect", options={}, state_hash="0" * 64, flow=None, status="pending",
        consent_url="https://login.example.test/authorize",
        expires_at=utcnow() + timedelta(minutes=10),
    )))  # fmt: skip
    server = ThreadedServer(app, http).start()
    api = Api(server.url, apikeys.create(k.store, None)["key"], apikeys.create(k.store, SUB)["key"],
              b_key["key"], world)  # fmt: skip
    values = {
        "subaccount": OTHER,
        "user": USER,
        "thread_id": sent["thread_id"],
        "message_id": quote(sent["message_id"], safe=""),
        "index": "0",
        "endpoint_id": str(endpoint["id"]),
        "delivery_id": str(delivery["id"]),
        "sign_in_id": "si_b",
        "key_id": b_key["key_id"],
    }
    before_threads = world.ts.threads(OTHER)
    tried = []
    try:
        with api.client(api.key) as a, api.client(api.other) as b:
            for method, template in v1_operations():
                path = template.format(**values)
                body = BODIES.get((method, template))
                r = a.request(method.upper(), path, json=body)
                want = {403} if template in ADMIN_ONLY else {404}
                assert r.status_code in want, (method, template, r.status_code, r.text)
                assert r.headers["content-type"] == "application/problem+json"
                assert "B only" not in r.text and "b-secret" not in r.text
                tried.append((method, template))
                if method == "get" and template not in ADMIN_ONLY:
                    assert b.get(path).status_code == 200, (template, "B's own key")
            # A's own listings show nothing of B.
            assert a.get(f"/v1/subaccounts/{SUB}/threads").json() == {"threads": []}
            assert a.get(f"/v1/subaccounts/{SUB}/events").json() == {"events": []}
            assert a.get(f"/v1/subaccounts/{SUB}/webhooks").json() == {"webhooks": []}
            deliveries = a.get(f"/v1/subaccounts/{SUB}/webhook-deliveries").json()
            assert deliveries == {"deliveries": []}
            # A sign-in kept in the database (a hosted consent) is B's alone too.
            db_sign_in = f"/v1/subaccounts/{OTHER}/sign-ins/si_b_db"
            assert a.get(db_sign_in).status_code == 404
            assert b.get(db_sign_in).json()["state"] == "pending"
            assert a.get(f"/v1/subaccounts/{SUB}/sign-ins/si_b_db").status_code == 404
            assert a.get("/metrics").status_code == 403
            assert a.get("/", params={"key": api.key}).status_code == 401
    finally:
        server.stop()
    assert tried == v1_operations() and len(tried) >= 20
    # B is untouched: still connected, Labs on, same threads, endpoint alive.
    assert world.ts.status(OTHER, USER)["connections"][0]["state"] == "connected"
    assert world.ts.labs_status(OTHER)["two_way_email_sync"] is True
    assert world.ts.threads(OTHER) == before_threads
    assert webhooks.get_endpoint(k, OTHER, endpoint["id"])["active"] is True
    assert apikeys.authenticate(k.store, b_key["key"]) is not None
