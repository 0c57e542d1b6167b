"""The provider contract: a reusable pytest suite that any provider runs to prove it
honours :class:`threadsync.core.provider.Provider`, ours or a third party's.

A provider author describes one fresh mailbox and the back doors into it (put a
message in INBOX or Sent, see what left through the sending side) by
implementing :class:`ContractMailbox`, and gets every test of
:class:`ProviderContract` by subclassing it::

    import pytest
    from threadsync.testing import ContractMailbox, ProviderContract

    class MyMailbox(ContractMailbox):
        ...                                   # see the abstract methods

    class TestMyProvider(ProviderContract):
        @pytest.fixture
        async def contract_mailbox(self, tmp_path):
            yield MyMailbox(tmp_path)         # a new, empty mailbox per test

What it checks: a new cursor returns nothing and sits at the folder's end;
``changes`` returns only headers, in arrival order, honouring ``limit`` and
``more``, and leaves mail unread; ``fetch`` returns the whole message; ``send``
awaits the checkpoint before the message leaves and sends nothing when the
checkpoint fails; the copy in Sent is found by ``find_sent``; ``close`` is
idempotent; failures are :mod:`threadsync.core.errors` types; ``wait_for_changes`` times
out, ends early on ``wake`` and, for providers with push, reports new mail.

The tests are coroutines: run them with pytest-asyncio (``asyncio_mode =
"auto"``, or strict mode with the fixture above decorated by
``pytest_asyncio.fixture``). This module imports pytest and is meant for test
suites only.
"""

from __future__ import annotations

import asyncio
import email.policy
import email.utils
import json
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from email.message import EmailMessage
from typing import Any, ClassVar

import pytest
import pytest_asyncio

from threadsync.core.errors import AuthenticationFailed, ProviderError, StoreError
from threadsync.core.provider import ChangeBatch, Folder, HeaderSummary, OutgoingMail, Provider

__all__ = ["ContractMailbox", "ProviderContract", "make_message"]

#: Most calls of ``changes`` the suite makes to drain a folder.
_MAX_BATCHES = 50


def make_message(
    message_id: str,
    *,
    sender: str = "contact@example.org",
    to: str = "user@example.test",
    subject: str = "Contract test",
    body: str = "Hello from the provider contract.\n",
    in_reply_to: str | None = None,
    references: Sequence[str] = (),
    attachment: bytes | None = None,
) -> bytes:
    """A small, well-formed message with CRLF line endings."""
    msg = EmailMessage(policy=email.policy.SMTP)
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    msg["Date"] = email.utils.formatdate()
    msg["Message-ID"] = message_id
    if in_reply_to is not None:
        msg["In-Reply-To"] = in_reply_to
    if references:
        msg["References"] = " ".join(references)
    msg.set_content(body)
    if attachment is not None:
        msg.add_attachment(
            attachment, maintype="application", subtype="octet-stream", filename="data.bin"
        )
    return msg.as_bytes()


def _lf(raw: bytes) -> bytes:
    return raw.replace(b"\r\n", b"\n")


def _json_round_trip(cursor: dict[str, Any]) -> dict[str, Any]:
    again: dict[str, Any] = json.loads(json.dumps(cursor))
    assert again == cursor, "a cursor must survive a JSON round trip unchanged"
    return again


