"""The aioimaplib client protocol, with the fixes the IMAP session relies on.

aioimaplib parses server responses well enough but has a few flaws that matter
for a sync service (see the project's pitfalls list). This subclass fixes them
at the root instead of working around them in every caller:

* ``_handle_responses`` recursed once per response line, so a response of about
  a thousand lines (a header FETCH of a few hundred messages, a LIST of a big
  folder tree) raised ``RecursionError`` inside the protocol callback and the
  command hung until its timeout (upstream issue #118). It is a loop here.
* Nothing is logged: the stock protocol logs every byte received (message
  bodies) and every command sent (SASL responses carry the password) at DEBUG.
* ``AUTHENTICATE`` continuations are answered: with the next queued SASL
  response, or with an empty line, which is what a server that rejected an
  XOAUTH2 token waits for after its ``+`` JSON challenge (the stock client never
  answers and hangs).
* FETCH responses are tracked in linear time (the library's check whether a
  response is complete rescanned all lines so far, for every line), and the
  inactivity timeout of a FETCH no longer replaces a timer per line received.
* Only the leading ``"* "`` of an untagged response is removed (the stock client
  removed every ``"* "`` in the line, mangling names such as ``"a* b"``).
* ``closed`` is a future that completes when the connection is lost, so callers
  can stop waiting for an answer that will never come; a response the library
  cannot place (an unexpected tag) aborts the connection instead of raising into
  the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

from aioimaplib import aioimaplib as _imap

log = logging.getLogger(__name__)

CRLF = b"\r\n"

#: Re-exported names of the library, so the rest of the plugin imports them from
#: one typed place.
AioImapError: type[Exception] = _imap.AioImapException
CommandTimeout: type[Exception] = _imap.CommandTimeout
STATE_AUTH: str = _imap.AUTH
STATE_SELECTED: str = _imap.SELECTED
STATE_NONAUTH: str = _imap.NONAUTH


# UNSELECT (RFC 3691) is missing from the library's command table, which
# ``execute`` consults for the states a command is valid in.
_imap.Commands.setdefault("UNSELECT", _imap.Cmd("UNSELECT", (_imap.SELECTED,), _imap.Exec.is_sync))


#: How an IMAP server greets (RFC 9051, 7.1): OK, PREAUTH or BYE.
_IMAP_GREETING = re.compile(rb"\* (OK|PREAUTH|BYE)\b", re.IGNORECASE)


class ImapProtocol(_imap.IMAP4ClientProtocol):  # type: ignore[misc]
    """An ``IMAP4ClientProtocol`` with the fixes listed in the module docstring."""

    incomplete_line: bytes
    current_command: Any

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop, None)
        #: Completes (with ``None``) once the connection is gone, for any reason.
        self.closed: asyncio.Future[None] = loop.create_future()
        #: SASL responses still to send, one per ``+`` continuation of AUTHENTICATE.
        self.sasl_responses: list[bytes] = []
        #: Continuation texts the server sent during AUTHENTICATE (error details).
        self.sasl_challenges: list[bytes] = []
        #: The first line, when it is not an IMAP greeting (another protocol answered).
        self.foreign_greeting: bytes | None = None

    # ---- receiving ------------------------------------------------------------------

    def data_received(self, d: bytes) -> None:
        try:
            self._handle_responses(
                self.incomplete_line + d, self._handle_line, self.current_command
            )
            self.incomplete_line = b""
            self.current_command = None
        except _imap.IncompleteRead as incomplete:
            self.current_command = incomplete.cmd
            self.incomplete_line = incomplete.data
        except _imap.AioImapException as exc:
            # A response that fits no pending command: the session is out of step
            # with the server and cannot be trusted any more.
            log.warning(
                "IMAP response out of sequence; dropping the connection",
                extra={"imap_error": type(exc).__name__},
            )
            if self.transport is not None:
                self.transport.abort()

    def _handle_responses(self, data: bytes, line_handler: Any, current_cmd: Any = None) -> None:
        # The library's recursive algorithm, unrolled into a loop (same states,
        # same order of calls), so the depth no longer grows with the response.
        while True:
            if not data:
                if self.pending_sync_command is not None:
                    self.pending_sync_command.flush()
                if current_cmd is not None and current_cmd.wait_data():
                    raise _imap.IncompleteRead(current_cmd)
                return

            if current_cmd is not None and current_cmd.wait_literal_data():
                data = current_cmd.append_literal_data(data)
                if current_cmd.wait_literal_data():
                    raise _imap.IncompleteRead(current_cmd)

            line, separator, tail = data.partition(CRLF)
            if not separator:
                raise _imap.IncompleteRead(current_cmd, data)

            cmd = line_handler(line, current_cmd)

            begin_literal = _imap.literal_data_re.match(line)
            if begin_literal:
                size = int(begin_literal.group("size"))
                if cmd is None:
                    cmd = _imap.Command("NIL", "unused")
                cmd.begin_literal_data(size)
                current_cmd = cmd
            elif cmd is not None and cmd.wait_data():
                current_cmd = cmd
            else:
                current_cmd = None
            data = tail

    def _handle_line(self, line: bytes, current_cmd: Any) -> Any:
        # Before the greeting, aioimaplib hands the line to a task that raises on
        # anything but an IMAP greeting, where nobody retrieves the error, and the
        # caller waits out its timeout. Another protocol's greeting ends it at once.
        if self.state == _imap.CONNECTED and line and not _IMAP_GREETING.match(line):
            self.foreign_greeting = line[:200]
            if self.transport is not None:
                self.transport.abort()
            return None
        return super()._handle_line(line, current_cmd)

    def _untagged_response(self, line: bytes) -> Any:
        line = line[2:] if line.startswith(b"* ") else line[1:]
        if self.pending_sync_command is not None:
            self.pending_sync_command.append_to_resp(line)
            return self.pending_sync_command
        match = _imap.message_data_re.match(line)
        if match:
            name, text = match.group(1), line
        else:
            name, _, text = line.partition(b" ")
        command = self.pending_async_commands.get(name.decode("ascii", "replace").upper())
        if command is not None:
            command.append_to_resp(text)
            return command
        # Unsolicited data (EXISTS, EXPUNGE, flag updates) while no command wants it.
        return None

    def _continuation(self, line: bytes) -> None:
        command = self.pending_sync_command
        if command is not None and command.name == "AUTHENTICATE":
            if self.sasl_responses:
                reply = self.sasl_responses.pop(0)
            else:
                # A challenge after our last response is the server's error report
                # (XOAUTH2 sends JSON here); an empty answer makes it finish with NO.
                self.sasl_challenges.append(line[1:].strip())
                reply = b""
            if self.transport is not None:
                self.transport.write(reply + CRLF)
            return
        super()._continuation(line)

    # ---- sending --------------------------------------------------------------------

    def send(self, line: str, scrub: str | None = None) -> None:
        # Deliberately silent: command lines can carry credentials.
        if self.transport is not None:
            self.transport.write(line.encode("utf-8") + CRLF)

    # ---- connection -----------------------------------------------------------------

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


class FetchCommand(_imap.FetchCommand):  # type: ignore[misc]
    """FETCH whose "response still open?" check is incremental.

    The library rescans every line received so far on each new line to find
    the current FETCH response and balance its parentheses: quadratic, seconds
    for a few thousand lines. Here the balance of the current response is kept
    as lines arrive; the answer is the same (literals, being ``bytearray``, are
    not counted, as before).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._depth = 0
        self._last_data = 0.0
        super().__init__(*args, **kwargs)

    # The timeout counts from the last data received. The library cancels and
    # creates a timer for every line (tens of thousands for one big FETCH); here
    # each line only notes the time, and the one timer, when it goes off early,
    # is set again for the rest.

    def _set_timer(self) -> None:
        if self._timeout is not None:
            self._last_data = self._loop.time()
            self._timer = self._loop.call_later(self._timeout, self._check_timeout)

    def _reset_timer(self) -> None:
        self._last_data = self._loop.time()

    def _check_timeout(self) -> None:
        quiet = self._loop.time() - self._last_data
        if quiet >= self._timeout:
            self._timeout_callback()
        else:
            self._timer = self._loop.call_later(self._timeout - quiet, self._check_timeout)

    def append_to_resp(self, line: bytes, result: str = "Pending") -> None:
        super().append_to_resp(line, result)
        if type(line) is bytes:
            if self.FETCH_MESSAGE_DATA_RE.match(line):
                self._depth = 0
            self._depth += line.count(b"(") - line.count(b")")

    def wait_data(self) -> bool:
        return self._depth != 0


def new_command(
    name: str,
    tag: str,
    *args: str,
    prefix: str | None = None,
    untagged: str | None = None,
    timeout: float | None = None,
) -> Any:
    """An aioimaplib command object (FETCH gets the literal-aware subclass)."""
    if name == "FETCH":
        return FetchCommand(tag, *args, prefix=prefix, untagged_resp_name=untagged, timeout=timeout)
    return _imap.Command(
        name, tag, *args, prefix=prefix, untagged_resp_name=untagged, timeout=timeout
    )


def new_idle_command(tag: str, queue: asyncio.Queue[list[bytes]]) -> Any:
    """An aioimaplib IDLE command that forwards server pushes to ``queue``."""
    return _imap.IdleCommand(tag, queue)


#: The library's response tuple (``result``, ``lines``).
Response: type[Any] = _imap.Response
