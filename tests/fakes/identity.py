"""A stateful fake of the Microsoft identity platform (v2.0 endpoints).

What MSAL for Python talks to: the OpenID discovery document
``/{tenant}/v2.0/.well-known/openid-configuration``, ``/oauth2/v2.0/authorize``
(the browser's consent page: it redirects back with ``code`` and ``state``, or
``error=access_denied``), ``/oauth2/v2.0/token`` (authorization code with PKCE
and client secret, refresh token, device code) and ``/oauth2/v2.0/devicecode``.
Answers follow the documented JSON, including error bodies with ``error``,
``error_description`` (``AADSTSnnnnn: ...``), ``error_codes``, ``timestamp``,
``trace_id``, ``correlation_id``, ``error_uri`` and ``suberror`` (the error
response of
https://learn.microsoft.com/entra/identity-platform/v2-oauth2-auth-code-flow#error-response-1).

Tests act as the user through :meth:`FakeIdentity.browse` (open the consent URL
in a "browser"), :meth:`approve_device_code`, :meth:`revoke_consent` (what a user
or admin does in My Apps: refresh tokens die with AADSTS65001
``consent_required``, access tokens are refused by Graph at once) and
:meth:`expire_access_tokens`.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit

from tests.fakes.server import Call, Reply, Router

GRANTED = ("Mail.ReadWrite", "Mail.Send", "User.Read")
OIDC = ("openid", "profile", "offline_access", "email")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class FakeUser:
    email: str
    oid: str
    tid: str
    upn: str
    display_name: str
    proxy_addresses: list[str] = field(default_factory=list)


@dataclass
class FakeApp:
    client_id: str
    secret: str | None
    redirect_uris: list[str]
    public_client: bool = False


@dataclass
class Grant:
    user: FakeUser
    client_id: str
    scopes: tuple[str, ...]
    expires: float


def _oauth_error(status: int, error: str, code: int, text: str, **extra: Any) -> Reply:
    trace, correlation = str(uuid.uuid4()), str(uuid.uuid4())
    stamp = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime())
    return Reply.json(status, {
        "error": error,
        "error_description": f"AADSTS{code}: {text} Trace ID: {trace} Correlation ID: "
                             f"{correlation} Timestamp: {stamp}",
        "error_codes": [code],
        "timestamp": stamp,
        "trace_id": trace,
        "correlation_id": correlation,
        "error_uri": "https://login.microsoftonline.com/error?code=" + str(code),
        **extra,
    })


class FakeIdentity:
    """Users, app registrations, consents and tokens of one fake tenant."""

    def __init__(self, tenant_id: str | None = None) -> None:
        self.tenant_id = tenant_id or str(uuid.uuid4())
        self.lock = threading.RLock()
        self.base = ""
        self.users: dict[str, FakeUser] = {}
        self.apps: dict[str, FakeApp] = {}
        self.consents: set[tuple[str, str]] = set()
        self.codes: dict[str, dict[str, Any]] = {}
        self.refresh_tokens: dict[str, Grant] = {}
        self.access_tokens: dict[str, Grant] = {}
        self.device_codes: dict[str, dict[str, Any]] = {}
        self.token_lifetime = 3600
        #: Who is signed in at the "browser" (None: the login_hint's user).
        self.browser_account: str | None = None
        self.deny_next_consent = False
        self.token_requests: list[str] = []

    # ---- directory ---------------------------------------------------------------------

    def add_user(self, email: str, *, upn: str | None = None) -> FakeUser:
        with self.lock:
            user = FakeUser(
                email=email, oid=str(uuid.uuid4()), tid=self.tenant_id, upn=upn or email,
                display_name=email.split("@")[0].title(),
                proxy_addresses=[f"SMTP:{email}"],
            )
            self.users[email.lower()] = user
            return user

    def add_app(self, redirect_uris: list[str], *, public_client: bool = True) -> FakeApp:
        with self.lock:
            app = FakeApp(str(uuid.uuid4()), secrets.token_urlsafe(24), redirect_uris,
                          public_client)
            self.apps[app.client_id] = app
            return app

    def user(self, email: str) -> FakeUser:
        return self.users[email.lower()]

    # ---- what users and admins do ----------------------------------------------------------

    def revoke_consent(self, email: str) -> None:
        """The user removes the app's permissions: every token of theirs dies."""
        with self.lock:
            user = self.user(email)
            self.consents = {c for c in self.consents if c[1] != user.oid}

    def expire_access_tokens(self, email: str | None = None) -> None:
        with self.lock:
            for grant in self.access_tokens.values():
                if email is None or grant.user.email.lower() == email.lower():
                    grant.expires = 0

    def approve_device_code(self, user_code: str, email: str) -> None:
        with self.lock:
            for entry in self.device_codes.values():
                if entry["user_code"] == user_code:
                    entry["user"] = self.user(email)
                    self.consents.add((entry["client_id"], entry["user"].oid))
                    return
        raise KeyError(user_code)

    def token_of(self, email: str) -> str:
        """A current access token of ``email`` (for tests calling Graph directly)."""
        with self.lock:
            return next(t for t, g in reversed(self.access_tokens.items())
                        if g.user.email.lower() == email.lower() and g.expires > time.time())

    def graph_grant(self, token: str) -> Grant | None:
        """The grant behind a bearer token, if Graph should accept it now."""
        with self.lock:
            grant = self.access_tokens.get(token)
            if grant is None or grant.expires < time.time():
                return None
            if (grant.client_id, grant.user.oid) not in self.consents:
                return None
            return grant

    # ---- endpoints ------------------------------------------------------------------------

    def routes(self, router: Router) -> None:
        t = r"/([^/]+)"
        router.add("GET", t + r"/v2\.0/\.well-known/openid-configuration", self.discovery)
        router.add("GET", t + r"/oauth2/v2\.0/authorize", self.authorize)
        router.add("POST", t + r"/oauth2/v2\.0/token", self.token)
        router.add("POST", t + r"/oauth2/v2\.0/devicecode", self.devicecode)

    async def discovery(self, call: Call, tenant: str) -> Reply:
        root = f"{self.base}/{tenant}"
        generic = tenant in ("common", "organizations", "consumers")
        issuer_tenant = "{tenantid}" if generic else self.tenant_id
        return Reply.json(200, {
            "authorization_endpoint": f"{root}/oauth2/v2.0/authorize",
            "token_endpoint": f"{root}/oauth2/v2.0/token",
            "device_authorization_endpoint": f"{root}/oauth2/v2.0/devicecode",
            "issuer": f"{self.base}/{issuer_tenant}/v2.0",
            "jwks_uri": f"{root}/discovery/v2.0/keys",
            "response_modes_supported": ["query", "fragment", "form_post"],
            "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
            "scopes_supported": ["openid", "profile", "email", "offline_access"],
            "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt",
                                                      "client_secret_basic"],
            "tenant_region_scope": "EU",
        })

    def _redirect_ok(self, app: FakeApp, uri: str) -> bool:
        """Registered URIs match exactly, except the port of a loopback URI (RFC 8252)."""
        given = urlsplit(uri)
        for registered in app.redirect_uris:
            want = urlsplit(registered)
            if uri == registered:
                return True
            if (want.scheme, want.hostname, want.path or "/") == (
                given.scheme, given.hostname, given.path or "/"
            ) and want.hostname in ("localhost", "127.0.0.1"):
                return True
        return False

    async def authorize(self, call: Call, tenant: str) -> Reply:
        q = call.query
        with self.lock:
            app = self.apps.get(q.get("client_id", ""))
            if app is None:
                return Reply.text(400, "AADSTS700016: Application not found in the directory.")
            redirect = q.get("redirect_uri", "")
            if not self._redirect_ok(app, redirect):
                return Reply.text(400, "AADSTS50011: The redirect URI specified in the request "
                                       "does not match the redirect URIs configured.")
            if q.get("response_type") != "code":
                return Reply.text(400, "AADSTS900144: response_type must be code.")
            if q.get("code_challenge") and q.get("code_challenge_method") != "S256":
                return Reply.text(400, "AADSTS501491: Invalid code_challenge_method.")
            scopes = tuple(q.get("scope", "").split())
            if not set(GRANTED) <= set(scopes):
                return Reply.text(400, "AADSTS70011: The provided scope is not valid.")
            params: dict[str, str] = {"state": q.get("state", "")}
            email = self.browser_account or q.get("login_hint", "")
            user = self.users.get(email.lower())
            if self.deny_next_consent or user is None:
                self.deny_next_consent = False
                params.update(error="access_denied", error_description=(
                    "AADSTS65004: User declined to consent to access the app."))
            else:
                code = secrets.token_urlsafe(32)
                self.codes[code] = {
                    "client_id": app.client_id, "user": user, "redirect_uri": redirect,
                    "challenge": q.get("code_challenge"), "scopes": scopes,
                    "nonce": q.get("nonce"), "expires": time.time() + 600,
                }
                self.consents.add((app.client_id, user.oid))
                params.update(code=code, session_state=str(uuid.uuid4()))
        if q.get("response_mode") == "form_post":
            inputs = "".join(f'<input type="hidden" name="{html.escape(k)}" '
                             f'value="{html.escape(v)}"/>' for k, v in params.items())
            page = (f'<html><body onload="document.forms[0].submit()"><form method="POST" '
                    f'name="hiddenform" action="{html.escape(redirect)}">{inputs}</form>'
                    f"</body></html>")
            return Reply(200, page.encode(), {"content-type": "text/html; charset=utf-8"})
        sep = "&" if "?" in redirect else "?"
        return Reply(302, b"", {"location": redirect + sep + urlencode(params)})

    def _client(self, form: dict[str, str]) -> tuple[FakeApp | None, Reply | None]:
        app = self.apps.get(form.get("client_id", ""))
        if app is None:
            return None, _oauth_error(400, "unauthorized_client", 700016,
                                      "Application not found in the directory.")
        secret = form.get("client_secret")
        if secret is not None and secret != app.secret:
            return None, _oauth_error(401, "invalid_client", 7000215,
                                      "Invalid client secret provided.")
        if secret is None and not app.public_client:
            return None, _oauth_error(401, "invalid_client", 7000218, "The request body must "
                                      "contain the following parameter: 'client_assertion' "
                                      "or 'client_secret'.")
        return app, None

    async def token(self, call: Call, tenant: str) -> Reply:
        form = call.form()
        grant_type = form.get("grant_type", "")
        with self.lock:
            self.token_requests.append(grant_type)
            app, error = self._client(form)
            if error is not None or app is None:
                return error or Reply(500)
            if grant_type == "authorization_code":
                return self._by_code(app, form)
            if grant_type == "refresh_token":
                return self._by_refresh_token(app, form)
            if grant_type == "urn:ietf:params:oauth:grant-type:device_code":
                return self._by_device_code(app, form)
        return _oauth_error(400, "unsupported_grant_type", 70003, "The app requested an "
                            "unsupported grant type.")

    def _by_code(self, app: FakeApp, form: dict[str, str]) -> Reply:
        entry = self.codes.pop(form.get("code", ""), None)
        if entry is None or entry["expires"] < time.time():
            return _oauth_error(400, "invalid_grant", 54005,
                                "OAuth2 Authorization code was already redeemed or expired.")
        if entry["client_id"] != app.client_id or entry["redirect_uri"] != form.get(
            "redirect_uri"
        ):
            return _oauth_error(400, "invalid_grant", 50148, "The redirect_uri or client "
                                "does not match the authorization request.")
        if entry["challenge"]:
            verifier = form.get("code_verifier", "").encode()
            if b64url(hashlib.sha256(verifier).digest()) != entry["challenge"]:
                return _oauth_error(400, "invalid_grant", 501481,
                                    "The Code_Verifier does not match the code_challenge.")
        return self._issue(app, entry["user"], entry["scopes"], form, entry.get("nonce"))

    def _by_refresh_token(self, app: FakeApp, form: dict[str, str]) -> Reply:
        grant = self.refresh_tokens.get(form.get("refresh_token", ""))
        if grant is None or grant.client_id != app.client_id:
            return _oauth_error(400, "invalid_grant", 70008, "The provided authorization code "
                                "or refresh token has expired due to inactivity.")
        if (app.client_id, grant.user.oid) not in self.consents:
            return _oauth_error(
                400, "invalid_grant", 65001,
                "The user or administrator has not consented to use the application.",
                suberror="consent_required",
            )
        return self._issue(app, grant.user, grant.scopes, form, None)

    def _by_device_code(self, app: FakeApp, form: dict[str, str]) -> Reply:
        entry = self.device_codes.get(form.get("device_code", ""))
        if entry is None or entry["expires"] < time.time():
            return _oauth_error(400, "expired_token", 70020, "The provided value for the input "
                                "parameter 'device_code' is not valid.")
        if entry["user"] is None:
            return _oauth_error(400, "authorization_pending", 70016, "OAuth 2.0 device flow "
                                "error. Authorization is pending. Continue polling.")
        del self.device_codes[form["device_code"]]
        return self._issue(app, entry["user"], entry["scopes"], form, None)

    def _issue(self, app: FakeApp, user: FakeUser, scopes: tuple[str, ...],
               form: dict[str, str], nonce: str | None) -> Reply:
        granted = tuple(s for s in scopes if s not in ("offline_access",))
        now = int(time.time())
        access = "fake-at-" + secrets.token_urlsafe(32)
        self.access_tokens[access] = Grant(user, app.client_id, granted, now + self.token_lifetime)
        claims: dict[str, Any] = {
            "aud": app.client_id, "iss": f"{self.base}/{user.tid}/v2.0", "iat": now,
            "nbf": now, "exp": now + 3600, "name": user.display_name, "oid": user.oid,
            "preferred_username": user.upn, "sub": b64url(user.oid.encode()), "tid": user.tid,
            "ver": "2.0",
        }
        if nonce:
            claims["nonce"] = nonce
        header = b64url(json.dumps({"typ": "JWT", "alg": "RS256", "kid": "fake"}).encode())
        body: dict[str, Any] = {
            "token_type": "Bearer",
            "scope": " ".join(granted),
            "expires_in": self.token_lifetime,
            "ext_expires_in": self.token_lifetime,
            "access_token": access,
            "id_token": f"{header}.{b64url(json.dumps(claims).encode())}.{b64url(b'sig')}",
        }
        if "offline_access" in scopes:
            refresh = "fake-rt-" + secrets.token_urlsafe(32)
            self.refresh_tokens[refresh] = Grant(user, app.client_id, scopes, now + 86400 * 90)
            body["refresh_token"] = refresh
        if form.get("client_info") == "1":
            body["client_info"] = b64url(json.dumps({"uid": user.oid, "utid": user.tid}).encode())
        return Reply.json(200, body, **{"cache-control": "no-store"})

    async def devicecode(self, call: Call, tenant: str) -> Reply:
        form = call.form()
        with self.lock:
            app = self.apps.get(form.get("client_id", ""))
            if app is None:
                return _oauth_error(400, "unauthorized_client", 700016, "Application not found.")
            if not app.public_client:
                return _oauth_error(400, "invalid_client", 7000218, "The request body must "
                                    "contain 'client_assertion' or 'client_secret' (enable "
                                    "'Allow public client flows').")
            device_code = secrets.token_urlsafe(32)
            user_code = secrets.token_hex(4).upper()
            self.device_codes[device_code] = {
                "user_code": user_code, "client_id": app.client_id, "user": None,
                "scopes": tuple(form.get("scope", "").split()), "expires": time.time() + 900,
            }
        return Reply.json(200, {
            "user_code": user_code,
            "device_code": device_code,
            "verification_uri": "https://microsoft.com/devicelogin",
            "expires_in": 900,
            "interval": 1,
            "message": "To sign in, use a web browser to open the page "
                       f"https://microsoft.com/devicelogin and enter the code {user_code} "
                       "to authenticate.",
        })
