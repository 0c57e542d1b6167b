"""threadsync's HTTP API and webhooks, for CRMs that are not written in Python.

A Starlette application (:func:`threadsync.plugins.http_api.app.create_app`) over the
Python API, served by uvicorn beside the sync loop by ``threadsync run
--listen HOST:PORT``, with a webhook dispatcher that posts signed events from
the durable queue in :mod:`threadsync.core.host.webhooks`. Modules: :mod:`.settings` (config),
:mod:`.auth` (API keys, sessions, rate limits), :mod:`.problems` (RFC 9457
errors), :mod:`.bodies` (request checks), the ``routes_*`` modules,
:mod:`.openapi` and :mod:`.openapi_schemas`, :mod:`.metrics`,
:mod:`.statuspage`, :mod:`.dispatcher` and :mod:`.signatures` (webhooks),
:mod:`.server` (uvicorn).
"""

from __future__ import annotations

from threadsync.plugins.http_api.commands import (
    config_sections,
    daemon_services,
    register_commands,
)
from threadsync.plugins.http_api.signatures import sign, verify

__all__ = ["config_sections", "daemon_services", "register_commands", "sign", "verify"]
