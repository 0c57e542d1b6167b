"""The provider contract kit, importable as ``threadsync.testing``.

A provider author subclasses :class:`ContractMailbox` and :class:`ProviderContract`
(see :mod:`.contract`) and runs pytest. The kit needs pytest and pytest-asyncio,
which come with the ``testing`` extra: ``pip install 'threadsync[testing]'``.
"""

from __future__ import annotations

try:
    import pytest  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised in a venv without pytest
    raise ImportError(
        "threadsync.testing needs pytest and pytest-asyncio: "
        "pip install 'threadsync[testing]'"
    ) from exc

from .contract import ContractMailbox, ProviderContract, make_message
from .registration import registered_provider

__all__ = ["ContractMailbox", "ProviderContract", "make_message", "registered_provider"]
