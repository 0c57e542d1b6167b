"""Connecting an Outlook mailbox over HTTP, against the test suite's fake
Microsoft cloud: the API answers 202 with the consent URL at once, the user
consents in a browser, and the sign-in becomes ``connected``."""

from __future__ import annotations

import httpx

from core import apikeys
from plugins.http_api.app import create_app
from plugins.http_api.server import ThreadedServer
from tests.fakes import FakeMicrosoft
from tests.fakes.world import MAILBOX, OutlookWorld
from tests.kernelfixtures import SUB, USER
from tests.test_http_api_support import http_settings, wait_for

pytest_plugins = ["tests.fakes.fixtures"]


async def test_outlook_connect_answers_the_consent_url(
    outlook_world: OutlookWorld, ms: FakeMicrosoft
) -> None:
    ts = outlook_world.ts
    http = http_settings()
    app, _ = create_app(ts, http)
    server = ThreadedServer(app, http).start()
    key = apikeys.create(ts.kernel.store, SUB)["key"]
    try:
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}) as c:
            url = f"/v1/subaccounts/{SUB}/users/{USER}/connection"
            r = c.post(url, json={"provider": "outlook", "email": MAILBOX})
            assert r.status_code == 202, r.text
            pending = r.json()
            assert pending["state"] == "pending" and MAILBOX in pending["message"]
            consent = pending["consent_url"]
            assert (
                consent.startswith(f"https://127.0.0.1:{ms.server.port}/")
                and "code_challenge" in consent
            )
            assert ms.app.secret and ms.app.secret not in r.text

            assert await ms.browse(consent) == 200  # the user signs in and accepts

            def finished() -> bool:
                return c.get(r.headers["location"]).json()["state"] != "pending"

            await wait_for(finished, 20, "the Outlook sign-in")
            done = c.get(r.headers["location"]).json()
            assert done["state"] == "connected", done
            assert (done["connection"]["provider"], done["connection"]["email"]) == (
                "outlook",
                MAILBOX,
            )
            status = c.get(f"/v1/subaccounts/{SUB}/connections").json()["connections"]
            assert [x["state"] for x in status] == ["connected"]
    finally:
        server.stop()
