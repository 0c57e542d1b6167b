"""Endpoints that outside services call: Graph change notifications (the Outlook
plugin's real NotificationHub behind ``/notifications/outlook``), the OAuth
redirect at ``/oauth/callback``, and a connect that needs the user's consent,
answered with the consent URL and finished through the callback."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import httpx

from core import apikeys
from core.api import Threadsync
from core.hookspecs import hookimpl
from core.provider import Account, Provider
from plugins.http_api.app import create_app
from plugins.http_api.server import ThreadedServer
from plugins.imap_smtp.provider import ImapSmtpProvider
from plugins.outlook.notifications import NotificationHub, NotificationReply
from tests.kernelfixtures import SUB, USER, World
from tests.test_http_api import connect_body, is_problem
from tests.test_http_api_support import (  # noqa: F401 (fixtures)
    Api,
    api_factory_fixture,
    api_fixture,
    http_settings,
    wait_for,
)


class Target:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str | None]] = []

    def notified(self, subscription_id: str, lifecycle_event: str | None) -> None:
        self.calls.append((subscription_id, lifecycle_event))


async def test_graph_notifications(api: Api, world: World) -> None:
    hub = world.ts.kernel.provider_settings["outlook"]["notification_hub"]
    assert isinstance(hub, NotificationHub)  # where OutlookProvider.open() looks for it
    target = Target()
    hub.register("sub-1", "the-client-state", target)
    with httpx.Client(base_url=api.url) as graph:
        started = time.monotonic()
        r = graph.post("/notifications/outlook", params={"validationToken": "tok+en 1"})
        assert (r.status_code, r.text) == (200, "tok+en 1")
        assert r.headers["content-type"].startswith("text/plain")
        assert time.monotonic() - started < 10
        item = {"subscriptionId": "sub-1", "clientState": "the-client-state",
                "changeType": "created", "resource": "me/messages/AAA"}  # fmt: skip
        forged = {**item, "clientState": "guessed"}
        started = time.monotonic()
        r = graph.post("/notifications/outlook", json={"value": [item, forged]})
        assert r.status_code == 202 and time.monotonic() - started < 3
        assert target.calls == [("sub-1", None)]  # the forged one is ignored
        lifecycle = {**item, "lifecycleEvent": "reauthorizationRequired"}
        assert graph.post("/notifications/outlook", json={"value": [lifecycle]}).status_code == 202
        assert target.calls[-1] == ("sub-1", "reauthorizationRequired")
        assert graph.post("/notifications/outlook", content=b"nope").status_code == 400
        is_problem(graph.post("/notifications/gmail", json={}), 404)
        is_problem(graph.get("/oauth/callback", params={"state": "x", "code": "y"}), 404)


class ConsentPlugin:
    """A provider that needs the user's consent, like OAuth providers: it shows a
    consent URL and waits for the redirect delivered to ``/oauth/callback``."""

    def __init__(self) -> None:
        self.waiting: dict[str, asyncio.Future[str]] = {}

    def callback(self, params: Mapping[str, str]) -> NotificationReply | None:
        future = self.waiting.pop(params.get("state", ""), None)
        if future is None:
            return None
        future.set_result(params.get("code", ""))
        return NotificationReply(200, "text/html", "<p>Signed in. You can close this window.</p>")

    @hookimpl
    def register_providers(self, register: Callable[[type[Provider]], None]) -> None:
        plugin = self

        class Consenting(ImapSmtpProvider):
            name: ClassVar[str] = "consenting"

            @classmethod
            async def authorize(
                cls,
                email: str,
                options: Mapping[str, Any],
                environ: Mapping[str, str],
                notify: Callable[[str], None],
                settings: Mapping[str, Any],
            ) -> Account:
                future = asyncio.get_running_loop().create_future()
                plugin.waiting["S1"] = future
                notify(f"To connect {email}, open https://login.example.test/authorize?state=S1 "
                       "and accept.")  # fmt: skip
                await asyncio.wait_for(future, 30)
                return cls.prepare(email, options, environ)

        register(Consenting)


async def test_connect_with_consent_over_http(world: World) -> None:
    plugin = ConsentPlugin()
    ts = Threadsync.from_settings(world.ts.kernel.settings, plugins=[plugin], environ=world.env)
    http = http_settings()
    http_app, ctx = create_app(ts, http)
    ctx.hosted.add_oauth_callback(plugin.callback)
    server = ThreadedServer(http_app, http).start()
    key = apikeys.create(ts.kernel.store, SUB)["key"]
    try:
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}) as c:
            body = connect_body(world, provider="consenting")
            r = c.post(f"/v1/subaccounts/{SUB}/users/{USER}/connection", json=body)
            assert r.status_code == 202, r.text
            pending = r.json()
            assert pending["state"] == "pending"
            assert pending["consent_url"] == "https://login.example.test/authorize?state=S1"
            assert r.headers["location"] == f"/v1/subaccounts/{SUB}/sign-ins/{pending['id']}"
            assert c.get(r.headers["location"]).json()["state"] == "pending"
            # Another tenant's key does not see the sign-in.
            other = apikeys.create(ts.kernel.store, "other")["key"]
            with httpx.Client(base_url=server.url,
                              headers={"Authorization": f"Bearer {other}"}) as o:  # fmt: skip
                assert o.get(f"/v1/subaccounts/other/sign-ins/{pending['id']}").status_code == 404

            # The browser comes back from the consent page.
            back = c.get("/oauth/callback", params={"state": "S1", "code": "one-time"})
            assert back.status_code == 200 and "Signed in" in back.text

            def done() -> bool:
                return c.get(r.headers["location"]).json()["state"] != "pending"

            await wait_for(done, 20, "the sign-in to finish")
            finished = c.get(r.headers["location"]).json()
            assert finished["state"] == "connected", finished
            assert finished["connection"]["email"] == world.email
            assert world.password not in str(finished)
            assert ts.status(SUB, USER)["connections"][0]["provider"] == "consenting"
    finally:
        server.stop()
        ts.close()
