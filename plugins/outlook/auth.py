"""Signing in to Microsoft with MSAL, and keeping each connection's tokens fresh.

Two ways in, both delegated (the user consents to ``Mail.ReadWrite Mail.Send
User.Read``; MSAL adds ``offline_access openid profile`` itself and refuses them
as input):

* the authorization-code flow with PKCE of a confidential client (the hosted
  CRM's app registration with a client secret), in two halves: begin (the
  consent URL) and finish (redeem the redirect's code). The command line
  receives the redirect on a loopback listener; the HTTP API at its
  ``/oauth/callback``, the flow kept encrypted in the database in between;
* the device-code flow of a public client, for machines without a browser.

Each connection keeps its own serialized MSAL token cache in ``Account.secrets``
(encrypted by the kernel). :class:`TokenSource` refreshes silently before calls
and reports a changed cache through ``Account.secrets_changed``. MSAL is
synchronous: every call runs in a worker thread. Revoked consent and dead refresh
tokens (``invalid_grant``, AADSTS65001 ``consent_required``) become
:class:`AuthenticationFailed`, which the kernel turns into ``needs_reauth``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msal
import requests

from threadsync.core.errors import (
    AuthenticationFailed,
    ConfigError,
    ProviderError,
    ProviderProtocolError,
    TransientProviderError,
)
from threadsync.core.provider import Account
from threadsync.plugins.outlook.config import OutlookConfig
from threadsync.plugins.outlook.loopback import RedirectListener

log = logging.getLogger(__name__)

#: Delegated permissions asked for; never the OIDC scopes (MSAL adds them).
SCOPES = ("Mail.ReadWrite", "Mail.Send", "User.Read")
#: What a shared or delegated mailbox (``/users/{address}``) needs besides.
SHARED_SCOPES = ("Mail.ReadWrite.Shared", "Mail.Send.Shared")


def scopes_for(shared: bool) -> tuple[str, ...]:
    """The delegated permissions a connection asks for."""
    return (*SCOPES, *SHARED_SCOPES) if shared else SCOPES
CONFIDENTIAL = "confidential"
PUBLIC = "public"
#: Refresh this long before the access token expires.
EXPIRY_MARGIN_SECONDS = 300.0
_RECONSENT = {"invalid_grant", "interaction_required", "consent_required", "login_required"}
_BAD_CLIENT = {"invalid_client", "unauthorized_client", "unsupported_grant_type"}
_BUSY = {"temporarily_unavailable", "server_error", "slow_down"}


@dataclass(frozen=True)
class SignIn:
    """What a completed sign-in gives: the token cache and who signed in."""

    cache: str
    home_account_id: str
    access_token: str
    claims: dict[str, Any]
    client_kind: str


def failure(result: Mapping[str, Any], mailbox: str) -> ProviderError:
    """The :mod:`threadsync.core.errors` exception for an MSAL error result (no secrets in it)."""
    error = str(result.get("error") or "unknown_error")
    codes = result.get("error_codes") or []
    detail = error
    if result.get("suberror"):
        detail += f"/{result['suberror']}"
    if codes:
        detail += f", AADSTS{codes[0]}"
    if error in _RECONSENT:
        return AuthenticationFailed(
            f"Microsoft no longer accepts the sign-in of {mailbox} ({detail}); "
            "connect again with the same address to sign in and consent"
        )
    if error in _BAD_CLIENT:
        return AuthenticationFailed(
            f"Microsoft refused this app's registration ({detail}): check [outlook] client_id "
            "and the client secret, then connect again"
        )
    if error == "access_denied":
        return AuthenticationFailed(f"the sign-in for {mailbox} was declined ({detail})")
    if error in _BUSY:
        return TransientProviderError(f"Microsoft sign-in is unavailable ({detail})")
    return ProviderProtocolError(f"Microsoft sign-in failed for {mailbox} ({detail})")


def http_session(config: OutlookConfig) -> Any:
    """The HTTP client MSAL uses; the caller closes it.

    ``verify`` is passed with every request, because requests lets the
    ``REQUESTS_CA_BUNDLE`` variable override a session-wide setting.
    """
    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(max_retries=1)
    session.mount("https://", adapter)
    session.request = functools.partial(  # type: ignore[method-assign]
        session.request, verify=config.verify, timeout=config.timeout_seconds
    )
    return session


def _build_app(
    config: OutlookConfig, kind: str, cache: Any, secret: str | None, session: Any
) -> Any:
    """An MSAL application (does authority discovery: network; call in a thread)."""
    common: dict[str, Any] = {
        "authority": config.authority,
        "token_cache": cache,
        "http_client": session,
        # A configured host is trusted as is; Microsoft's own need no discovery.
        "instance_discovery": False,
    }
    if kind == PUBLIC:
        return msal.PublicClientApplication(config.client_id, **common)
    if not secret:
        raise AuthenticationFailed(
            "no client secret is available for this Outlook connection; connect again"
        )
    return msal.ConfidentialClientApplication(
        config.client_id, client_credential=secret, **common
    )


async def _in_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run an MSAL call in a worker thread and translate its library errors."""
    try:
        return await asyncio.to_thread(fn, *args, **kwargs)
    except requests.RequestException as exc:
        raise TransientProviderError(
            f"cannot reach the Microsoft sign-in service: {exc.__class__.__name__}"
        ) from None
    except ValueError as exc:
        # MSAL raises ValueError for an unusable authority and for a redirect whose
        # state does not match the request.
        raise ProviderProtocolError(f"Microsoft sign-in failed: {_first_line(exc)}") from None
    except RuntimeError as exc:  # MSAL: nonce mismatch in the ID token
        raise AuthenticationFailed(f"the sign-in answer was not for this request: {exc}") from None


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0][:200] if str(exc) else exc.__class__.__name__


