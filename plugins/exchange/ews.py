"""The EWS session of one Exchange connection: exchangelib in worker threads.

exchangelib is synchronous (requests underneath), so every call into it runs in
a worker thread of one bounded pool per process (:data:`WORKERS` threads,
:func:`run_in_worker`), never on the event loop. :class:`EwsSession` builds the
exchangelib ``Account`` for the connection (Basic, NTLM or an OAuth 2.0 bearer
token; delegate access or ApplicationImpersonation), trusts the CA file given at
connect for that host only (:class:`_CaAdapter`), and translates exchangelib's
errors into :mod:`threadsync.core.errors` at this boundary: 401 ->
``AuthenticationFailed``; ``ErrorServerBusy`` -> its ``BackOffMilliseconds``
waited out (asynchronously) up to ``max_retry_wait``, then a
``TransientProviderError`` carrying the wait; mailbox moves, an unavailable
store, timeouts and connection failures -> ``TransientProviderError``; anything
else -> ``ProviderProtocolError``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar
from urllib.parse import urlsplit

import requests
import requests.adapters
from exchangelib import (
    BASIC,
    DELEGATE,
    IMPERSONATION,
    NTLM,
    OAUTH2,
    Account,
    Build,
    Configuration,
    Credentials,
    FailFast,
    Version,
)
from exchangelib import errors as ews_errors
from exchangelib.credentials import OAuth2AuthorizationCodeCredentials
from exchangelib.folders import Inbox, Root, SentItems
from exchangelib.folders.base import BaseFolder
from exchangelib.properties import DistinguishedFolderId, Mailbox
from exchangelib.protocol import BaseProtocol

from threadsync.core.errors import (
    AuthenticationFailed,
    ProviderProtocolError,
    TransientProviderError,
)

log = logging.getLogger(__name__)

#: Worker threads for exchangelib calls, for all connections of this process.
WORKERS = 8
_POOL = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="threadsync-ews")
T = TypeVar("T")

#: The EWS schema version requested: Exchange 2016 and later, so that no request
#: is spent guessing the server's version.
SERVER_BUILD = Build(15, 1)
TRANSIENT_CODES = (
    ews_errors.ErrorMailboxMoveInProgress,
    ews_errors.ErrorMailboxStoreUnavailable,
    ews_errors.ErrorTimeoutExpired,
    ews_errors.ErrorInternalServerTransientError,
    ews_errors.ErrorConnectionFailed,
    ews_errors.ErrorTooManyObjectsOpened,
)


async def run_in_worker(fn: Callable[[], T]) -> T:
    """Run the blocking ``fn`` in the bounded EWS pool and await its result."""
    return await asyncio.get_running_loop().run_in_executor(_POOL, fn)


# ---- TLS: a CA file per host -----------------------------------------------------------

_CA_FILES: dict[str, str] = {}
_CA_LOCK = threading.Lock()


class _CaAdapter(requests.adapters.HTTPAdapter):
    """Verifies a host's certificate against the CA file given for that host at
    connect (``--ca-file``); every other host against the system's CAs."""

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any
             ) -> requests.Response:
        ca = _CA_FILES.get(_host_key(str(request.url)))
        if ca is not None and kwargs.get("verify") is not False:
            kwargs["verify"] = ca
        return super().send(request, *args, **kwargs)


def _host_key(url: str) -> str:
    parts = urlsplit(url)
    return f"{(parts.hostname or '').lower()}:{parts.port or 443}"


def trust_ca_for(url: str, ca_file: str | None) -> None:
    if ca_file is None:
        return
    with _CA_LOCK:
        _CA_FILES[_host_key(url)] = ca_file
        BaseProtocol.HTTP_ADAPTER_CLS = _CaAdapter


# ---- errors ----------------------------------------------------------------------------


class Throttled(TransientProviderError):
    """ErrorServerBusy: ``retry_after`` is the server's BackOffMilliseconds."""


