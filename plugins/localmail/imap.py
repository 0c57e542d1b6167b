"""IMAP for the local mail system: pymap's IMAP server over the users' Maildirs.

pymap brings IMAP4rev1 with IDLE, UIDPLUS, MOVE and STARTTLS; it has no
CONDSTORE, QRESYNC or SPECIAL-USE (the Sent folder is found by its name), and
it answers header fetches with bare LF line endings. It allows LOGIN before
STARTTLS only from loopback clients; others must STARTTLS first.

pymap's own service object never closes open connections when it stops, so
this listener keeps track of them and ends each one (with a ``BYE``) on
:meth:`ImapListener.stop`: nothing is left running and no port stays open.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from proxyprotocol.reader import ProxyProtocolReader
from pymap.imap import IMAPServer

from threadsync.plugins.localmail.mailboxes import Mailboxes

log = logging.getLogger(__name__)


class ImapListener:
    """The listening socket and every open IMAP connection, closed together."""

    def __init__(self, mailboxes: Mailboxes) -> None:
        self.mailboxes = mailboxes
        self.port = 0
        self._imap = IMAPServer(mailboxes.login, mailboxes.config)
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[Any]] = set()

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, sock_info: Any
    ) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        try:
            await self._imap(reader, writer, sock_info)
        except (ConnectionError, OSError) as exc:
            log.debug("IMAP connection ended: %s", exc.__class__.__name__)
        finally:
            if task is not None:
                self._connections.discard(task)

    async def start(self, host: str, port: int) -> int:
        """Listen; pymap's context (its concurrency subsystem) must be applied in
        the calling task, so that every connection inherits it."""
        self.mailboxes.config.apply_context()
        reader = ProxyProtocolReader(self.mailboxes.config.proxy_protocol)
        self._server = await asyncio.start_server(
            reader.get_callback(self._serve), host, port, reuse_address=True
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for _ in range(3):  # connections accepted just now start their tasks first
            await asyncio.sleep(0)
        connections = list(self._connections)
        for task in connections:
            task.cancel()
        await asyncio.gather(*connections, return_exceptions=True)
        await asyncio.sleep(0)  # let the closed transports release their sockets
        await server.wait_closed()
