"""The pluggy hook specifications of threadsync, grouped by who implements them.

Plugins are modules or objects with functions named like the hooks below, marked
with :data:`hookimpl`, loaded from the ``threadsync`` entry-point group (built-in
providers come through the same group as third-party ones).

* Provider hooks: a plugin contributes :class:`threadsync.core.provider.Provider` classes.
* Host hooks: the host CRM (or an integration plugin) is told about events. They
  are called after the change they describe is committed, once per event, in the
  order the events happened. ``payload`` is the JSON-ready dict also stored in the
  event log. Return values are ignored; an exception raised by a host hook is
  logged and never undoes or blocks sync.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

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
