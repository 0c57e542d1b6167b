"""``--auth oauth`` for hybrid Exchange: a delegated sign-in by device code with
MSAL against the fake Microsoft identity platform (the Outlook provider's sign-in
and refresh, asked for the EWS scope), then EWS with the bearer token against
the fake Exchange Server, which accepts only tokens carrying EWS.AccessAsUser.All."""

from __future__ import annotations

from typing import Any

import pytest

from tests.fakes import FakeMicrosoft
from tests.fakes.ews import FakeEws
from tests.fakes.ews_world import MAILBOX, SETTINGS
from tests.servers.tlscerts import TestCA
from threadsync.core.errors import AuthenticationFailed, ConfigError
from threadsync.core.provider import Folder
from threadsync.plugins.exchange import ExchangeProvider
from threadsync.testing import make_message

pytest_plugins = ["tests.fakes.fixtures", "tests.fakes.ews_fixtures"]


def oauth_settings(ms: FakeMicrosoft) -> dict[str, Any]:
    graph = ms.outlook_settings()
    return {**SETTINGS, "client_id": graph["client_id"], "tenant": graph["tenant"],
            "authority_host": graph["authority_host"], "identity_ca_file": graph["ca_file"],
            "sign_in_timeout_seconds": 20}


def oauth_options(ews: FakeEws, ca: TestCA) -> dict[str, Any]:
    return {"ews_url": ews.url, "auth": "oauth", "ca_file": str(ca.ca_file)}


async def test_device_code_sign_in_then_ews_with_the_bearer_token(
    ms: FakeMicrosoft, ews: FakeEws, test_ca: TestCA
) -> None:
    ews.store.identity = ms.identity
    settings = oauth_settings(ms)
    account = await ExchangeProvider.authorize(
        MAILBOX, oauth_options(ews, test_ca), {}, ms.device(MAILBOX), settings)
    assert set(account.secrets) == {"token_cache"} and "password" not in account.settings
    scopes = {s for g in ms.identity.access_tokens.values() for s in g.scopes}
    assert "https://127.0.0.1/EWS.AccessAsUser.All" in scopes
    provider = ExchangeProvider(account, settings)
    await provider.open()
    try:
        await provider.verify()
        inbox = Folder("inbox", "inbox")
        cursor = (await provider.changes(inbox, None)).cursor
        ews.deliver(MAILBOX, make_message("<oauth@x.test>", to=MAILBOX))
        batch = await provider.changes(inbox, cursor)
        assert [h.message_id for h in batch.headers] == ["<oauth@x.test>"]
        # The user withdraws consent: the token is refused, the connection needs reauth.
        ms.identity.revoke_consent(MAILBOX)
        with pytest.raises(AuthenticationFailed):
            await provider.changes(inbox, batch.cursor)
    finally:
        await provider.close()
    assert all(e.mailbox == MAILBOX for e in ews.log if e.status == 200)


async def test_a_graph_token_or_another_account_is_refused(
    ms: FakeMicrosoft, ews: FakeEws, test_ca: TestCA
) -> None:
    ews.store.identity = ms.identity
    ms.add_user("bob@contoso.test")
    with pytest.raises(AuthenticationFailed, match=r"bob@contoso\.test"):
        await ExchangeProvider.authorize(
            MAILBOX, oauth_options(ews, test_ca), {}, ms.device("bob@contoso.test"),
            oauth_settings(ms))
    with pytest.raises(ConfigError, match="client_id"):
        await ExchangeProvider.authorize(MAILBOX, oauth_options(ews, test_ca), {},
                                         ms.device(MAILBOX), SETTINGS)
    with pytest.raises(ConfigError, match="--ews-url"):
        ExchangeProvider.prepare(MAILBOX, {"auth": "oauth"}, {})
