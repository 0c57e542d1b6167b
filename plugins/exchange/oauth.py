"""OAuth 2.0 for Exchange in hybrid deployments (``--auth oauth``).

Exchange Server with Hybrid Modern Authentication accepts Microsoft Entra ID
access tokens for EWS. The sign-in is delegated, by device code, and reuses the
Outlook provider's MSAL sign-in and silent refresh
(:mod:`threadsync.plugins.outlook.auth`) with the EWS scope instead of Graph's:
``https://<EWS host>/EWS.AccessAsUser.All`` (or ``oauth_scope`` from
``[exchange]``). The app registration is named in ``[exchange]`` as for
Outlook: ``client_id``, ``tenant``, ``authority_host`` and ``identity_ca_file``
(a CA for the identity platform's certificate, rarely needed). The connection
keeps its MSAL token cache encrypted in ``Account.secrets["token_cache"]``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

from threadsync.core.errors import AuthenticationFailed, ConfigError
from threadsync.core.provider import Account
from threadsync.plugins.outlook.auth import TokenSource, sign_in_with_device_code
from threadsync.plugins.outlook.config import OutlookConfig

EWS_SCOPE = "EWS.AccessAsUser.All"
_IDENTITY_KEYS = ("client_id", "tenant", "authority_host", "sign_in_timeout_seconds")


def identity_config(settings: Mapping[str, Any]) -> OutlookConfig:
    """The Microsoft identity settings of ``[exchange]``, checked like ``[outlook]``'s."""
    section = {k: settings[k] for k in _IDENTITY_KEYS if k in settings}
    if settings.get("identity_ca_file"):
        section["ca_file"] = settings["identity_ca_file"]
    if "client_id" not in section:
        raise ConfigError("--auth oauth needs [exchange] client_id: the Application (client) "
                          "ID of an app registration allowed EWS.AccessAsUser.All")
    return OutlookConfig.from_section(section)


def ews_scope(settings: Mapping[str, Any], ews_url: str) -> str:
    """The delegated scope asked for: ``oauth_scope``, or the EWS host's."""
    explicit = settings.get("oauth_scope")
    if explicit:
        return str(explicit)
    return f"https://{urlsplit(ews_url).hostname}/{EWS_SCOPE}"


async def sign_in(account: Account, settings: Mapping[str, Any],
                  notify: Callable[[str], None]) -> Account:
    """Sign the user in by device code; the account gains the MSAL token cache.
    The signed-in account must be the mailbox's."""
    config = identity_config(settings)
    scope = ews_scope(settings, str(account.settings["ews_url"]))
    signed = await sign_in_with_device_code(config, account.email, notify, scopes=(scope,))
    owned = {str(signed.claims.get(c) or "").lower() for c in ("preferred_username", "email",
                                                              "upn")}
    if account.email.lower() not in owned:
        who = signed.claims.get("preferred_username") or "another account"
        raise AuthenticationFailed(f"the Microsoft account that signed in is {who}, not "
                                   f"{account.email}: sign in with the mailbox's account")
    account.settings.update(client_kind=signed.client_kind,
                            home_account_id=signed.home_account_id)
    account.secrets["token_cache"] = signed.cache
    return account


def token_source(account: Account, settings: Mapping[str, Any]) -> TokenSource:
    """Silent refresh of this connection's EWS access token."""
    return TokenSource(identity_config(settings), account, None,
                       scopes=(ews_scope(settings, str(account.settings["ews_url"])),))


__all__ = ["EWS_SCOPE", "ews_scope", "identity_config", "sign_in", "token_source"]
