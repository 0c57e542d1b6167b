"""Who is calling, and how often: API keys, status-page sessions and rate limits.

Requests carry ``Authorization: Bearer tsk_...``. A key is checked against the
stored SHA-256 (:mod:`threadsync.core.host.apikeys`); a valid one is remembered for a few
seconds so that a busy client does not cost a database lookup per request
(revoking a key takes effect within ``CACHE_SECONDS``). The status page uses a
signed, HttpOnly cookie naming the admin key's public id instead, so the key
itself is sent once, at login.

Each key has a token bucket (``[http] rate_per_second`` refill, ``burst``
capacity); an empty bucket answers 429 with ``Retry-After``.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import time
from dataclasses import dataclass, field

import anyio.to_thread
from starlette.requests import Request

from threadsync.core.host.apikeys import ApiKeys, Principal
from threadsync.plugins.http_api.problems import ApiProblem

CACHE_SECONDS = 5.0
SESSION_COOKIE = "threadsync_session"


@dataclass
class TokenBucket:
    tokens: float
    updated: float


@dataclass
class RateLimiter:
    """Token buckets per key id; single event loop, so no locking."""

    rate: float
    burst: int
    buckets: dict[str, TokenBucket] = field(default_factory=dict)

    def take(self, key_id: str) -> float | None:
        """Take a token; ``None`` when allowed, else seconds until one is free."""
        now = time.monotonic()
        bucket = self.buckets.get(key_id)
        if bucket is None:
            bucket = self.buckets[key_id] = TokenBucket(float(self.burst), now)
        bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.updated) * self.rate)
        bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return None
        return (1.0 - bucket.tokens) / self.rate


class Authenticator:
    """Resolves keys and sessions to principals, with a short positive cache."""

    def __init__(self, keys: ApiKeys, session_hours: float) -> None:
        self.keys = keys
        self.session_seconds = session_hours * 3600
        self._cache: dict[str, tuple[Principal, float]] = {}
        #: Signs status-page cookies; new per process, so a restart logs everyone out.
        self._session_key = secrets.token_bytes(32)

    def forget(self) -> None:
        self._cache.clear()

    async def key(self, presented: str) -> Principal | None:
        digest = hashlib.sha256(presented.encode("utf-8", "replace")).hexdigest()
        hit = self._cache.get(digest)
        now = time.monotonic()
        if hit is not None and hit[1] > now:
            return hit[0]
        found = await anyio.to_thread.run_sync(self.keys.authenticate, presented)
        if found is not None:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[digest] = (found, now + CACHE_SECONDS)
        return found

    # ---- status-page sessions ----------------------------------------------------------

    def _sign(self, text: str) -> str:
        return hmac.new(self._session_key, text.encode(), hashlib.sha256).hexdigest()

    def session_cookie(self, principal: Principal) -> str:
        expires = int(time.time() + self.session_seconds)
        text = f"{principal.key_id}.{expires}"
        return f"{text}.{self._sign(text)}"

    async def session(self, cookie: str) -> Principal | None:
        key_id, _, rest = cookie.partition(".")
        expires, _, signature = rest.partition(".")
        if not expires.isdigit() or int(expires) < time.time():
            return None
        if not hmac.compare_digest(signature, self._sign(f"{key_id}.{expires}")):
            return None
        return await anyio.to_thread.run_sync(self.keys.principal_of, key_id)


def bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


async def authenticate(request: Request, auth: Authenticator, limiter: RateLimiter) -> Principal:
    """The caller of an API route; 401 without a valid key, 429 over the rate."""
    presented = bearer(request)
    principal = await auth.key(presented) if presented else None
    if principal is None:
        raise ApiProblem(
            401,
            "a valid API key is needed: Authorization: Bearer tsk_...",
            code="unauthorized",
            headers={"WWW-Authenticate": 'Bearer realm="threadsync"'},
        )
    wait = limiter.take(principal.key_id)
    if wait is not None:
        raise ApiProblem(
            429,
            "rate limit of this API key exceeded; retry later",
            code="rate_limited",
            headers={"Retry-After": str(max(1, math.ceil(wait)))},
        )
    return principal


def require_admin(principal: Principal) -> None:
    if not principal.admin:
        raise ApiProblem(403, "this needs an admin API key", code="forbidden")


def require_subaccount(principal: Principal, subaccount: str) -> None:
    """R10: another sub-account's things do not exist for this key (404, not 403)."""
    if not principal.may_see(subaccount):
        raise ApiProblem(404, f"sub-account {subaccount!r} not found", code="not_found")
