"""threadsync's kernel: rules, store, MIME, outbox, scheduler and plugin API.

The public Python API is :class:`Threadsync` (see :mod:`core.api`); provider
authors need :mod:`core.provider` and :data:`hookimpl`. Names are imported on
first use, so that ``import core.errors`` stays cheap and plugins can import
``core`` while the kernel is still loading.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Threadsync": "core.api",
    "Draft": "core.compose",
    "ThreadsyncError": "core.errors",
    "hookimpl": "core.hookspecs",
    "AttachmentIn": "core.mime",
    "Account": "core.provider",
    "ChangeBatch": "core.provider",
    "Folder": "core.provider",
    "HeaderSummary": "core.provider",
    "OutgoingMail": "core.provider",
    "Provider": "core.provider",
    "ProviderOption": "core.provider",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'core' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
