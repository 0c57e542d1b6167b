"""Finding a provider the way threadsync does: through the ``threadsync``
entry-point group of the installed packages. A plugin's test suite uses
:func:`registered_provider` to prove the package is installed and registers its
provider under the expected name before running the contract against it."""

from __future__ import annotations

from threadsync.core.provider import Provider
from threadsync.core.registry import get_plugin_manager, providers


def registered_provider(name: str, plugin: str | None = None) -> type[Provider]:
    """The provider class registered as ``name`` by the installed plugins (and by
    the entry point ``plugin``, when given); ``AssertionError`` otherwise."""
    found = providers(get_plugin_manager())
    assert name in found, f"no provider {name!r} is registered: is the package installed?"
    if plugin is not None:
        assert found[name].plugin == plugin, (
            f"provider {name!r} comes from {found[name].plugin!r}, not {plugin!r}"
        )
    return found[name].cls
