"""The provider contract (threadsync.testing) for ``outlook``, against the fake
Microsoft cloud, with a notification endpoint so that push is tested too."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from tests.fakes import FakeMicrosoft, ServerThread
from tests.fakes.server import Call, Reply
from tests.fakes.world import MAILBOX, sign_in
from tests.servers.tlscerts import TestCA
from threadsync.core.provider import Account, Provider
from threadsync.plugins.outlook import HUB, NotificationHub, OutlookProvider
from threadsync.testing import ContractMailbox, ProviderContract

pytest_plugins = ["tests.fakes.fixtures"]


class OutlookMailbox(ContractMailbox):
    """``ann@contoso.test`` in the fake; back doors through the fake's state."""

    pushes = True

    def __init__(self, ms: FakeMicrosoft, account: Account, settings: dict[str, Any]) -> None:
        self.ms, self.account, self.settings = ms, account, settings
        self.address = MAILBOX

    def provider(self) -> Provider:
        return OutlookProvider(self.account, self.settings)

    def provider_with_wrong_credentials(self) -> Provider | None:
        self.ms.identity.revoke_consent(MAILBOX)
        return OutlookProvider(self.account, self.settings)

    async def deliver(self, raw: bytes) -> None:
        self.ms.deliver(MAILBOX, raw)

    async def file_in_sent(self, raw: bytes) -> None:
        self.ms.file_in_sent(MAILBOX, raw)

    async def transmitted(self) -> list[bytes]:
        return [t.raw for t in self.ms.sent() if t.mailbox == MAILBOX]

    async def is_unread(self, message_id: str) -> bool | None:
        for msg in self.ms.messages(MAILBOX, "inbox"):
            if msg.internet_message_id == message_id:
                return not msg.is_read
        return None


@pytest.fixture
def hub_endpoint(test_ca: TestCA) -> Iterator[tuple[NotificationHub, ServerThread]]:
    hub = HUB

    async def app(call: Call) -> Reply:
        answer = hub.handle(call.body, call.query)
        return Reply(answer.status, answer.body.encode(), {"content-type": answer.content_type})

    server = ServerThread(app, test_ca).start()
    with hub.serving():
        yield hub, server
    server.stop()


class TestOutlookOnTheFakeCloud(ProviderContract):
    @pytest.fixture
    async def contract_mailbox(
        self, ms: FakeMicrosoft, hub_endpoint: tuple[NotificationHub, ServerThread]
    ) -> AsyncIterator[ContractMailbox]:
        _hub, server = hub_endpoint
        account, settings = await sign_in(ms, notification_url=f"{server.base}/notify",
                                          page_size=2)
        yield OutlookMailbox(ms, account, settings)
