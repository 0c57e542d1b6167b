"""Who is calling, and how often: API keys, status-page sessions and rate limits.

Requests carry ``Authorization: Bearer tsk_...``. A key is checked against the
stored SHA-256 (:mod:`threadsync.core.host.apikeys`); a valid one is remembered for a few
seconds so that a busy client does not cost a database lookup per request
(revoking a key takes effect within ``CACHE_SECONDS``). The status page uses a
signed, HttpOnly cookie naming the admin key's public id instead, so the key
itself is sent once, at login.

Each key has a token bucket (``[http] rate_per_second`` refill, ``burst``
capacity); an empty bucket answers 429 with ``Retry-After``. Each client
address has one for keys that are not known (``auth_failures_per_second``,
``auth_failures_burst``): while it is empty, an unknown key is refused with 429
before it is looked up, so guessing keys costs the database nothing. The
buckets live in the database (:mod:`threadsync.core.host.ratelimits`), shared by
every API process on it.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import time

import anyio.to_thread
from starlette.requests import Request

from threadsync.core.host.apikeys import ApiKeys, Principal
from threadsync.core.host.ratelimits import RateLimits
from threadsync.plugins.http_api.problems import ApiProblem

CACHE_SECONDS = 5.0
SESSION_COOKIE = "threadsync_session"


#: How often a process drops idle buckets from the database.
PURGE_EVERY_SECONDS = 600.0


class RateLimiter:
    """The API's token buckets: per key, and per client address for unknown keys."""

    def __init__(
        self,
        limits: RateLimits,
        rate: float,
        burst: int,
        failure_rate: float = 1.0,
        failure_burst: int = 20,
    ) -> None:
        self.limits = limits
        self.rate, self.burst = rate, burst
        self.failure_rate, self.failure_burst = failure_rate, failure_burst
        self._purged = time.monotonic()

    async def take(self, key_id: str) -> float | None:
        """Take a token of a key; ``None`` when allowed, else seconds until one is free."""
        await self._maybe_purge()
        return await anyio.to_thread.run_sync(
            self.limits.take, f"key:{key_id}", self.rate, self.burst
        )

    async def failures_wait(self, address: str) -> float | None:
        """``None`` while ``address`` may still present unknown keys."""
        return await anyio.to_thread.run_sync(
            self.limits.wait, f"auth:{address}", self.failure_rate, self.failure_burst
        )

    async def failed(self, address: str) -> None:
        """``address`` presented an unknown key."""
        await anyio.to_thread.run_sync(
            self.limits.take, f"auth:{address}", self.failure_rate, self.failure_burst
        )

    async def _maybe_purge(self) -> None:
        now = time.monotonic()
        if now - self._purged < PURGE_EVERY_SECONDS:
            return
        self._purged = now
        idle = max(3600.0, self.burst / self.rate, self.failure_burst / self.failure_rate)
        await anyio.to_thread.run_sync(self.limits.purge, idle)


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

    def cached(self, presented: str) -> Principal | None:
        """The principal of a key checked in the last ``CACHE_SECONDS``, if any."""
        hit = self._cache.get(_digest(presented))
        return hit[0] if hit is not None and hit[1] > time.monotonic() else None

    async def key(self, presented: str) -> Principal | None:
        digest = _digest(presented)
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


def _digest(presented: str) -> str:
    return hashlib.sha256(presented.encode("utf-8", "replace")).hexdigest()


def bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


async def authenticate(request: Request, auth: Authenticator, limiter: RateLimiter) -> Principal:
    """The caller of an API route; 401 without a valid key, 429 over the rate
    (of the key, or of unknown keys from the client's address)."""
    presented = bearer(request)
    principal = auth.cached(presented) if presented else None
    if principal is None and presented:
        address = request.client.host if request.client else "unknown"
        wait = await limiter.failures_wait(address)
        if wait is not None:
            raise ApiProblem(
                429,
                "too many requests with unknown API keys from this address; retry later",
                code="rate_limited",
                headers={"Retry-After": str(max(1, math.ceil(wait)))},
            )
        principal = await auth.key(presented)
        if principal is None:
            await limiter.failed(address)
    if principal is None:
        raise ApiProblem(
            401,
            "a valid API key is needed: Authorization: Bearer tsk_...",
            code="unauthorized",
            headers={"WWW-Authenticate": 'Bearer realm="threadsync"'},
        )
    wait = await limiter.take(principal.key_id)
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
