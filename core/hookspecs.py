"""The pluggy hook specifications of threadsync, grouped by who implements them.

Plugins are modules or objects with functions named like the hooks below, marked
with :data:`hookimpl`, loaded from the ``threadsync`` entry-point group (built-in
providers come through the same group as third-party ones).

* Provider hooks: a plugin contributes :class:`threadsync.core.provider.Provider` classes.
* Integration hooks: a plugin declares its config.toml sections, adds commands to
  the command line, HTTP endpoints to the HTTP API and long-running services to
  ``threadsync run`` (the built-in HTTP API and local mail system come this way).
* Host hooks: the host CRM (or an integration plugin) is told about events. They
  are called after the change they describe is committed, once per event, in the
  order the events happened. ``payload`` is the JSON-ready dict also stored in the
  event log. Return values are ignored; an exception raised by a host hook is
  logged and never undoes or blocks sync.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any

import pluggy

from threadsync.core.host.routes import PluginRoute
from threadsync.core.provider import Provider

PROJECT = "threadsync"

hookspec = pluggy.HookspecMarker(PROJECT)
#: Mark a plugin function as a threadsync hook implementation.
hookimpl = pluggy.HookimplMarker(PROJECT)


# ---- providers ----------------------------------------------------------------------


@hookspec
def register_providers(register: Callable[[type[Provider]], None]) -> None:
    """Register mailbox provider classes by calling ``register(ProviderClass)``.

    Called once when the plugin manager is built. Every plugin's answer counts;
    two providers with the same ``name`` are an error (no silent rename).
    """


# ---- integrations ---------------------------------------------------------------------


@hookspec
def config_sections() -> Mapping[str, Collection[str]]:
    """The config.toml sections this plugin reads, each with the keys it knows.

    Called when settings are checked. Every plugin's answer counts; a section
    claimed by two plugins is an error. A section or key that neither the kernel
    nor any plugin knows is a ``ConfigError`` naming the closest valid one. A
    provider's section is named after the provider (``[outlook]``).
    """
    return {}


@hookspec
def register_commands(cli: Any) -> None:
    """Add commands to the command line: ``cli`` is the ``click.Group`` of
    ``threadsync``. Called once per invocation, after the kernel's commands exist
    (a plugin may add options to them, as the HTTP API adds ``run --listen``).
    Helpers for output and errors are in ``threadsync.cli``.
    """


@hookspec
def register_routes(threadsync: Any) -> list[PluginRoute] | None:
    """HTTP endpoints this plugin serves through the HTTP API, if it runs.

    ``threadsync`` is the :class:`~threadsync.core.api.Threadsync` being served.
    Called once when the API is built; every plugin's answer counts. The routes
    are unauthenticated (see :mod:`threadsync.core.host.routes`).
    """


@hookspec
def daemon_services(
    threadsync: Any, options: Mapping[str, Any]
) -> list[Callable[[], Awaitable[None]]] | None:
    """Long-running coroutines to run beside the sync loop of ``threadsync run``.

    ``options`` are the values of every option of the ``run`` command, including
    those a plugin added through :func:`register_commands`, and ``announce``: a
    callable taking a dict that shows the user what a service offers (printed as
    JSON with ``--json``, as ``key: value`` lines otherwise). Each coroutine runs
    until it returns or the daemon stops (it is then cancelled). Every plugin's
    answer counts; ``None`` or an empty list adds nothing.
    """


# ---- host events ----------------------------------------------------------------------


@hookspec
def message_synced(payload: dict[str, Any]) -> None:
    """A message of a synced thread was stored (``direction`` inbound or outbound).

    ``payload`` is ``{"event", "subaccount", "user", "thread_id", "message": {...}}``
    with the whole message as in ``threadsync thread``.
    """


@hookspec
def message_skipped(payload: dict[str, Any]) -> None:
    """A message of a synced thread was recorded without syncing it (``reason``,
    e.g. ``attachment_too_large``), or a CRM message went by the default channel."""


@hookspec
def connection_state_changed(payload: dict[str, Any]) -> None:
    """A connection moved between ``connected``, ``needs_reauth``, ``error``,
    ``disconnected`` and ``replaced`` (``payload["state"]``, ``payload["previous"]``)."""


@hookspec
def thread_stopped(payload: dict[str, Any]) -> None:
    """A synced thread stopped for good (``reason``: ``disconnected``, ``replaced``)."""
