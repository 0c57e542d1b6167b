"""SMTP DATA with the point of no return at its very end.

A message may have left once the server has seen the line that ends DATA
(``.``): before that, a dropped connection makes the server discard what it
received (RFC 5321, 4.1.1.4), so sending again is safe. :func:`send_data`
therefore writes the whole message except that line, awaits the caller's
checkpoint (which commits "transmitting", see :mod:`threadsync.core.outbox.delivery`), and only
then writes the three bytes that complete it. A crash between the commit and
that single write is the only way a message can be lost; a crash anywhere
before the commit leaves an unterminated DATA and the message is sent again.

Once that line is written, a connection that drops (or stays silent past the
timeout) before the server's answer leaves the outcome unknown: the server may
have accepted the message. That failure leaves as
:class:`~threadsync.core.errors.DeliveryUnconfirmed`, never as a plain network
error, so the kernel does not send it again; a negative answer (4xx, 5xx) is
proof it was refused and leaves as aiosmtplib's ``SMTPDataError``.

aiosmtplib's ``SMTP.data`` writes the message and its end in one go, so the
data phase is driven here through the client's protocol (``write`` and
``read_response``; ``execute_command`` for ``DATA`` itself).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable

import aiosmtplib

from threadsync.core.errors import DeliveryUnconfirmed

#: Lone CR or LF, or CRLF: every line ending, made CRLF on the wire.
_LINE_END = re.compile(rb"\r\n|\r|\n")
#: A line that starts with a dot gets another one (RFC 5321, 4.5.2).
_LEADING_DOT = re.compile(rb"(?m)^\.")
#: Bytes of a message handed to the transport at a time.
_WRITE_SLICE = 1024 * 1024


def wire_form(raw: bytes) -> bytes:
    """The message as DATA carries it, without the terminating ``.`` line."""
    crlf = raw.count(b"\r\n")
    if raw.count(b"\r") != crlf or raw.count(b"\n") != crlf:  # bare CR or LF: repair
        raw = _LINE_END.sub(b"\r\n", raw)
    # re.sub hands back its input when nothing matches: a big message is not copied.
    body = _LEADING_DOT.sub(b"..", raw)
    return body if body.endswith(b"\r\n") else body + b"\r\n"


async def send_data(
    client: aiosmtplib.SMTP, raw: bytes, checkpoint: Callable[[], Awaitable[None]]
) -> None:
    """``DATA``, the message, ``checkpoint()``, then the end of data and the
    server's verdict. aiosmtplib errors leave as they are, except a lost answer
    to the end of data (:class:`DeliveryUnconfirmed`); an exception from
    ``checkpoint`` leaves unchanged with the message unterminated (the
    connection is closed, without QUIT, so the server discards it)."""
    protocol = client.protocol
    if protocol is None:
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    start = await client.execute_command(b"DATA")
    if start.code != aiosmtplib.SMTPStatus.start_input:
        raise aiosmtplib.SMTPDataError(start.code, start.message)
    try:
        body = memoryview(wire_form(raw))
        # In slices, each written when the socket took the last: the transport
        # never buffers a copy of a whole large message.
        for offset in range(0, len(body), _WRITE_SLICE):
            protocol.write(bytes(body[offset : offset + _WRITE_SLICE]))
            await protocol._drain_helper()
        await checkpoint()
        protocol.write(b".\r\n")
        try:
            # No await between the write and this call: the answer cannot arrive first.
            done = await protocol.read_response(timeout=client.timeout)
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, OSError) as exc:
            raise DeliveryUnconfirmed(
                "the connection failed after the end of DATA was sent, before the server "
                f"answered ({exc.__class__.__name__}); the message may have been accepted"
            ) from None
    except BaseException:
        client.close()  # inside DATA a QUIT would only become message text
        raise
    if done.code != aiosmtplib.SMTPStatus.completed:
        raise aiosmtplib.SMTPDataError(done.code, done.message)