async def _app(
    config: OutlookConfig, kind: str, cache: Any, secret: str | None, session: Any
) -> Any:
    try:
        return await _in_thread(_build_app, config, kind, cache, secret, session)
    except ProviderProtocolError:
        raise ConfigError(
            f"cannot use the Microsoft authority {config.authority}: check [outlook] tenant "
            "and authority_host"
        ) from None


def _signed_in(app: Any, cache: Any, result: Mapping[str, Any], kind: str, mailbox: str) -> SignIn:
    if "access_token" not in result:
        raise failure(result, mailbox)
    claims = dict(result.get("id_token_claims") or {})
    accounts = app.get_accounts()
    if not accounts:
        raise ProviderProtocolError("Microsoft sign-in returned no account")
    oid = claims.get("oid")
    chosen = next((a for a in accounts if oid and a.get("local_account_id") == oid), accounts[0])
    return SignIn(
        cache=cache.serialize(),
        home_account_id=str(chosen["home_account_id"]),
        access_token=str(result["access_token"]),
        claims=claims,
        client_kind=kind,
    )


async def begin_browser_sign_in(
    config: OutlookConfig, email: str, secret: str, redirect_uri: str,
    scopes: Sequence[str] = SCOPES,
) -> dict[str, Any]:
    """The first half of the authorization-code flow with PKCE: MSAL's flow
    (``auth_uri`` to show the user, ``state``, the PKCE verifier and nonce), to be
    kept until the browser comes back to ``redirect_uri``."""
    session = http_session(config)
    try:
        app = await _app(config, CONFIDENTIAL, msal.SerializableTokenCache(), secret, session)
        flow = await _in_thread(
            app.initiate_auth_code_flow,
            list(scopes),
            redirect_uri=redirect_uri,
            login_hint=email,
            prompt="select_account",
            response_mode="form_post",
        )
    finally:
        session.close()
    return dict(flow)


async def finish_browser_sign_in(
    config: OutlookConfig,
    email: str,
    secret: str,
    flow: Mapping[str, Any],
    params: Mapping[str, str],
    scopes: Sequence[str] = SCOPES,
) -> SignIn:
    """The second half: redeem the redirect's ``code`` (MSAL checks ``state``,
    the PKCE verifier and the ID token's nonce against ``flow``)."""
    if "code" not in params and "error" not in params:
        raise ProviderProtocolError("the sign-in redirect carries neither a code nor an error")
    cache = msal.SerializableTokenCache()
    session = http_session(config)
    try:
        app = await _app(config, CONFIDENTIAL, cache, secret, session)
        result = await _in_thread(
            app.acquire_token_by_auth_code_flow, dict(flow), dict(params), list(scopes)
        )
        return _signed_in(app, cache, result, CONFIDENTIAL, email)
    finally:
        session.close()


async def sign_in_with_browser(
    config: OutlookConfig, email: str, secret: str, notify: Callable[[str], None],
    scopes: Sequence[str] = SCOPES,
) -> SignIn:
    """Authorization code with PKCE on the command line: print the consent URL and
    wait for the redirect on a loopback listener."""
    listener = await RedirectListener.start(config.redirect_uri)
    try:
        flow = await begin_browser_sign_in(config, email, secret, listener.redirect_uri,
                                           scopes)
        notify(
            f"To connect {email}, open this address in a browser, sign in as {email} "
            f"and accept: {flow['auth_uri']}"
        )
        params = await listener.wait(config.sign_in_timeout_seconds)
    finally:
        await listener.close()
    return await finish_browser_sign_in(config, email, secret, flow, params, scopes)


