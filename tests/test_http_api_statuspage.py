"""The operator's status page: behind the admin key, connections per
sub-account with state and last error, recent synced and skipped messages;
rendered by headless Chromium (Debian package ``chromium``) to a screenshot."""

from __future__ import annotations

import re
import shutil
import subprocess
from html import unescape
from pathlib import Path

import pytest

from tests.kernelfixtures import CONTACT, SUB, USER, World
from tests.test_http_api_support import (  # noqa: F401 (fixtures)
    OTHER,
    Api,
    api_factory_fixture,
    api_fixture,
    synced_thread,
)
from threadsync.core.outbox.compose import Draft
from threadsync.plugins.http_api.statuspage import PAGE_SIZE

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


async def story(world: World) -> None:
    """A synced thread, a skipped CRM message, and a connection whose password
    was changed (needs_reauth, with its last error)."""
    await synced_thread(world, subject="Quarterly offer")
    await world.ts.send(OTHER, USER, Draft(to=[CONTACT], subject="No mailbox here", text="x"))
    world.imap.add_user(world.email, "rotated-password")
    await world.ts.run_once()
    assert world.ts.status(SUB, USER)["connections"][0]["state"] == "needs_reauth"


async def test_login_and_page(api: Api, world: World) -> None:
    await story(world)
    with api.client() as browser:
        login = browser.get("/")
        assert login.status_code == 200 and "id=login" in login.text
        assert "Quarterly offer" not in login.text
        assert browser.post("/login", data={"key": api.key}).status_code == 401  # not admin
        assert browser.post("/login", data={"key": "tsk_wrong"}).status_code == 401
        r = browser.post("/login", data={"key": api.admin}, follow_redirects=False)
        assert r.status_code == 303
        cookie = r.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        assert api.admin not in r.headers["set-cookie"]
        page = browser.get("/")
        html = page.text
        assert page.headers["content-security-policy"].startswith("default-src 'none'")
        assert "id=connections" in html and "id=messages" in html
        assert "data-state='needs_reauth'" in html and world.email in html
        assert "authentication" in html.lower() or "rejected" in html.lower()  # last error
        assert "data-state='synced'" in html and "data-state='skipped'" in html
        assert "labs_disabled" in html and "Quarterly offer" in html
        assert world.password not in html and "rotated-password" not in html
        browser.post("/logout")
        assert "id=login" in browser.get("/").text


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed "
                    "(apt-get install chromium)")  # fmt: skip
async def test_rendered_in_headless_chromium(api: Api, world: World, tmp_path: Path) -> None:
    await story(world)
    assert CHROMIUM is not None
    shot = tmp_path / "status.png"
    base = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--no-first-run", "--hide-scrollbars", "--window-size=1280,900",
    ]  # fmt: skip
    url = f"{api.url}/?key={api.admin}"  # redirected to / with the session cookie

    def chromium(*args: str, profile: str) -> str:
        proc = subprocess.run(
            [*base, f"--user-data-dir={tmp_path / profile}", *args, url],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout

    dom = chromium("--dump-dom", profile="dom")
    assert 'id="connections"' in dom and 'data-state="needs_reauth"' in dom
    assert "Quarterly offer" in dom and "labs_disabled" in dom
    chromium(f"--screenshot={shot}", profile="shot")
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


async def test_thread_links_paging_and_filter(api: Api, world: World) -> None:
    """Thread ids link to a page of the thread; the message list pages (older
    messages behind a link) and filters by sub-account and state; pages refresh."""
    await story(world)
    for n in range(PAGE_SIZE + 3):  # more than a page, all skipped (no mailbox for OTHER)
        await world.ts.send(OTHER, USER, Draft(to=[CONTACT], subject=f"Bulk {n}", text="x"))
    with api.client() as browser:
        assert browser.post("/login", data={"key": api.admin}).status_code == 303
        first = browser.get("/")
        assert first.headers["refresh"] == "30"
        html = first.text
        assert html.count("<tr class=message") == PAGE_SIZE
        assert f"Bulk {PAGE_SIZE + 2}" in html and "Quarterly offer" not in html
        older = re.search(r"<a id=older href='([^']+)'", html)
        assert older is not None
        second = browser.get(unescape(older.group(1))).text
        assert "Quarterly offer" in second and f"Bulk {PAGE_SIZE + 2}" not in second
        # Filter: only SUB's synced messages; the thread id is a link to the thread.
        only = browser.get("/", params={"subaccount": SUB, "state": "synced"}).text
        assert "Bulk" not in only and "Quarterly offer" in only
        assert "data-state='skipped'" not in only.split("id=messages")[1]
        link = re.search(r"<a href='(/threads/th_[^']+)'>(th_[^<]+)</a>", only)
        assert link is not None
        page = browser.get(link.group(1))
        assert page.status_code == 200 and page.headers["refresh"] == "30"
        assert link.group(2) in page.text and "Quarterly offer" in page.text
        assert page.text.count("<tr class=message") == 2
        assert browser.get("/threads/th_nope").status_code == 404
        browser.post("/logout")
        assert "id=login" in browser.get(link.group(1)).text
