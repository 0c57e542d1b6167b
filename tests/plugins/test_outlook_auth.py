"""Outlook sign-in with MSAL against the fake identity platform: authorization
code with PKCE through the loopback listener, device code, the address check,
silent refresh, revoked consent, and configuration errors."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from tests.fakes import FakeMicrosoft
from tests.fakes.world import MAILBOX, opened, sign_in
from threadsync.core.errors import AuthenticationFailed, ConfigError, TransientProviderError
from threadsync.core.provider import Folder
from threadsync.plugins.outlook import OutlookProvider
from threadsync.plugins.outlook.config import OutlookConfig
from threadsync.plugins.outlook.loopback import RedirectListener

pytest_plugins = ["tests.fakes.fixtures"]
INBOX = Folder("inbox", "inbox")


async def test_browser_sign_in_uses_pkce_and_form_post_and_stores_a_token_cache(
    ms: FakeMicrosoft,
) -> None:
    shown: list[str] = []
    browser = ms.browser()

    def notify(text: str) -> None:
        shown.append(text)
        browser(text)

    settings = ms.provider_settings()
    try:
        account = await OutlookProvider.authorize(MAILBOX, {}, {}, notify, settings)
    finally:
        await ms.settle()
    url = httpx.URL(shown[0].split(": ", 1)[1])
    assert url.params["code_challenge_method"] == "S256" and url.params["code_challenge"]
    assert url.params["response_mode"] == "form_post"
    assert url.params["login_hint"] == MAILBOX
    scopes = set(url.params["scope"].split())
    assert {"Mail.ReadWrite", "Mail.Send", "User.Read", "offline_access"} <= scopes
    # The app's client secret comes with the provider settings on every start;
    # it is not stored per connection.
    assert set(account.secrets) == {"token_cache"}
    assert settings["client_secret"] not in str(account.secrets)
    assert account.settings["client_kind"] == "confidential"
    assert account.settings["home_account_id"].startswith(ms.identity.user(MAILBOX).oid)
    assert "fake-at-" not in str(account.settings)
    assert ms.identity.token_requests == ["authorization_code"]
    async with opened(account, settings) as provider:
        await provider.verify()
    assert ms.identity.token_requests == ["authorization_code"]  # the cached token served


async def test_device_code_sign_in_is_a_public_client_without_secret(ms: FakeMicrosoft) -> None:
    settings = ms.provider_settings()
    account = await OutlookProvider.authorize(
        MAILBOX, {"device_code": True}, {}, ms.device(MAILBOX), settings
    )
    assert account.settings["client_kind"] == "public"
    assert "client_secret" not in account.secrets
    ms.identity.expire_access_tokens()
    async with opened(account, settings) as provider:
        await provider.changes(INBOX, None)
    assert ms.identity.token_requests[-1] == "refresh_token"


async def test_device_code_refused_for_an_app_without_public_client_flows(
    ms: FakeMicrosoft,
) -> None:
    ms.app.public_client = False
    with pytest.raises(AuthenticationFailed, match="registration"):
        await OutlookProvider.authorize(MAILBOX, {"device_code": "true"}, {},
                                        ms.device(MAILBOX), ms.provider_settings())


async def test_consent_for_another_mailbox_is_refused(ms: FakeMicrosoft) -> None:
    ms.add_user("eve@contoso.test")
    settings = ms.provider_settings()
    with pytest.raises(AuthenticationFailed) as info:
        try:
            await OutlookProvider.authorize(MAILBOX, {}, {},
                                            ms.browser("eve@contoso.test"), settings)
        finally:
            await ms.settle()
    assert "eve@contoso.test" in str(info.value) and MAILBOX in str(info.value)


async def test_declined_consent_and_wrong_client_secret(ms: FakeMicrosoft) -> None:
    ms.identity.deny_next_consent = True
    with pytest.raises(AuthenticationFailed, match="declined"):
        await sign_in(ms)
    wrong = ms.provider_settings()
    wrong["client_secret"] = "not-the-secret"
    with pytest.raises(AuthenticationFailed, match="invalid_client") as info:
        try:
            await OutlookProvider.authorize(MAILBOX, {}, {}, ms.browser(), wrong)
        finally:
            await ms.settle()
    assert "not-the-secret" not in str(info.value)


async def test_expired_access_token_is_refreshed_and_the_new_cache_reported(
    ms: FakeMicrosoft,
) -> None:
    account, settings = await sign_in(ms)
    before = account.secrets["token_cache"]
    async with opened(account, settings) as provider:
        ms.identity.expire_access_tokens()
        await provider.changes(INBOX, None)  # 401 -> refresh -> retried
    assert ms.identity.token_requests == ["authorization_code", "refresh_token"]
    assert account.secrets_changed and account.secrets["token_cache"] != before
    assert [e.status for e in ms.requests()].count(401) == 1


async def test_revoked_consent_is_authentication_failed_without_secrets(
    ms: FakeMicrosoft,
) -> None:
    account, settings = await sign_in(ms)
    ms.identity.revoke_consent(MAILBOX)
    async with opened(account, settings) as provider:
        with pytest.raises(AuthenticationFailed) as info:
            await provider.changes(INBOX, None)
    text = str(info.value)
    assert "consent_required" in text and "AADSTS65001" in text and MAILBOX in text
    assert "fake-rt-" not in text and "fake-at-" not in text and ms.app.secret not in text


async def test_stored_sign_in_missing_or_unreadable(ms: FakeMicrosoft) -> None:
    account, settings = await sign_in(ms)
    account.secrets["token_cache"] = "{not json"
    with pytest.raises(AuthenticationFailed, match="unreadable"):
        async with opened(account, settings):
            pass
    del account.secrets["token_cache"]
    with pytest.raises(AuthenticationFailed, match="connect again"):
        async with opened(account, settings):
            pass


def test_config_errors_name_the_key(ms: FakeMicrosoft) -> None:
    with pytest.raises(ConfigError, match="client_id"):
        OutlookConfig.from_section({})
    with pytest.raises(ConfigError, match="graph_url"):
        OutlookConfig.from_section({"client_id": "x", "graph_url": "http://graph.example/v1.0"})
    with pytest.raises(ConfigError, match="subscription_minutes"):
        OutlookConfig.from_section({"client_id": "x", "subscription_minutes": 5000})
    with pytest.raises(ConfigError, match="max_concurrency"):
        OutlookConfig.from_section({"client_id": "x", "max_concurrency": 8})
    config = OutlookConfig.from_section({"client_id": "x", "client_secret_env": "NOPE"})
    with pytest.raises(ConfigError, match="NOPE"):
        config.client_secret({})
    assert config.authority == "https://login.microsoftonline.com/common"


async def test_hosted_redirect_uri_is_not_served_by_the_command_line(ms: FakeMicrosoft) -> None:
    settings = ms.provider_settings(redirect_uri="https://crm.example.org/outlook/callback")
    with pytest.raises(ConfigError, match="loopback"):
        await OutlookProvider.authorize(MAILBOX, {}, {}, ms.browser(), settings)


async def test_loopback_listener_takes_only_the_redirect() -> None:
    listener = await RedirectListener.start("http://127.0.0.1:0/callback")
    try:
        assert listener.redirect_uri.startswith("http://127.0.0.1:")
        async with httpx.AsyncClient() as browser:
            probe = await browser.get(listener.redirect_uri.replace("/callback", "/favicon.ico"))
            assert probe.status_code == 404
            done = await browser.post(listener.redirect_uri,
                                      data={"code": "c0de", "state": "s"})
            assert done.status_code == 200 and "complete" in done.text
        assert await listener.wait(1) == {"code": "c0de", "state": "s"}
    finally:
        await listener.close()
    waiting = await RedirectListener.start("http://localhost:0/")
    try:
        with pytest.raises(TransientProviderError, match="sign-in"):
            await waiting.wait(0.05)
    finally:
        await waiting.close()


async def test_sign_in_times_out_when_nobody_consents(ms: FakeMicrosoft) -> None:
    settings = ms.provider_settings(sign_in_timeout_seconds=0.2)

    def nobody(text: Any) -> None:
        del text

    with pytest.raises(TransientProviderError, match="nobody completed"):
        await asyncio.wait_for(
            OutlookProvider.authorize(MAILBOX, {}, {}, nobody, settings), 10
        )
