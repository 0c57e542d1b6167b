"""Size limits that protect the shared process: a message over ``[sync]
max_message_bytes`` is recorded skipped (``message_too_large``) instead of stored
whole, a CRM message over it is refused at send with a clear error, and the HTTP
API bounds the requests and body bytes it works on at once (503 beyond)."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.kernelfixtures import CONTACT, SUB, USER, World
from tests.test_http_api_support import (  # noqa: F401 (fixtures)
    Api,
    api_factory_fixture,
    api_fixture,
)
from threadsync.core.config import from_mapping
from threadsync.core.errors import ConfigError, MessageTooLarge
from threadsync.core.mime import AttachmentIn
from threadsync.core.outbox.compose import Draft

LIMIT = 200_000


def limit_messages(world: World, limit: int = LIMIT) -> None:
    k = world.ts.kernel
    k.settings = dataclasses.replace(
        k.settings, sync=dataclasses.replace(k.settings.sync, max_message_bytes=limit)
    )


async def test_inbound_message_over_the_limit_is_skipped_not_stored(world: World) -> None:
    limit_messages(world)
    await world.connect()
    sent = await world.ts.send(SUB, USER, Draft(to=[CONTACT], subject="Offer", text="hi"))
    big = world.contact_replies(sent, body="x" * (LIMIT + 10_000))
    small = world.contact_replies(sent, body="fits")
    report = await world.ts.run_once()
    assert report.skipped == 1 and report.stored == 1, report

    thread = world.ts.thread(sent["thread_id"])
    by_id = {m["message_id"]: m for m in thread["messages"]}
    assert by_id[big]["state"] == "skipped" and by_id[big]["reason"] == "message_too_large"
    assert by_id[big]["text"] is None and by_id[big]["subject"] == "Re: Offer"
    assert by_id[small]["state"] == "synced" and by_id[small]["text"].strip() == "fits"
    skipped = world.recorder.of("message.skipped")
    assert [e["message"]["reason"] for e in skipped] == ["message_too_large"]


async def test_crm_message_over_the_limit_is_refused_at_send(world: World, api: Api) -> None:
    limit_messages(world)
    await world.connect()
    attachment = AttachmentIn("big.bin", "application/octet-stream", b"\x00" * 160_000)
    with pytest.raises(MessageTooLarge, match="max_message_bytes"):
        await world.ts.send(
            SUB, USER, Draft(to=[CONTACT], subject="Big", text="hi", attachments=[attachment])
        )
    sent = await world.ts.send(SUB, USER, Draft(to=[CONTACT], subject="Offer", text="hi"))
    with pytest.raises(MessageTooLarge):
        await world.ts.reply(sent["thread_id"], Draft(text="y" * (LIMIT + 1)))
    with api.client(api.key) as crm:
        r = crm.post(
            f"/v1/subaccounts/{SUB}/users/{USER}/send",
            json={"to": [CONTACT], "subject": "Big", "text": "z" * (LIMIT + 1)},
        )
        assert r.status_code == 422 and r.json()["code"] == "message_too_large", r.text
    assert len(world.submission.received) == 1  # only the one that fits
    assert world.ts.threads(SUB)["threads"][0]["message_count"] == 1


def half_request(url: str, key: str, length: int) -> socket.socket:
    """A POST whose headers and part of whose body were sent; the rest never is."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=10)
    head = (
        f"POST /v1/subaccounts/{SUB}/users/{USER}/send HTTP/1.1\r\n"
        f"Host: {parts.hostname}\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    )
    sock.sendall(head.encode() + b'{"to": ')
    return sock


async def test_api_bounds_requests_and_body_bytes_in_progress(
    api_factory: Callable[..., Api], world: World
) -> None:
    api = api_factory(
        max_body_bytes=100_000, max_concurrent_requests=3, max_inflight_body_bytes=150_000
    )
    await world.connect()
    held = [half_request(api.url, api.key, 90_000)]
    await asyncio.sleep(0.3)
    try:
        with api.client(api.key) as crm:
            # A second 90 KB body would make 180 KB in progress: over the byte budget.
            r = crm.post(
                f"/v1/subaccounts/{SUB}/users/{USER}/send",
                json={"to": [CONTACT], "subject": "x", "text": "a" * 89_000},
            )
            assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
            # Small requests still pass, up to the number in progress.
            assert crm.get(f"/v1/subaccounts/{SUB}/connections").status_code == 200
            held += [half_request(api.url, api.key, 1_000) for _ in range(2)]
            await asyncio.sleep(0.3)
            r = crm.get(f"/v1/subaccounts/{SUB}/connections")
            assert r.status_code == 503, r.text
    finally:
        for sock in held:
            sock.close()
    await asyncio.sleep(0.3)
    with api.client(api.key) as crm:
        assert crm.get(f"/v1/subaccounts/{SUB}/connections").status_code == 200


def test_limits_are_configured(tmp_path: Path) -> None:
    base = {"database": {"url": "sqlite:///x.db"}, "security": {"secret_key_file": "k"}}
    assert from_mapping(base, base=tmp_path).sync.max_message_bytes == 26_214_400
    raw = {**base, "sync": {"max_message_bytes": 1_000_000}}
    assert from_mapping(raw, base=tmp_path).sync.max_message_bytes == 1_000_000
    with pytest.raises(ConfigError, match="max_message_bytes"):
        from_mapping({**base, "sync": {"max_message_bytes": 10}}, base=tmp_path)
