"""Serving the app with uvicorn: beside the sync loop (``threadsync run
--listen``), or on a thread of its own (tests, benchmarks).

The listening socket is bound before anything starts, so a taken port is a
clear :class:`threadsync.core.errors.ConfigError` instead of uvicorn exiting the process.
Signals belong to the daemon: the uvicorn server installs none, and stops
gracefully (``should_exit``) when the daemon cancels it. uvicorn's access log is
off; :class:`threadsync.plugins.http_api.app.Guard` logs requests without their query.
Connections go through :mod:`threadsync.plugins.http_api.frontdoor` (limits per
client address, a deadline for request headers).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

import uvicorn
from starlette.applications import Starlette

from threadsync.core.api import Threadsync
from threadsync.core.errors import ConfigError
from threadsync.plugins.http_api.app import create_app
from threadsync.plugins.http_api.dispatcher import Dispatcher
from threadsync.plugins.http_api.frontdoor import protocol_class
from threadsync.plugins.http_api.settings import HttpSettings, parse_listen


class ApiServer(uvicorn.Server):
    """A uvicorn server that leaves the process's signals alone."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    def install_signal_handlers(self) -> None:  # older uvicorn
        return None


def bind(listen: str) -> socket.socket:
    host, port = parse_listen(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {listen}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


def server_for(app: Starlette, http: HttpSettings) -> ApiServer:
    config = uvicorn.Config(
        app,
        log_config=None,
        access_log=False,
        lifespan="on",
        ws="none",
        http=protocol_class(http),  # h11 with per-client and header-time limits
        timeout_keep_alive=http.keep_alive_seconds,  # type: ignore[arg-type]
        server_header=False,
        proxy_headers=http.behind_tls_proxy,
        ssl_certfile=http.tls_cert_file,
        ssl_keyfile=http.tls_key_file,
        timeout_graceful_shutdown=5,
    )
    return ApiServer(config)


async def serve_until_cancelled(server: ApiServer, sock: socket.socket) -> None:
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        server.should_exit = True
        await task
        raise
    finally:
        sock.close()


@dataclass
class Service:
    """The API and the webhook dispatcher, ready to run beside the daemon."""

    server: ApiServer
    sock: socket.socket
    dispatcher: Dispatcher
    address: str

    @classmethod
    def prepare(cls, ts: Threadsync, http: HttpSettings) -> Service:
        if http.listen is None:
            raise ConfigError("the HTTP API has no listen address ([http] listen or --listen)")
        dispatcher = Dispatcher(ts.webhooks, http.webhooks)
        ts.register_plugin(dispatcher, name="http_api.webhooks")

        def counts() -> tuple[int, int]:
            return dispatcher.delivered, dispatcher.failed

        app, _ = create_app(ts, http, wake_webhooks=dispatcher.wake, dispatched=counts)
        sock = bind(http.listen)
        host, port = sock.getsockname()[:2]
        scheme = "https" if http.tls else "http"
        shown = f"[{host}]" if ":" in host else host
        return cls(server_for(app, http), sock, dispatcher, f"{scheme}://{shown}:{port}")

    def coroutines(self) -> list[Callable[[], Awaitable[None]]]:
        return [
            lambda: serve_until_cancelled(self.server, self.sock),
            self.dispatcher.run,
        ]


class ThreadedServer:
    """The app served by uvicorn on a thread of its own, on loopback (tests)."""

    def __init__(self, app: Starlette, http: HttpSettings, listen: str = "127.0.0.1:0") -> None:
        self.sock = bind(listen)
        host, port = self.sock.getsockname()[:2]
        self.url = f"http://{host}:{port}"
        self.server = server_for(app, http)
        self.thread = threading.Thread(target=self._run, name="http-api", daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            asyncio.run(self.server.serve(sockets=[self.sock]))
        except BaseException as exc:  # shown by stop(); a thread cannot raise
            self.error = exc

    def start(self) -> ThreadedServer:
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError(f"the API server did not start: {self.error!r}")
            self.thread.join(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()
        if self.error is not None:
            raise RuntimeError("the API server failed") from self.error
