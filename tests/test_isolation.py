"""R10 tenant isolation, R11 secrets, and real-world mail that breaks parsers:
none of them may leak, crash or stop the sync."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from sqlalchemy import text

from tests.kernelfixtures import CONTACT, SUB, USER, World, reply_to
from threadsync.core.errors import NotFound
from threadsync.core.outbox.compose import Draft


async def test_r10_a_subaccount_sees_nothing_of_another(world: World) -> None:
    await world.connect()
    sent = await world.ts.send(SUB, USER, Draft(to=[CONTACT], subject="A's offer", text="a"))
    world.contact_replies(sent)
    await world.ts.run_once()
    world.ts.labs("other", enabled=True)
    assert world.ts.threads("other") == {"threads": []}
    assert world.ts.status("other") == {"connections": []}
    assert world.ts.events("other") == {"events": []}
    with pytest.raises(NotFound):
        world.ts.thread(sent["thread_id"], subaccount="other")
    assert world.ts.thread(sent["thread_id"], subaccount=SUB)["message_count"] == 2
    # The same user id in another sub-account is another user: no connection there.
    other = await world.ts.send("other", USER, Draft(to=[CONTACT], subject="B", text="b"))
    assert (other["channel"], other["reason"]) == ("default", "no_connection")
    assert all(e["subaccount"] == SUB for e in world.ts.events(SUB)["events"])
    assert all(e["subaccount"] == "other" for e in world.ts.events("other")["events"])
    assert {e["subaccount"] for e in world.recorder.events} == {SUB, "other"}


async def test_r11_secrets_are_encrypted_and_never_logged(
    world: World, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    caplog.set_level(logging.DEBUG)
    await world.connect()
    sent = await world.ts.send(SUB, USER, Draft(to=[CONTACT], subject="Offer", text="a"))
    world.contact_replies(sent)
    await world.ts.run_once()
    # Credentials rejected: the error is logged and stored, the password is not.
    world.imap.add_user(world.email, "rotated-password")
    await world.ts.run_once()
    assert world.password not in caplog.text and "rotated-password" not in caplog.text
    status = world.ts.status(SUB, USER)
    assert world.password not in str(status)
    assert world.password not in str(world.recorder.events)

    def dump(session) -> str:  # type: ignore[no-untyped-def]
        rows = session.execute(text("SELECT secrets, settings FROM connections")).all()
        return repr(rows)

    stored = world.ts.kernel.store.call(dump)
    assert world.password not in stored and "gAAAA" in stored  # a Fernet token
    db_file = Path(world.ts.kernel.settings.database_url.removeprefix("sqlite:///"))
    assert world.password.encode() not in db_file.read_bytes()


BROKEN = [
    # unknown charset, LF-only line endings
    b"From: contact@example.org\nTo: {to}\nSubject: =?x-unknown?q?caf=E9?=\n"
    b"Message-ID: <broken1@example.org>\n{hdrs}Content-Type: text/plain; charset=x-unknown\n\n"
    b"caf\xe9 au lait\n",
    # nested multiparts and an address group, a very long header line
    b"From: contact@example.org\r\nTo: undisclosed-recipients:;\r\nCc: {to}\r\n"
    b"Subject: nested\r\nMessage-ID: <broken2@example.org>\r\n{hdrs}"
    b"X-Long: " + b"x" * 3000 + b"\r\n"
    b'Content-Type: multipart/mixed; boundary="a"\r\n\r\n--a\r\n'
    b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\n'
    b"inner text\r\n--b\r\nContent-Type: application/ms-tnef\r\n"
    b'Content-Disposition: attachment; filename="winmail.dat"\r\n'
    b"Content-Transfer-Encoding: base64\r\n\r\neJ8+IgAA\r\n--b--\r\n--a--\r\n",
    # 8-bit garbage everywhere and a broken base64 body
    b"From: \xff\xfe contact@example.org\r\nTo: {to}\r\nSubject: \x80\x81 garbage\r\n"
    b"Message-ID: <broken3@example.org>\r\n{hdrs}Content-Transfer-Encoding: base64\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n\r\n!!!not base64===\r\n",
]


async def test_real_world_broken_mail_in_a_thread_never_stops_sync(world: World) -> None:
    await world.connect()
    sent = await world.ts.send(SUB, USER, Draft(to=[CONTACT], subject="Offer", text="a"))
    hdrs = "".join(f"{k}: {v}\r\n" for k, v in reply_to(sent).items()).encode()
    for raw in BROKEN:
        world.imap.deliver(
            world.email, raw.replace(b"{to}", world.email.encode()).replace(b"{hdrs}", hdrs)
        )
    good = world.contact_replies(sent, body="after the broken ones")
    report = await world.ts.run_once()
    assert report.errors == []
    msgs = {m["message_id"]: m for m in world.ts.thread(sent["thread_id"])["messages"]}
    assert {"<broken1@example.org>", "<broken2@example.org>", "<broken3@example.org>", good} <= set(
        msgs
    )
    assert "caf" in (msgs["<broken1@example.org>"]["text"] or "")
    assert "inner text" in (msgs["<broken2@example.org>"]["text"] or "")
    names = [a["filename"] for a in msgs["<broken2@example.org>"]["attachments"]]
    assert names == ["winmail.dat"]
    assert msgs[good]["state"] == "synced"
