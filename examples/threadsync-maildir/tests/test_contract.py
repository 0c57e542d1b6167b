"""The provider contract of threadsync, run against this plugin as installed.

The provider class is taken from threadsync's registry, so these tests also
prove that the entry point in ``pyproject.toml`` works: run them after
``pip install -e .`` (or a wheel) in an environment with threadsync.
"""

from __future__ import annotations

import asyncio
import mailbox
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from threadsync import Provider
from threadsync.testing import ContractMailbox, ProviderContract, registered_provider

ADDRESS = "ann@example.test"


def installed_provider() -> type[Provider]:
    return registered_provider("maildir", plugin="maildir")


class MaildirMailbox(ContractMailbox):
    """A fresh Maildir and pickup folder under ``root``."""

    address = ADDRESS

    def __init__(self, root: Path) -> None:
        self.maildir = root / "Maildir"
        self.pickup = root / "pickup"
        mailbox.Maildir(str(self.maildir), create=True).add_folder("Sent")
        mailbox.Maildir(str(self.pickup), create=True)

    def provider(self) -> Provider:
        cls = installed_provider()
        options = {"maildir": str(self.maildir), "pickup_dir": str(self.pickup)}
        return cls(cls.prepare(ADDRESS, options, {}))

    async def deliver(self, raw: bytes) -> None:
        await asyncio.to_thread(mailbox.Maildir(str(self.maildir)).add, raw)

    async def file_in_sent(self, raw: bytes) -> None:
        message = mailbox.MaildirMessage(raw)
        message.set_subdir("cur")
        message.set_flags("S")
        await asyncio.to_thread(mailbox.Maildir(str(self.maildir / ".Sent")).add, message)

    async def transmitted(self) -> list[bytes]:
        files = sorted((self.pickup / "new").iterdir(), key=lambda p: p.stat().st_mtime_ns)
        return [p.read_bytes() for p in files]

    async def is_unread(self, message_id: str) -> bool | None:
        box = mailbox.Maildir(str(self.maildir))
        for key in box.iterkeys():
            message = box[key]
            if str(message["Message-ID"]).strip() == message_id:
                return "S" not in message.get_flags()
        return None


def test_registered_through_the_entry_point() -> None:
    assert installed_provider().name == "maildir"


class TestMaildirProvider(ProviderContract):
    @pytest.fixture
    async def contract_mailbox(self, tmp_path: Path) -> AsyncIterator[ContractMailbox]:
        yield MaildirMailbox(tmp_path)
