"""The HTTP API where the command line and it must agree, through a real
loopback server and the CLI as a subprocess on the same database: a sub-account
threadsync has never seen is 404 on both (the CLI's exit 3); recipients
written as ``Display Name <address>``; a message without a Date header; the
wording of a reply that does not sync."""

from __future__ import annotations

import json
import subprocess
import sys
from email import message_from_bytes
from email.policy import default
from pathlib import Path

from tests.kernelfixtures import CONTACT, SUB, USER, World, write_config
from tests.test_http_api_support import (  # noqa: F401 (fixtures)
    Api,
    api_factory_fixture,
    api_fixture,
)
from threadsync.core.outbox.compose import Draft

ROOT = Path(__file__).resolve().parent.parent


def cli(config: Path, *args: str, expect: int = 0) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), "--config", str(config), *args],
        cwd=config.parent, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == expect, (proc.returncode, proc.stdout, proc.stderr)
    return proc


def test_an_unknown_subaccount_is_not_found_on_both(api: Api, world: World, tmp_path: Path) -> None:
    config = write_config(world, tmp_path / "config.toml")
    with api.client(api.admin) as c:
        r = c.get("/v1/subaccounts/nosuchsub/threads")
        assert r.status_code == 404, r.text
        detail = r.json()["detail"]
    assert "nosuchsub" in detail and "Labs" in detail
    err = cli(config, "threads", "nosuchsub", expect=3).stderr
    assert err.strip() == f"error: {detail}"
    # A sub-account threadsync knows (its Labs flag set) and without threads: empty on both.
    cli(config, "labs", "disable", "nosuchsub")
    with api.client(api.admin) as c:
        assert c.get("/v1/subaccounts/nosuchsub/threads").json() == {"threads": []}
    assert cli(config, "threads", "nosuchsub").stdout.strip() == "no threads"


async def test_display_name_addresses_over_http(api: Api, world: World) -> None:
    """``Name <addr>`` recipients go out with the name in To (RFC 2047 when not
    ASCII) and the bare address on the envelope; CR/LF stay refused."""
    await world.connect()
    body = {
        "to": ["Carla <carla@customer.example>", "Jörg Ü <t15@example.org>"],
        "cc": ['"Doe, Jo" <jo@example.org>'],
        "subject": "Names",
        "text": "Hello",
    }
    with api.client(api.key) as c:
        r = c.post(f"/v1/subaccounts/{SUB}/users/{USER}/send", json=body)
        assert r.status_code == 201, r.text
        assert r.json()["channel"] == "mailbox" and r.json()["synced"] is True
        bad = c.post(
            f"/v1/subaccounts/{SUB}/users/{USER}/send",
            json={**body, "to": ["Carla\r\nBcc: eve@example.org <carla@customer.example>"]},
        )
        assert bad.status_code == 422, bad.text
        wrong = c.post(
            f"/v1/subaccounts/{SUB}/users/{USER}/send",
            json={**body, "to": ["Jörg <jörg@example.org>"]},
        )
        assert wrong.status_code == 422 and "non-ASCII local part" in wrong.json()["detail"]
    (got,) = [m for m in world.submission.received if b"Subject: Names" in m.raw]
    assert sorted(got.rcpt_tos) == ["carla@customer.example", "jo@example.org", "t15@example.org"]
    parsed = message_from_bytes(got.raw, policy=default)
    to = parsed["To"].addresses
    assert [(a.display_name, a.addr_spec) for a in to] == [
        ("Carla", "carla@customer.example"), ("Jörg Ü", "t15@example.org"),
    ]  # fmt: skip
    assert parsed["Cc"].addresses[0].display_name == "Doe, Jo"
    assert got.raw.isascii() and b"=?utf-8?" in got.raw.lower()


async def test_thread_without_date_and_a_reply_over_the_limit(world: World, tmp_path: Path) -> None:
    """``thread`` shows when a message without a Date header arrived, never "None";
    a CRM reply whose attachment is over the limit says that this message does not
    sync, not that the thread does not."""
    config = write_config(world, tmp_path / "config.toml")
    await world.connect()
    sent = await world.ts.send(SUB, USER, Draft(to=[CONTACT], subject="Offer", text="hello"))
    raw = (
        f"From: {CONTACT}\r\nTo: {world.email}\r\nSubject: Re: Offer\r\n"
        f"Message-ID: <no-date@customer.example>\r\nIn-Reply-To: {sent['message_id']}\r\n"
        f"References: {sent['message_id']}\r\n\r\nNo date here.\r\n"
    ).encode()
    world.imap.deliver(world.email, raw, "INBOX")
    assert (await world.ts.run_once()).stored == 1
    text = cli(config, "thread", sent["thread_id"]).stdout
    (line,) = [x for x in text.splitlines() if CONTACT in x and "<-" in x]
    assert "None" not in line and "no Date header; arrived 20" in line, text

    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * (4 * 1024 * 1024))
    proc = cli(config, "reply", sent["thread_id"], "--text", "the file", "--attach", str(big),
               "--json")  # fmt: skip
    replied = json.loads(proc.stdout)
    assert (replied["synced"], replied["reason"]) == (False, "attachment_too_large")
    words = cli(config, "reply", sent["thread_id"], "--text", "again", "--attach", str(big))
    said = words.stdout
    assert "this message not synced (attachment_too_large)" in said, said
    assert f"thread {sent['thread_id']} not synced" not in said
    assert world.ts.thread(sent["thread_id"])["state"] == "active"


async def test_an_idempotent_replay_has_the_first_answers_location(api: Api, world: World) -> None:
    await world.connect()
    url = f"/v1/subaccounts/{SUB}/users/{USER}/send"
    body = {"to": [CONTACT], "subject": "Offer", "text": "hello"}
    with api.client(api.key) as c:
        first = c.post(url, json=body, headers={"Idempotency-Key": "k-1"})
        again = c.post(url, json=body, headers={"Idempotency-Key": "k-1"})
    assert first.status_code == again.status_code == 201, (first.text, again.text)
    assert again.headers["idempotent-replayed"] == "true"
    assert first.headers["location"] == f"/v1/threads/{first.json()['thread_id']}"
    assert again.headers.get("location") == first.headers["location"]