class ContractMailbox(ABC):
    """One fresh, empty mailbox of the provider under test, and back doors into it.

    ``address`` is the mailbox's e-mail address. The back doors work without the
    provider (a server's admin tool, the test server's API, the file system).
    """

    address: str
    #: True when :meth:`Provider.wait_for_changes` returns ``True`` soon after new
    #: INBOX mail arrives (IMAP IDLE, a push subscription); polled providers: False.
    pushes: ClassVar[bool] = False

    @abstractmethod
    def provider(self) -> Provider:
        """A new provider for this mailbox, not opened yet."""

    def provider_with_wrong_credentials(self) -> Provider | None:
        """A provider whose credentials the mailbox rejects; ``None`` when the
        provider has no credentials (that test is then skipped)."""
        return None

    @abstractmethod
    async def deliver(self, raw: bytes) -> None:
        """Put ``raw`` in the INBOX, as mail from someone else arrives."""

    @abstractmethod
    async def file_in_sent(self, raw: bytes) -> None:
        """Put ``raw`` in the Sent folder, as the user's own mail program does."""

    @abstractmethod
    async def transmitted(self) -> list[bytes]:
        """Every message that has left through this mailbox's sending side so far
        (what recipients received), oldest first."""

    async def is_unread(self, message_id: str) -> bool | None:
        """Whether the INBOX message with this Message-ID is still unread;
        ``None`` when that cannot be told (the check is then skipped)."""
        return None


