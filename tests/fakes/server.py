"""A real loopback HTTPS server for the Microsoft fakes: uvicorn in a thread.

Clients under test (httpx, and MSAL through requests) talk to it over TLS
verified against the test CA, exactly as they would talk to Microsoft. The
fakes themselves are plain Python objects; :class:`Router` turns each HTTP
request into a :class:`Call` and dispatches it by method and path pattern, so
the same handlers also serve the items of a Graph ``$batch``.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import uvicorn
from starlette.requests import Request
from starlette.responses import Response

from tests.servers.tlscerts import TestCA


@dataclass
class Call:
    """One HTTP request as the fakes see it (header names lower-case)."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes = b""
    header_lists: dict[str, list[str]] = field(default_factory=dict)
    in_batch: bool = False
    #: What the pipeline learnt about the call (mailbox, id preference...).
    ctx: dict[str, Any] = field(default_factory=dict)

    def json(self) -> Any:
        return json.loads(self.body or b"null")

    def form(self) -> dict[str, str]:
        return dict(parse_qsl(self.body.decode("ascii", "replace"), keep_blank_values=True))


@dataclass
class Reply:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, status: int, data: Any, **headers: str) -> Reply:
        return cls(status, json.dumps(data).encode(),
                   {"content-type": "application/json", **headers})

    @classmethod
    def text(cls, status: int, text: str | bytes) -> Reply:
        data = text.encode() if isinstance(text, str) else text
        return cls(status, data, {"content-type": "text/plain"})

    @classmethod
    def graph_error(cls, status: int, code: str, message: str, **headers: str) -> Reply:
        """Graph's error shape: ``{"error": {"code", "message", "innerError"}}``."""
        return cls.json(
            status,
            {"error": {"code": code, "message": message,
                       "innerError": {"request-id": "00000000-0000-0000-0000-000000000000"}}},
            **headers,
        )

    def data(self) -> Any:
        return json.loads(self.body) if self.body else None


Handler = Callable[..., Awaitable[Reply]]


class Router:
    """Method + regex routing; literal parts match case-insensitively."""

    def __init__(self) -> None:
        self._routes: list[tuple[str, re.Pattern[str], Handler]] = []

    def add(self, method: str, pattern: str, handler: Handler) -> None:
        self._routes.append((method, re.compile(pattern + r"\Z", re.IGNORECASE), handler))

    async def dispatch(self, call: Call, fallback: Reply | None = None) -> Reply:
        allowed = False
        for method, pattern, handler in self._routes:
            match = pattern.match(call.path)
            if match is None:
                continue
            allowed = True
            if method == call.method:
                return await handler(call, *match.groups())
        if allowed:
            return Reply.graph_error(405, "Request_BadRequest", "Method not allowed")
        return fallback or Reply.graph_error(
            400, "Request_BadRequest", f"Unsupported segment in {call.path}"
        )


class ServerThread:
    """Serves an async ``app(call) -> Reply`` over HTTPS (or HTTP) in a thread."""

    def __init__(self, app: Callable[[Call], Awaitable[Reply]], ca: TestCA | None) -> None:
        self.app = app
        self.ca = ca
        self.port = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def base(self) -> str:
        scheme = "https" if self.ca else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    async def _asgi(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        request = Request(scope, receive)
        header_lists: dict[str, list[str]] = {}
        for name, value in request.headers.items():
            header_lists.setdefault(name.lower(), []).append(value)
        call = Call(
            method=request.method,
            path=request.url.path,
            query=dict(parse_qsl(request.url.query, keep_blank_values=True)),
            headers={k: ", ".join(v) for k, v in header_lists.items()},
            body=await request.body(),
            header_lists=header_lists,
        )
        reply = await self.app(call)
        response = Response(reply.body, status_code=reply.status, headers=reply.headers)
        await response(scope, receive, send)

    def start(self) -> ServerThread:
        # proto IPPROTO_TCP: asyncio sets TCP_NODELAY only on such sockets; without
        # it every answer waits ~40 ms for the client's delayed ACK (Nagle).
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(("127.0.0.1", self.port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self._asgi,
            lifespan="off",
            interface="asgi3",
            ws="none",
            http="h11",
            loop="asyncio",
            log_config=None,
            log_level="warning",
            access_log=False,
            timeout_keep_alive=30,
            # Stopping does not wait long for clients that keep connections open.
            timeout_graceful_shutdown=2,
            ssl_certfile=str(self.ca.cert_file) if self.ca else None,
            ssl_keyfile=str(self.ca.key_file) if self.ca else None,
        )
        server = uvicorn.Server(config)
        ready = threading.Event()

        def run() -> None:
            async def main() -> None:
                self.loop = asyncio.get_running_loop()
                task = asyncio.create_task(server.serve(sockets=[sock]))
                while not server.started and not task.done():
                    await asyncio.sleep(0.005)
                ready.set()
                await task

            asyncio.run(main())
            sock.close()

        self._server = server
        self._thread = threading.Thread(target=run, name=f"fake-{self.port}", daemon=True)
        self._thread.start()
        if not ready.wait(10) or not server.started:
            raise RuntimeError("the fake server did not start")
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
        self._server = self._thread = None
        self.loop = None

    def submit(self, make: Callable[[], Awaitable[Any]]) -> None:
        """Run ``make()`` on the server's loop (from any thread), fire and forget."""
        loop = self.loop
        if loop is None or loop.is_closed():
            return

        async def runner() -> None:
            await make()

        asyncio.run_coroutine_threadsafe(runner(), loop)
