"""Sending through an Outlook mailbox: a draft from our MIME, the checkpoint
right before ``/send``, our Message-ID kept, ``Bcc`` hidden, big messages split
with an upload session, and sends whose answer is lost never repeated."""

from __future__ import annotations

import asyncio
import email
import email.policy
from email.message import EmailMessage

import pytest

from tests.fakes import FakeMicrosoft
from tests.fakes.world import MAILBOX, opened, sign_in
from tests.kernelfixtures import CONTACT
from threadsync.core.errors import ProviderProtocolError, TransientProviderError
from threadsync.core.mime import AttachmentIn, build_message
from threadsync.core.provider import OutgoingMail

pytest_plugins = ["tests.fakes.fixtures"]
LIMIT = 3_145_728
MID = "<t.1@threadsync.local>"


def outgoing(
    *,
    recipients: tuple[str, ...] = (CONTACT,),
    attachments: tuple[AttachmentIn, ...] = (),
    sender: str = MAILBOX,
) -> OutgoingMail:
    raw = build_message(sender=sender, to=[CONTACT], subject="Re: Offer", text="Hello",
                        attachments=attachments, message_id=MID,
                        in_reply_to="<parent@example.org>",
                        references=["<root@threadsync.local>", "<parent@example.org>"])
    return OutgoingMail(raw=raw, message_id=MID, sender=sender, recipients=recipients)


