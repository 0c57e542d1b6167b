"""The one-shot loopback listener that receives the browser's redirect at the
end of an interactive sign-in (RFC 8252, section 7.3).

It listens on the loopback address of ``redirect_uri`` (port ``0`` picks a free
one), answers the browser with a short page, and hands the parameters of the
first request to the redirect path that carries ``code`` or ``error`` to the
caller: the form of a ``POST`` (``response_mode=form_post``, which keeps the
code out of the browser's history) or the query of a ``GET``. Anything else
(``/favicon.ico``, probes) gets a 404 and is otherwise ignored. Nothing is
logged: the parameters hold a one-time authorization code.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import ipaddress
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from threadsync.core.config import is_loopback
from threadsync.core.errors import ConfigError, TransientProviderError

_HEAD_LIMIT = 16 * 1024
_PAGE = (
    "<!doctype html><meta charset=utf-8><title>threadsync</title>"
    "<p>{text}</p><p>You can close this window.</p>"
)


class RedirectListener:
    """Waits for the redirect of one sign-in on a loopback address."""

    def __init__(self, server: asyncio.Server, redirect_uri: str, path: str) -> None:
        self._server = server
        self.redirect_uri = redirect_uri
        self._path = path
        self._result: asyncio.Future[dict[str, str]] = asyncio.get_running_loop().create_future()

    @classmethod
    async def start(cls, redirect_uri: str) -> RedirectListener:
        """Listen where ``redirect_uri`` points (it must be a loopback ``http`` URI)."""
        parts = urlsplit(redirect_uri)
        host = parts.hostname or ""
        if parts.scheme != "http" or not is_loopback(host):
            raise ConfigError(
                f"[outlook] redirect_uri {redirect_uri!r} is not a loopback address: the "
                "command line receives the sign-in on http://localhost:PORT/ (the HTTP "
                "API receives it at its /oauth/callback); or use --device-code"
            )
        bind = _bind_address(host)
        path = parts.path or "/"
        holder: list[RedirectListener] = []

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await holder[0]._serve(reader, writer)

        port = parts.port if parts.port is not None else 80
        try:
            server = await asyncio.start_server(on_connect, bind, port)
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {bind}:{port} for the sign-in redirect: {exc.strerror}"
            ) from None
        port = server.sockets[0].getsockname()[1]
        netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        actual = urlunsplit(("http", netloc, path, "", ""))
        listener = cls(server, actual, path)
        holder.append(listener)
        return listener

    async def wait(self, timeout: float) -> dict[str, str]:
        """The redirect's query parameters; TransientProviderError on timeout."""
        try:
            return await asyncio.wait_for(asyncio.shield(self._result), timeout)
        except TimeoutError:
            raise TransientProviderError(
                f"nobody completed the sign-in within {timeout:g} s; run connect again"
            ) from None

    async def close(self) -> None:
        self._server.close()
        with contextlib.suppress(OSError):
            await self._server.wait_closed()
        if not self._result.done():
            self._result.cancel()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, OSError):
            writer.close()
            return
        status, text = 404, "Not found."
        lines = head[:_HEAD_LIMIT].decode("latin-1").split("\r\n")
        fields = lines[0].split(" ")
        if len(fields) == 3 and fields[0] in ("GET", "POST"):
            target = urlsplit(fields[1])
            query = target.query
            if fields[0] == "POST":
                query = await _form(reader, lines[1:])
            params = dict(parse_qsl(query, keep_blank_values=True))
            if target.path == self._path and ("code" in params or "error" in params):
                status = 200
                text = (
                    "Sign-in complete: threadsync has the mailbox now."
                    if "code" in params
                    else "Sign-in was not completed: "
                    + html.escape(params.get("error", "error"))
                )
                if not self._result.done():
                    self._result.set_result(params)
        page = _PAGE.format(text=text).encode()
        reason = "OK" if status == 200 else "Not Found"
        writer.write(
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/html; charset=utf-8\r\n"
            f"Content-Length: {len(page)}\r\nConnection: close\r\n"
            "Cache-Control: no-store\r\n\r\n".encode()
            + page
        )
        with contextlib.suppress(OSError):
            await writer.drain()
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _form(reader: asyncio.StreamReader, header_lines: list[str]) -> str:
    """The url-encoded body of a POST (at most 16 KiB)."""
    length = 0
    for line in header_lines:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length" and value.strip().isdigit():
            length = int(value.strip())
    if not 0 < length <= _HEAD_LIMIT:
        return ""
    try:
        body = await asyncio.wait_for(reader.readexactly(length), 10)
    except (asyncio.IncompleteReadError, TimeoutError, OSError):
        return ""
    return body.decode("ascii", "replace")


def _bind_address(host: str) -> str:
    if host.lower().startswith("localhost"):
        return "127.0.0.1"
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return "127.0.0.1"
