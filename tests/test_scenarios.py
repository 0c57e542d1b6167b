"""End-to-end scenarios, one per rule (R1-R9) and per row of the routing table,
against a real IMAP server (Dovecot, or pymap), aiosmtpd for the user's SMTP
submission and for the CRM's relay, and a real database."""

from __future__ import annotations

import email
import email.policy

import pytest
from sqlalchemy import select

from tests.kernelfixtures import CONTACT, SUB, USER, World
from threadsync.core.errors import (
    AlreadyConnected,
    AuthenticationFailed,
    HeaderInjection,
    LabsDisabled,
)
from threadsync.core.mime import AttachmentIn
from threadsync.core.outbox.compose import Draft
from threadsync.core.store.models import Connection, Message, OutboxEntry

LIMIT = 3_145_728


def offer(**kw: object) -> Draft:
    base: dict[str, object] = {"to": [CONTACT], "subject": "Offer", "text": "Here is our offer."}
    base.update(kw)
    return Draft(**base)  # type: ignore[arg-type]


def parse(raw: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(raw, policy=email.policy.default)  # type: ignore[return-value]


async def start_thread(world: World) -> tuple[str, dict]:  # type: ignore[type-arg]
    await world.connect()
    sent = await world.ts.send(SUB, USER, offer())
    assert sent["status"] == "sent" and sent["channel"] == "mailbox" and sent["synced"]
    return sent["thread_id"], sent


# ---- R1 Labs gate ----------------------------------------------------------------------


async def test_r1_connect_refused_while_labs_off_and_paused_sync_catches_up(world: World) -> None:
    world.ts.labs(SUB, enabled=False)
    with pytest.raises(LabsDisabled):
        await world.connect()
    world.ts.labs(SUB, enabled=True)
    thread_id, sent = await start_thread(world)

    world.ts.labs(SUB, enabled=False)
    status = world.ts.status(SUB, USER)["connections"][0]
    assert status["paused"] is True and status["state"] == "connected"
    # CRM mail goes by the default channel while Labs is off.
    reply = await world.ts.reply(thread_id, Draft(text="While paused"))
    assert (reply["channel"], reply["synced"], reply["reason"]) == (
        "default",
        False,
        "labs_disabled",
    )
    assert world.relay.by_message_id(reply["message_id"])
    # A contact's reply arriving meanwhile is not read...
    mid = world.contact_replies(sent)
    report = await world.ts.run_once()
    assert report.connections == 0 and world.count_messages(mid) == 0
    # ...and is caught up when Labs is on again.
    world.ts.labs(SUB, enabled=True)
    await world.ts.run_once()
    assert world.count_messages(mid) == 1
    assert world.ts.status(SUB, USER)["connections"][0]["paused"] is False


# ---- R2 connect, states, re-authorisation ---------------------------------------------------


async def test_r2_wrong_password_stores_nothing(world: World) -> None:
    world.ts.kernel.environ["BADPW"] = "wrong-password"
    with pytest.raises(AuthenticationFailed) as info:
        await world.connect(password_env="BADPW")
    assert "wrong-password" not in str(info.value)
    assert world.ts.status(SUB, USER)["connections"] == []


async def test_r2a_second_connect_refused_and_reauth_catches_up(world: World) -> None:
    thread_id, sent = await start_thread(world)
    with pytest.raises(AlreadyConnected):
        await world.connect()
    # The mailbox password changes: the next pass finds the credentials rejected.
    world.imap.add_user(world.email, "new-password")
    world.submission.users[world.email] = "new-password"
    await world.ts.run_once()
    conn = world.ts.status(SUB, USER)["connections"][0]
    assert conn["state"] == "needs_reauth" and conn["last_error"]
    assert "new-password" not in str(conn) and world.password not in str(conn)
    # CRM mail in the thread is queued, not lost, and a contact reply waits too.
    queued = await world.ts.reply(thread_id, Draft(text="queued while reauth"))
    assert (queued["channel"], queued["status"], queued["synced"]) == ("mailbox", "queued", True)
    mid = world.contact_replies(sent)
    await world.ts.run_once()
    assert world.count_messages(mid) == 0
    # Re-authorising the same address resumes the same connection and catches up.
    world.ts.kernel.environ["MAILPW"] = "new-password"
    again = await world.connect()
    assert again["state"] == "connected" and again["id"] == conn["id"]
    await world.ts.run_once()
    assert world.count_messages(mid) == 1
    assert len(world.submission.by_message_id(queued["message_id"])) == 1
    states = [e["state"] for e in world.recorder.of("connection.state_changed")]
    assert states == ["connected", "needs_reauth", "connected"]


# ---- R3 / R4 both ways ---------------------------------------------------------------------


async def test_r3_r4_whole_conversation_both_ways_exactly_once(world: World) -> None:
    thread_id, sent = await start_thread(world)
    # R3: out through the user's mailbox: delivered, and in Sent.
    got = world.submission.by_message_id(sent["message_id"])
    assert len(got) == 1 and got[0].rcpt_tos == [CONTACT]
    assert parse(got[0].raw)["From"] == world.email
    sent_folder = [parse(r)["Message-ID"] for r in world.imap.messages(world.email, "Sent")]
    assert sent_folder == [sent["message_id"]]

    # R4: the contact replies; the user replies from the mail client.
    contact_mid = world.contact_replies(sent)
    client_mid = world.user_replies_from_client(contact_mid, chain=[sent["message_id"]])
    assert world.submission.by_message_id(client_mid)
    await world.ts.run_once()

    # R4: a reply written in the CRM is threaded for mail clients.
    crm = await world.ts.reply(thread_id, Draft(text="Reply from the CRM"))
    assert crm["channel"] == "mailbox" and crm["status"] == "sent"
    out = parse(world.submission.by_message_id(crm["message_id"])[0].raw)
    assert out["In-Reply-To"] == client_mid
    refs = out["References"].split()
    assert refs[0] == sent["message_id"] and refs[-1] == client_mid and contact_mid in refs
    assert out["Subject"] == "Re: Offer"

    for _ in range(2):  # R9: more passes store nothing new
        await world.ts.run_once()
    msgs = world.ts.thread(thread_id)["messages"]
    assert [(m["message_id"], m["direction"], m["origin"]) for m in msgs] == [
        (sent["message_id"], "outbound", "crm"),
        (contact_mid, "inbound", "mailbox"),
        (client_mid, "outbound", "mailbox"),
        (crm["message_id"], "outbound", "crm"),
    ]
    assert msgs[1]["text"].strip() == "Thanks, sounds good." and msgs[1]["from"] == CONTACT
    # The CRM's own copies in Sent were not imported a second time.
    assert [parse(r)["Message-ID"] for r in world.imap.messages(world.email, "Sent")] == [
        sent["message_id"],
        client_mid,
        crm["message_id"],
    ]
    synced = [e["message"]["message_id"] for e in world.recorder.of("message.synced")]
    assert sorted(synced) == sorted(m["message_id"] for m in msgs)
    # Reading never marked the user's mail as read.
    assert all("\\Seen" not in f for f in world.imap.flags(world.email, "INBOX"))


async def test_r4_reply_keeping_only_part_of_the_chain_still_matches(world: World) -> None:
    thread_id, sent = await start_thread(world)
    first = world.contact_replies(sent)
    await world.ts.run_once()
    crm = await world.ts.reply(thread_id, Draft(text="second"))
    # A client that keeps only In-Reply-To of our latest message (no References).
    from tests.kernelfixtures import make_mail

    raw, mid = make_mail(
        sender=CONTACT,
        to=world.email,
        subject="Re: Offer",
        body="short chain",
        headers={"In-Reply-To": crm["message_id"]},
    )
    world.imap.deliver(world.email, raw)
    await world.ts.run_once()
    ids = [m["message_id"] for m in world.ts.thread(thread_id)["messages"]]
    assert ids == [sent["message_id"], first, crm["message_id"], mid]


# ---- R5 personal threads -----------------------------------------------------------------


async def test_r5_personal_threads_never_sync(world: World) -> None:
    thread_id, _ = await start_thread(world)
    from tests.kernelfixtures import make_mail

    # The same contact writes a new, unrelated mail with the same subject...
    raw, personal = make_mail(sender=CONTACT, to=world.email, subject="Offer", body="private")
    world.imap.deliver(world.email, raw)
    # ...and the user starts a thread from the mailbox to a CRM contact.
    raw2, own = make_mail(sender=world.email, to=CONTACT, subject="Lunch?", body="private too")
    world.imap.deliver(world.email, raw2, "Sent")
    # A reply within that personal thread.
    raw3, personal_reply = make_mail(
        sender=CONTACT,
        to=world.email,
        subject="Re: Lunch?",
        body="yes",
        headers={"In-Reply-To": own, "References": own},
    )
    world.imap.deliver(world.email, raw3)
    await world.ts.run_once()
    for mid in (personal, own, personal_reply):
        assert world.count_messages(mid) == 0
    assert world.ts.thread(thread_id)["message_count"] == 1
    assert all("private" not in str(e) for e in world.recorder.events)
    assert all("\\Seen" not in f for f in world.imap.flags(world.email, "INBOX"))


# ---- R6 disconnect, R7 update-email ----------------------------------------------------------


async def test_r6_disconnect_stops_threads_for_good(world: World) -> None:
    thread_id, sent = await start_thread(world)
    done = await world.ts.disconnect(SUB, USER)
    assert done["state"] == "disconnected"
    assert world.ts.thread(thread_id)["state"] == "stopped"
    assert world.ts.thread(thread_id)["stop_reason"] == "disconnected"
    assert [e["reason"] for e in world.recorder.of("thread.stopped")] == ["disconnected"]

    def secrets(session):  # type: ignore[no-untyped-def]
        return [c.secrets for c in session.scalars(select(Connection))]

    assert world.ts.kernel.store.call(secrets) == [None]
    late = world.contact_replies(sent)
    crm = await world.ts.reply(thread_id, Draft(text="after disconnect"))
    assert (crm["channel"], crm["synced"], crm["reason"]) == ("default", False, "thread_stopped")
    assert world.relay.by_message_id(crm["message_id"])
    assert not world.submission.by_message_id(crm["message_id"])
    # New CRM mail goes by the default channel; reconnecting does not revive the thread.
    new = await world.ts.send(SUB, USER, offer(subject="Later"))
    assert (new["channel"], new["reason"]) == ("default", "no_connection")
    await world.connect()
    await world.ts.run_once()
    assert world.count_messages(late) == 0
    assert world.ts.thread(thread_id)["state"] == "stopped"


async def test_r7_update_email_replaces_without_gap(
    world: World,
    mailbox_factory,  # type: ignore[no-untyped-def]
) -> None:
    thread_id, sent = await start_thread(world)
    new_email, new_password = mailbox_factory()
    world.submission.users[new_email] = new_password
    world.ts.kernel.environ["NEWPW"] = new_password
    old_email = world.email
    world.email = new_email
    result = await world.ts.update_email(
        SUB, USER, "imap_smtp", email=new_email, options=world.options(password_env="NEWPW")
    )
    assert result["state"] == "connected" and result["email"] == new_email
    conns = world.ts.status(SUB, USER)["connections"]
    assert [(c["email"], c["state"]) for c in conns] == [
        (old_email, "replaced"),
        (new_email, "connected"),
    ]
    t = world.ts.thread(thread_id)
    assert (t["state"], t["stop_reason"]) == ("stopped", "replaced")
    fresh = await world.ts.send(SUB, USER, offer(subject="From the new address"))
    assert fresh["channel"] == "mailbox"
    assert parse(world.submission.by_message_id(fresh["message_id"])[0].raw)["From"] == new_email
    # A late reply into the old thread (at the old mailbox) is not synced.
    world.email = old_email
    late = world.contact_replies(sent)
    await world.ts.run_once()
    assert world.count_messages(late) == 0


# ---- R8 attachment limit ------------------------------------------------------------------


async def test_r8_inbound_limit_is_exact(world: World) -> None:
    thread_id, sent = await start_thread(world)
    ok = world.contact_replies(sent, attachments=[("exact.bin", b"a" * LIMIT)])
    big = world.contact_replies(sent, attachments=[("big.bin", b"b" * (LIMIT + 1))])
    await world.ts.run_once()
    later = world.contact_replies(big, chain=[sent["message_id"]], body="after the big one")
    await world.ts.run_once()
    msgs = {m["message_id"]: m for m in world.ts.thread(thread_id)["messages"]}
    assert msgs[ok]["state"] == "synced"
    assert msgs[ok]["attachments"] == [
        {"filename": "exact.bin", "content_type": "application/octet-stream", "size": LIMIT}
    ]
    assert (msgs[big]["state"], msgs[big]["reason"]) == ("skipped", "attachment_too_large")
    assert msgs[big]["text"] is None and msgs[big]["html"] is None
    assert msgs[big]["attachments"][0]["size"] == LIMIT + 1
    assert msgs[later]["state"] == "synced"  # the thread stays synced

    def contents(session):  # type: ignore[no-untyped-def]
        m = session.scalar(select(Message).where(Message.message_id == big))
        return [a.content for a in m.attachments]

    assert world.ts.kernel.store.call(contents) == [None]
    skipped = world.recorder.of("message.skipped")
    assert [e["message"]["reason"] for e in skipped] == ["attachment_too_large"]


async def test_r8_crm_limit_is_exact(world: World) -> None:
    thread_id, _ = await start_thread(world)
    exact = await world.ts.reply(
        thread_id,
        Draft(
            text="exact",
            attachments=[AttachmentIn("a.bin", "application/octet-stream", b"a" * LIMIT)],
        ),
    )
    assert (exact["channel"], exact["synced"]) == ("mailbox", True)
    over = await world.ts.reply(
        thread_id,
        Draft(
            text="over",
            attachments=[AttachmentIn("b.bin", "application/octet-stream", b"b" * (LIMIT + 1))],
        ),
    )
    assert (over["channel"], over["synced"], over["reason"], over["status"]) == (
        "default",
        False,
        "attachment_too_large",
        "sent",
    )
    assert world.relay.by_message_id(over["message_id"])
    assert world.ts.thread(thread_id)["state"] == "active"
    first_big = await world.ts.send(
        SUB,
        USER,
        offer(attachments=[AttachmentIn("c.bin", "application/octet-stream", b"c" * (LIMIT + 1))]),
    )
    assert (first_big["channel"], first_big["reason"]) == ("default", "attachment_too_large")


# ---- R9 exactly once ------------------------------------------------------------------------


async def test_r9_inbox_and_sent_copy_stored_once_and_uidvalidity_reset(world: World) -> None:
    thread_id, sent = await start_thread(world)
    # The user replies to the contact and cc's themselves: the same message lands
    # in INBOX and in Sent.
    mid = world.user_replies_from_client(sent, to=f"{CONTACT}, {world.email}")
    from tests.kernelfixtures import make_mail

    raw = next(r for r in world.imap.messages(world.email, "Sent") if mid.encode() in r)
    world.imap.deliver(world.email, raw, "INBOX")
    reply = world.contact_replies(sent)
    await world.ts.run_once()
    assert world.count_messages(mid) == 1 and world.count_messages(reply) == 1
    before = world.ts.thread(thread_id)["message_count"]
    # The server resets UIDVALIDITY: the rescan finds everything again, stores nothing twice.
    world.imap.reset_uidvalidity(world.email, "INBOX")
    world.imap.reset_uidvalidity(world.email, "Sent")
    after_reset = world.contact_replies(reply, chain=[sent["message_id"]])
    await world.ts.run_once()
    await world.ts.run_once()
    assert world.ts.thread(thread_id)["message_count"] == before + 1
    assert world.count_messages(after_reset) == 1
    del make_mail


@pytest.mark.parametrize("scenario_database_url", ["postgresql"], indirect=True)
async def test_r9_on_postgresql_two_passes_store_nothing_new(world: World) -> None:
    thread_id, sent = await start_thread(world)
    world.contact_replies(sent)
    first = await world.ts.run_once()
    second = await world.ts.run_once()
    assert first.stored == 1 and second.stored == 0
    assert world.ts.thread(thread_id)["message_count"] == 2


# ---- routing rows ---------------------------------------------------------------------------


async def test_routing_without_connection_and_with_labs_off(world: World) -> None:
    none = await world.ts.send(SUB, USER, offer())
    assert (none["channel"], none["synced"], none["reason"], none["status"]) == (
        "default",
        False,
        "no_connection",
        "sent",
    )
    got = parse(world.relay.by_message_id(none["message_id"])[0].raw)
    assert got["From"] == "crm@threadsync.local"
    assert world.ts.thread(none["thread_id"])["state"] == "unsynced"
    await world.connect()
    world.ts.labs(SUB, enabled=False)
    off = await world.ts.send(SUB, USER, offer())
    assert (off["channel"], off["reason"]) == ("default", "labs_disabled")


async def test_routing_queued_while_server_unreachable_then_delivered(world: World) -> None:
    thread_id, _ = await start_thread(world)
    port = world.submission.port
    world.submission.stop()
    queued = await world.ts.reply(thread_id, Draft(text="while down"))
    assert (queued["channel"], queued["status"]) == ("mailbox", "queued")
    conn = world.ts.status(SUB, USER)["connections"][0]
    assert conn["state"] == "error" and conn["last_error"]
    world.submission.port = port
    world.submission.start()
    import asyncio

    await asyncio.sleep(0.6)  # past the test backoff
    await world.ts.run_once()
    assert len(world.submission.by_message_id(queued["message_id"])) == 1
    assert world.ts.status(SUB, USER)["connections"][0]["state"] == "connected"

    def statuses(session):  # type: ignore[no-untyped-def]
        return [e.status for e in session.scalars(select(OutboxEntry))]

    assert world.ts.kernel.store.call(statuses) == ["sent", "sent"]


async def test_crm_headers_with_line_breaks_are_refused(world: World) -> None:
    await world.connect()
    with pytest.raises(HeaderInjection):
        await world.ts.send(SUB, USER, offer(subject="Hi\r\nBcc: victim@example.org"))
    with pytest.raises(HeaderInjection):
        await world.ts.send(SUB, USER, offer(to=["a@example.org\r\nX: y"]))
    assert world.ts.threads(SUB)["threads"] == []
