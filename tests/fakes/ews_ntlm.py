"""NTLM for the fake Exchange Server, connection-based as IIS does it.

The client (requests_ntlm under exchangelib) sends its NEGOTIATE message, gets a
401 carrying the CHALLENGE, and sends AUTHENTICATE on the same TCP connection;
the server checks the NTLMv2 response with pyspnego's acceptor against the
users' passwords (written to the flat credential file pyspnego reads, named by
``NTLM_USER_FILE``). From then on that connection is authenticated and requests
on it need no Authorization header, as with IIS's Windows authentication. See
"Authentication and EWS in Exchange" and the MS-NLMP specification.
"""

from __future__ import annotations

import base64
import os
import tempfile
import threading
from typing import TYPE_CHECKING, Any

import spnego
from spnego.exceptions import SpnegoError

if TYPE_CHECKING:
    from tests.fakes.ews_store import EwsStore
    from tests.fakes.server import Call

_FILE_LOCK = threading.Lock()


class NtlmGate:
    """The NTLM handshakes and authenticated connections of one fake server."""

    def __init__(self, store: EwsStore) -> None:
        self.store = store
        self.pending: dict[Any, Any] = {}
        self.authenticated: dict[Any, str] = {}
        #: completed handshakes (tests check NTLM was really used)
        self.handshakes = 0
        self._file: str | None = None

    def connection_login(self, call: Call) -> str | None:
        """The address a connection already authenticated as, if any."""
        return self.authenticated.get(call.ctx.get("connection"))

    def _write_users(self) -> None:
        lines = []
        for login, (password, _address) in self.store.logins.items():
            domain, _, user = login.rpartition("\\")
            lines.append(f"{domain}:{user}:{password}")
        fd, path = tempfile.mkstemp(prefix="ntlm-users-", text=True)
        with os.fdopen(fd, "w") as out:
            out.write("\n".join(lines) + "\n")
        if self._file:
            os.unlink(self._file)
        self._file = path
        os.environ["NTLM_USER_FILE"] = path

    def step(self, call: Call, token: str) -> tuple[str | None, str | None]:
        """(address, None) once AUTHENTICATE checks out; (None, challenge) after
        NEGOTIATE; (None, None) when the handshake fails."""
        connection = call.ctx.get("connection")
        try:
            raw = base64.b64decode(token)
        except ValueError:
            return None, None
        kind = int.from_bytes(raw[8:12], "little") if len(raw) >= 12 else 0
        if kind == 1:
            with _FILE_LOCK:
                self._write_users()
                acceptor = spnego.server(protocol="ntlm")
                challenge = acceptor.step(raw)
            self.pending[connection] = acceptor
            return None, "NTLM " + base64.b64encode(challenge or b"").decode("ascii")
        acceptor = self.pending.pop(connection, None)
        if kind != 3 or acceptor is None:
            return None, None
        with _FILE_LOCK:
            self._write_users()
            try:
                acceptor.step(raw)
            except SpnegoError:
                return None, None
        principal = str(acceptor.client_principal or "")
        user = principal.rpartition("\\")[2]
        known = self.store.logins.get(principal.lower()) or self.store.logins.get(user.lower())
        if known is None:
            return None, None
        self.handshakes += 1
        self.authenticated[connection] = known[1]
        return known[1], None
