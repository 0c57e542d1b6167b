"""One fake Microsoft cloud: identity platform + Graph on one loopback HTTPS
server, and what the people around a mailbox do to it.

The server (:class:`~tests.fakes.server.ServerThread`) can outlive a
:class:`FakeMicrosoft`: tests share one server per session and get fresh state
each. ``outlook_settings()`` is the ``[outlook]`` config section that points
threadsync at it; ``browser()`` is a ``notify`` callback that plays the user
consenting in a browser; ``deliver``/``client_send``/``client_reply`` put mail
into the mailbox as a contact's reply, a message sent from Outlook, and a reply
made with Outlook's Reply button.
"""

from __future__ import annotations

import asyncio
import email.utils
import html
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import httpx

from tests.fakes.graph import FakeGraph, Logged
from tests.fakes.graph_write import GraphWrites
from tests.fakes.identity import FakeIdentity
from tests.fakes.mailstore import FakeMailbox, FakeMessage, Transmission, parse_mime
from tests.fakes.server import Call, Reply, Router, ServerThread
from tests.fakes.subscriptions import FakeSubscriptions
from tests.servers.tlscerts import TestCA

SECRET_ENV = "OUTLOOK_CLIENT_SECRET"
_URL = re.compile(r"https://\S+")


class FakeMicrosoft:
    """Fresh identity and Graph state, served by ``server``."""

    def __init__(self, ca: TestCA, server: ServerThread | None = None) -> None:
        self.ca = ca
        self.server = server or ServerThread(self._app, ca).start()
        self._own_server = server is None
        self.server.app = self._app
        self.identity = FakeIdentity()
        self.graph = FakeGraph(self.identity)
        self.writes = GraphWrites(self.graph)
        self.subscriptions = FakeSubscriptions(self.graph, ca.client_context(),
                                               self.server.submit)
        self.router = Router()
        self.identity.routes(self.router)
        self.identity.base = self.graph.base = self.server.base
        self.app = self.identity.add_app(
            ["http://localhost/", "http://127.0.0.1/", "http://127.0.0.1/oauth/callback"]
        )
        self.browser_tasks: list[asyncio.Task[int]] = []

    async def _app(self, call: Call) -> Reply:
        if call.path.startswith("/v1.0/"):
            return await self.graph.handle(call)
        if call.path.startswith("/upload/"):
            return await self.writes.upload(call)
        return await self.router.dispatch(call)

    def close(self) -> None:
        if self._own_server:
            self.server.stop()

    # ---- configuration ---------------------------------------------------------------------

    def outlook_settings(self, **over: Any) -> dict[str, Any]:
        settings: dict[str, Any] = {
            "client_id": self.app.client_id,
            "tenant": self.identity.tenant_id,
            "client_secret_env": SECRET_ENV,
            "authority_host": f"127.0.0.1:{self.server.port}",
            "graph_url": f"{self.server.base}/v1.0",
            "ca_file": str(self.ca.ca_file),
            "redirect_uri": "http://127.0.0.1:0/",
            "timeout_seconds": 10,
            "max_retry_wait_seconds": 3,
            "sign_in_timeout_seconds": 20,
            "send_settle_seconds": 1.5,
        }
        settings.update(over)
        return settings

    def environ(self) -> dict[str, str]:
        return {SECRET_ENV: self.app.secret or ""}

    def provider_settings(self, **over: Any) -> dict[str, Any]:
        """The ``[outlook]`` section as the kernel hands it to the provider: the
        client secret read from the variable ``client_secret_env`` names."""
        return {**self.outlook_settings(**over), "client_secret": self.app.secret or ""}

    def add_user(self, email: str) -> FakeMailbox:
        self.identity.add_user(email)
        box = FakeMailbox(email)
        with self.graph.lock:
            self.graph.mailboxes[email.lower()] = box
        return box

    # ---- the user at a browser ------------------------------------------------------------

    async def consent(self, url: str) -> tuple[str, dict[str, str], str] | int:
        """Open the consent URL and accept: where the answer sends the browser (the
        redirect URI), with which fields and method, or its status on failure."""
        async with httpx.AsyncClient(verify=self.ca.client_context(), timeout=10) as client:
            response = await client.get(url)
        if response.status_code == 302 and response.headers.get("location"):
            target = urlsplit(response.headers["location"])
            return urlunsplit(target._replace(query="")), dict(parse_qsl(target.query)), "GET"
        action = re.search(r'action="([^"]+)"', response.text)
        if response.status_code != 200 or action is None:
            return response.status_code
        fields = dict(re.findall(r'name="([^"]+)" value="([^"]*)"', response.text))
        fields = {k: html.unescape(v) for k, v in fields.items()}
        return html.unescape(action.group(1)), fields, "POST"

    async def browse(self, url: str) -> int:
        """Open the consent URL, accept, and do what the answer page does: submit
        its form to the redirect URI (form_post), or follow its redirect."""
        answer = await self.consent(url)
        if isinstance(answer, int):
            return answer
        target, fields, method = answer
        async with httpx.AsyncClient(timeout=30) as loopback:
            if method == "GET":
                return (await loopback.get(target, params=fields)).status_code
            return (await loopback.post(target, data=fields)).status_code

    def browser(self, as_user: str | None = None) -> Callable[[str], None]:
        """A ``notify`` callback: the user opens the URL and consents (as ``as_user``)."""

        def notify(text: str) -> None:
            match = _URL.search(text)
            if match is None:
                return
            self.identity.browser_account = as_user
            task = asyncio.get_running_loop().create_task(self.browse(match.group(0)))
            self.browser_tasks.append(task)

        return notify

    def device(self, as_user: str) -> Callable[[str], None]:
        """A ``notify`` callback: the user enters the shown device code."""

        def notify(text: str) -> None:
            code = re.search(r"enter the code (\w+)", text)
            assert code is not None, text
            self.identity.approve_device_code(code.group(1), as_user)

        return notify

    async def settle(self) -> None:
        """Wait for the browser visits started by :meth:`browser`."""
        tasks, self.browser_tasks = self.browser_tasks, []
        await asyncio.gather(*tasks)

    # ---- mail arriving and leaving ---------------------------------------------------------

    def deliver(self, email_addr: str, raw: bytes, folder: str = "inbox") -> FakeMessage:
        """A message received from outside (with transport headers)."""
        with self.graph.lock:
            box = self.graph.mailbox(email_addr)
            msg = box.add(parse_mime(raw), folder, transport=True)
            self.graph.on_created(box, msg)
            return msg

    def client_send(self, email_addr: str, raw: bytes, *,
                    partial_headers: bool = False) -> FakeMessage:
        """The user sends from Outlook: transmitted, and the copy in Sent Items.

        ``partial_headers``: the copy carries ``internetMessageHeaders`` without
        ``In-Reply-To`` and ``References``, as Sent Items of shared mailboxes
        can; the MAPI properties still have them.
        """
        with self.graph.lock:
            box = self.graph.mailbox(email_addr)
            mime = parse_mime(raw)
            refused = self.writes.transmit(box, mime)
            assert refused is None, refused.data() if refused else None
            msg = box.add(mime, "sentitems")
            if partial_headers:
                msg.transport_headers = [
                    (k, " ".join(str(v).split())) for k, v in mime.items()
                    if k.lower() not in ("in-reply-to", "references")]
            self.graph.on_created(box, msg)
            return msg

    def file_in_sent(self, email_addr: str, raw: bytes) -> FakeMessage:
        """A message appears in Sent Items without being sent (imported, moved)."""
        with self.graph.lock:
            box = self.graph.mailbox(email_addr)
            msg = box.add(parse_mime(raw), "sentitems")
            self.graph.on_created(box, msg)
            return msg

    def client_reply(self, email_addr: str, parent_message_id: str, text: str) -> str:
        """The user presses Reply in Outlook on the message ``parent_message_id``."""
        with self.graph.lock:
            box = self.graph.mailbox(email_addr)
            parent = next(m for m in box.messages.values()
                          if m.internet_message_id == parent_message_id)
            reply = self.writes.reply_to(box, parent, text)
            return self.client_send(email_addr, reply.as_bytes()).internet_message_id or ""

    # ---- looking ---------------------------------------------------------------------------

    def messages(self, email_addr: str, folder: str) -> list[FakeMessage]:
        self.graph.settle()
        with self.graph.lock:
            return self.graph.mailbox(email_addr).in_folder(folder)

    def message_ids(self, email_addr: str, folder: str) -> list[str | None]:
        return [m.internet_message_id for m in self.messages(email_addr, folder)]

    def sent(self, message_id: str | None = None) -> list[Transmission]:
        """What left the mailboxes (envelope + MIME as transmitted)."""
        with self.graph.lock:
            return [t for t in self.writes.transmissions
                    if message_id is None or t.message_id == message_id]

    def requests(self, mailbox: str | None = None) -> list[Logged]:
        with self.graph.lock:
            return [e for e in self.graph.log if mailbox is None or e.mailbox == mailbox]

    def id_of(self, email_addr: str, message_id: str) -> str:
        """The immutable id of the message with this Message-ID."""
        with self.graph.lock:
            box = self.graph.mailbox(email_addr)
            return next(m.id for m in box.messages.values()
                        if m.internet_message_id == message_id)


def address_of(header: str) -> str:
    return email.utils.parseaddr(header)[1]
