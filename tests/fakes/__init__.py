"""Stateful fakes of Microsoft's cloud (the one peer that cannot run here).

:class:`FakeMicrosoft` (:mod:`.microsoft`) serves the identity platform
(:mod:`.identity`) and Microsoft Graph's mail API (:mod:`.graph`,
:mod:`.graph_write`, :mod:`.subscriptions`, state in :mod:`.mailstore`) over
real HTTPS on loopback (:mod:`.server`), so MSAL and httpx run unmodified
against them. They follow the documented JSON, accept what Microsoft accepts and
refuse what it refuses, and log every request for tests and benchmarks.
"""

from tests.fakes.microsoft import SECRET_ENV, FakeMicrosoft
from tests.fakes.server import ServerThread

__all__ = ["SECRET_ENV", "FakeMicrosoft", "ServerThread"]
