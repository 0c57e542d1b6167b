"""A TCP proxy on loopback that breaks connections on purpose.

:class:`FaultProxy` listens on a free loopback port and forwards every
connection to one target (Dovecot, aiosmtpd, the fake Graph). It works on bytes
only, so TLS passes through untouched. A test arms :class:`Fault` objects; each
one applies to one direction of the next connection whose stream reaches its
trigger, a byte offset (chosen, or drawn at random from a seeded range) or the
end of a byte pattern (``b"\\r\\n.\\r\\n"``: just after the end of SMTP DATA),
optionally ``plus`` bytes further (a random point inside a FETCH literal), or,
with neither, ``plus`` bytes into the next data in that direction (for TLS,
where no pattern is visible: armed by a fake at the moment it handles a request).
From there the connection is:

* ``reset``: the client side is aborted with an RST (``SO_LINGER`` 0); what was
  already forwarded to the server is flushed and the server side closed, as when
  a line drops after the server got the bytes;
* ``stall``: no byte moves in either direction any more, the sockets stay open
  (longer than any timeout of the client), until the client gives up;
* ``throttle``: that direction goes on at ``rate`` bytes per second.

The proxy runs its own event loop in a thread, so it keeps forwarding while a
test's loop or a subprocess waits; it counts connections and remembers which
faults fired.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import threading
from dataclasses import dataclass, field
from typing import Literal

Kind = Literal["reset", "stall", "throttle"]
Direction = Literal["up", "down"]  # up: client -> server; down: server -> client


@dataclass
class Fault:
    """One fault, armed on a proxy: ``kind`` in ``direction`` once the stream
    reached byte ``at`` or the end of ``after`` (whichever is given)."""

    kind: Kind
    direction: Direction
    at: int | None = None
    #: A byte pattern, or several that must follow each other in the stream.
    after: bytes | tuple[bytes, ...] | None = None
    #: With ``after``: how many bytes past the end of the pattern.
    plus: int = 0
    #: For ``throttle``: bytes per second.
    rate: int = 300
    #: Set once the fault took effect (by the proxy's thread).
    fired: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def random(
        cls, kind: Kind, direction: Direction, low: int, high: int, rng: random.Random
    ) -> Fault:
        """A fault at a random byte offset in ``[low, high]``."""
        return cls(kind, direction, at=rng.randint(low, high))

    def trigger(self, seen: int, tail: bytes, chunk: bytes) -> int | None:
        """Where in ``chunk`` (after ``seen`` bytes of the stream, whose last
        bytes are ``tail``) the fault starts, or ``None`` if not in it."""
        if self.at is None and not self.after:
            self.at = seen + self.plus  # relative: from where this stream is now
        if self.at is not None:
            if seen + len(chunk) >= self.at:
                return max(0, self.at - seen)
            return None
        window = tail + chunk
        patterns = (self.after,) if isinstance(self.after, bytes) else tuple(self.after or ())
        # A pattern wholly inside the tail was looked for with the previous chunk.
        start = max(0, len(tail) - len(patterns[0]) + 1)
        while patterns:
            found = window.find(patterns[0], start)
            if found < 0:
                self.after = patterns
                return None
            start = found + len(patterns[0])
            patterns = patterns[1:]
        # From here on an offset in the stream: the last pattern's end plus ``plus``.
        self.at = seen + start - len(tail) + self.plus
        self.after = None
        return self.trigger(seen, tail, chunk)


class _Link:
    """One proxied connection: two pumps and the faults that hit them."""

    def __init__(
        self,
        proxy: FaultProxy,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        server: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        self.proxy = proxy
        self.client = client
        self.server = server
        self.stalled = asyncio.Event()
        self.closed = False

    async def run(self) -> None:
        up = asyncio.create_task(self._pump("up", self.client[0], self.server[1]))
        down = asyncio.create_task(self._pump("down", self.server[0], self.client[1]))
        try:
            _done, pending = await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
            if pending and not self.closed:
                # One side finished normally: let the other say its last words.
                await asyncio.wait(pending, timeout=5)
        finally:
            for task in (up, down):
                task.cancel()
            await asyncio.gather(up, down, return_exceptions=True)
            self._close(self.client[1])
            self._close(self.server[1])

    async def _pump(
        self, direction: Direction, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        seen = 0
        tail = b""
        rate: int | None = None
        while True:
            try:
                chunk = await reader.read(65536)
            except (OSError, ConnectionError):
                chunk = b""
            if not chunk:
                if not self.stalled.is_set():
                    with contextlib.suppress(OSError, RuntimeError):
                        writer.write_eof()
                else:
                    self.closed = True  # the client gave up on the stalled line
                return
            if self.stalled.is_set():
                continue  # swallowed: nothing moves on a stalled line
            fault, cut = self.proxy._claim(direction, seen, tail, chunk)
            if fault is not None and cut is not None:
                head, rest = chunk[:cut], chunk[cut:]
                await self._forward(writer, head, rate)
                seen += len(head)
                fault.fired.set()
                if fault.kind == "reset":
                    self.closed = True
                    await self._reset()
                    return
                if fault.kind == "stall":
                    self.stalled.set()
                    continue
                rate = fault.rate
                chunk = rest
            await self._forward(writer, chunk, rate)
            seen += len(chunk)
            tail = (tail + chunk)[-64:]

    async def _forward(self, writer: asyncio.StreamWriter, data: bytes, rate: int | None) -> None:
        if not data or self.stalled.is_set():
            return
        if rate is None:
            writer.write(data)
            await writer.drain()
            return
        step = max(1, rate // 10)
        for start in range(0, len(data), step):
            writer.write(data[start : start + step])
            await writer.drain()
            await asyncio.sleep(0.1)

    async def _reset(self) -> None:
        """RST towards the client; the server side gets what was forwarded, then FIN."""
        client = self.client[1]
        sock = client.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.transport.abort()
        server = self.server[1]
        with contextlib.suppress(OSError, ConnectionError):
            await server.drain()
        server.close()

    def abort(self) -> None:
        """Drop both sides at once (the proxy is stopping)."""
        self.closed = True
        self.client[1].transport.abort()
        self.server[1].transport.abort()

    @staticmethod
    def _close(writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, RuntimeError):
            writer.close()


class FaultProxy:
    """A loopback proxy to ``target_host:target_port`` that injects armed faults.

    Use as a context manager, or :meth:`start` / :meth:`stop`. ``port`` is where
    clients connect.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.host = "127.0.0.1"
        self.port = 0
        self.connections = 0
        self.fired: list[Fault] = []
        self._armed: list[Fault] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._links: dict[asyncio.Task[None], _Link] = {}

    def arm(self, *faults: Fault) -> None:
        """Faults for the connections to come (each fires once)."""
        with self._lock:
            self._armed.extend(faults)

    def disarm(self) -> None:
        with self._lock:
            self._armed.clear()

    def _claim(
        self, direction: Direction, seen: int, tail: bytes, chunk: bytes
    ) -> tuple[Fault | None, int | None]:
        with self._lock:
            for fault in self._armed:
                if fault.direction != direction:
                    continue
                cut = fault.trigger(seen, tail, chunk)
                if cut is not None:
                    self._armed.remove(fault)
                    self.fired.append(fault)
                    return fault, cut
        return None, None

    def start(self) -> FaultProxy:
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            self._server = loop.run_until_complete(
                asyncio.start_server(self._accept, self.host, 0)
            )
            self.port = self._server.sockets[0].getsockname()[1]
            loop.call_soon(ready.set)
            loop.run_forever()
            self._server.close()
            # Aborting the sockets ends every link's pumps: its task returns on
            # its own (a cancelled connection task is logged as an error).
            for link in list(self._links.values()):
                link.abort()
            if self._links:
                loop.run_until_complete(asyncio.wait(list(self._links), timeout=5))
            loop.run_until_complete(self._server.wait_closed())
            loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=run, name="fault-proxy", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise TimeoutError("fault proxy did not start")
        return self

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop = None
        self._thread = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            server = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None
        link = _Link(self, (reader, writer), server)
        self._links[task] = link
        try:
            await link.run()
        finally:
            self._links.pop(task, None)