class ProviderContract:
    """The suite. Subclass it in a test module and override :meth:`contract_mailbox`."""

    @pytest_asyncio.fixture
    async def contract_mailbox(self) -> AsyncIterator[ContractMailbox]:
        """Override: yield a new, empty :class:`ContractMailbox` per test."""
        raise NotImplementedError("override the contract_mailbox fixture")
        yield  # pragma: no cover

    @pytest_asyncio.fixture
    async def provider(self, contract_mailbox: ContractMailbox) -> AsyncIterator[Provider]:
        """An opened provider for the mailbox, closed after the test."""
        provider = contract_mailbox.provider()
        await provider.open()
        try:
            yield provider
        finally:
            await provider.close()

    # ---- helpers ------------------------------------------------------------------------

    @staticmethod
    async def folders_by_role(provider: Provider) -> dict[str, Folder]:
        return {f.role: f for f in await provider.folders()}

    @staticmethod
    async def drain(
        provider: Provider, folder: Folder, cursor: dict[str, Any], limit: int = 250
    ) -> tuple[list[HeaderSummary], dict[str, Any], list[ChangeBatch]]:
        """Every header after ``cursor``: (headers, last cursor, batches)."""
        headers: list[HeaderSummary] = []
        batches: list[ChangeBatch] = []
        for _ in range(_MAX_BATCHES):
            batch = await provider.changes(folder, cursor, limit)
            batches.append(batch)
            headers += batch.headers
            cursor = _json_round_trip(batch.cursor)
            if not batch.more:
                return headers, cursor, batches
        raise AssertionError(f"changes() still said more=True after {_MAX_BATCHES} calls")

    async def at_end(self, provider: Provider, folder: Folder) -> dict[str, Any]:
        return _json_round_trip((await provider.changes(folder, None)).cursor)

    # ---- session ------------------------------------------------------------------------

    async def test_open_verify_and_close_twice(self, contract_mailbox: ContractMailbox) -> None:
        provider = contract_mailbox.provider()
        await provider.open()
        await provider.verify()
        await provider.close()
        await provider.close()

    async def test_folders_are_one_inbox_and_one_sent(self, provider: Provider) -> None:
        folders = await provider.folders()
        assert sorted(f.role for f in folders) == ["inbox", "sent"]
        assert all(isinstance(f.name, str) and f.name for f in folders)
        assert await provider.folders() == folders

    async def test_wrong_credentials_raise_authentication_failed(
        self, contract_mailbox: ContractMailbox
    ) -> None:
        provider = contract_mailbox.provider_with_wrong_credentials()
        if provider is None:
            pytest.skip("this provider has no credentials to get wrong")
        try:
            with pytest.raises(AuthenticationFailed) as info:
                await provider.open()
                await provider.verify()
        finally:
            await provider.close()
        for secret in provider.account.secrets.values():
            assert secret not in str(info.value), "an error message shows a secret"

    # ---- reading ------------------------------------------------------------------------

    async def test_a_new_cursor_returns_nothing_and_sits_at_the_end(
        self, provider: Provider, contract_mailbox: ContractMailbox
    ) -> None:
        await contract_mailbox.deliver(make_message("<old-1@contract.test>"))
        await contract_mailbox.deliver(make_message("<old-2@contract.test>"))
        await contract_mailbox.file_in_sent(make_message("<old-3@contract.test>"))
        for folder in await provider.folders():
            batch = await provider.changes(folder, None)
            assert batch.headers == [], "history before the connection must not be read"
            headers, _, _ = await self.drain(provider, folder, _json_round_trip(batch.cursor))
            assert headers == []

    async def test_changes_return_new_headers_in_order(
        self, provider: Provider, contract_mailbox: ContractMailbox
    ) -> None:
        inbox = (await self.folders_by_role(provider))["inbox"]
        cursor = await self.at_end(provider, inbox)
        first, second, third = "<n1@contract.test>", "<n2@contract.test>", "<n3@contract.test>"
        await contract_mailbox.deliver(make_message(first, subject="One"))
        await contract_mailbox.deliver(
            make_message(second, subject="Re: One", in_reply_to=first, references=[first])
        )
        await contract_mailbox.deliver(
            make_message(third, subject="Re: One", in_reply_to=second, references=[first, second])
        )
        headers, cursor, _ = await self.drain(provider, inbox, cursor)
        assert [h.message_id for h in headers] == [first, second, third]
        assert headers[1].in_reply_to == (first,) and headers[2].references == (first, second)
        assert headers[0].subject == "One" and "contact@example.org" in (headers[0].sender or "")
        assert len({h.ref for h in headers}) == 3 and all(isinstance(h.ref, str) for h in headers)
        again, _, _ = await self.drain(provider, inbox, cursor)
        assert again == [], "a cursor must not return the same messages twice"

    async def test_limit_and_more(
        self, provider: Provider, contract_mailbox: ContractMailbox
    ) -> None:
        inbox = (await self.folders_by_role(provider))["inbox"]
        cursor = await self.at_end(provider, inbox)
        ids = [f"<limit-{i}@contract.test>" for i in range(5)]
        for mid in ids:
            await contract_mailbox.deliver(make_message(mid))
        headers, _, batches = await self.drain(provider, inbox, cursor, limit=2)
        assert all(len(b.headers) <= 2 for b in batches), "changes() ignored limit"
        assert [h.message_id for h in headers] == ids
        assert not batches[-1].more and all(b.more for b in batches[:-1])

    async def test_sent_folder_changes(
        self, provider: Provider, contract_mailbox: ContractMailbox
    ) -> None:
        sent = (await self.folders_by_role(provider))["sent"]
        cursor = await self.at_end(provider, sent)
        await contract_mailbox.file_in_sent(
            make_message("<mine@contract.test>", sender=contract_mailbox.address)
        )
        headers, _, _ = await self.drain(provider, sent, cursor)
        assert [h.message_id for h in headers] == ["<mine@contract.test>"]

    async def test_fetch_returns_the_whole_message_and_leaves_it_unread(
        self, provider: Provider, contract_mailbox: ContractMailbox
    ) -> None:
        inbox = (await self.folders_by_role(provider))["inbox"]
        cursor = await self.at_end(provider, inbox)
        raw = make_message(
            "<whole@contract.test>", body="body marker 4711\n", attachment=bytes(range(256)) * 64
        )
        await contract_mailbox.deliver(raw)
        (header,), _, _ = await self.drain(provider, inbox, cursor)
        fetched = await provider.fetch(inbox, header.ref)
        assert isinstance(fetched, bytes)
        # Servers may add trace headers on top and change line endings; nothing else.
        assert _lf(raw) in _lf(fetched), "fetch() did not return the whole message"
        assert await contract_mailbox.is_unread("<whole@contract.test>") in (True, None), (
            "reading marked the message as read"
        )

    async def test_failures_are_threadsync_errors(self, provider: Provider) -> None:
        inbox = (await self.folders_by_role(provider))["inbox"]
        with pytest.raises(ProviderError):
            await provider.fetch(inbox, "999999999")
        try:
            batch = await provider.changes(inbox, {"not": "a cursor of this provider"})
        except ProviderError:
            return
        assert batch.reset, "an unusable cursor must raise ProviderError or return reset=True"

    # ---- writing ------------------------------------------------------------------------

    def outgoing(self, contract_mailbox: ContractMailbox, message_id: str) -> OutgoingMail:
        raw = make_message(
            message_id,
            sender=contract_mailbox.address,
            to="contact@example.org",
            subject="Sent by the contract",
        )
        return OutgoingMail(
            raw=raw,
            message_id=message_id,
            sender=contract_mailbox.address,
            recipients=("contact@example.org",),
        )

    async def test_send_awaits_the_checkpoint_before_the_message_leaves(
        self, provider: Provider, contract_mailbox: ContractMailbox
    ) -> None:
        mail = self.outgoing(contract_mailbox, "<out-1@contract.test>")
        at_checkpoint: list[bool] = []

        async def checkpoint() -> None:
            left = [
                m for m in await contract_mailbox.transmitted() if mail.message_id.encode() in m
            ]
            at_checkpoint.append(bool(left))

        await provider.send(mail, checkpoint)
        assert at_checkpoint == [False], "the checkpoint must be awaited once, before sending"
        left = [m for m in await contract_mailbox.transmitted() if mail.message_id.encode() in m]
        assert len(left) == 1, "the message must have left exactly once"

    async def test_a_failing_checkpoint_sends_nothing(
        self, provider: Provider, contract_mailbox: ContractMailbox
    ) -> None:
        mail = self.outgoing(contract_mailbox, "<out-2@contract.test>")

        async def checkpoint() -> None:
            raise StoreError("the database is gone")

        with pytest.raises(StoreError):
            await provider.send(mail, checkpoint)
        await asyncio.sleep(0.2)
        assert not [
            m for m in await contract_mailbox.transmitted() if mail.message_id.encode() in m
        ]

    async def test_the_sent_copy_is_found_once(
        self, provider: Provider, contract_mailbox: ContractMailbox
    ) -> None:
        sent = (await self.folders_by_role(provider))["sent"]
        cursor = await self.at_end(provider, sent)
        mail = self.outgoing(contract_mailbox, "<out-3@contract.test>")

        async def checkpoint() -> None:
            return None

        assert await provider.find_sent(mail.message_id) is False
        await provider.send(mail, checkpoint)
        if not provider.files_sent_copy:
            await provider.store_sent_copy(mail)
        assert await provider.find_sent(mail.message_id) is True
        assert await provider.find_sent("<never-sent@contract.test>") is False
        headers, _, _ = await self.drain(provider, sent, cursor)
        assert [h.message_id for h in headers] == [mail.message_id]

    # ---- waiting ------------------------------------------------------------------------

    async def test_wait_for_changes_times_out(self, provider: Provider) -> None:
        for folder in await provider.folders():
            await provider.changes(folder, None)
        started = time.monotonic()
        assert await provider.wait_for_changes(0.5) is False
        assert time.monotonic() - started < 5

    async def test_wake_ends_a_wait_early(self, provider: Provider) -> None:
        for folder in await provider.folders():
            await provider.changes(folder, None)
        waiting = asyncio.ensure_future(provider.wait_for_changes(60))
        await asyncio.sleep(0.3)
        started = time.monotonic()
        provider.wake()
        assert await asyncio.wait_for(waiting, 10) is False
        assert time.monotonic() - started < 5

    async def test_wait_for_changes_reports_new_mail(
        self, provider: Provider, contract_mailbox: ContractMailbox
    ) -> None:
        if not contract_mailbox.pushes:
            pytest.skip("this provider is polled: it has no push to report new mail")
        inbox = (await self.folders_by_role(provider))["inbox"]
        await provider.changes(inbox, None)
        waiting = asyncio.ensure_future(provider.wait_for_changes(60))
        await asyncio.sleep(0.3)
        await contract_mailbox.deliver(make_message("<pushed@contract.test>"))
        assert await asyncio.wait_for(waiting, 15) is True
