"""The kernel's half of redirect sign-ins (threadsync.core.accounts.consent), on SQLite and
PostgreSQL: a redirect is redeemed once even when two arrive together, an
expired sign-in connects nothing, and old sign-ins are deleted."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from urllib.parse import parse_qs, urlsplit

import pytest
from sqlalchemy import func, select, update

from tests.kernelfixtures import SUB, USER, World
from tests.test_http_api_hosted import ConsentPlugin
from threadsync.core.api import Threadsync
from threadsync.core.errors import NotFound, Refused
from threadsync.core.store.models import PendingSignIn, utcnow

pytestmark = pytest.mark.parametrize(
    "scenario_database_url", ["sqlite", "postgresql"], indirect=True
)
REDIRECT = "https://sync.example.test/oauth/callback"


def _options(world: World) -> dict[str, object]:
    return dict(world.options())


async def _begin(ts: Threadsync, world: World, user: str = USER) -> tuple[str, str]:
    pending = await ts.begin_sign_in(
        SUB, user, "consenting", email=world.email, options=_options(world),
        redirect_uri=REDIRECT,
    )  # fmt: skip
    assert pending is not None and pending["state"] == "pending"
    return pending["id"], parse_qs(urlsplit(pending["consent_url"]).query)["state"][0]


async def test_a_redirect_is_redeemed_once(world: World) -> None:
    plugin = ConsentPlugin()
    ts = Threadsync.from_settings(world.ts.kernel.settings, plugins=[plugin], environ=world.env)
    try:
        sign_in_id, state = await _begin(ts, world)
        params = {"state": state, "code": "one-time"}
        results = await asyncio.gather(
            ts.finish_sign_in(params), ts.finish_sign_in(params), return_exceptions=True
        )
        done = [r for r in results if isinstance(r, dict)]
        refused = [r for r in results if isinstance(r, Refused)]
        assert len(done) == 1 and len(refused) == 1, results
        assert len(plugin.finished) == 1  # the provider redeemed the code once
        assert ts.sign_in(SUB, sign_in_id)["state"] == "connected"
        assert [c["state"] for c in ts.status(SUB, USER)["connections"]] == ["connected"]
        with pytest.raises(NotFound):
            ts.sign_in("another-subaccount", sign_in_id)
        with pytest.raises(NotFound):
            await ts.finish_sign_in({"state": "never-issued", "code": "x"})
    finally:
        await ts.aclose()


async def test_an_expired_sign_in_connects_nothing_and_old_ones_go(world: World) -> None:
    plugin = ConsentPlugin()
    ts = Threadsync.from_settings(world.ts.kernel.settings, plugins=[plugin], environ=world.env)
    store = ts.kernel.store
    try:
        sign_in_id, state = await _begin(ts, world)
        store.call(lambda s: s.execute(
            update(PendingSignIn).values(expires_at=utcnow() - timedelta(seconds=1))
        ))  # fmt: skip
        assert ts.sign_in(SUB, sign_in_id)["state"] == "expired"
        with pytest.raises(Refused, match="expired"):
            await ts.finish_sign_in({"state": state, "code": "late"})
        assert plugin.finished == [] and ts.status(SUB, USER)["connections"] == []
        assert ts.sign_in(SUB, sign_in_id)["error"]["detail"].startswith("the sign-in expired")

        # A day after, the next sign-in that begins deletes it.
        store.call(lambda s: s.execute(
            update(PendingSignIn).values(expires_at=utcnow() - timedelta(days=2))
        ))  # fmt: skip
        await _begin(ts, world, user="u2")
        count = store.call(lambda s: s.scalar(select(func.count()).select_from(PendingSignIn)))
        assert count == 1
        with pytest.raises(NotFound):
            ts.sign_in(SUB, sign_in_id)
    finally:
        await ts.aclose()


async def test_begin_checks_like_connect(world: World) -> None:
    plugin = ConsentPlugin()
    ts = Threadsync.from_settings(world.ts.kernel.settings, plugins=[plugin], environ=world.env)
    try:
        await world.ts.connect(SUB, USER, "imap_smtp", email=world.email, options=_options(world))
        with pytest.raises(Refused, match="already has"):
            await _begin(ts, world)
        assert plugin.redirects == []  # refused before any consent URL was made
        # A provider without a redirect sign-in answers None: use connect.
        none = await ts.begin_sign_in(
            SUB, "u3", "imap_smtp", email=world.email, options=_options(world),
            redirect_uri=REDIRECT,
        )  # fmt: skip
        assert none is None
    finally:
        await ts.aclose()
