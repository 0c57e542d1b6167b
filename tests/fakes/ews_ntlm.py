"""NTLM for the fake Exchange Server: connection-based, as IIS does it.

Placeholder until the handshake is verified server-side; every NTLM attempt is
refused with a plain challenge.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tests.fakes.ews_store import EwsStore
    from tests.fakes.server import Call


class NtlmGate:
    def __init__(self, store: EwsStore) -> None:
        self.store = store

    def step(self, call: Call, token: str) -> tuple[str | None, str | None]:
        return None, "NTLM"
