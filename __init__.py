"""threadsync: two-way email sync between a CRM and each user's own mailbox.

This is the one public import name. A host CRM uses :class:`Threadsync` and
:class:`Draft`; a provider plugin subclasses :class:`Provider`, registers it with
a :data:`hookimpl` of ``register_providers`` and raises the errors below; its test
suite subclasses the contract kit in :mod:`threadsync.testing`. Everything under
``threadsync.core`` and ``threadsync.plugins`` is internal and may change.

Names are imported on first use, so that ``import threadsync`` stays cheap and a
plugin can import it while the kernel is still loading it.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    # the Python API of a host CRM
    "Threadsync": "threadsync.core.api",
    "Draft": "threadsync.core.outbox.compose",
    "AttachmentIn": "threadsync.core.mime",
    "load_settings": "threadsync.core.config",
    # writing a plugin
    "hookimpl": "threadsync.core.hookspecs",
    "Account": "threadsync.core.provider",
    "ChangeBatch": "threadsync.core.provider",
    "Checkpoint": "threadsync.core.provider",
    "ConsentRequest": "threadsync.core.provider",
    "Folder": "threadsync.core.provider",
    "FolderRole": "threadsync.core.provider",
    "HeaderSummary": "threadsync.core.provider",
    "OutgoingMail": "threadsync.core.provider",
    "Provider": "threadsync.core.provider",
    "ProviderOption": "threadsync.core.provider",
    "option_bool": "threadsync.core.provider",
    # helpers a provider needs to read headers the way the kernel does
    "parse_msgid_list": "threadsync.core.mime",
    "summarize_headers": "threadsync.core.mime",
    "send_data": "threadsync.core.outbox.smtp_data",
    # the one error tree
    "ThreadsyncError": "threadsync.core.errors",
    "ConfigError": "threadsync.core.errors",
    "InvalidInput": "threadsync.core.errors",
    "HeaderInjection": "threadsync.core.errors",
    "MessageTooLarge": "threadsync.core.errors",
    "NotFound": "threadsync.core.errors",
    "Refused": "threadsync.core.errors",
    "LabsDisabled": "threadsync.core.errors",
    "AlreadyConnected": "threadsync.core.errors",
    "StoreError": "threadsync.core.errors",
    "SecretsUnreadable": "threadsync.core.errors",
    "LeaseLost": "threadsync.core.errors",
    "MessageParseError": "threadsync.core.errors",
    "ProviderError": "threadsync.core.errors",
    "AuthenticationFailed": "threadsync.core.errors",
    "TransientProviderError": "threadsync.core.errors",
    "ProviderProtocolError": "threadsync.core.errors",
    "UnexpectedFailure": "threadsync.core.errors",
    "DeliveryUnconfirmed": "threadsync.core.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'threadsync' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
