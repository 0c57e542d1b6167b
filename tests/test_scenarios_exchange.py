"""The rule scenarios of tests/test_scenarios.py (R1-R9 and the routing rows),
run against the Exchange provider: threadsync talks EWS through exchangelib to
the stateful fake Exchange Server in tests/fakes over HTTPS, with a real
database and aiosmtpd as the CRM's default relay."""

from __future__ import annotations

import asyncio
import email
import email.policy

import pytest
from sqlalchemy import select

from tests.fakes.ews_world import MAILBOX, PASSWORD_ENV, ExchangeWorld
from tests.kernelfixtures import CONTACT, SUB, USER, make_mail
from threadsync.core.errors import (
    AlreadyConnected,
    AuthenticationFailed,
    ConfigError,
    HeaderInjection,
    LabsDisabled,
)
from threadsync.core.mime import AttachmentIn
from threadsync.core.outbox.compose import Draft
from threadsync.core.store.models import Connection, Message, OutboxEntry

pytest_plugins = ["tests.fakes.ews_fixtures"]

LIMIT = 3_145_728


def offer(**kw: object) -> Draft:
    base: dict[str, object] = {"to": [CONTACT], "subject": "Offer", "text": "Here is our offer."}
    base.update(kw)
    return Draft(**base)  # type: ignore[arg-type]


