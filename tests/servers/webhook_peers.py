"""Webhook receivers that misbehave, as real HTTP servers on loopback: one that
drips its answer a byte at a time (in the headers or in the body) and one that
answers 200 with a huge body. Each counts what it did, so a test can see what
the dispatcher read and when it hung up, without timing anything.

Raw sockets on threads rather than ``http.server``: the point is to send less,
later or more than a well-behaved server would.
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass, field

_HEADERS_END = b"\r\n\r\n"


def _read_request(conn: socket.socket) -> bool:
    """Read one request (headers, then Content-Length bytes); False on EOF."""
    data = b""
    while _HEADERS_END not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return False
        data += chunk
    head, _, body = data.partition(_HEADERS_END)
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            return False
        body += chunk
    return True


@dataclass
class Peer:
    """A loopback server that handles each connection on a thread of its own.

    ``mode``: ``"drip-headers"`` sends a status line then one header byte every
    ``every`` seconds; ``"drip-body"`` sends complete headers announcing a large
    body, then a byte every ``every`` seconds; ``"big"`` answers 200 with
    ``size`` bytes of body as fast as the client reads."""

    mode: str
    every: float = 0.2
    size: int = 64 * 1024 * 1024
    requests: int = 0
    finished: int = 0  # connections that ended (the client hung up or all was sent)
    sent: list[int] = field(default_factory=list)  # body bytes written, per connection
    lock: threading.Lock = field(default_factory=threading.Lock)
    _sock: socket.socket | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    @property
    def port(self) -> int:
        assert self._sock is not None
        return int(self._sock.getsockname()[1])

    def url(self, host: str = "127.0.0.1", path: str = "/hook") -> str:
        return f"http://{host}:{self.port}{path}"

    def start(self) -> Peer:
        self._sock = socket.create_server(("127.0.0.1", 0), backlog=512)
        self._sock.settimeout(0.2)
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._sock is not None:
            self._sock.close()

    def _accept(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        written = 0
        try:
            with conn:
                conn.settimeout(30)
                if not _read_request(conn):
                    return
                with self.lock:
                    self.requests += 1
                if self.mode == "drip-headers":
                    conn.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
                    while not self._stop.wait(self.every):
                        conn.sendall(b"a")
                elif self.mode == "drip-body":
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n")
                    while not self._stop.wait(self.every):
                        conn.sendall(b"a")
                        written += 1
                else:
                    head = f"HTTP/1.1 200 OK\r\nContent-Length: {self.size}\r\n\r\n"
                    conn.sendall(head.encode())
                    chunk = b"x" * 65536
                    while written < self.size and not self._stop.is_set():
                        conn.sendall(chunk[: self.size - written])
                        written += min(len(chunk), self.size - written)
        except OSError:
            pass  # the client hung up: what it cost is counted below
        finally:
            with self.lock:
                self.finished += 1
                self.sent.append(written)
