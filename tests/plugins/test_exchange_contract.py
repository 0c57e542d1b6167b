"""The provider contract (threadsync.testing) for ``exchange``, against the fake
Exchange Server over HTTPS, with its pull subscription so that push is tested too."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.fakes.ews import FakeEws
from tests.fakes.ews_world import MAILBOX, SETTINGS, account
from tests.servers.tlscerts import TestCA
from threadsync.core.provider import Provider
from threadsync.plugins.exchange import ExchangeProvider
from threadsync.testing import ContractMailbox, ProviderContract

pytest_plugins = ["tests.fakes.ews_fixtures"]


class ExchangeMailbox(ContractMailbox):
    """``ann@contoso.test`` on the fake server; back doors through its state."""

    pushes = True

    def __init__(self, ews: FakeEws, ca: TestCA) -> None:
        self.ews, self.ca = ews, ca
        self.address = MAILBOX

    def provider(self) -> Provider:
        return ExchangeProvider(account(self.ews, self.ca), SETTINGS)

    def provider_with_wrong_credentials(self) -> Provider | None:
        return ExchangeProvider(account(self.ews, self.ca, password="not-the-password"),
                                SETTINGS)

    async def deliver(self, raw: bytes) -> None:
        self.ews.deliver(MAILBOX, raw)

    async def file_in_sent(self, raw: bytes) -> None:
        self.ews.file_in_sent(MAILBOX, raw)

    async def transmitted(self) -> list[bytes]:
        return [t.raw for t in self.ews.sent() if t.mailbox == MAILBOX]

    async def is_unread(self, message_id: str) -> bool | None:
        for item in self.ews.items(MAILBOX, "inbox"):
            if item.internet_message_id == message_id:
                return not item.is_read
        return None


class TestExchangeOnTheFakeServer(ProviderContract):
    @pytest.fixture
    async def contract_mailbox(self, ews: FakeEws, test_ca: TestCA
                               ) -> AsyncIterator[ContractMailbox]:
        yield ExchangeMailbox(ews, test_ca)


class TestExchangeWithNtlm(ProviderContract):
    """The same contract with NTLM, the default of on-premises Exchange."""

    @pytest.fixture
    async def contract_mailbox(self, ews: FakeEws, test_ca: TestCA
                               ) -> AsyncIterator[ContractMailbox]:
        mailbox = ExchangeMailbox(ews, test_ca)

        def provider(password: str | None = None) -> Provider:
            acct = account(ews, test_ca, auth="ntlm", username="CONTOSO\\ann",
                           **({"password": password} if password else {}))
            return ExchangeProvider(acct, SETTINGS)

        mailbox.provider = provider  # type: ignore[method-assign]
        mailbox.provider_with_wrong_credentials = (  # type: ignore[method-assign]
            lambda: provider("not-the-password"))
        yield mailbox
