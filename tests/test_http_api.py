"""The HTTP API through a real uvicorn server on loopback, on SQLite and
PostgreSQL: every route of the CLI's story, the documented JSON shapes, RFC 9457
problems, idempotent send and reply, rate limits, and secrets kept out of logs."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from tests.kernelfixtures import CONTACT, SUB, USER, World, write_config
from tests.test_http_api_support import (  # noqa: F401 (fixtures)
    OTHER,
    Api,
    api_factory_fixture,
    api_fixture,
    synced_thread,
)

ROOT = Path(__file__).resolve().parent.parent
PROBLEM = "application/problem+json"


def connect_body(world: World, **over: Any) -> dict[str, Any]:
    o = world.options()
    return {
        "provider": "imap_smtp",
        "email": world.email,
        "options": {
            "imap_host": o["imap_host"],
            "imap_port": o["imap_port"],
            "smtp_host": o["smtp_host"],
            "smtp_port": o["smtp_port"],
            "security": "none",
        },
        "credentials": {"password": world.password},
        **over,
    }


def is_problem(r: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"] == PROBLEM
    body = r.json()
    assert body["status"] == status and body["type"].startswith("urn:threadsync:problem:")
    assert body["title"] and body["detail"]
    if code is not None:
        assert body["code"] == code, body
    return dict(body)


@pytest.mark.parametrize("scenario_database_url", ["sqlite", "postgresql"], indirect=True)
async def test_every_route_of_the_story(
    api: Api, world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    world.ts.labs(SUB, enabled=False)
    with api.client(api.admin) as admin, api.client(api.key) as c:
        # Labs: only an operator switches it; the sub-account reads it.
        is_problem(c.put(f"/v1/subaccounts/{SUB}/labs", json={"two_way_email_sync": True}), 403)
        r = admin.put(f"/v1/subaccounts/{SUB}/labs", json={"two_way_email_sync": True})
        assert r.json() == {"subaccount": SUB, "two_way_email_sync": True}
        assert c.get(f"/v1/subaccounts/{SUB}/labs").json()["two_way_email_sync"] is True

        # Connect with the password in the body (R11: never logged, never echoed).
        conn_url = f"/v1/subaccounts/{SUB}/users/{USER}/connection"
        r = c.post(conn_url, json=connect_body(world))
        assert r.status_code == 201, r.text
        conn = r.json()
        assert (conn["state"], conn["email"], conn["paused"]) == ("connected", world.email, False)
        assert world.password not in r.text
        is_problem(c.post(conn_url, json=connect_body(world)), 409, "already_connected")
        bad = connect_body(world, options={"password_env": "HOME"})
        is_problem(c.post(conn_url, json=bad), 422, "invalid_input")
        status = c.get(f"/v1/subaccounts/{SUB}/connections").json()
        assert set(status["connections"][0]) >= {
            "subaccount", "user", "provider", "email", "state", "paused", "since",
            "last_error", "last_sync_at",
        }  # fmt: skip
        assert c.get(conn_url).json()["connections"][0]["state"] == "connected"

        # Send: through the mailbox, synced; retried with the same key: one message.
        draft = {
            "to": [CONTACT],
            "subject": "Offer",
            "text": "Hello from the CRM",
            "attachments": [
                {"filename": "price list.txt", "content_type": "text/plain",
                 "content_base64": base64.b64encode(b"prices").decode()}
            ],
        }  # fmt: skip
        send_url = f"/v1/subaccounts/{SUB}/users/{USER}/send"
        key = {"Idempotency-Key": "crm-msg-1"}
        first = c.post(send_url, json=draft, headers=key)
        assert first.status_code == 201, first.text
        sent = first.json()
        assert set(sent) >= {"thread_id", "message_id", "channel", "synced", "reason", "status"}
        assert (sent["channel"], sent["synced"], sent["status"]) == ("mailbox", True, "sent")
        again = c.post(send_url, json=draft, headers=key)
        assert again.status_code == 201 and again.json() == sent
        assert again.headers["idempotent-replayed"] == "true"
        other_body = {**draft, "text": "something else"}
        is_problem(c.post(send_url, json=other_body, headers=key), 422, "idempotency_key_reused")
        assert len(world.submission.by_message_id(sent["message_id"])) == 1
        thread_id = sent["thread_id"]

        # The contact replies with an attachment; the daemon's pass syncs it.
        world.contact_replies(sent["message_id"], attachments=[("terms.pdf", b"%PDF terms")])
        await world.ts.run_once()

        # Reply from the CRM, idempotent too.
        r = c.post(f"/v1/threads/{thread_id}/reply", json={"text": "Thanks!"},
                   headers={"Idempotency-Key": "crm-reply-1"})  # fmt: skip
        assert r.status_code == 201, r.text
        replied = r.json()
        assert replied["thread_id"] == thread_id and replied["synced"] is True
        r2 = c.post(f"/v1/threads/{thread_id}/reply", json={"text": "Thanks!"},
                    headers={"Idempotency-Key": "crm-reply-1"})  # fmt: skip
        assert r2.json() == replied
        assert len(world.submission.by_message_id(replied["message_id"])) == 1

        # Threads, one thread, one message, attachments.
        listed = c.get(f"/v1/subaccounts/{SUB}/threads", params={"user": USER}).json()
        (row,) = listed["threads"]
        assert (row["thread_id"], row["message_count"], row["state"]) == (thread_id, 3, "active")
        t = c.get(f"/v1/threads/{thread_id}").json()
        assert [m["direction"] for m in t["messages"]] == ["outbound", "inbound", "outbound"]
        inbound = t["messages"][1]
        assert set(inbound) >= {
            "message_id", "direction", "origin", "from", "to", "cc", "subject", "date",
            "state", "reason", "text", "html", "attachments",
        }  # fmt: skip
        (att,) = inbound["attachments"]
        assert (att["filename"], att["size"]) == ("terms.pdf", 10)
        got = c.get(att["download_url"])
        assert got.status_code == 200 and got.content == b"%PDF terms"
        assert "terms.pdf" in got.headers["content-disposition"]
        crm_att = t["messages"][0]["attachments"][0]
        assert c.get(crm_att["download_url"]).content == b"prices"
        mid = quote(inbound["message_id"], safe="")
        one = c.get(f"/v1/threads/{thread_id}/messages/{mid}").json()
        assert one["message_id"] == inbound["message_id"] and one["thread_id"] == thread_id
        is_problem(c.get(f"/v1/threads/{thread_id}/messages/{mid}/attachments/5"), 404)
        is_problem(c.get(f"/v1/threads/{thread_id}/messages/%3Cnope%40x%3E"), 404)

        # The event log, paged.
        events = c.get(f"/v1/subaccounts/{SUB}/events", params={"limit": 2}).json()["events"]
        assert len(events) == 2 and events[0]["event"] == "connection.state_changed"
        rest = c.get(f"/v1/subaccounts/{SUB}/events", params={"after": events[-1]["id"]}).json()
        kinds = [e["event"] for e in rest["events"]]
        assert "message.synced" in kinds and all(e["subaccount"] == SUB for e in rest["events"])

        # update-email: a second mailbox replaces the first without a gap (R7).
        new_email, new_password = "u1-new@threadsync.test", "new-secret-pw"
        world.imap.add_user(new_email, new_password)
        world.submission.users[new_email] = new_password
        body = connect_body(world, email=new_email, credentials={"password": new_password})
        r = c.put(conn_url, json=body)
        assert r.status_code == 200, r.text
        assert (r.json()["email"], r.json()["state"]) == (new_email, "connected")
        assert c.get(f"/v1/threads/{thread_id}").json()["stop_reason"] == "replaced"
        late = c.post(f"/v1/threads/{thread_id}/reply", json={"text": "late"}).json()
        assert (late["channel"], late["reason"]) == ("default", "thread_stopped")

        # Disconnect (R6), then the user has no live connection.
        r = c.delete(conn_url)
        assert r.status_code == 200 and r.json()["state"] == "disconnected"
        is_problem(c.delete(conn_url), 404, "not_found")
        states = [x["state"] for x in c.get(conn_url).json()["connections"]]
        assert states == ["replaced", "disconnected"]

        # Labs off: connect is refused with the R1 problem.
        admin.put(f"/v1/subaccounts/{SUB}/labs", json={"two_way_email_sync": False})
        is_problem(c.post(conn_url, json=connect_body(world)), 403, "labs_disabled")

        # Health, readiness, metrics.
        assert c.get("/healthz").json() == {"status": "ok"}
        assert c.get("/readyz").json() == {"status": "ready"}
        is_problem(c.get("/metrics"), 403)
        text = admin.get("/metrics").text
        assert 'threadsync_messages_total{direction="inbound",reason="",state="synced"} 1' in text
        assert "threadsync_outbox_depth" in text and "threadsync_sync_lag_seconds_max" in text
        assert 'threadsync_webhook_deliveries{status="pending"} 0' in text
        assert "threadsync_provider_errors_total" in text
    for secret in (world.password, new_password, api.key, api.admin):
        assert secret not in caplog.text


async def test_problems_for_bad_requests(api_factory: Any, world: World) -> None:
    api = api_factory(max_body_bytes=2048)
    with api.client(api.key) as c, api.client() as anonymous:
        p = is_problem(anonymous.get(f"/v1/subaccounts/{SUB}/threads"), 401, "unauthorized")
        assert p["instance"] == f"/v1/subaccounts/{SUB}/threads"
        assert anonymous.get("/v1/threads/x").headers["www-authenticate"].startswith("Bearer")
        with api.client("tsk_not_a_real_key") as wrong:
            is_problem(wrong.get(f"/v1/subaccounts/{SUB}/threads"), 401)
        is_problem(c.get("/v1/threads/th_missing"), 404, "not_found")
        is_problem(c.get("/v1/nothing-here"), 404)
        is_problem(c.delete(f"/v1/subaccounts/{SUB}/threads"), 405)
        send = f"/v1/subaccounts/{SUB}/users/{USER}/send"
        is_problem(c.post(send, content=b"to=x", headers={"Content-Type": "text/plain"}), 415)
        is_problem(
            c.post(send, content=b"{not json", headers={"Content-Type": "application/json"}), 400
        )
        p = is_problem(c.post(send, json={"to": [CONTACT], "subject": "x"}), 422, "invalid_input")
        assert p["errors"] == [{"field": "text", "message": "is required"}]
        is_problem(c.post(send, json={"to": ["not an address"], "subject": "x", "text": "y"}), 422)
        is_problem(
            c.post(send, json={"to": [CONTACT], "subject": "x", "text": "y", "bcc": []}), 422
        )
        is_problem(c.post(send, json={"to": [CONTACT], "subject": "x\u0000", "text": "y"}), 422)
        is_problem(c.post(send, json={"to": [CONTACT], "subject": "s", "text": "y" * 4000}), 413)
        is_problem(c.get(f"/v1/subaccounts/{SUB}/events", params={"limit": 0}), 422)
        is_problem(c.get(f"/v1/subaccounts/{SUB}/events?after=%00"), 422)
        conn = f"/v1/subaccounts/{SUB}/users/{USER}/connection"
        is_problem(
            c.post(conn, json={"provider": "nope", "email": world.email}), 400, "config_error"
        )


async def test_concurrent_retries_send_once(api: Api, world: World) -> None:
    await world.connect()
    body = {"to": [CONTACT], "subject": "Once", "text": "only once"}
    url = f"/v1/subaccounts/{SUB}/users/{USER}/send"
    async with httpx.AsyncClient(
        base_url=api.url, headers={"Authorization": f"Bearer {api.key}"}, timeout=30
    ) as c:
        answers = await asyncio.gather(
            *(c.post(url, json=body, headers={"Idempotency-Key": "burst-1"}) for _ in range(6))
        )
    codes = sorted(r.status_code for r in answers)
    assert set(codes) <= {201, 409} and 201 in codes, codes
    ids = {r.json()["message_id"] for r in answers if r.status_code == 201}
    assert len(ids) == 1
    assert len(world.submission.by_message_id(ids.pop())) == 1
    assert len(world.ts.threads(SUB)["threads"]) == 1


async def test_rate_limit_answers_429_with_retry_after(api_factory: Any) -> None:
    api = api_factory(rate_per_second=0.5, burst=3)
    api.world.ts.labs(OTHER, enabled=False)  # a sub-account threadsync knows
    with api.client(api.key) as c, api.client(api.other) as other:
        codes = [c.get(f"/v1/subaccounts/{SUB}/threads").status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        r = c.get(f"/v1/subaccounts/{SUB}/threads")
        is_problem(r, 429, "rate_limited")
        assert int(r.headers["retry-after"]) >= 1
        # Buckets are per key: another key is not slowed down.
        assert other.get(f"/v1/subaccounts/{OTHER}/threads").status_code == 200


async def test_api_keys_over_http_and_cli(api: Api, world: World, tmp_path: Path) -> None:
    with api.client(api.admin) as admin, api.client(api.key) as c:
        is_problem(c.get("/v1/api-keys"), 403)
        made = admin.post("/v1/api-keys", json={"subaccount": "beta", "label": "beta crm"})
        assert made.status_code == 201 and made.json()["key"].startswith("tsk_")
        assert made.headers["cache-control"] == "no-store"
        key_id = made.json()["key_id"]
        listed = admin.get("/v1/api-keys", params={"subaccount": "beta"}).json()["keys"]
        assert [k["key_id"] for k in listed] == [key_id] and "key" not in listed[0]
        world.ts.labs("beta", enabled=False)  # a sub-account threadsync knows
        with api.client(made.json()["key"]) as beta:
            assert beta.get("/v1/subaccounts/beta/threads").status_code == 200
            assert admin.delete(f"/v1/api-keys/{key_id}").json()["revoked_at"] is not None
            is_problem(beta.get("/v1/subaccounts/beta/threads"), 401)
        is_problem(admin.post("/v1/api-keys", json={"subaccount": "x", "admin": True}), 422)

    cfg = write_config(world, tmp_path / "config.toml")

    def cli(*args: str) -> Any:
        proc = subprocess.run(
            [sys.executable, str(ROOT / "cli.py"), "--config", str(cfg), "--json", *args],
            capture_output=True, text=True, timeout=60, env=dict(os.environ),
        )  # fmt: skip
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
        return json.loads(proc.stdout)

    made = cli("apikey", "create", SUB, "--label", "from cli")
    assert made["subaccount"] == SUB and made["key"].startswith("tsk_")
    operator = cli("apikey", "create", "--admin")
    assert operator["admin"] is True
    listed = cli("apikey", "list")["keys"]
    assert {made["key_id"], operator["key_id"]} <= {k["key_id"] for k in listed}
    assert made["key"] not in json.dumps(listed)
    with api.client(made["key"]) as c:
        assert c.get(f"/v1/subaccounts/{SUB}/labs").status_code == 200
    assert cli("apikey", "revoke", made["key_id"])["revoked_at"]
    stored = world.ts.kernel.store.call(lambda s: repr(s.execute(
        __import__("sqlalchemy").text("SELECT key_hash FROM api_keys")).all()))  # fmt: skip
    assert made["key"] not in stored and operator["key"] not in stored
