"""The integration hooks, as a third-party plugin uses them: a command added to the
command line, an endpoint served by the HTTP API (and one that fails, answered
without details), and a service run beside the daemon."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import click
import httpx
from click.testing import CliRunner

from tests.kernelfixtures import World
from tests.test_http_api_support import http_settings
from threadsync import Threadsync, hookimpl
from threadsync.core.host.routes import PluginRoute, RouteReply, RouteRequest
from threadsync.core.registry import get_plugin_manager
from threadsync.plugins.http_api.app import create_app
from threadsync.plugins.http_api.server import ThreadedServer


class Bridge:
    """A plugin that adds a command, two endpoints and a service."""

    def __init__(self) -> None:
        self.ran: list[Mapping[str, Any]] = []

    @hookimpl
    def register_commands(self, cli: click.Group) -> None:
        @cli.command("bridge-ping")
        @click.argument("name")
        def ping(name: str) -> None:
            """Say hello."""
            click.echo(f"pong {name}")

    @hookimpl
    def register_routes(self, threadsync: Any) -> list[PluginRoute]:
        async def hello(request: RouteRequest) -> RouteReply:
            return RouteReply(200, "application/json", f'{{"got": {len(request.body)}}}',
                              {"X-Bridge": request.query.get("q", "")})  # fmt: skip

        async def broken(request: RouteRequest) -> RouteReply:
            raise RuntimeError("secret internals")

        return [
            PluginRoute("/bridge/hello", ("POST",), hello, max_body_bytes=16),
            PluginRoute("/bridge/broken", ("GET",), broken),
        ]

    @hookimpl
    def daemon_services(
        self, threadsync: Any, options: Mapping[str, Any]
    ) -> list[Callable[[], Awaitable[None]]]:
        async def service() -> None:
            self.ran.append(dict(options))

        return [service]


def test_a_plugin_adds_a_command() -> None:
    group = click.Group("threadsync")
    get_plugin_manager([Bridge()], load_entry_points=False).hook.register_commands(cli=group)
    result = CliRunner().invoke(group, ["bridge-ping", "ann"])
    assert (result.exit_code, result.output) == (0, "pong ann\n")


def test_a_plugin_route_is_served_and_its_failure_shows_nothing(world: World) -> None:
    ts = Threadsync.from_settings(world.ts.settings, plugins=[Bridge()], environ=world.env)
    server = ThreadedServer(create_app(ts, http_settings())[0], http_settings()).start()
    try:
        with httpx.Client(base_url=server.url) as client:
            ok = client.post("/bridge/hello", params={"q": "x"}, content=b"12345")
            assert (ok.status_code, ok.json(), ok.headers["x-bridge"]) == (200, {"got": 5}, "x")
            assert client.post("/bridge/hello", content=b"x" * 17).status_code == 413
            failed = client.get("/bridge/broken")
            assert failed.status_code == 500 and "secret internals" not in failed.text
    finally:
        server.stop()
        ts.close()


async def test_a_plugin_service_runs_beside_the_daemon(world: World) -> None:
    bridge = Bridge()
    ts = Threadsync.from_settings(world.ts.settings, plugins=[bridge], environ=world.env)
    try:
        services = ts.daemon_services({"listen": None, "once": False})
        assert len(services) == 1  # the HTTP API adds nothing without an address
        daemon = ts.daemon(extra=services)
        await asyncio.wait_for(daemon.run(), 10)  # the service ends, so the daemon stops
        assert bridge.ran == [{"listen": None, "once": False}]
    finally:
        ts.close()
