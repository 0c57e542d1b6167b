"""Sign-ins finished by a browser redirect: the hosted half of OAuth consent.

Over HTTP nobody can wait while the user reads a consent page. So a connect (or
update-email) whose provider answers :meth:`~threadsync.core.provider.Provider.begin_consent`
is split in two:

1. :func:`begin` runs the same checks as connect (Labs on, no other address
   connected), asks the provider for the consent URL and stores a
   :class:`~threadsync.core.store.models.PendingSignIn`: the SHA-256 of the OAuth ``state``, and
   the provider's flow (PKCE verifier, nonce) encrypted with the vault (R11).
2. :func:`finish` is handed the redirect's parameters (``/oauth/callback``). It
   finds the sign-in by ``state``, takes it with a compare-and-set so that a
   replayed redirect does nothing, deletes the flow, lets the provider redeem
   the code and then connects exactly as the command line does, with the same
   checks repeated. The outcome (the connection, or the error's code and
   detail) stays on the sign-in for :func:`get` to report.

Because the sign-in lives in the database, the redirect may reach any process
of the deployment, and a restart between the two halves loses nothing.
Sign-ins finished (or expired) more than a day ago are deleted when new ones
begin.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, or_, select, update
from sqlalchemy.orm import Session

from threadsync.core.accounts import connections as accounts
from threadsync.core.errors import NotFound, Refused, ThreadsyncError
from threadsync.core.host.events import EventBuffer
from threadsync.core.kernel import Kernel
from threadsync.core.store.models import PendingSignIn, iso, utcnow

log = logging.getLogger(__name__)

CONNECT = "connect"
UPDATE_EMAIL = "update_email"
#: Finished and expired sign-ins are kept this long for the caller to read.
KEEP = timedelta(days=1)
#: Longest accepted ``state`` (MSAL's are 16-32 characters).
MAX_STATE = 512


def state_hash(state: str) -> str:
    return hashlib.sha256(state.encode("utf-8", "surrogatepass")).hexdigest()



def sign_in_json(row: PendingSignIn, now: datetime | None = None) -> dict[str, Any]:
    status = row.status
    if status in ("pending", "finishing") and row.expires_at <= (now or utcnow()):
        status = "expired"
    return {
        "id": row.id,
        "subaccount": row.subaccount_id,
        "user": row.user_id,
        "provider": row.provider,
        "email": row.email,
        "purpose": row.purpose,
        "state": status,
        "message": (
            f"To connect {row.email}, open this address in a browser, sign in as "
            f"{row.email} and accept: {row.consent_url}"
        ),
        "consent_url": row.consent_url if status == "pending" else None,
        "expires_at": iso(row.expires_at),
        "connection": row.connection,
        "error": row.error,
    }


async def begin(
    k: Kernel,
    subaccount: str,
    user: str,
    provider: str,
    email: str,
    options: Mapping[str, Any],
    redirect_uri: str,
    *,
    update: bool = False,
    credentials: Mapping[str, str] | None = None,
) -> dict[str, Any] | None:
    """Start a redirect sign-in; ``None`` when the provider signs in without one
    (then :func:`threadsync.core.accounts.connections.connect` with a ``notify`` is the way).

    ``credentials`` are secrets given with this request (a password): they are
    kept encrypted with the flow and given to the provider again when the
    redirect arrives."""
    email, cls = accounts.checked_request(k, subaccount, user, provider, email)
    await accounts.precheck(k, subaccount, user, provider, email, update=update)
    given = accounts.resolve_secrets(k, cls, options, credentials or {})
    request = await cls.begin_consent(
        email, options, given, k.provider_settings.get(cls.name, {}), redirect_uri
    )
    if request is None:
        return None
    if not request.state or len(request.state) > MAX_STATE:
        raise Refused(f"provider {provider!r} gave an unusable OAuth state")
    now = utcnow()
    row = PendingSignIn(
        id="si_" + secrets.token_urlsafe(16),
        subaccount_id=subaccount,
        user_id=user,
        provider=provider,
        email=email,
        purpose=UPDATE_EMAIL if update else CONNECT,
        options=dict(options),
        state_hash=state_hash(request.state),
        flow=k.vault.seal(
            {
                "flow": json.dumps(dict(request.flow)),
                "secrets": json.dumps(given),
            }
        ),
        status="pending",
        consent_url=request.url,
        created_at=now,
        expires_at=now + timedelta(seconds=request.expires_in),
    )

    def work(session: Session, _events: EventBuffer) -> dict[str, Any]:
        _prune(session, now)
        session.add(row)
        session.flush()
        return sign_in_json(row, now)

    return await k.unit_of_work(work)


def _prune(session: Session, now: datetime) -> None:
    session.execute(
        delete(PendingSignIn).where(
            or_(
                PendingSignIn.finished_at < now - KEEP,
                PendingSignIn.expires_at < now - KEEP,
            )
        )
    )


def get(k: Kernel, subaccount: str, sign_in_id: str) -> dict[str, Any]:
    """A sign-in of ``subaccount`` (another sub-account's is not found)."""

    def work(session: Session) -> dict[str, Any]:
        row = session.get(PendingSignIn, sign_in_id)
        if row is None or row.subaccount_id != subaccount:
            raise NotFound(f"sign-in {sign_in_id!r} not found")
        return sign_in_json(row)

    return k.store.call(work)


async def finish(k: Kernel, params: Mapping[str, str]) -> dict[str, Any]:
    """Finish the sign-in that the redirect's ``state`` names.

    Raises :class:`NotFound` when no sign-in waits for this ``state``,
    :class:`Refused` when it was used already or expired, and the connect's own
    errors (recorded on the sign-in too) when the sign-in fails."""
    state = str(params.get("state") or "")
    if not state or len(state) > MAX_STATE:
        raise NotFound("no sign-in is waiting for this redirect")
    digest = state_hash(state)

    def take(session: Session, _events: EventBuffer) -> tuple[PendingSignIn, dict[str, str]]:
        row = session.scalars(
            select(PendingSignIn).where(PendingSignIn.state_hash == digest)
        ).first()
        if row is None:
            raise NotFound("no sign-in is waiting for this redirect")
        now = utcnow()
        if row.status == "pending" and row.expires_at <= now:
            row.status, row.finished_at, row.flow = "expired", now, None
            row.error = {"code": Refused.code, "detail": "the sign-in expired; connect again"}
            return row, {}
        if row.status != "pending":
            return row, {}
        taken = session.execute(
            update(PendingSignIn)
            .where(PendingSignIn.id == row.id, PendingSignIn.status == "pending")
            .values(status="finishing", flow=None)
            .execution_options(synchronize_session=False)
        )
        if taken.rowcount != 1:  # type: ignore[attr-defined]
            return row, {}  # another request took it first
        return row, k.vault.open(row.flow)

    row, sealed = await k.unit_of_work(take)
    if not sealed:
        if row.status == "expired":
            raise Refused(f"the sign-in for {row.email} expired; connect again")
        raise Refused(f"the sign-in for {row.email} was already used ({row.status})")
    flow = json.loads(sealed["flow"])
    given = json.loads(sealed.get("secrets") or "{}")
    cls = k.provider_class(row.provider)
    settings = k.provider_settings.get(cls.name, {})
    with_account = accounts.update_email_with if row.purpose == UPDATE_EMAIL else (
        accounts.connect_with
    )
    try:
        connection = await with_account(
            k, row.subaccount_id, row.user_id, row.provider, row.email,
            lambda: cls.finish_consent(
                row.email, row.options, given, settings, flow, params
            ),
        )  # fmt: skip
    except ThreadsyncError as exc:
        await _record(k, row.id, "failed", error={"code": exc.code, "detail": str(exc)})
        raise
    except BaseException:
        await _record(
            k, row.id, "failed", error={"code": "internal", "detail": "the sign-in was interrupted"}
        )
        raise
    return await _record(k, row.id, "connected", connection=connection)


async def _record(
    k: Kernel,
    sign_in_id: str,
    status: str,
    *,
    connection: dict[str, Any] | None = None,
    error: dict[str, Any] | None = None,
) -> dict[str, Any]:
    def work(session: Session, _events: EventBuffer) -> dict[str, Any]:
        row = session.get(PendingSignIn, sign_in_id)
        if row is None:  # deleted meanwhile: report what happened anyway
            return {"id": sign_in_id, "state": status, "connection": connection, "error": error}
        row.status, row.connection, row.error = status, connection, error
        row.finished_at = utcnow()
        return sign_in_json(row)

    return await k.unit_of_work(work)
