"""What the MIME parser had to drop or repair is kept with the message and shown
wherever the message is (the Python API, ``thread`` on the command line, the HTTP
API, events), so that the CRM can say "parts of this message could not be read"
instead of showing a reply as complete when it is not."""

from __future__ import annotations

import email.utils
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.kernelfixtures import CONTACT, SUB, USER, World, reply_to, write_config
from tests.test_http_api_support import (  # noqa: F401 (fixtures)
    Api,
    api_factory_fixture,
    api_fixture,
)
from threadsync.core.outbox.compose import Draft

ROOT = Path(__file__).resolve().parent.parent


def head(world: World, parent: str, mid: str, ctype: str) -> bytes:
    lines = [
        f"From: {CONTACT}",
        f"To: {world.email}",
        "Subject: Re: Offer",
        f"Date: {email.utils.formatdate()}",
        f"Message-ID: {mid}",
        *(f"{k}: {v}" for k, v in reply_to(parent).items()),
        "MIME-Version: 1.0",
        f"Content-Type: {ctype}",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def deep_reply(world: World, parent: str, levels: int = 50) -> tuple[bytes, str]:
    """A reply whose only text sits under ``levels`` nested multiparts."""
    mid = email.utils.make_msgid(domain="deep.example.org")
    body = b"Content-Type: text/plain\r\n\r\nThe answer is deep down.\r\n"
    for level in range(levels):
        b = f"b{level}"
        body = (
            f'Content-Type: multipart/mixed; boundary="{b}"\r\n\r\n--{b}\r\n'.encode()
            + body
            + f"\r\n--{b}--\r\n".encode()
        )
    top = body.split(b"\r\n\r\n", 1)
    ctype = top[0].decode().removeprefix("Content-Type: ")
    return head(world, parent, mid, ctype) + top[1], mid


def many_parts(world: World, parent: str, parts: int = 10_000) -> tuple[bytes, str]:
    mid = email.utils.make_msgid(domain="wide.example.org")
    chunks = [b"--w\r\nContent-Type: text/plain\r\n\r\nHello.\r\n"]
    part = (
        "--w\r\nContent-Type: application/octet-stream\r\n"
        'Content-Disposition: attachment; filename="p{}.bin"\r\n\r\nx\r\n'
    )
    chunks += [part.format(i).encode() for i in range(parts - 1)]
    body = b"".join(chunks) + b"--w--\r\n"
    return head(world, parent, mid, 'multipart/mixed; boundary="w"') + body, mid


def by_id(thread: dict[str, Any], mid: str) -> dict[str, Any]:
    return next(m for m in thread["messages"] if m["message_id"] == mid)


async def test_defects_are_stored_and_shown(world: World, api: Api, tmp_path: Path) -> None:
    await world.connect()
    sent = await world.ts.send(SUB, USER, Draft(to=[CONTACT], subject="Offer", text="hi"))
    deep, deep_id = deep_reply(world, sent["message_id"])
    wide, wide_id = many_parts(world, sent["message_id"])
    fine = world.contact_replies(sent)
    world.imap.deliver(world.email, deep, "INBOX")
    world.imap.deliver(world.email, wide, "INBOX")
    await world.ts.run_once()

    thread = world.ts.thread(sent["thread_id"])
    assert by_id(thread, fine)["defects"] == []
    assert by_id(thread, sent["message_id"])["defects"] == []
    deep_defects = by_id(thread, deep_id)["defects"]
    assert any("nested" in d for d in deep_defects), deep_defects
    wide_defects = by_id(thread, wide_id)["defects"]
    assert any("MIME parts" in d for d in wide_defects), wide_defects

    events = world.ts.events(SUB)["events"]
    evented = {
        e["message"]["message_id"]: e["message"]["defects"] for e in events if "message" in e
    }
    assert evented[deep_id] == deep_defects and evented[wide_id] == wide_defects

    with api.client(api.key) as crm:
        shown = crm.get(f"/v1/threads/{sent['thread_id']}").json()
        assert by_id(shown, deep_id)["defects"] == deep_defects

    cfg = write_config(world, tmp_path / "c.toml")
    out = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), "--config", str(cfg), "thread", sent["thread_id"]],
        env={**os.environ, **world.env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("parts of this message could not be read") == 2, out.stdout
