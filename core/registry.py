"""Builds the plugin manager and the table of registered providers.

``get_plugin_manager()`` is a factory, never run at import time: tests get a
fresh manager each, and the CLI builds one per invocation. Built-in providers are
found through the same ``threadsync`` entry-point group as third-party ones.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import cast

import pluggy

from threadsync.core import hookspecs
from threadsync.core.errors import ConfigError
from threadsync.core.provider import Provider

#: The plugins that come with threadsync, loaded like any other.
BUILTIN = (
    "threadsync.plugins.imap_smtp",
    "threadsync.plugins.outlook",
    "threadsync.plugins.exchange",
    "threadsync.plugins.http_api",
    "threadsync.plugins.localmail",
)


@dataclass(frozen=True)
class RegisteredProvider:
    """A provider class and the plugin that registered it."""

    name: str
    cls: type[Provider]
    plugin: str


def get_plugin_manager(
    extra_plugins: Iterable[object] = (), *, load_entry_points: bool = True
) -> pluggy.PluginManager:
    """A new plugin manager with threadsync's hooks and every installed plugin.

    ``extra_plugins`` are registered too (a host CRM's event handlers, a test's
    provider). Misspelt hook implementations fail here (``check_pending``).
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    if load_entry_points:
        _load_entry_points(pm)
        _ensure_builtin(pm)
    for plugin in extra_plugins:
        pm.register(plugin)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise ConfigError(f"a plugin implements an unknown hook: {exc}") from None
    return pm


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    """Load every plugin of the ``threadsync`` group; a plugin that cannot be
    imported is a ``ConfigError`` naming it, not a traceback. A package installed
    twice on the path (a virtual environment over the system's site-packages)
    counts once, as the one that imports first."""
    seen: set[str] = set()
    for dist in importlib.metadata.distributions():
        name = re.sub(r"[-_.]+", "-", str(dist.metadata["name"] or "")).lower()
        if name in seen:
            continue
        seen.add(name)
        for ep in dist.entry_points:
            if ep.group != hookspecs.PROJECT or pm.get_plugin(ep.name) is not None:
                continue
            try:
                plugin = ep.load()
            except Exception as exc:  # any import-time failure of third-party code
                raise ConfigError(
                    f"plugin {ep.name!r} ({ep.value}) from package "
                    f"{dist.metadata['name']!r} cannot be loaded: {exc}"
                ) from None
            pm.register(plugin, name=ep.name)


def _ensure_builtin(pm: pluggy.PluginManager) -> None:
    """Register the built-in providers when running from a source tree that was
    not pip-installed (``python cli.py``), so the entry points are missing."""
    for name in BUILTIN:
        module = importlib.import_module(name)
        if not pm.is_registered(module):
            pm.register(module, name=name.rsplit(".", 1)[-1])


def providers(pm: pluggy.PluginManager) -> dict[str, RegisteredProvider]:
    """Every registered provider by name. Duplicate names are a ``ConfigError``."""
    found: dict[str, RegisteredProvider] = {}
    for impl in pm.hook.register_providers.get_hookimpls():
        plugin_name = pm.get_name(impl.plugin) or repr(impl.plugin)

        def register(cls: type[Provider], _plugin: str = plugin_name) -> None:
            if not (isinstance(cls, type) and issubclass(cls, Provider)):
                raise ConfigError(f"plugin {_plugin} registered {cls!r}, not a Provider")
            name = getattr(cls, "name", None)
            if not name:
                raise ConfigError(f"plugin {_plugin} registered {cls.__name__} with no name")
            if name in found:
                raise ConfigError(
                    f"provider {name!r} is registered twice: by {found[name].plugin} "
                    f"and by {_plugin}"
                )
            found[name] = RegisteredProvider(name=name, cls=cls, plugin=_plugin)

        impl.function(register=register)
    return found


def config_sections(pm: pluggy.PluginManager) -> dict[str, frozenset[str]]:
    """Every plugin's config.toml sections with their keys (``config_sections``
    hook). A section claimed by two plugins is a ``ConfigError``."""
    found: dict[str, frozenset[str]] = {}
    owner: dict[str, str] = {}
    for impl in pm.hook.config_sections.get_hookimpls():
        plugin_name = pm.get_name(impl.plugin) or repr(impl.plugin)
        declared = cast(Mapping[str, Collection[str]], impl.function() or {})
        for section, keys in declared.items():
            if section in found:
                raise ConfigError(
                    f"config section [{section}] is claimed by {owner[section]} and by "
                    f"{plugin_name}"
                )
            found[section], owner[section] = frozenset(keys), plugin_name
    return found
