"""Connecting an Outlook mailbox over HTTP with the hosted consent flow, against
the test suite's fake Microsoft cloud and the real MSAL: the API answers 202
with the consent URL, whose redirect is the API's own ``/oauth/callback``; the
user consents in a browser, Microsoft posts the code there (``form_post``) and
the connection is made before the page answers."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from tests.daemonproc import free_port, start, terminate, wait_ready
from tests.fakes import FakeMicrosoft
from tests.fakes.world import MAILBOX, OutlookWorld
from tests.kernelfixtures import SUB, USER
from tests.test_http_api_support import http_settings, wait_for
from threadsync.core.api import Threadsync
from threadsync.core.config import from_mapping
from threadsync.core.errors import ConfigError
from threadsync.core.host import apikeys
from threadsync.core.outbox.compose import Draft
from threadsync.plugins.http_api.app import create_app
from threadsync.plugins.http_api.server import ThreadedServer
from threadsync.plugins.http_api.settings import http_settings as http_settings_of

pytest_plugins = ["tests.fakes.fixtures"]

OTHER_MAILBOX = "bob@contoso.test"


@contextmanager
def api(ts: Threadsync, **over: Any) -> Iterator[tuple[ThreadedServer, httpx.Client]]:
    http = http_settings(**over)
    app, _ = create_app(ts, http)
    server = ThreadedServer(app, http).start()
    key = apikeys.create(ts.kernel.store, SUB)["key"]
    try:
        with httpx.Client(
            base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=30
        ) as client:
            yield server, client
    finally:
        server.stop()


def connection_url(user: str = USER) -> str:
    return f"/v1/subaccounts/{SUB}/users/{user}/connection"


@pytest.mark.parametrize("scenario_database_url", ["sqlite", "postgresql"], indirect=True)
async def test_outlook_connects_through_the_hosted_callback(
    outlook_world: OutlookWorld, ms: FakeMicrosoft
) -> None:
    ts = outlook_world.ts
    with api(ts) as (server, c):
        r = c.post(connection_url(), json={"provider": "outlook", "email": MAILBOX})
        assert r.status_code == 202, r.text
        pending = r.json()
        assert (pending["state"], pending["provider"], pending["email"]) == (
            "pending", "outlook", MAILBOX,
        )  # fmt: skip
        consent = pending["consent_url"]
        query = parse_qs(urlsplit(consent).query)
        assert consent.startswith(f"https://127.0.0.1:{ms.server.port}/")
        assert query["redirect_uri"] == [server.url + "/oauth/callback"]
        assert query["response_mode"] == ["form_post"]
        assert query["code_challenge_method"] == ["S256"]
        assert ms.app.secret and ms.app.secret not in r.text
        # Nothing is connected and no listener waits in this process: the sign-in
        # is a row in the database until the browser comes back.
        assert ts.status(SUB, USER)["connections"] == []

        answer = await ms.consent(consent)  # the user signs in and accepts
        assert not isinstance(answer, int)
        target, fields, method = answer
        assert (target, method) == (server.url + "/oauth/callback", "POST")
        back = httpx.post(target, data=fields, timeout=30)  # the browser, without a key
        assert back.status_code == 200, back.text
        assert "Connected" in back.text and MAILBOX in back.text
        assert fields["code"] not in back.text

        done = c.get(r.headers["location"]).json()
        assert done["state"] == "connected", done
        assert (done["connection"]["provider"], done["connection"]["email"]) == (
            "outlook", MAILBOX,
        )  # fmt: skip
        status = c.get(f"/v1/subaccounts/{SUB}/connections").json()["connections"]
        assert [x["state"] for x in status] == ["connected"]

        # The redirect replayed (browser back button, an attacker with the code):
        # refused, and the one-time code is not redeemed again.
        redeemed = len(ms.identity.codes)
        again = httpx.post(target, data=fields, timeout=30)
        assert again.status_code == 409 and "already used" in again.text
        assert len(ms.identity.codes) == redeemed

    # The connection works: a message from the CRM goes out through the mailbox.
    sent = await ts.send(SUB, USER, Draft(to=["carol@fabrikam.test"], subject="Offer",
                                          text="Hello from the CRM"))  # fmt: skip
    assert (sent["channel"], sent["synced"], sent["status"]) == ("mailbox", True, "sent"), sent


@pytest.mark.parametrize("scenario_database_url", ["sqlite", "postgresql"], indirect=True)
async def test_the_sign_in_survives_a_restart(
    outlook_world: OutlookWorld, ms: FakeMicrosoft
) -> None:
    """The consent URL is issued by one API process; the browser's redirect is
    received by another (a restart, or a second replica behind the same URL)."""
    ts = outlook_world.ts
    public = "http://127.0.0.1:9/threadsync"  # what the operator's proxy serves
    ms.app.redirect_uris.append(public + "/oauth/callback")  # as registered with Microsoft
    with api(ts, public_url=public) as (_, c):
        r = c.post(connection_url(), json={"provider": "outlook", "email": MAILBOX})
        assert r.status_code == 202, r.text
        location = r.headers["location"]
        consent = r.json()["consent_url"]
    assert parse_qs(urlsplit(consent).query)["redirect_uri"] == [public + "/oauth/callback"]
    answer = await ms.consent(consent)
    assert not isinstance(answer, int)
    _, fields, _ = answer

    fresh = Threadsync.from_settings(ts.kernel.settings, environ=ms.environ())
    try:
        with api(fresh) as (server, c):
            back = httpx.post(server.url + "/oauth/callback", data=fields, timeout=30)
            assert back.status_code == 200, back.text
            assert c.get(location).json()["state"] == "connected"
        assert [x["email"] for x in fresh.status(SUB, USER)["connections"]] == [MAILBOX]
    finally:
        await fresh.aclose()


async def test_wrong_account_and_declined_consent(
    outlook_world: OutlookWorld, ms: FakeMicrosoft
) -> None:
    ts = outlook_world.ts
    ms.add_user(OTHER_MAILBOX)
    with api(ts) as (_, c):
        # Someone else is signed in at the browser: refused, nothing connected.
        r = c.post(connection_url(), json={"provider": "outlook", "email": MAILBOX})
        assert r.status_code == 202, r.text
        ms.identity.browser_account = OTHER_MAILBOX
        assert await ms.browse(r.json()["consent_url"]) == 403
        failed = c.get(r.headers["location"]).json()
        assert failed["state"] == "failed" and failed["error"]["code"] == "authentication_failed"
        assert OTHER_MAILBOX in failed["error"]["detail"]
        assert ts.status(SUB, USER)["connections"] == []

        # The user declines on the consent page.
        ms.identity.browser_account = None
        ms.identity.deny_next_consent = True
        r = c.post(connection_url(), json={"provider": "outlook", "email": MAILBOX})
        assert r.status_code == 202, r.text
        assert await ms.browse(r.json()["consent_url"]) == 403
        declined = c.get(r.headers["location"]).json()
        assert declined["state"] == "failed" and "declined" in declined["error"]["detail"]

        # Then consents: connected.
        r = c.post(connection_url(), json={"provider": "outlook", "email": MAILBOX})
        assert await ms.browse(r.json()["consent_url"]) == 200
        assert ts.status(SUB, USER)["connections"][0]["state"] == "connected"


async def test_update_email_through_the_hosted_callback(
    outlook_world: OutlookWorld, ms: FakeMicrosoft
) -> None:
    ts = outlook_world.ts
    ms.add_user(OTHER_MAILBOX)
    await outlook_world.connect()
    with api(ts) as (_, c):
        r = c.put(connection_url(), json={"provider": "outlook", "email": OTHER_MAILBOX})
        assert r.status_code == 202, r.text
        assert r.json()["purpose"] == "update_email"
        # Until the user consents, the old address stays connected (R7: no gap).
        assert [x["email"] for x in ts.status(SUB, USER)["connections"]] == [MAILBOX]
        ms.identity.browser_account = OTHER_MAILBOX
        assert await ms.browse(r.json()["consent_url"]) == 200
        done = c.get(r.headers["location"]).json()
        assert done["state"] == "connected" and done["connection"]["email"] == OTHER_MAILBOX
    states = {x["email"]: x["state"] for x in ts.status(SUB, USER)["connections"]}
    assert states == {MAILBOX: "replaced", OTHER_MAILBOX: "connected"}


def test_public_url_is_checked(tmp_path: Path) -> None:
    def read(http: dict[str, Any]) -> str | None:
        raw = {
            "database": {"url": "sqlite:///unused.db"},
            "security": {"secret_key_file": "unused.key"},
            "http": http,
        }
        return http_settings_of(from_mapping(raw, base=tmp_path)).public_url

    assert read({}) is None
    assert read({"public_url": "https://sync.example.com/"}) == "https://sync.example.com"
    assert read({"public_url": "http://127.0.0.1:8080/ts"}) == "http://127.0.0.1:8080/ts"
    for bad in ("http://sync.example.com", "ftp://sync.example.com", "https://",
                "https://sync.example.com/?a=1", "https://user@sync.example.com"):  # fmt: skip
        with pytest.raises(ConfigError, match="public_url"):
            read({"public_url": bad})


async def test_the_daemon_connects_outlook_through_its_own_callback(
    outlook_world: OutlookWorld, ms: FakeMicrosoft, tmp_path: Path
) -> None:
    """``threadsync run --listen``, a separate process: the consent URL it hands
    out comes back to its own ``/oauth/callback``, and its sync loop then serves
    the new connection (a CRM send goes out, the contact's reply comes in)."""
    settings = outlook_world.ts.kernel.settings
    outlook = "".join(f"{k} = {json.dumps(v)}\n" for k, v in ms.outlook_settings().items())
    cfg = tmp_path / "daemon.toml"
    cfg.write_text(
        f'[database]\nurl = "{settings.database_url}"\n'
        f'[security]\nsecret_key_file = "{settings.secret_key_file}"\n'
        "[sync]\npoll_interval_seconds = 0.5\n"
        f'[outbound.default]\nhost = "127.0.0.1"\nport = {settings.default_channel.port}\n'
        'security = "none"\nfrom_address = "crm@threadsync.local"\n'
        f"[outlook]\n{outlook}",
        encoding="utf-8",
    )
    listen = f"127.0.0.1:{free_port()}"
    url = f"http://{listen}"
    key = apikeys.create(outlook_world.ts.kernel.store, SUB)["key"]
    proc = start(cfg, listen, ms.environ())
    try:
        wait_ready(url, proc)
        with httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30
        ) as c:
            r = c.post(connection_url(), json={"provider": "outlook", "email": MAILBOX})
            assert r.status_code == 202, r.text
            consent = r.json()["consent_url"]
            assert parse_qs(urlsplit(consent).query)["redirect_uri"] == [url + "/oauth/callback"]
            assert await ms.browse(consent) == 200
            assert c.get(r.headers["location"]).json()["state"] == "connected"

            sent = c.post(f"/v1/subaccounts/{SUB}/users/{USER}/send",
                          json={"to": ["carol@fabrikam.test"], "subject": "Offer",
                                "text": "From the CRM"})  # fmt: skip
            assert sent.status_code == 201, sent.text
            assert (sent.json()["channel"], sent.json()["status"]) == ("mailbox", "sent")
            outlook_world.contact_replies(sent.json(), body="Deal.")
            thread = f"/v1/threads/{sent.json()['thread_id']}"

            def replied() -> bool:
                return len(c.get(thread).json()["messages"]) == 2

            await wait_for(replied, 30, "the daemon to sync the contact's reply")
            last = c.get(thread).json()["messages"][-1]
            assert (last["direction"], last["state"]) == ("inbound", "synced")
            assert "Deal." in last["text"]
    finally:
        err = terminate(proc)
    assert proc.returncode == 0, err.decode()
    assert b"Traceback" not in err and key.encode() not in err
    assert (ms.app.secret or "-").encode() not in err