def translate(exc: BaseException, what: str) -> Exception:
    """The threadsync error for an exchangelib / requests failure."""
    if isinstance(exc, ews_errors.UnauthorizedError | ews_errors.ErrorAccessDenied |
                  ews_errors.ErrorImpersonateUserDenied | ews_errors.ErrorNonExistentMailbox |
                  ews_errors.ErrorInvalidLicense):
        return AuthenticationFailed(f"Exchange refused the credentials for {what}: "
                                    f"{_first_line(exc)}")
    if isinstance(exc, ews_errors.ErrorServerBusy):
        back_off = exc.back_off if exc.back_off is not None else 5.0
        return Throttled(f"Exchange is busy ({what}); it asked to wait {back_off:.1f} s",
                         retry_after=back_off)
    if isinstance(exc, TRANSIENT_CODES):
        return TransientProviderError(f"Exchange cannot serve {what} right now: "
                                      f"{type(exc).__name__}")
    if isinstance(exc, requests.exceptions.SSLError):
        return ProviderProtocolError(f"the TLS certificate of the EWS server for {what} is not "
                                     f"trusted (see --ca-file): {_first_line(exc)}")
    if isinstance(exc, requests.exceptions.RequestException | ConnectionError | TimeoutError |
                  ews_errors.TransportError | ews_errors.RateLimitError):
        return TransientProviderError(f"the EWS server for {what} cannot be reached or did not "
                                      f"answer: {type(exc).__name__}")
    return ProviderProtocolError(f"EWS failed for {what}: {type(exc).__name__}: "
                                 f"{_first_line(exc)}")


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [""])[0][:300]


# ---- the session -----------------------------------------------------------------------


class EwsSession:
    """One connection's exchangelib ``Account`` and the folders it reads."""

    def __init__(
        self,
        email: str,
        ews_url: str,
        *,
        username: str | None,
        password: str | None,
        auth: str,
        token: str | None = None,
        impersonate: bool = False,
        ca_file: str | None = None,
        timeout: float = 60.0,
        max_retry_wait: float = 10.0,
        max_connections: int = 2,
    ) -> None:
        self.email = email
        self.ews_url = ews_url
        self.max_retry_wait = max_retry_wait
        #: How back-off waits are awaited (tests record them here).
        self.sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
        trust_ca_for(ews_url, ca_file)
        credentials: Any
        if auth == "oauth":
            credentials = OAuth2AuthorizationCodeCredentials(
                access_token={"access_token": token or "", "token_type": "Bearer",
                              "expires_in": 3600})
            auth_type = OAUTH2
        else:
            credentials = Credentials(username or email, password or "")
            auth_type = NTLM if auth == "ntlm" else BASIC
        config = Configuration(
            service_endpoint=ews_url,
            credentials=credentials,
            auth_type=auth_type,
            version=Version(build=SERVER_BUILD),
            retry_policy=FailFast(),
            max_connections=max_connections,
        )
        self.account = Account(
            primary_smtp_address=email,
            config=config,
            autodiscover=False,
            access_type=IMPERSONATION if impersonate else DELEGATE,
        )
        # Per connection (exchangelib reads it from the protocol, default 120 s).
        self.account.protocol.TIMEOUT = timeout
        root = Root(account=self.account)
        mailbox = Mailbox(email_address=email)
        self.folders: dict[str, BaseFolder] = {
            "inbox": Inbox(root=root, _distinguished_id=DistinguishedFolderId(
                id="inbox", mailbox=mailbox)),
            "sentitems": SentItems(root=root, _distinguished_id=DistinguishedFolderId(
                id="sentitems", mailbox=mailbox)),
        }

    async def call(self, what: str, fn: Callable[[], T]) -> T:
        """``fn()`` in a worker thread; ErrorServerBusy waited out asynchronously
        (BackOffMilliseconds) while the total stays within ``max_retry_wait``."""
        waited = 0.0
        while True:
            try:
                return await run_in_worker(lambda: self._guarded(what, fn))
            except Throttled as exc:
                wait = exc.retry_after or 1.0
                if waited + wait > self.max_retry_wait:
                    raise
                log.info("EWS throttled; waiting", extra={"mailbox": self.email,
                                                          "wait_seconds": wait})
                waited += wait
                await self.sleep(wait)

    def _guarded(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except (ews_errors.EWSError, requests.exceptions.RequestException, OSError) as exc:
            raise translate(exc, what) from exc

    def close(self) -> None:
        """Close the HTTP sessions of this account (in a worker thread)."""
        try:
            self.account.protocol.close()
        except (ews_errors.EWSError, requests.exceptions.RequestException, OSError):
            log.debug("closing the EWS sessions failed", extra={"mailbox": self.email})


__all__ = ["WORKERS", "EwsSession", "Throttled", "run_in_worker", "translate", "trust_ca_for"]
