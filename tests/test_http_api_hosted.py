"""Endpoints that outside services call: Graph change notifications (the Outlook
plugin's real NotificationHub behind ``/notifications/outlook``), the OAuth
redirect at ``/oauth/callback``, and a connect that needs the user's consent,
answered with the consent URL and finished through the callback."""

from __future__ import annotations

import dataclasses
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx

from tests.kernelfixtures import SUB, USER, World
from tests.test_http_api import connect_body, is_problem
from tests.test_http_api_support import (  # noqa: F401 (fixtures)
    Api,
    api_factory_fixture,
    api_fixture,
    http_settings,
    wait_for,
)
from threadsync.core.api import Threadsync
from threadsync.core.errors import AuthenticationFailed
from threadsync.core.hookspecs import hookimpl
from threadsync.core.host import apikeys
from threadsync.core.provider import Account, ConsentRequest, Provider
from threadsync.plugins.http_api.app import create_app
from threadsync.plugins.http_api.server import ThreadedServer
from threadsync.plugins.imap_smtp.provider import ImapSmtpProvider
from threadsync.plugins.outlook.notifications import HUB


class Target:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str | None]] = []

    def notified(self, subscription_id: str, lifecycle_event: str | None) -> None:
        self.calls.append((subscription_id, lifecycle_event))


async def test_graph_notifications(world: World) -> None:
    outlook = {"client_id": "00000000-0000-0000-0000-000000000001"}
    settings = dataclasses.replace(
        world.ts.settings, sections={**world.ts.settings.sections, "outlook": outlook}
    )
    ts = Threadsync.from_settings(settings, environ=world.env)
    server = ThreadedServer(create_app(ts, http_settings())[0], http_settings()).start()
    try:
        assert HUB.served  # Outlook connections of this process subscribe through it
        target = Target()
        HUB.register("sub-1", "the-client-state", target)
        with httpx.Client(base_url=server.url) as graph:
            started = time.monotonic()
            r = graph.post("/notifications/outlook", params={"validationToken": "tok+en 1"})
            assert (r.status_code, r.text) == (200, "tok+en 1")
            assert r.headers["content-type"].startswith("text/plain")
            assert r.headers["x-content-type-options"] == "nosniff"
            assert time.monotonic() - started < 10
            item = {"subscriptionId": "sub-1", "clientState": "the-client-state",
                    "changeType": "created", "resource": "me/messages/AAA"}  # fmt: skip
            forged = {**item, "clientState": "guessed"}
            started = time.monotonic()
            r = graph.post("/notifications/outlook", json={"value": [item, forged]})
            assert r.status_code == 202 and time.monotonic() - started < 3
            assert target.calls == [("sub-1", None)]  # the forged one is ignored
            lifecycle = {**item, "lifecycleEvent": "reauthorizationRequired"}
            reply = graph.post("/notifications/outlook", json={"value": [lifecycle]})
            assert reply.status_code == 202
            assert target.calls[-1] == ("sub-1", "reauthorizationRequired")
            assert graph.post("/notifications/outlook", content=b"nope").status_code == 400
            is_problem(graph.post("/notifications/gmail", json={}), 404)
            stray = graph.get("/oauth/callback", params={"state": "x", "code": "y"})
            assert stray.status_code == 404 and "text/html" in stray.headers["content-type"]
    finally:
        HUB.unregister("sub-1")
        server.stop()
        ts.close()


def test_no_graph_endpoint_where_outlook_is_not_configured(api: Api) -> None:
    with httpx.Client(base_url=api.url) as graph:
        r = graph.post("/notifications/outlook", params={"validationToken": "tok"})
        assert r.status_code == 404 and r.text != "tok"


class ConsentPlugin:
    """A provider whose sign-in a browser redirect finishes, like OAuth
    providers: ``begin_consent`` gives the consent URL, ``finish_consent``
    redeems the code the redirect brings back to ``/oauth/callback``."""

    def __init__(self) -> None:
        self.redirects: list[str] = []
        self.finished: list[tuple[dict[str, Any], dict[str, str]]] = []

    @hookimpl
    def register_providers(self, register: Callable[[type[Provider]], None]) -> None:
        plugin = self

        class Consenting(ImapSmtpProvider):
            name: ClassVar[str] = "consenting"

            @classmethod
            async def begin_consent(
                cls,
                email: str,
                options: Mapping[str, Any],
                credentials: Mapping[str, str],
                settings: Mapping[str, Any],
                redirect_uri: str,
            ) -> ConsentRequest | None:
                cls.prepare(email, options, credentials)  # bad options fail before consent
                plugin.redirects.append(redirect_uri)
                state = secrets.token_urlsafe(16)
                url = f"https://login.example.test/authorize?{urlencode({'state': state})}"
                return ConsentRequest(url=url, state=state, flow={"verifier": "v-" + state})

            @classmethod
            async def finish_consent(
                cls,
                email: str,
                options: Mapping[str, Any],
                credentials: Mapping[str, str],
                settings: Mapping[str, Any],
                flow: Mapping[str, Any],
                params: Mapping[str, str],
            ) -> Account:
                plugin.finished.append((dict(flow), dict(params)))
                if params.get("error"):
                    raise AuthenticationFailed(f"the sign-in for {email} was declined")
                if flow.get("verifier") != "v-" + params.get("state", ""):
                    raise AuthenticationFailed("the flow does not belong to this redirect")
                return cls.prepare(email, options, credentials)

        register(Consenting)


