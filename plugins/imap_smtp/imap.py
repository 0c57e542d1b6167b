"""A small, typed asynchronous IMAP session over aioimaplib.

:class:`ImapSession` connects with implicit TLS, STARTTLS or (loopback only)
plaintext, logs in with LOGIN, AUTHENTICATE PLAIN or XOAUTH2, and offers the
handful of commands the provider needs: LIST, STATUS, EXAMINE, UID SEARCH,
UID FETCH, APPEND, IDLE and LOGOUT. Mailbox names are Unicode here; they are
encoded to modified UTF-7 and quoted on the way out.

STARTTLS is implemented here, not by aioimaplib (which has no method for it):
the command is sent in the not-authenticated state, the transport is upgraded
in place with ``loop.start_tls`` (certificate verified), and CAPABILITY is asked
again because pre-TLS capabilities must not be trusted (RFC 3501 6.2.1).

Every command is bounded: it fails with ``TransientProviderError`` when the
server does not answer within the timeout or the connection drops, and the
session is then unusable (``alive`` is false) because aioimaplib cannot recover
from an abandoned command. Failures leave as :mod:`threadsync.core.errors` exceptions only.
A session runs one command at a time; the caller serialises access.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import inspect
import logging
import re
import ssl
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

from threadsync.core.errors import (
    AuthenticationFailed,
    ProviderProtocolError,
    ThreadsyncError,
    TransientProviderError,
)
from threadsync.core.network import NetworkPolicy, open_socket
from threadsync.core.tls import certificate_error, certificate_failure
from threadsync.plugins.imap_smtp import imap_syntax as syntax
from threadsync.plugins.imap_smtp import wire

log = logging.getLogger(__name__)

T = TypeVar("T")

#: NO/BAD response codes (RFC 5530) that mean "try again later".
_TRANSIENT_CODES = frozenset({"UNAVAILABLE", "SERVERBUG", "INUSE", "LIMIT"})
#: Response codes of a login that the user must fix.
_AUTH_CODES = frozenset({"AUTHENTICATIONFAILED", "AUTHORIZATIONFAILED", "EXPIRED"})
_CODE = re.compile(r"^\[([A-Z-]+)")
#: Servers end IDLE after 30 minutes; stop a little before (RFC 2177).
MAX_IDLE_SECONDS = 29 * 60
#: How long close() waits for the server to confirm LOGOUT and the socket to go.
_CLOSE_SECONDS = 2.0
_NEW_MAIL = re.compile(rb"^\d+ (EXISTS|RECENT)\b", re.I)
#: "Use the endpoint's timeout" (a negative limit is otherwise meaningless).
_DEFAULT = -1.0


@dataclass(frozen=True)
class ImapEndpoint:
    """Where and how to connect."""

    host: str
    port: int
    security: str  # "tls" | "starttls" | "none"
    ssl_context: ssl.SSLContext | None
    timeout: float = 30.0
    #: Set when a tenant named the host: connect only to addresses it allows.
    network: NetworkPolicy | None = None


@dataclass(frozen=True)
class Selection:
    """The mailbox opened by the last EXAMINE."""

    name: str
    uidvalidity: int
    uidnext: int | None
    exists: int
    highestmodseq: int | None = None


class Reply(NamedTuple):
    """A completed command: status word, untagged data lines, status text."""

    result: str
    lines: list[bytes | bytearray]
    text: str


class ImapSession:
    """One logged-in (or logging-in) IMAP connection. Build with :meth:`connect`."""

    def __init__(
        self, endpoint: ImapEndpoint, protocol: wire.ImapProtocol, transport: asyncio.Transport
    ) -> None:
        self.endpoint = endpoint
        self._protocol = protocol
        self._transport = transport
        self._broken = False
        self._closing = False
        #: True once a command went unanswered for the whole timeout (as opposed
        #: to the connection being dropped, after which a retry is worthwhile).
        self.timed_out = False
        self._secrets: tuple[str, ...] = ()
        #: The mailbox currently open read-only, if any.
        self.selected: Selection | None = None

    # ---- connecting -------------------------------------------------------------------

    @classmethod
    async def connect(cls, endpoint: ImapEndpoint) -> ImapSession:
        """Open the connection, read the greeting and upgrade to TLS if asked.

        For a host a tenant named (``endpoint.network``), the address connected
        to is one the network policy allowed, and any failure up to the greeting
        is told as "could not connect", whatever the cause: a tenant must not
        learn which ports are closed, silent or speak TLS."""
        if endpoint.network is None:
            return await cls._connect(endpoint)
        try:
            return await cls._connect(endpoint)
        except (ThreadsyncError, OSError, TimeoutError) as exc:
            log.warning(
                "IMAP connect for a tenant failed: %s",
                exc,
                extra={"imap_host": endpoint.host, "imap_port": endpoint.port},
            )
            raise TransientProviderError(
                f"could not connect to IMAP server {endpoint.host}:{endpoint.port}"
            ) from None

    @classmethod
    async def _connect(cls, endpoint: ImapEndpoint) -> ImapSession:
        loop = asyncio.get_running_loop()
        protocol = wire.ImapProtocol(loop)
        implicit = endpoint.ssl_context if endpoint.security == "tls" else None
        try:
            if endpoint.network is not None:
                sock = await open_socket(
                    endpoint.host, endpoint.port, endpoint.network, endpoint.timeout
                )
                where: dict[str, Any] = {"sock": sock}
            else:
                where = {"host": endpoint.host, "port": endpoint.port}
            transport, _ = await asyncio.wait_for(
                loop.create_connection(
                    lambda: protocol,
                    ssl=implicit,
                    server_hostname=endpoint.host if implicit else None,
                    ssl_handshake_timeout=endpoint.timeout if implicit else None,
                    **where,
                ),
                endpoint.timeout,
            )
        except (OSError, TimeoutError) as exc:
            raise _connect_error(endpoint, exc) from None
        session = cls(endpoint, protocol, transport)
        try:
            await session._run("greeting", protocol.wait("AUTH|NONAUTH"))
            if endpoint.security == "starttls":
                await session._starttls()
        except BaseException:
            await session._dispose()
            raise
        return session

    async def _starttls(self) -> None:
        if self.state != wire.STATE_NONAUTH:
            raise ProviderProtocolError(
                f"IMAP server {self.endpoint.host} logged us in before STARTTLS; refusing"
            )
        if not self.has("STARTTLS"):
            raise ProviderProtocolError(
                f"IMAP server {self.endpoint.host} does not offer STARTTLS; use security tls"
            )
        await self._ok("STARTTLS", self._command("STARTTLS"))
        if self._protocol.incomplete_line:
            # Bytes sent before the handshake could be injected by a third party.
            raise ProviderProtocolError(
                f"IMAP server {self.endpoint.host} sent data after STARTTLS"
            )
        assert self.endpoint.ssl_context is not None
        loop = asyncio.get_running_loop()
        try:
            upgraded = await asyncio.wait_for(
                loop.start_tls(
                    self._transport,
                    self._protocol,
                    self.endpoint.ssl_context,
                    server_hostname=self.endpoint.host,
                    ssl_handshake_timeout=self.endpoint.timeout,
                ),
                self.endpoint.timeout,
            )
        except (OSError, TimeoutError) as exc:
            self._broken = True
            raise _connect_error(self.endpoint, exc) from None
        if upgraded is None:
            raise TransientProviderError(f"IMAP STARTTLS with {self.endpoint.host} failed")
        self._transport = upgraded
        self._protocol.transport = upgraded
        await self._run("CAPABILITY", self._protocol.capability())

    # ---- state ------------------------------------------------------------------------

    @property
    def state(self) -> str:
        return str(self._protocol.state)

    @property
    def alive(self) -> bool:
        """False once the connection is lost, timed out or closed."""
        return not (self._broken or self._closing or self._protocol.closed.done())

    @property
    def encrypted(self) -> bool:
        """True when the connection runs over TLS (implicit or after STARTTLS)."""
        return self._transport.get_extra_info("sslcontext") is not None

    @property
    def capabilities(self) -> frozenset[str]:
        return frozenset(str(c).upper() for c in self._protocol.capabilities)

    def has(self, capability: str) -> bool:
        return capability.upper() in self.capabilities

    # ---- authentication ---------------------------------------------------------------

    async def login(self, username: str, password: str) -> None:
        """LOGIN (AUTHENTICATE PLAIN for non-ASCII credentials, when offered)."""
        if self.state == wire.STATE_AUTH:
            return  # PREAUTH greeting
        self._secrets = (password,)
        if not (username + password).isascii() and self.has("AUTH=PLAIN"):
            sasl = base64.b64encode(f"\0{username}\0{password}".encode()).decode("ascii")
            await self._authenticate("PLAIN", sasl, username)
            return
        reply = await self._run(
            "LOGIN", self._command("LOGIN", syntax.quote(username), syntax.quote(password))
        )
        await self._logged_in(reply, username)

    async def xoauth2(self, username: str, token: str) -> None:
        """AUTHENTICATE XOAUTH2 with an OAuth 2.0 access token."""
        if self.state == wire.STATE_AUTH:
            return
        self._secrets = (token,)
        if not self.has("AUTH=XOAUTH2"):
            raise ProviderProtocolError(f"IMAP server {self.endpoint.host} does not offer XOAUTH2")
        sasl = base64.b64encode(f"user={username}\1auth=Bearer {token}\1\1".encode()).decode(
            "ascii"
        )
        await self._authenticate("XOAUTH2", sasl, username)

    async def _authenticate(self, mechanism: str, sasl: str, username: str) -> None:
        self._protocol.sasl_challenges.clear()
        if self.has("SASL-IR"):
            self._protocol.sasl_responses = []
            command = self._command("AUTHENTICATE", mechanism, sasl)
        else:
            self._protocol.sasl_responses = [sasl.encode("ascii")]
            command = self._command("AUTHENTICATE", mechanism)
        try:
            reply = await self._run("AUTHENTICATE", command)
        finally:
            self._protocol.sasl_responses = []
        await self._logged_in(reply, username)

    async def _logged_in(self, reply: Reply, username: str) -> None:
        if reply.result == "OK":
            self._protocol.state = wire.STATE_AUTH
            # Servers announce more after login (CONDSTORE, SPECIAL-USE ...).
            await self._run("CAPABILITY", self._protocol.capability())
            log.info(
                "IMAP login ok", extra={"imap_host": self.endpoint.host, "imap_user": username}
            )
            return
        code = _response_code(reply.text)
        detail = self._clean(reply.text)
        if code in _TRANSIENT_CODES:
            raise TransientProviderError(
                f"IMAP server {self.endpoint.host} cannot log in {username} now: {detail}"
            )
        if reply.result == "NO" or code in _AUTH_CODES:
            raise AuthenticationFailed(
                f"IMAP login as {username} at {self.endpoint.host} was rejected: {detail}"
            )
        raise ProviderProtocolError(
            f"IMAP login as {username} at {self.endpoint.host} failed: {detail}"
        )

    # ---- mailboxes --------------------------------------------------------------------

    async def list_mailboxes(
        self, pattern: str = "*", *, special_use_only: bool = False
    ) -> list[syntax.ListedMailbox]:
        """LIST ``""`` ``pattern``; with ``special_use_only`` and LIST-EXTENDED,
        only mailboxes with a special use are returned (RFC 6154)."""
        args = ['""', syntax.mailbox_arg(pattern)]
        if self.has("SPECIAL-USE") and self.has("LIST-EXTENDED"):
            if special_use_only:
                args.insert(0, "(SPECIAL-USE)")
            else:
                args += ["RETURN", "(SPECIAL-USE)"]
        reply = await self._ok("LIST", self._command("LIST", *args))
        return syntax.parse_list(reply.lines)

    async def status(self, name: str, items: Sequence[str]) -> dict[str, int]:
        """STATUS of ``name`` (without selecting it)."""
        reply = await self._ok(
            f"STATUS {name!r}",
            self._command("STATUS", syntax.mailbox_arg(name), "(" + " ".join(items) + ")"),
        )
        return syntax.parse_status(reply.lines)

    async def examine(self, name: str) -> Selection:
        """Open ``name`` read-only (EXAMINE never changes ``\\Seen``)."""
        self.selected = None
        reply = await self._run("EXAMINE", self._command("EXAMINE", syntax.mailbox_arg(name)))
        if reply.result != "OK":
            self._protocol.state = wire.STATE_AUTH  # a failed EXAMINE deselects
            self._raise(f"EXAMINE {name!r}", reply)
        self._protocol.state = wire.STATE_SELECTED
        values = syntax.parse_select(reply.lines)
        if "UIDVALIDITY" not in values:
            raise ProviderProtocolError(f"IMAP server gave no UIDVALIDITY for {name!r}")
        self.selected = Selection(
            name,
            values["UIDVALIDITY"],
            values.get("UIDNEXT"),
            values.get("EXISTS", 0),
            values.get("HIGHESTMODSEQ"),
        )
        return self.selected

    async def fresh_status(self, name: str, items: Sequence[str]) -> dict[str, int]:
        """STATUS values that are current even when ``name`` is selected.

        STATUS of the selected mailbox may answer from the session's older view
        (Dovecot does; RFC 3501 6.3.10 says not to use it there). So the mailbox
        is left first with UNSELECT, or, where that is missing, opened again
        with EXAMINE, whose answer carries the same values. (CLOSE would do on
        most servers, but some refuse it on a read-only mailbox.)
        """
        current = self.selected
        if current is None or current.name != name:
            return await self.status(name, items)
        if self.has("UNSELECT"):
            self.selected = None
            await self._ok("UNSELECT", self._command("UNSELECT"))
            self._protocol.state = wire.STATE_AUTH
            return await self.status(name, items)
        reopened = await self.examine(name)
        if reopened.uidnext is None:
            return await self.status(name, items)
        values = {"UIDVALIDITY": reopened.uidvalidity, "UIDNEXT": reopened.uidnext}
        if reopened.highestmodseq is not None:
            values["HIGHESTMODSEQ"] = reopened.highestmodseq
        return values

    # ---- messages ---------------------------------------------------------------------

    async def uid_search(self, *criteria: str) -> list[int]:
        """UID SEARCH in the selected mailbox; sorted UIDs."""
        reply = await self._ok("UID SEARCH", self._command("SEARCH", *criteria, prefix="UID"))
        return syntax.parse_search(reply.lines)

    async def uid_fetch(self, uids: str, items: str) -> list[syntax.FetchedMessage]:
        """UID FETCH in the selected mailbox. The timeout counts from the last
        byte received, so a large message may take longer as long as it flows."""
        command = wire.new_command(
            "FETCH",
            self._protocol.new_tag(),
            uids,
            items,
            prefix="UID",
            timeout=self.endpoint.timeout,
        )
        reply = await self._ok("UID FETCH", self._protocol.execute(command), limit=None)
        return syntax.parse_fetch(reply.lines)

    async def append(self, name: str, raw: bytes, flags: str) -> None:
        """APPEND ``raw`` to ``name`` with ``flags`` such as ``(\\Seen)``."""
        timeout = self.endpoint.timeout + len(raw) / 250_000
        await self._ok(
            f"APPEND to {name!r}",
            self._protocol.append(raw, syntax.mailbox_arg(name), flags, None, timeout=timeout),
            limit=timeout,
        )

    async def idle(self, timeout: float, stop: asyncio.Event) -> bool:
        """IDLE in the selected mailbox until new mail (EXISTS/RECENT), ``stop``
        is set, or ``timeout`` passes; True only for new mail. Always ends with
        DONE and waits for the server's tagged answer."""
        protocol = self._protocol
        while not protocol.idle_queue.empty():
            protocol.idle_queue.get_nowait()
        command = wire.new_idle_command(protocol.new_tag(), protocol.idle_queue)
        idle: asyncio.Future[Reply] = asyncio.ensure_future(
            self._run("IDLE", protocol.execute(command), limit=None)
        )
        try:
            await self._run("IDLE", self._first(idle, protocol.wait_for_idle_response()))
            if idle.done():  # answered without a continuation: refused
                self._raise("IDLE", idle.result())
            changed = await self._wait_for_push(idle, timeout, stop)
            if not idle.done():
                protocol.idle_done()
            reply: Reply = await self._run("IDLE", asyncio.shield(idle))
        except BaseException:
            idle.cancel()
            self._broken = True
            raise
        if reply.result != "OK":
            self._raise("IDLE", reply)
        return changed

    async def _wait_for_push(
        self, idle: asyncio.Future[Any], timeout: float, stop: asyncio.Event
    ) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(timeout, MAX_IDLE_SECONDS)
        stopped = asyncio.ensure_future(stop.wait())
        try:
            while (remaining := deadline - loop.time()) > 0:
                push = asyncio.ensure_future(self._protocol.idle_queue.get())
                done, _ = await asyncio.wait(
                    {push, stopped, idle, self._protocol.closed},
                    timeout=remaining,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if push not in done:
                    push.cancel()
                    if push.done() and not push.cancelled():  # arrived meanwhile
                        return any(_NEW_MAIL.match(bytes(line)) for line in push.result())
                    if self._protocol.closed.done():
                        raise TransientProviderError(
                            f"IMAP connection to {self.endpoint.host} lost during IDLE"
                        )
                    return False
                if any(_NEW_MAIL.match(bytes(line)) for line in push.result()):
                    return True
            return False
        finally:
            stopped.cancel()

    @staticmethod
    async def _first(idle: asyncio.Future[Any], ack: Awaitable[None]) -> None:
        ack_task = asyncio.ensure_future(ack)
        try:
            await asyncio.wait({idle, ack_task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ack_task.cancel()

    # ---- closing ----------------------------------------------------------------------

    async def close(self) -> None:
        """LOGOUT if the session is healthy, then release the socket. Idempotent."""
        if self._closing:
            return
        if self.alive:
            with contextlib.suppress(wire.AioImapError, OSError, TimeoutError):
                await asyncio.wait_for(
                    self._command("LOGOUT"), min(self.endpoint.timeout, _CLOSE_SECONDS)
                )
        self._closing = True
        await self._dispose()

    async def _dispose(self) -> None:
        self._closing = True
        if not self._protocol.closed.done():
            self._transport.close()
            try:
                await asyncio.wait_for(asyncio.shield(self._protocol.closed), _CLOSE_SECONDS)
            except TimeoutError:
                self._transport.abort()
                await asyncio.sleep(0)

    # ---- plumbing ---------------------------------------------------------------------

    def _command(self, name: str, *args: str, prefix: str | None = None) -> Awaitable[Any]:
        return self._protocol.execute(  # type: ignore[no-any-return]
            wire.new_command(name, self._protocol.new_tag(), *args, prefix=prefix)
        )

    async def _ok(self, what: str, aw: Awaitable[Any], limit: float | None = _DEFAULT) -> Reply:
        reply: Reply = await self._run(what, aw, limit=limit)
        if reply.result != "OK":
            self._raise(what, reply)
        return reply

    async def _run(self, what: str, aw: Awaitable[Any], limit: float | None = _DEFAULT) -> Any:
        """Await one protocol call, bounded by ``limit`` seconds (default: the
        endpoint's timeout; ``None``: only the command's own inactivity timer)
        and by the connection staying up. aioimaplib responses come back as
        :class:`Reply`; library errors leave as core errors."""
        if self._broken or self._closing or self._protocol.closed.done():
            if inspect.iscoroutine(aw):
                aw.close()  # never to run: close it, or it is reported as never awaited
            raise TransientProviderError(f"IMAP connection to {self.endpoint.host} is closed")
        if limit == _DEFAULT:
            limit = self.endpoint.timeout
        task = asyncio.ensure_future(aw)
        try:
            done, _ = await asyncio.wait(
                {task, self._protocol.closed}, timeout=limit, return_when=asyncio.FIRST_COMPLETED
            )
        except BaseException:
            task.cancel()
            self._broken = True
            raise
        if task not in done:
            task.cancel()
            self._broken = True
            self.timed_out = not self._protocol.closed.done()
            self._transport.abort()
            reason = f"no answer within {limit:g}s" if self.timed_out else "connection lost"
            raise TransientProviderError(f"IMAP {what} at {self.endpoint.host}: {reason}")
        try:
            result = task.result()
        except wire.CommandTimeout:
            self._broken = self.timed_out = True
            self._transport.abort()
            raise TransientProviderError(
                f"IMAP {what} at {self.endpoint.host}: the server stopped answering"
            ) from None
        except wire.AioImapError as exc:
            raise ProviderProtocolError(
                f"IMAP {what} at {self.endpoint.host} failed: {self._clean(str(exc))}"
            ) from None
        except ValueError as exc:  # NUL/CR/LF in an argument
            raise ProviderProtocolError(f"IMAP {what}: {exc}") from None
        except OSError as exc:
            self._broken = True
            raise TransientProviderError(
                f"IMAP {what} at {self.endpoint.host}: {exc.strerror or exc}"
            ) from None
        return _reply(result) if isinstance(result, wire.Response) else result

    def _raise(self, what: str, reply: Reply) -> None:
        detail = self._clean(reply.text)
        if _response_code(reply.text) in _TRANSIENT_CODES:
            raise TransientProviderError(f"IMAP {what} at {self.endpoint.host}: {detail}")
        raise ProviderProtocolError(
            f"IMAP {what} at {self.endpoint.host} answered {reply.result}: {detail}"
        )

    def _clean(self, text: str) -> str:
        for secret in self._secrets:
            if secret:
                text = text.replace(secret, "***")
        return text[:300]


def _reply(response: Any) -> Reply:
    lines = list(response.lines)
    text = lines.pop() if lines else b""
    return Reply(str(response.result), lines, bytes(text).decode("utf-8", "replace"))


def _response_code(text: str) -> str | None:
    match = _CODE.match(text.strip())
    return match.group(1) if match else None


def _connect_error(
    endpoint: ImapEndpoint, exc: BaseException
) -> TransientProviderError | ProviderProtocolError:
    cert = certificate_error(exc)
    if cert is not None:
        return certificate_failure(endpoint.host, endpoint.port, cert)
    if isinstance(exc, ssl.SSLError):
        return ProviderProtocolError(
            f"TLS with IMAP server {endpoint.host}:{endpoint.port} failed: {exc.reason}"
        )
    if isinstance(exc, TimeoutError):
        return TransientProviderError(
            f"IMAP server {endpoint.host}:{endpoint.port} did not answer within "
            f"{endpoint.timeout:g}s"
        )
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return TransientProviderError(
        f"cannot connect to IMAP server {endpoint.host}:{endpoint.port}: {reason}"
    )
