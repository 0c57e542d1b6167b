"""The rule scenarios of tests/test_scenarios.py (R1-R9 and the routing rows),
run against the Outlook provider: threadsync signs in with MSAL and talks to
Microsoft Graph, both played by the stateful fakes in tests/fakes over HTTPS,
with a real database and aiosmtpd as the CRM's default relay."""

from __future__ import annotations

import asyncio
import email
import email.policy

import pytest
from sqlalchemy import select

from tests.fakes.world import MAILBOX, OutlookWorld
from tests.kernelfixtures import CONTACT, SUB, USER, make_mail
from threadsync.core.errors import (
    AlreadyConnected,
    AuthenticationFailed,
    HeaderInjection,
    LabsDisabled,
)
from threadsync.core.mime import AttachmentIn
from threadsync.core.outbox.compose import Draft
from threadsync.core.store.models import Connection, Message, OutboxEntry

pytest_plugins = ["tests.fakes.fixtures"]

LIMIT = 3_145_728


def offer(**kw: object) -> Draft:
    base: dict[str, object] = {"to": [CONTACT], "subject": "Offer", "text": "Here is our offer."}
    base.update(kw)
    return Draft(**base)  # type: ignore[arg-type]


def parse(raw: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(raw, policy=email.policy.default)  # type: ignore[return-value]


async def start_thread(world: OutlookWorld) -> tuple[str, dict]:  # type: ignore[type-arg]
    await world.connect()
    sent = await world.ts.send(SUB, USER, offer())
    assert sent["status"] == "sent" and sent["channel"] == "mailbox" and sent["synced"]
    return sent["thread_id"], sent


# ---- R1 Labs gate ----------------------------------------------------------------------


async def test_r1_connect_refused_while_labs_off_and_paused_sync_catches_up(
    outlook_world: OutlookWorld,
) -> None:
    world = outlook_world
    world.ts.labs(SUB, enabled=False)
    with pytest.raises(LabsDisabled):
        await world.connect()
    assert world.ms.identity.token_requests == []  # refused before any sign-in
    world.ts.labs(SUB, enabled=True)
    thread_id, sent = await start_thread(world)

    world.ts.labs(SUB, enabled=False)
    status = world.ts.status(SUB, USER)["connections"][0]
    assert status["paused"] is True and status["state"] == "connected"
    reply = await world.ts.reply(thread_id, Draft(text="While paused"))
    assert (reply["channel"], reply["synced"], reply["reason"]) == (
        "default", False, "labs_disabled")
    assert world.relay.by_message_id(reply["message_id"])
    mid = world.contact_replies(sent)
    report = await world.ts.run_once()
    assert report.connections == 0 and world.count_messages(mid) == 0
    world.ts.labs(SUB, enabled=True)
    await world.ts.run_once()
    assert world.count_messages(mid) == 1
    assert world.ts.status(SUB, USER)["connections"][0]["paused"] is False


# ---- R2 connect, states, re-authorisation ---------------------------------------------------


async def test_r2_declined_or_foreign_consent_stores_nothing(outlook_world: OutlookWorld) -> None:
    world = outlook_world
    world.ms.identity.deny_next_consent = True
    with pytest.raises(AuthenticationFailed, match="declined"):
        await world.connect()
    # Someone else is signed in at the browser: their mailbox is not connected.
    world.ms.add_user("bob@contoso.test")
    with pytest.raises(AuthenticationFailed) as info:
        await world.connect(as_user="bob@contoso.test")
    assert "bob@contoso.test" in str(info.value) and MAILBOX in str(info.value)
    assert world.ms.app.secret not in str(info.value)
    assert world.ts.status(SUB, USER)["connections"] == []


async def test_r2a_revoked_consent_needs_reauth_and_reconsent_catches_up(
    outlook_world: OutlookWorld,
) -> None:
    world = outlook_world
    thread_id, sent = await start_thread(world)
    with pytest.raises(AlreadyConnected):
        await world.connect()
    # The user removes the app's permissions: refresh tokens die (AADSTS65001).
    world.ms.identity.revoke_consent(MAILBOX)
    await world.ts.run_once()
    conn = world.ts.status(SUB, USER)["connections"][0]
    assert conn["state"] == "needs_reauth" and "consent" in conn["last_error"]
    assert "fake-rt-" not in str(conn) and "fake-at-" not in str(conn)
    queued = await world.ts.reply(thread_id, Draft(text="queued while reauth"))
    assert (queued["channel"], queued["status"], queued["synced"]) == ("mailbox", "queued", True)
    mid = world.contact_replies(sent)
    await world.ts.run_once()
    assert world.count_messages(mid) == 0
    # A second connect with the same address re-consents the same connection.
    again = await world.connect()
    assert again["state"] == "connected" and again["id"] == conn["id"]
    await world.ts.run_once()
    assert world.count_messages(mid) == 1
    assert len(world.ms.sent(queued["message_id"])) == 1
    states = [e["state"] for e in world.recorder.of("connection.state_changed")]
    assert states == ["connected", "needs_reauth", "connected"]


async def test_r2_device_code_sign_in(outlook_world: OutlookWorld) -> None:
    world = outlook_world
    result = await world.connect(device_code=True)
    assert result["state"] == "connected"
    sent = await world.ts.send(SUB, USER, offer())
    assert sent["channel"] == "mailbox" and len(world.ms.sent(sent["message_id"])) == 1


# ---- R3 / R4 both ways ---------------------------------------------------------------------


async def test_r3_r4_whole_conversation_both_ways_exactly_once(outlook_world: OutlookWorld) -> None:
    world = outlook_world
    thread_id, sent = await start_thread(world)
    got = world.ms.sent(sent["message_id"])
    assert len(got) == 1 and got[0].recipients == [CONTACT]
    assert parse(got[0].raw)["From"] == world.email
    assert world.ms.message_ids(world.email, "sentitems") == [sent["message_id"]]
    assert world.ms.messages(world.email, "drafts") == []

    contact_mid = world.contact_replies(sent)
    client_mid = world.user_replies_from_client(contact_mid, chain=[sent["message_id"]])
    await world.ts.run_once()

    crm = await world.ts.reply(thread_id, Draft(text="Reply from the CRM"))
    assert crm["channel"] == "mailbox" and crm["status"] == "sent"
    out = parse(world.ms.sent(crm["message_id"])[0].raw)
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
    assert world.ms.message_ids(world.email, "sentitems") == [
        sent["message_id"], client_mid, crm["message_id"]]
    synced = [e["message"]["message_id"] for e in world.recorder.of("message.synced")]
    assert sorted(synced) == sorted(m["message_id"] for m in msgs)
    # Reading never marked the user's mail as read; every id was immutable.
    assert not any(m.is_read for m in world.ms.messages(world.email, "inbox"))
    assert world.ms.graph.prefer_missing == 0


async def test_r4_reply_with_outlooks_reply_button_and_partial_chain(
    outlook_world: OutlookWorld,
) -> None:
    world = outlook_world
    thread_id, sent = await start_thread(world)
    first = world.contact_replies(sent)
    await world.ts.run_once()
    outlook_reply = world.ms.client_reply(world.email, first, "Answered in Outlook")
    crm = await world.ts.reply(thread_id, Draft(text="second"))
    raw, short = make_mail(sender=CONTACT, to=world.email, subject="Re: Offer",
                           body="short chain", headers={"In-Reply-To": crm["message_id"]})
    world.ms.deliver(world.email, raw)
    await world.ts.run_once()
    msgs = world.ts.thread(thread_id)["messages"]
    assert sorted(m["message_id"] for m in msgs) == sorted(
        [sent["message_id"], first, outlook_reply, crm["message_id"], short])
    mine = next(m for m in msgs if m["message_id"] == outlook_reply)
    assert (mine["direction"], mine["origin"]) == ("outbound", "mailbox")


# ---- R5 personal threads -----------------------------------------------------------------


async def test_r5_personal_threads_never_sync_nor_download(outlook_world: OutlookWorld) -> None:
    world = outlook_world
    _, sent = await start_thread(world)
    member = world.contact_replies(sent)
    raw, personal = make_mail(sender=CONTACT, to=world.email, subject="Offer", body="private")
    world.ms.deliver(world.email, raw)
    raw2, own = make_mail(sender=world.email, to=CONTACT, subject="Lunch?", body="private too")
    world.ms.client_send(world.email, raw2)
    raw3, personal_reply = make_mail(sender=CONTACT, to=world.email, subject="Re: Lunch?",
                                     body="yes", headers={"In-Reply-To": own, "References": own})
    world.ms.deliver(world.email, raw3)
    await world.ts.run_once()
    for mid in (personal, own, personal_reply):
        assert world.count_messages(mid) == 0
    assert world.count_messages(member) == 1
    assert all("private" not in str(e) for e in world.recorder.events)
    # Graph was never asked for a body (or attachments) of anything but the member.
    assert world.ms.graph.bodies_read() <= {
        world.ms.id_of(world.email, member), world.ms.id_of(world.email, sent["message_id"])}
    assert world.ms.id_of(world.email, personal) not in world.ms.graph.bodies_read()
    values = [e.path for e in world.ms.requests() if e.path.endswith("/$value")]
    assert values == [f"/me/messages/{world.ms.id_of(world.email, member)}/$value"]
    assert not any(m.is_read for m in world.ms.messages(world.email, "inbox"))


# ---- R6 disconnect, R7 update-email ----------------------------------------------------------


async def test_r6_disconnect_stops_threads_for_good(outlook_world: OutlookWorld) -> None:
    world = outlook_world
    thread_id, sent = await start_thread(world)
    done = await world.ts.disconnect(SUB, USER)
    assert done["state"] == "disconnected"
    assert (world.ts.thread(thread_id)["state"], world.ts.thread(thread_id)["stop_reason"]) == (
        "stopped", "disconnected")

    def secrets(session):  # type: ignore[no-untyped-def]
        return [c.secrets for c in session.scalars(select(Connection))]

    assert world.ts.kernel.store.call(secrets) == [None]
    late = world.contact_replies(sent)
    crm = await world.ts.reply(thread_id, Draft(text="after disconnect"))
    assert (crm["channel"], crm["synced"], crm["reason"]) == ("default", False, "thread_stopped")
    assert world.relay.by_message_id(crm["message_id"]) and not world.ms.sent(crm["message_id"])
    new = await world.ts.send(SUB, USER, offer(subject="Later"))
    assert (new["channel"], new["reason"]) == ("default", "no_connection")
    await world.connect()
    await world.ts.run_once()
    assert world.count_messages(late) == 0
    assert world.ts.thread(thread_id)["state"] == "stopped"


async def test_r7_update_email_replaces_without_gap(outlook_world: OutlookWorld) -> None:
    world = outlook_world
    thread_id, sent = await start_thread(world)
    world.ms.add_user("ann.new@contoso.test")
    result = await world.connect(email="ann.new@contoso.test", update=True)
    assert result["state"] == "connected" and result["email"] == "ann.new@contoso.test"
    conns = world.ts.status(SUB, USER)["connections"]
    assert [(c["email"], c["state"]) for c in conns] == [
        (MAILBOX, "replaced"), ("ann.new@contoso.test", "connected")]
    t = world.ts.thread(thread_id)
    assert (t["state"], t["stop_reason"]) == ("stopped", "replaced")
    fresh = await world.ts.send(SUB, USER, offer(subject="From the new address"))
    out = world.ms.sent(fresh["message_id"])
    assert fresh["channel"] == "mailbox" and out[0].mailbox == "ann.new@contoso.test"
    assert parse(out[0].raw)["From"] == "ann.new@contoso.test"
    late = world.contact_replies(sent)  # into the old mailbox
    await world.ts.run_once()
    assert world.count_messages(late) == 0


# ---- R8 attachment limit ------------------------------------------------------------------


async def test_r8_inbound_limit_is_exact(outlook_world: OutlookWorld) -> None:
    world = outlook_world
    thread_id, sent = await start_thread(world)
    ok = world.contact_replies(sent, attachments=[("exact.bin", b"a" * LIMIT)])
    big = world.contact_replies(sent, attachments=[("big.bin", b"b" * (LIMIT + 1))])
    await world.ts.run_once()
    later = world.contact_replies(big, chain=[sent["message_id"]], body="after the big one")
    await world.ts.run_once()
    msgs = {m["message_id"]: m for m in world.ts.thread(thread_id)["messages"]}
    assert msgs[ok]["state"] == "synced"
    assert msgs[ok]["attachments"] == [
        {"filename": "exact.bin", "content_type": "application/octet-stream", "size": LIMIT}]
    assert (msgs[big]["state"], msgs[big]["reason"]) == ("skipped", "attachment_too_large")
    assert msgs[big]["text"] is None and msgs[big]["attachments"][0]["size"] == LIMIT + 1
    assert msgs[later]["state"] == "synced"

    def contents(session):  # type: ignore[no-untyped-def]
        m = session.scalar(select(Message).where(Message.message_id == big))
        return [a.content for a in m.attachments]

    assert world.ts.kernel.store.call(contents) == [None]
    skipped = world.recorder.of("message.skipped")
    assert [e["message"]["reason"] for e in skipped] == ["attachment_too_large"]


async def test_r8_crm_limit_is_exact(outlook_world: OutlookWorld) -> None:
    world = outlook_world
    thread_id, _ = await start_thread(world)
    exact = await world.ts.reply(thread_id, Draft(text="exact", attachments=[
        AttachmentIn("a.bin", "application/octet-stream", b"a" * LIMIT)]))
    assert (exact["channel"], exact["synced"], exact["status"]) == ("mailbox", True, "sent")
    out = parse(world.ms.sent(exact["message_id"])[0].raw)
    parts = [p for p in out.iter_attachments()]
    assert [(p.get_filename(), len(p.get_content())) for p in parts] == [("a.bin", LIMIT)]
    # Too big for one Graph request: the attachment went up in an upload session.
    assert any(e.path.endswith("/createUploadSession") for e in world.ms.requests())
    over = await world.ts.reply(thread_id, Draft(text="over", attachments=[
        AttachmentIn("b.bin", "application/octet-stream", b"b" * (LIMIT + 1))]))
    assert (over["channel"], over["synced"], over["reason"], over["status"]) == (
        "default", False, "attachment_too_large", "sent")
    assert world.relay.by_message_id(over["message_id"]) and not world.ms.sent(over["message_id"])
    assert world.ts.thread(thread_id)["state"] == "active"
    first_big = await world.ts.send(SUB, USER, offer(attachments=[
        AttachmentIn("c.bin", "application/octet-stream", b"c" * (LIMIT + 1))]))
    assert (first_big["channel"], first_big["reason"]) == ("default", "attachment_too_large")


# ---- R9 exactly once ------------------------------------------------------------------------


async def test_r9_inbox_and_sent_copy_once_and_410_resync_duplicates_nothing(
    outlook_world: OutlookWorld,
) -> None:
    world = outlook_world
    thread_id, sent = await start_thread(world)
    mid = world.user_replies_from_client(sent, to=f"{CONTACT}, {world.email}")
    raw = world.ms.messages(world.email, "sentitems")[-1].raw()
    world.ms.deliver(world.email, raw)  # the cc to self arrives in the Inbox too
    reply = world.contact_replies(sent)
    await world.ts.run_once()
    assert world.count_messages(mid) == 1 and world.count_messages(reply) == 1
    before = world.ts.thread(thread_id)["message_count"]
    # Graph forgets both folders' sync state: 410 Gone, full resync, nothing twice.
    world.ms.graph.expire_delta_tokens(world.email, "inbox")
    world.ms.graph.expire_delta_tokens(world.email, "sentitems")
    after_reset = world.contact_replies(reply, chain=[sent["message_id"]])
    await world.ts.run_once()
    await world.ts.run_once()
    assert sum(e.status == 410 for e in world.ms.requests()) == 2
    assert world.ts.thread(thread_id)["message_count"] == before + 1
    assert world.count_messages(after_reset) == 1
    assert len(world.ms.sent(sent["message_id"])) == 1


@pytest.mark.parametrize("scenario_database_url", ["postgresql"], indirect=True)
async def test_r9_on_postgresql_two_passes_store_nothing_new(
    outlook_world: OutlookWorld,
) -> None:
    world = outlook_world
    thread_id, sent = await start_thread(world)
    world.contact_replies(sent)
    first = await world.ts.run_once()
    second = await world.ts.run_once()
    assert first.stored == 1 and second.stored == 0
    assert world.ts.thread(thread_id)["message_count"] == 2


# ---- routing rows ---------------------------------------------------------------------------


async def test_routing_without_connection_and_with_labs_off(outlook_world: OutlookWorld) -> None:
    world = outlook_world
    none = await world.ts.send(SUB, USER, offer())
    assert (none["channel"], none["synced"], none["reason"], none["status"]) == (
        "default", False, "no_connection", "sent")
    assert parse(world.relay.by_message_id(none["message_id"])[0].raw)["From"] == (
        "crm@threadsync.local")
    await world.connect()
    world.ts.labs(SUB, enabled=False)
    off = await world.ts.send(SUB, USER, offer())
    assert (off["channel"], off["reason"]) == ("default", "labs_disabled")
    assert world.ms.sent() == []


async def test_routing_queued_while_graph_unreachable_then_delivered(
    outlook_world: OutlookWorld,
) -> None:
    world = outlook_world
    thread_id, _ = await start_thread(world)
    await world.ts.kernel.pool.aclose()  # the session kept open since the send goes too
    world.ms.server.stop()
    try:
        queued = await world.ts.reply(thread_id, Draft(text="while down"))
        assert (queued["channel"], queued["status"]) == ("mailbox", "queued")
        conn = world.ts.status(SUB, USER)["connections"][0]
        assert conn["state"] == "error" and conn["last_error"]
    finally:
        world.ms.server.start()
    await asyncio.sleep(0.6)  # past the test backoff
    await world.ts.run_once()
    assert len(world.ms.sent(queued["message_id"])) == 1
    assert world.ts.status(SUB, USER)["connections"][0]["state"] == "connected"

    def statuses(session):  # type: ignore[no-untyped-def]
        return [e.status for e in session.scalars(select(OutboxEntry))]

    assert world.ts.kernel.store.call(statuses) == ["sent", "sent"]


async def test_routing_throttled_mailbox_waits_and_catches_up(outlook_world: OutlookWorld) -> None:
    world = outlook_world
    thread_id, sent = await start_thread(world)
    mid = world.contact_replies(sent)
    # A short 429 storm is ridden out inside the pass (Retry-After honoured)...
    world.ms.graph.throttle(3, retry_after=0.2)
    await world.ts.run_once()
    assert world.count_messages(mid) == 1
    # ...a long one hands the wait to the kernel: error with backoff, then catch-up.
    later = world.contact_replies(sent, body="later")
    world.ms.graph.throttle(50, retry_after=0.3)
    report = await world.ts.run_once()
    assert report.errors and world.ts.status(SUB, USER)["connections"][0]["state"] == "error"
    world.ms.graph.throttles.clear()
    await asyncio.sleep(0.6)
    await world.ts.run_once()
    assert world.count_messages(later) == 1
    assert world.ts.status(SUB, USER)["connections"][0]["state"] == "connected"
    assert world.ts.thread(thread_id)["message_count"] == 3


async def test_crm_headers_with_line_breaks_are_refused(outlook_world: OutlookWorld) -> None:
    world = outlook_world
    await world.connect()
    with pytest.raises(HeaderInjection):
        await world.ts.send(SUB, USER, offer(subject="Hi\r\nBcc: victim@example.org"))
    with pytest.raises(HeaderInjection):
        await world.ts.send(SUB, USER, offer(to=["a@example.org\r\nX: y"]))
    assert world.ts.threads(SUB)["threads"] == [] and world.ms.sent() == []


async def test_r9_lost_send_answer_then_restart_sends_once_and_keeps_it(
    outlook_world: OutlookWorld,
) -> None:
    """Graph answers /send with 202 before sending and Sent Items lags. The
    answer is lost and the process dies while it waits for the copy; after the
    restart the message is neither sent again nor given up."""
    world = outlook_world
    thread_id, _ = await start_thread(world)
    world.ms.graph.sent_items_lag = 1.0
    world.ms.graph.lose_answer(1, when=lambda c: c.path.endswith("/send"))
    replying = asyncio.create_task(world.ts.reply(thread_id, Draft(text="Lost answer")))
    for _ in range(200):
        if len(world.ms.sent()) == 2:
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.3)  # the answer is lost; the copy has not landed yet
    replying.cancel()  # the process dies while it watches the draft
    with pytest.raises(asyncio.CancelledError):
        await replying
    mid = world.ms.sent()[-1].message_id

    def restart(session):  # type: ignore[no-untyped-def]
        # The dead process's lease ends; the entry says the send may have left.
        entry = session.scalars(select(OutboxEntry).order_by(OutboxEntry.id.desc())).first()
        assert entry.status == "transmitting"
        entry.lease_until = entry.created_at

    world.ts.kernel.store.call(restart)
    await world.ts.run_once()
    await asyncio.sleep(1.1)  # the copy lands in Sent Items
    await world.ts.run_once()

    def statuses(session):  # type: ignore[no-untyped-def]
        return [e.status for e in session.scalars(select(OutboxEntry))]

    assert world.ts.kernel.store.call(statuses) == ["sent", "sent"]
    assert len(world.ms.sent(mid)) == 1
    assert world.ms.message_ids(world.email, "sentitems").count(mid) == 1
    assert world.count_messages(mid) == 1
    assert world.ts.thread(thread_id)["message_count"] == 2