def parse(raw: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(raw, policy=email.policy.default)  # type: ignore[return-value]


async def start_thread(world: ExchangeWorld) -> tuple[str, dict]:  # type: ignore[type-arg]
    await world.connect()
    sent = await world.ts.send(SUB, USER, offer())
    assert sent["status"] == "sent" and sent["channel"] == "mailbox" and sent["synced"]
    return sent["thread_id"], sent


# ---- R1 Labs gate ----------------------------------------------------------------------


async def test_r1_connect_refused_while_labs_off_and_paused_sync_catches_up(
    exchange_world: ExchangeWorld,
) -> None:
    world = exchange_world
    world.ts.labs(SUB, enabled=False)
    with pytest.raises(LabsDisabled):
        await world.connect()
    assert world.ews.log == []  # refused before any request to Exchange
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


async def test_r2_wrong_password_or_exchange_online_stores_nothing(
    exchange_world: ExchangeWorld,
) -> None:
    world = exchange_world
    world.ts.kernel.environ["BADPW"] = "wrong-password"
    with pytest.raises(AuthenticationFailed) as info:
        await world.connect(password_env="BADPW")
    assert "wrong-password" not in str(info.value)
    with pytest.raises(ConfigError, match="--provider outlook"):
        await world.connect(ews_url="https://outlook.office365.com/EWS/Exchange.asmx")
    assert world.ts.status(SUB, USER)["connections"] == []


async def test_r2a_changed_password_needs_reauth_and_reconnect_catches_up(
    exchange_world: ExchangeWorld,
) -> None:
    world = exchange_world
    thread_id, sent = await start_thread(world)
    with pytest.raises(AlreadyConnected):
        await world.connect()
    # The password changes in Active Directory: Exchange answers 401.
    world.ews.store.add_user(MAILBOX, "Spring-2027-ann")
    await world.ts.run_once()
    conn = world.ts.status(SUB, USER)["connections"][0]
    assert conn["state"] == "needs_reauth" and conn["last_error"]
    assert "Spring-2027" not in str(conn) and "Winter-2026" not in str(conn)
    queued = await world.ts.reply(thread_id, Draft(text="queued while reauth"))
    assert (queued["channel"], queued["status"], queued["synced"]) == ("mailbox", "queued", True)
    mid = world.contact_replies(sent)
    await world.ts.run_once()
    assert world.count_messages(mid) == 0
    world.ts.kernel.environ[PASSWORD_ENV] = "Spring-2027-ann"
    again = await world.connect()
    assert again["state"] == "connected" and again["id"] == conn["id"]
    await world.ts.run_once()
    assert world.count_messages(mid) == 1
    assert len(world.ews.sent(queued["message_id"])) == 1
    states = [e["state"] for e in world.recorder.of("connection.state_changed")]
    assert states == ["connected", "needs_reauth", "connected"]


async def test_r2_ntlm_and_impersonation(exchange_world: ExchangeWorld) -> None:
    world = exchange_world
    # A service account with ApplicationImpersonation acts as the mailbox.
    world.ews.store.add_user("svc-crm@contoso.test", "Svc-Pass-1")
    world.ts.kernel.environ["SVCPW"] = "Svc-Pass-1"
    with pytest.raises(AuthenticationFailed, match="impersonate"):
        await world.connect(auth="ntlm", username="CONTOSO\\svc-crm", password_env="SVCPW",
                            impersonate=True)
    world.ews.store.impersonators.add("svc-crm@contoso.test")
    result = await world.connect(auth="ntlm", username="CONTOSO\\svc-crm",
                                 password_env="SVCPW", impersonate=True)
    assert result["state"] == "connected" and world.ews.ntlm.handshakes >= 1
    sent = await world.ts.send(SUB, USER, offer())
    out = world.ews.sent(sent["message_id"])
    assert sent["channel"] == "mailbox" and [t.mailbox for t in out] == [MAILBOX]


# ---- R3 / R4 both ways ---------------------------------------------------------------------


async def test_r3_r4_whole_conversation_both_ways_exactly_once(
    exchange_world: ExchangeWorld,
) -> None:
    world = exchange_world
    thread_id, sent = await start_thread(world)
    got = world.ews.sent(sent["message_id"])
    assert len(got) == 1 and got[0].recipients == [CONTACT]
    assert parse(got[0].raw)["From"] == world.email
    assert world.ews.message_ids(world.email, "sentitems") == [sent["message_id"]]
    assert world.ews.items(world.email, "drafts") == []

    contact_mid = world.contact_replies(sent)
    client_mid = world.user_replies_from_client(contact_mid, chain=[sent["message_id"]])
    await world.ts.run_once()

    crm = await world.ts.reply(thread_id, Draft(text="Reply from the CRM"))
    assert crm["channel"] == "mailbox" and crm["status"] == "sent"
    out = parse(world.ews.sent(crm["message_id"])[0].raw)
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
    assert world.ews.message_ids(world.email, "sentitems") == [
        sent["message_id"], client_mid, crm["message_id"]]
    synced = [e["message"]["message_id"] for e in world.recorder.of("message.synced")]
    assert sorted(synced) == sorted(m["message_id"] for m in msgs)
    assert not any(i.is_read for i in world.ews.items(world.email, "inbox"))


async def test_r4_reply_keeping_only_part_of_the_chain_still_matches(
    exchange_world: ExchangeWorld,
) -> None:
    world = exchange_world
    thread_id, sent = await start_thread(world)
    first = world.contact_replies(sent)
    await world.ts.run_once()
    crm = await world.ts.reply(thread_id, Draft(text="second"))
    raw, short = make_mail(sender=CONTACT, to=world.email, subject="Re: Offer",
                           body="short chain", headers={"In-Reply-To": crm["message_id"]})
    world.ews.deliver(world.email, raw)
    await world.ts.run_once()
    ids = [m["message_id"] for m in world.ts.thread(thread_id)["messages"]]
    assert ids == [sent["message_id"], first, crm["message_id"], short]


# ---- R5 personal threads -----------------------------------------------------------------


async def test_r5_personal_threads_never_sync_nor_download(exchange_world: ExchangeWorld) -> None:
    world = exchange_world
    _, sent = await start_thread(world)
    member = world.contact_replies(sent)
    raw, personal = make_mail(sender=CONTACT, to=world.email, subject="Offer", body="private")
    world.ews.deliver(world.email, raw)
    raw2, own = make_mail(sender=world.email, to=CONTACT, subject="Lunch?", body="private too")
    world.ews.client_send(world.email, raw2)
    raw3, personal_reply = make_mail(sender=CONTACT, to=world.email, subject="Re: Lunch?",
                                     body="yes", headers={"In-Reply-To": own, "References": own})
    world.ews.deliver(world.email, raw3)
    await world.ts.run_once()
    for mid in (personal, own, personal_reply):
        assert world.count_messages(mid) == 0
    assert world.count_messages(member) == 1
    assert all("private" not in str(e) for e in world.recorder.events)
    # Exchange was asked for the MIME of the member only, never of personal mail.
    assert world.ews.bodies_read() == {world.ews.id_of(world.email, member)}
    assert world.ews.count("GetItem") == 1
    assert not any(i.is_read for i in world.ews.items(world.email, "inbox"))


# ---- R6 disconnect, R7 update-email ----------------------------------------------------------


async def test_r6_disconnect_stops_threads_for_good(exchange_world: ExchangeWorld) -> None:
    world = exchange_world
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
    assert world.relay.by_message_id(crm["message_id"]) and not world.ews.sent(crm["message_id"])
    new = await world.ts.send(SUB, USER, offer(subject="Later"))
    assert (new["channel"], new["reason"]) == ("default", "no_connection")
    await world.connect()
    await world.ts.run_once()
    assert world.count_messages(late) == 0
    assert world.ts.thread(thread_id)["state"] == "stopped"


async def test_r7_update_email_replaces_without_gap(exchange_world: ExchangeWorld) -> None:
    world = exchange_world
    thread_id, sent = await start_thread(world)
    world.ews.store.add_user("ann.new@contoso.test", "New-Pass-2")
    world.ts.kernel.environ["NEWPW"] = "New-Pass-2"
    result = await world.connect(email="ann.new@contoso.test", update=True, password_env="NEWPW")
    assert result["state"] == "connected" and result["email"] == "ann.new@contoso.test"
    conns = world.ts.status(SUB, USER)["connections"]
    assert [(c["email"], c["state"]) for c in conns] == [
        (MAILBOX, "replaced"), ("ann.new@contoso.test", "connected")]
    t = world.ts.thread(thread_id)
    assert (t["state"], t["stop_reason"]) == ("stopped", "replaced")
    fresh = await world.ts.send(SUB, USER, offer(subject="From the new address"))
    out = world.ews.sent(fresh["message_id"])
    assert fresh["channel"] == "mailbox" and out[0].mailbox == "ann.new@contoso.test"
    assert parse(out[0].raw)["From"] == "ann.new@contoso.test"
    late = world.contact_replies(sent)  # into the old mailbox
    await world.ts.run_once()
    assert world.count_messages(late) == 0


# ---- R8 attachment limit ------------------------------------------------------------------


async def test_r8_inbound_limit_is_exact(exchange_world: ExchangeWorld) -> None:
    world = exchange_world
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


async def test_r8_crm_limit_is_exact(exchange_world: ExchangeWorld) -> None:
    world = exchange_world
    thread_id, _ = await start_thread(world)
    exact = await world.ts.reply(thread_id, Draft(text="exact", attachments=[
        AttachmentIn("a.bin", "application/octet-stream", b"a" * LIMIT)]))
    assert (exact["channel"], exact["synced"], exact["status"]) == ("mailbox", True, "sent")
    out = parse(world.ews.sent(exact["message_id"])[0].raw)
    parts = [p for p in out.iter_attachments()]
    assert [(p.get_filename(), len(p.get_content())) for p in parts] == [("a.bin", LIMIT)]
    over = await world.ts.reply(thread_id, Draft(text="over", attachments=[
        AttachmentIn("b.bin", "application/octet-stream", b"b" * (LIMIT + 1))]))
    assert (over["channel"], over["synced"], over["reason"], over["status"]) == (
        "default", False, "attachment_too_large", "sent")
    assert world.relay.by_message_id(over["message_id"]) and not world.ews.sent(over["message_id"])
    assert world.ts.thread(thread_id)["state"] == "active"
    first_big = await world.ts.send(SUB, USER, offer(attachments=[
        AttachmentIn("c.bin", "application/octet-stream", b"c" * (LIMIT + 1))]))
    assert (first_big["channel"], first_big["reason"]) == ("default", "attachment_too_large")


# ---- R9 exactly once ------------------------------------------------------------------------


async def test_r9_inbox_and_sent_copy_once_and_sync_state_reset_duplicates_nothing(
    exchange_world: ExchangeWorld,
) -> None:
    world = exchange_world
    thread_id, sent = await start_thread(world)
    mid = world.user_replies_from_client(sent, to=f"{CONTACT}, {world.email}")
    raw = world.ews.items(world.email, "sentitems")[-1].raw()
    world.ews.deliver(world.email, raw)  # the cc to self arrives in the Inbox too
    reply = world.contact_replies(sent)
    await world.ts.run_once()
    assert world.count_messages(mid) == 1 and world.count_messages(reply) == 1
    before = world.ts.thread(thread_id)["message_count"]
    # Exchange no longer accepts either folder's sync state (a mailbox move):
    # ErrorInvalidSyncStateData, a resync from the connection time, nothing twice.
    world.ews.store.forget_sync_states(world.email, "inbox")
    world.ews.store.forget_sync_states(world.email, "sentitems")
    after_reset = world.contact_replies(reply, chain=[sent["message_id"]])
    await world.ts.run_once()
    await world.ts.run_once()
    assert world.ews.invalid_sync_states == 2
    assert world.ts.thread(thread_id)["message_count"] == before + 1
    assert world.count_messages(after_reset) == 1
    assert len(world.ews.sent(sent["message_id"])) == 1


async def test_r9_a_send_whose_answer_is_lost_goes_out_once(exchange_world: ExchangeWorld) -> None:
    world = exchange_world
    thread_id, _ = await start_thread(world)
    world.ews.lose_next_send_answer = True
    reply = await world.ts.reply(thread_id, Draft(text="answer lost"))
    assert (reply["channel"], reply["status"]) == ("mailbox", "sent")
    for _ in range(2):
        await world.ts.run_once()
    assert len(world.ews.sent(reply["message_id"])) == 1
    assert world.ews.message_ids(world.email, "sentitems").count(reply["message_id"]) == 1
    assert world.ews.count("CreateItem") == 2  # the first offer and this reply, once each
    msgs = [m["message_id"] for m in world.ts.thread(thread_id)["messages"]]
    assert msgs.count(reply["message_id"]) == 1


@pytest.mark.parametrize("scenario_database_url", ["postgresql"], indirect=True)
async def test_r9_on_postgresql_two_passes_store_nothing_new(
    exchange_world: ExchangeWorld,
) -> None:
    world = exchange_world
    thread_id, sent = await start_thread(world)
    world.contact_replies(sent)
    first = await world.ts.run_once()
    second = await world.ts.run_once()
    assert first.stored == 1 and second.stored == 0
    assert world.ts.thread(thread_id)["message_count"] == 2


# ---- routing rows ---------------------------------------------------------------------------


async def test_routing_without_connection_and_with_labs_off(exchange_world: ExchangeWorld) -> None:
    world = exchange_world
    none = await world.ts.send(SUB, USER, offer())
    assert (none["channel"], none["synced"], none["reason"], none["status"]) == (
        "default", False, "no_connection", "sent")
    assert parse(world.relay.by_message_id(none["message_id"])[0].raw)["From"] == (
        "crm@threadsync.local")
    await world.connect()
    world.ts.labs(SUB, enabled=False)
    off = await world.ts.send(SUB, USER, offer())
    assert (off["channel"], off["reason"]) == ("default", "labs_disabled")
    assert world.ews.sent() == []


async def test_routing_queued_while_exchange_unreachable_then_delivered(
    exchange_world: ExchangeWorld, ews_server: object,
) -> None:
    world = exchange_world
    thread_id, _ = await start_thread(world)
    await world.ts.kernel.pool.aclose()
    server = ews_server
    server.stop()  # type: ignore[attr-defined]
    try:
        queued = await world.ts.reply(thread_id, Draft(text="while down"))
        assert (queued["channel"], queued["status"]) == ("mailbox", "queued")
        conn = world.ts.status(SUB, USER)["connections"][0]
        assert conn["state"] == "error" and conn["last_error"]
    finally:
        server.start()  # type: ignore[attr-defined]
    await asyncio.sleep(0.6)  # past the test backoff
    await world.ts.run_once()
    assert len(world.ews.sent(queued["message_id"])) == 1
    assert world.ts.status(SUB, USER)["connections"][0]["state"] == "connected"

    def statuses(session):  # type: ignore[no-untyped-def]
        return [e.status for e in session.scalars(select(OutboxEntry))]

    assert world.ts.kernel.store.call(statuses) == ["sent", "sent"]


async def test_routing_throttled_mailbox_waits_and_catches_up(
    exchange_world: ExchangeWorld,
) -> None:
    world = exchange_world
    thread_id, sent = await start_thread(world)
    mid = world.contact_replies(sent)
    # A short ErrorServerBusy storm is ridden out inside the pass (BackOffMilliseconds)...
    world.ews.throttle(3, back_off_ms=200)
    await world.ts.run_once()
    assert world.count_messages(mid) == 1 and world.ews.throttles == []
    # ...a long one hands the wait to the kernel: error with backoff, then catch-up.
    later = world.contact_replies(sent, body="later")
    world.ews.throttle(50, back_off_ms=300)
    report = await world.ts.run_once()
    assert report.errors and world.ts.status(SUB, USER)["connections"][0]["state"] == "error"
    world.ews.throttles.clear()
    await asyncio.sleep(0.6)
    await world.ts.run_once()
    assert world.count_messages(later) == 1
    assert world.ts.status(SUB, USER)["connections"][0]["state"] == "connected"
    assert world.ts.thread(thread_id)["message_count"] == 3


async def test_crm_headers_with_line_breaks_are_refused(exchange_world: ExchangeWorld) -> None:
    world = exchange_world
    await world.connect()
    with pytest.raises(HeaderInjection):
        await world.ts.send(SUB, USER, offer(subject="Hi\r\nBcc: victim@example.org"))
    with pytest.raises(HeaderInjection):
        await world.ts.send(SUB, USER, offer(to=["a@example.org\r\nX: y"]))
    assert world.ts.threads(SUB)["threads"] == [] and world.ews.sent() == []