async def sign_in_with_device_code(
    config: OutlookConfig, email: str, notify: Callable[[str], None],
    scopes: Sequence[str] = SCOPES,
) -> SignIn:
    """Device code: show the code and the address to enter it, poll until done."""
    cache = msal.SerializableTokenCache()
    session = http_session(config)
    try:
        return await _device_flow(config, email, notify, cache, session, scopes)
    finally:
        session.close()


async def _device_flow(
    config: OutlookConfig, email: str, notify: Callable[[str], None], cache: Any, session: Any,
    scopes: Sequence[str] = SCOPES,
) -> SignIn:
    app = await _app(config, PUBLIC, cache, None, session)
    flow = await _in_thread(app.initiate_device_flow, list(scopes))
    if "user_code" not in flow:
        raise failure(flow, email)
    notify(f"To connect {email}: {flow.get('message') or flow['user_code']}")
    flow["expires_at"] = min(
        float(flow.get("expires_at", 0)), time.time() + config.sign_in_timeout_seconds
    )
    try:
        result = await _in_thread(app.acquire_token_by_device_flow, flow)
    finally:
        flow["expires_at"] = 0  # stops MSAL's polling thread if we were cancelled
    return _signed_in(app, cache, result, PUBLIC, email)


class TokenSource:
    """Access tokens for one stored connection, refreshed silently with MSAL.

    Callable as ``await tokens(force_refresh)``; concurrent callers share one
    refresh. A refreshed cache is written back to ``account.secrets`` and flagged
    with ``account.secrets_changed`` so that the kernel stores it encrypted.
    """

    def __init__(
        self,
        config: OutlookConfig,
        account: Account,
        secret: str | None,
        scopes: Sequence[str] | None = None,
    ) -> None:
        self._config = config
        #: Other scopes than Graph's (the Exchange provider asks for EWS's).
        self._scopes = tuple(scopes) if scopes else None
        self._account = account
        self._secret = secret
        self._kind = str(account.settings.get("client_kind") or CONFIDENTIAL)
        self._cache = msal.SerializableTokenCache()
        blob = account.secrets.get("token_cache")
        if not blob:
            raise AuthenticationFailed(
                f"no Microsoft sign-in is stored for {account.email}; connect again"
            )
        try:
            self._cache.deserialize(blob)
        except ValueError:
            raise AuthenticationFailed(
                f"the stored Microsoft sign-in of {account.email} is unreadable; connect again"
            ) from None
        self._app: Any = None
        self._session: Any = None
        self._lock = asyncio.Lock()
        self._token: str | None = None
        self._fresh_until = 0.0

    async def __call__(self, force_refresh: bool = False) -> str:
        if not force_refresh and self._token and time.monotonic() < self._fresh_until:
            return self._token
        async with self._lock:
            if not force_refresh and self._token and time.monotonic() < self._fresh_until:
                return self._token
            if self._app is None:
                if self._session is None:
                    self._session = http_session(self._config)
                self._app = await _in_thread(
                    _build_app, self._config, self._kind, self._cache, self._secret,
                    self._session,
                )
            result = await _in_thread(self._acquire, force_refresh)
            self._keep_cache()
            if "access_token" not in result:
                raise failure(result, self._account.email)
            self._token = str(result["access_token"])
            lifetime = float(result.get("expires_in") or 0)
            self._fresh_until = time.monotonic() + max(0.0, lifetime - EXPIRY_MARGIN_SECONDS)
            return self._token

    def close(self) -> None:
        """Release MSAL's HTTP connections."""
        session, self._session, self._app = self._session, None, None
        if session is not None:
            session.close()

    def _acquire(self, force_refresh: bool) -> dict[str, Any]:
        """In a worker thread: a token from the cache, or by the refresh token."""
        wanted = self._account.settings.get("home_account_id")
        accounts = self._app.get_accounts()
        chosen = next((a for a in accounts if a.get("home_account_id") == wanted), None)
        if chosen is None and len(accounts) == 1:
            chosen = accounts[0]
        if chosen is None:
            return {"error": "invalid_grant", "suberror": "no_account_in_cache"}
        result = self._app.acquire_token_silent_with_error(
            list(self._scopes or scopes_for(bool(self._account.settings.get("shared")))), chosen,
            force_refresh=force_refresh,
        )
        return dict(result) if result else {"error": "invalid_grant", "suberror": "no_token"}

    def _keep_cache(self) -> None:
        if self._cache.has_state_changed:
            self._account.secrets["token_cache"] = self._cache.serialize()
            self._account.secrets_changed = True
            self._cache.has_state_changed = False