def parse(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


class Checkpoint:
    """Records where in the request log the checkpoint was awaited."""

    def __init__(self, ms: FakeMicrosoft) -> None:
        self.ms = ms
        self.at: list[int] = []

    async def __call__(self) -> None:
        self.at.append(len(self.ms.requests()))


async def test_send_keeps_our_headers_hides_bcc_and_checkpoints_right_before_send(
    ms: FakeMicrosoft,
) -> None:
    account, settings = await sign_in(ms)
    checkpoint = Checkpoint(ms)
    mail = outgoing(recipients=(CONTACT, "hidden@example.net"))
    async with opened(account, settings) as provider:
        await provider.send(mail, checkpoint)
        assert await provider.find_sent(MID) and not await provider.find_sent("<no@x>")
    [sent] = ms.sent()
    assert sent.message_id == MID and sorted(sent.recipients) == [CONTACT, "hidden@example.net"]
    wire = parse(sent.raw)
    assert wire["Bcc"] is None and wire["In-Reply-To"] == "<parent@example.org>"
    assert wire["References"].split() == ["<root@threadsync.local>", "<parent@example.org>"]
    assert ms.message_ids(MAILBOX, "sentitems") == [MID] and ms.messages(MAILBOX, "drafts") == []
    log = ms.requests()
    assert len(checkpoint.at) == 1
    after = log[checkpoint.at[0]]
    assert (after.method, after.path.endswith("/send")) == ("POST", True)
    assert [e.method for e in log[: checkpoint.at[0]] if e.path == "/me/messages"] == ["POST"]


async def test_a_message_id_chosen_by_exchange_is_set_back_to_ours(ms: FakeMicrosoft) -> None:
    ms.graph.rewrite_message_ids = True
    account, settings = await sign_in(ms)
    async with opened(account, settings) as provider:
        await provider.send(outgoing(), Checkpoint(ms))
    assert [t.message_id for t in ms.sent()] == [MID]
    assert any(e.method == "PATCH" for e in ms.requests())


async def test_big_message_split_and_exact_limit_attachment_uploaded(ms: FakeMicrosoft) -> None:
    account, settings = await sign_in(ms)
    mail = outgoing(attachments=(
        AttachmentIn("small.bin", "application/octet-stream", b"s" * 2_500_000),
        AttachmentIn("exact.bin", "application/octet-stream", b"e" * LIMIT),
    ))
    async with opened(account, settings) as provider:
        await provider.send(mail, Checkpoint(ms))
    [sent] = ms.sent()
    parts = {p.get_filename(): len(p.get_content()) for p in parse(sent.raw).iter_attachments()}
    assert parts == {"small.bin": 2_500_000, "exact.bin": LIMIT}
    paths = [e.path for e in ms.requests()]
    assert paths.count("/me/messages") == 1  # the draft, without the attachments
    assert sum(p.endswith("/attachments") for p in paths) == 1
    assert sum(p.endswith("/createUploadSession") for p in paths) == 1
    assert 413 not in [e.status for e in ms.requests()]


async def test_too_many_recipients_refused_before_any_request(ms: FakeMicrosoft) -> None:
    account, settings = await sign_in(ms)
    many = tuple(f"r{n}@example.net" for n in range(501))
    async with opened(account, settings) as provider:
        before = len(ms.requests())
        with pytest.raises(ProviderProtocolError, match="500"):
            await provider.send(outgoing(recipients=many), Checkpoint(ms))
    assert len(ms.requests()) == before


async def test_a_send_whose_answer_is_lost_is_not_sent_again(ms: FakeMicrosoft) -> None:
    account, settings = await sign_in(ms)
    ms.graph.lose_answer(1, lambda call: call.path.endswith("/send"))
    async with opened(account, settings) as provider:
        await provider.send(outgoing(), Checkpoint(ms))
    assert len(ms.sent()) == 1
    assert [e.path.endswith("/send") for e in ms.requests()].count(True) == 1


async def test_a_gateway_timeout_before_sending_retries_the_same_draft(ms: FakeMicrosoft) -> None:
    account, settings = await sign_in(ms)
    ms.graph.throttle(1, status=504, retry_after=None, when=lambda c: c.path.endswith("/send"))
    async with opened(account, settings) as provider:
        await provider.send(outgoing(), Checkpoint(ms))
    assert len(ms.sent()) == 1 and ms.messages(MAILBOX, "drafts") == []
    assert [e.path.endswith("/send") for e in ms.requests()].count(True) == 2


async def test_a_send_throttled_for_too_long_discards_the_draft(ms: FakeMicrosoft) -> None:
    account, settings = await sign_in(ms)
    ms.graph.throttle(20, retry_after=0.05, when=lambda c: c.path.endswith("/send"))
    async with opened(account, settings) as provider:
        with pytest.raises(TransientProviderError, match="throttling"):
            await provider.send(outgoing(), Checkpoint(ms))
    assert ms.sent() == [] and ms.messages(MAILBOX, "drafts") == []


async def test_only_the_mailbox_owner_may_be_the_sender(ms: FakeMicrosoft) -> None:
    account, settings = await sign_in(ms)
    async with opened(account, settings) as provider:
        with pytest.raises(ProviderProtocolError, match="ErrorSendAsDenied"):
            await provider.send(outgoing(sender="boss@contoso.test"), Checkpoint(ms))
    assert ms.sent() == [] and ms.messages(MAILBOX, "drafts") == []


async def test_a_lost_send_answer_while_sent_items_lag_sends_once_and_keeps_it(
    ms: FakeMicrosoft,
) -> None:
    """/send answers 202 before sending and the item reads as a draft until its
    copy lands: sending again would send twice, deleting it would lose it."""
    account, settings = await sign_in(ms)
    ms.graph.sent_items_lag = 0.5
    ms.graph.lose_answer(1, when=lambda c: c.path.endswith("/send"))
    async with opened(account, settings) as provider:
        await provider.send(outgoing(), Checkpoint(ms))
    assert len(ms.sent(MID)) == 1
    assert [e.path.endswith("/send") for e in ms.requests()].count(True) == 1
    assert not any(e.method == "DELETE" for e in ms.requests())
    assert ms.message_ids(MAILBOX, "sentitems") == [MID]


async def test_the_fake_lags_sent_items_behind_a_202(ms: FakeMicrosoft) -> None:
    account, settings = await sign_in(ms)
    ms.graph.sent_items_lag = 0.3
    async with opened(account, settings) as provider:
        await provider.send(outgoing(), Checkpoint(ms))
        assert len(ms.sent(MID)) == 1 and ms.message_ids(MAILBOX, "sentitems") == []
        assert await provider.find_sent(MID) is False
        await asyncio.sleep(0.4)
        assert await provider.find_sent(MID) is True
    assert ms.message_ids(MAILBOX, "sentitems") == [MID] and ms.messages(MAILBOX, "drafts") == []