def _state(consent_url: str) -> str:
    return parse_qs(urlsplit(consent_url).query)["state"][0]


async def test_connect_with_consent_over_http(world: World) -> None:
    plugin = ConsentPlugin()
    ts = Threadsync.from_settings(world.ts.kernel.settings, plugins=[plugin], environ=world.env)
    http = http_settings()
    http_app, _ = create_app(ts, http)
    server = ThreadedServer(http_app, http).start()
    key = apikeys.create(ts.kernel.store, SUB)["key"]
    try:
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}) as c:
            body = connect_body(world, provider="consenting")
            r = c.post(f"/v1/subaccounts/{SUB}/users/{USER}/connection", json=body)
            assert r.status_code == 202, r.text
            pending = r.json()
            assert pending["state"] == "pending" and pending["purpose"] == "connect"
            consent = pending["consent_url"]
            assert consent.startswith("https://login.example.test/authorize?state=")
            assert consent in pending["message"]
            assert plugin.redirects == [server.url + "/oauth/callback"]
            assert r.headers["location"] == f"/v1/subaccounts/{SUB}/sign-ins/{pending['id']}"
            assert c.get(r.headers["location"]).json()["state"] == "pending"
            assert ts.status(SUB, USER)["connections"] == []
            # The flow and the request's password are kept encrypted.
            state = _state(consent)
            with ts.kernel.store.engine.connect() as db:
                stored = str(db.exec_driver_sql("SELECT * FROM sign_ins").all())
            assert "v-" + state not in stored and world.password not in stored
            # Another tenant's key does not see the sign-in.
            other = apikeys.create(ts.kernel.store, "other")["key"]
            with httpx.Client(base_url=server.url,
                              headers={"Authorization": f"Bearer {other}"}) as o:  # fmt: skip
                assert o.get(f"/v1/subaccounts/other/sign-ins/{pending['id']}").status_code == 404
                assert o.get(f"/v1/subaccounts/{SUB}/sign-ins/{pending['id']}").status_code == 404

            # A redirect with a state nobody issued finishes nothing.
            stray = c.get("/oauth/callback", params={"state": "guessed", "code": "x"})
            assert stray.status_code == 404 and "not connected" in stray.text
            # The browser comes back from the consent page (form_post), without a key.
            back = httpx.post(server.url + "/oauth/callback",
                              data={"state": state, "code": "one-time"})  # fmt: skip
            assert back.status_code == 200 and "Connected" in back.text
            assert world.email in back.text and back.headers["cache-control"] == "no-store"
            finished = c.get(r.headers["location"]).json()
            assert finished["state"] == "connected", finished
            assert finished["consent_url"] is None
            assert finished["connection"]["email"] == world.email
            assert world.password not in str(finished)
            assert plugin.finished == [({"verifier": "v-" + state},
                                        {"state": state, "code": "one-time"})]  # fmt: skip
            assert ts.status(SUB, USER)["connections"][0]["provider"] == "consenting"
            with ts.kernel.store.engine.connect() as db:
                flows = db.exec_driver_sql("SELECT flow FROM sign_ins").all()
            assert flows == [(None,)]  # the used flow is deleted

            # A replayed redirect is refused and changes nothing.
            again = c.get("/oauth/callback", params={"state": state, "code": "one-time"})
            assert again.status_code == 409 and "already used" in again.text
            assert len(plugin.finished) == 1
            assert [x["state"] for x in ts.status(SUB, USER)["connections"]] == ["connected"]
    finally:
        server.stop()
        ts.close()


async def test_declined_consent_connects_nothing(world: World) -> None:
    plugin = ConsentPlugin()
    ts = Threadsync.from_settings(world.ts.kernel.settings, plugins=[plugin], environ=world.env)
    http = http_settings()
    http_app, _ = create_app(ts, http)
    server = ThreadedServer(http_app, http).start()
    key = apikeys.create(ts.kernel.store, SUB)["key"]
    try:
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}) as c:
            url = f"/v1/subaccounts/{SUB}/users/{USER}/connection"
            r = c.post(url, json=connect_body(world, provider="consenting"))
            assert r.status_code == 202, r.text
            state = _state(r.json()["consent_url"])
            back = c.get("/oauth/callback", params={"state": state, "error": "access_denied"})
            assert back.status_code == 403 and "declined" in back.text
            failed = c.get(r.headers["location"]).json()
            assert failed["state"] == "failed" and failed["connection"] is None
            assert failed["error"]["code"] == "authentication_failed"
            assert ts.status(SUB, USER)["connections"] == []
            # Labs off: refused before any consent page is shown.
            ts.labs(SUB, enabled=False)
            refused = c.post(url, json=connect_body(world, provider="consenting"))
            assert refused.status_code == 403 and len(plugin.redirects) == 1
    finally:
        server.stop()
        ts.close()
