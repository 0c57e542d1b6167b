"""Build the outgoing email the CRM sends, and check what goes into its headers.

:func:`build_message` returns complete RFC 5322 bytes with CRLF line endings, made
with :class:`email.message.EmailMessage` under a 7-bit SMTP policy: non-ASCII text
goes out as quoted-printable or base64 and RFC 2047 / RFC 2231 encoded header
words, so neither 8BITMIME nor SMTPUTF8 is needed on the way. Every value that
reaches a header is checked first (CR, LF or NUL raise
:class:`threadsync.core.errors.HeaderInjection`); a ``Bcc`` header is never written (the
envelope carries Bcc recipients).
"""

from __future__ import annotations

import base64
import io
import ipaddress
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.errors import MessageError
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import SMTP, EmailPolicy

from threadsync.core.errors import HeaderInjection, InvalidInput
from threadsync.core.mime.decode import parse_msgid_list

#: CRLF, lines folded at 78; cte_type 7bit makes set_content pick quoted-printable
#: or base64 for non-ASCII text (the default, 8bit, would need 8BITMIME).
_POLICY = SMTP.clone(cte_type="7bit")


@dataclass(frozen=True)
class AttachmentIn:
    """An attachment the CRM wants to send."""

    filename: str
    content_type: str
    data: bytes


# ---- checks ------------------------------------------------------------------------

_INJECTION_RE = re.compile("[\r\n\x00]")
#: Other characters that end a line for str.splitlines(), which EmailMessage
#: refuses in header values, and C0 controls: blanks in a header.
_HEADER_BREAKS_RE = re.compile("[\x01-\x08\x0b-\x1f\x7f\x85\u2028\u2029]")
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LOCAL_PART_RE = re.compile(rf"{_ATEXT}(?:\.{_ATEXT})*")
_DOMAIN_LABEL_RE = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")


def check_header_value(value: str, what: str) -> str:
    """Return ``value``; raise HeaderInjection if it holds CR, LF or NUL.

    ``what`` names the value for the error ("subject", "to address", ...).
    """
    if not isinstance(value, str):
        raise InvalidInput(f"{what} must be text")
    if _INJECTION_RE.search(value):
        raise HeaderInjection(f"{what} must not contain CR, LF or NUL: {value[:80]!r}")
    return value


def check_address(addr: str, what: str) -> str:
    """Return ``addr`` normalised (blanks and <> stripped, domain lower-case, IDNA).

    HeaderInjection for CR, LF or NUL; InvalidInput for anything that is not one
    plausible ``local@domain`` (a display name, a list, a quoted or non-ASCII local
    part: the latter needs SMTPUTF8, which threadsync does not use).
    """
    check_header_value(addr, what)
    text = addr.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1].strip()
    local, at, domain = text.rpartition("@")
    if not at or not local or not domain:
        raise InvalidInput(f"{what} {addr[:80]!r} is not an email address")
    if not local.isascii():
        raise InvalidInput(f"{what} {addr[:80]!r} has a non-ASCII local part (needs SMTPUTF8)")
    if len(local) > 64 or not _LOCAL_PART_RE.fullmatch(local):
        raise InvalidInput(f"{what} {addr[:80]!r} is not a plausible email address")
    return f"{local}@{_check_domain(domain, what, addr)}"


def _check_domain(domain: str, what: str, addr: str) -> str:
    problem = InvalidInput(f"{what} {addr[:80]!r} has an invalid domain")
    if domain.startswith("[") and domain.endswith("]"):
        literal = domain[1:-1]
        try:
            ipaddress.ip_address(literal[5:] if literal.lower().startswith("ipv6:") else literal)
        except ValueError:
            raise problem from None
        return domain
    name = domain.lower()
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            raise problem from None
    if len(name) > 253 or not all(_DOMAIN_LABEL_RE.fullmatch(p) for p in name.split(".")):
        raise problem
    return name


def _address(addr: str) -> Address:
    # Built from parts: the header registry would re-parse an addr-spec string.
    local, _, domain = addr.rpartition("@")
    return Address(username=local, domain=domain)


_SURROGATE_RE = re.compile("[\ud800-\udfff]")


def _text(value: str) -> str:
    # A lone surrogate (possible in JSON input) cannot be encoded to UTF-8.
    return _SURROGATE_RE.sub("\ufffd", value)


def _header_text(value: str, what: str) -> str:
    # CR/LF/NUL are refused; other line-ending characters (VT, FF, NEL, U+2028 ...)
    # would make EmailMessage raise ValueError, so they become blanks.
    return _HEADER_BREAKS_RE.sub(" ", _text(check_header_value(value, what)))


#: Printable ASCII without blanks or brackets inside; short enough that
#: "In-Reply-To: <id>" fits the 998-character line limit.
_SENDABLE_ID_RE = re.compile(r"<[\x21-\x3b\x3d\x3f-\x7e]{1,900}>")


def _message_ids(values: Sequence[str], what: str) -> list[str]:
    """Ids in ``values`` (each may hold several), de-duplicated, in order."""
    ids: dict[str, None] = {}
    for value in values:
        found = parse_msgid_list(check_header_value(value, what))
        if not found:
            raise InvalidInput(f"{what} {value[:80]!r} is not a Message-ID like <id@host>")
        for ident in found:
            if not _SENDABLE_ID_RE.fullmatch(ident):
                raise InvalidInput(f"{what} {ident[:80]!r} is not a sendable Message-ID")
            ids.setdefault(ident, None)
    return list(ids)


class _Folded(str):
    """A header value as atoms that this module folds and encodes itself.

    EmailPolicy writes a value that has ``name`` and ``fold()`` as the value folds
    itself (the documented header-object protocol). Its own folding RFC 2047-encodes
    a Message-ID longer than a line, which no client matches any more, and, when
    it folds between two encoded words, moves a blank out of them, where decoders
    drop it ("Söhne März" comes back as "SöhneMärz" in about one long non-ASCII
    subject in eight).
    """

    name: str
    atoms: tuple[str, ...]

    def __new__(cls, name: str, atoms: Sequence[str]) -> _Folded:
        self = super().__new__(cls, " ".join(atoms))
        self.name = name
        self.atoms = tuple(atoms)
        return self

    def fold(self, *, policy: EmailPolicy) -> str:
        """Atoms joined by single blanks, a line break before a blank where a line
        would pass the policy's width (78)."""
        width = policy.max_line_length or 78
        lines = [f"{self.name}:"]
        for atom in self.atoms:
            if len(lines[-1]) + 1 + len(atom) > width and lines[-1] != f"{self.name}:":
                lines.append(f" {atom}")
            else:
                lines[-1] += f" {atom}"
        return policy.linesep.join(lines) + policy.linesep


#: UTF-8 bytes per encoded word: "=?utf-8?b?" + 56 base64 characters + "?=" is 68
#: characters, so even "Subject: " plus one word stays within 78.
_WORD_BYTES = 42
#: Blanks where an ASCII text may be folded: single ones between two non-blanks
#: (a fold before a run of blanks could leave a line of blanks only).
_FOLD_POINT_RE = re.compile(r"(?<=[^ ]) (?=[^ ])")
_PLAIN_PHRASE_RE = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~ .-]*")


def _encoded_words(text: str) -> list[str]:
    """``text`` as RFC 2047 words of whole UTF-8 characters, blanks inside them."""
    chunks: list[bytes] = []
    chunk = b""
    for char in text:
        data = char.encode("utf-8")
        if chunk and len(chunk) + len(data) > _WORD_BYTES:
            chunks.append(chunk)
            chunk = b""
        chunk += data
    if chunk:
        chunks.append(chunk)
    return [f"=?utf-8?b?{base64.b64encode(c).decode('ascii')}?=" for c in chunks]


def _text_atoms(text: str) -> list[str]:
    """Subject text as atoms: plain ASCII folded at blanks, else encoded words."""
    atoms = _FOLD_POINT_RE.split(text)
    if text.isascii() and "=?" not in text and max(map(len, atoms)) < 900:
        return atoms
    return _encoded_words(text)


def _mailbox_atoms(display: str, addr: str) -> list[str]:
    """From as atoms: display name (plain, quoted or encoded) and ``<addr>``."""
    if not display:
        return [addr]
    if not display.isascii() or "=?" in display or len(display) > 900:
        return [*_encoded_words(display), f"<{addr}>"]
    if not _PLAIN_PHRASE_RE.fullmatch(display) or display.startswith(".") or "  " in display:
        escaped = display.replace("\\", "\\\\").replace('"', '\\"')
        display = f'"{escaped}"'
    return [*_FOLD_POINT_RE.split(display), f"<{addr}>"]


# ---- building ----------------------------------------------------------------------

_BODY_CONTROLS_RE = re.compile("[\x00-\x08\x0b\x0e-\x1f\x7f]")
_TYPE_RE = re.compile(r"[a-z0-9!#$%&'*+.^_`{|}~-]+/[a-z0-9!#$%&'*+.^_`{|}~-]+")
_CHARSET_PARAM_RE = re.compile(r'charset\s*=\s*"?([A-Za-z0-9._:+-]{1,40})', re.IGNORECASE)


def _body_cte(text: str) -> str | None:
    # EmailMessage would send ASCII text with NUL or other controls as 7bit, raw;
    # quoted-printable carries them safely. None lets EmailMessage choose.
    return "quoted-printable" if _BODY_CONTROLS_RE.search(text) else None


def _attachment_type(content_type: str) -> tuple[str, str, dict[str, str]]:
    value, _, rest = check_header_value(content_type, "attachment content type").partition(";")
    mime_type = value.strip().lower()
    if not _TYPE_RE.fullmatch(mime_type) or mime_type.startswith("multipart/"):
        # An empty or odd type from a browser upload: still send the file.
        return "application", "octet-stream", {}
    maintype, subtype = mime_type.split("/")
    charset = _CHARSET_PARAM_RE.search(rest)
    params = {"charset": charset.group(1)} if charset and maintype == "text" else {}
    return maintype, subtype, params


def _seven_bit_clean(data: bytes) -> bool:
    return (
        data.isascii()
        and b"\x00" not in data
        and all(len(line) <= 998 for line in data.splitlines())
    )


def _add_attachment(
    msg: EmailMessage, attachment: AttachmentIn, placeholders: dict[bytes, bytes]
) -> None:
    """Add ``attachment`` to ``msg``. A base64 one gets a placeholder body, noted in
    ``placeholders`` (token -> content) and replaced by :func:`_spliced`."""
    filename = _header_text(attachment.filename, "attachment filename").strip() or None
    maintype, subtype, params = _attachment_type(attachment.content_type)
    data = attachment.data
    if maintype == "message":
        # RFC 2046 allows only 7bit/8bit/binary for message/*; 8bit would need
        # 8BITMIME, so an attached message that is not 7-bit clean goes as a file.
        if _seven_bit_clean(data):
            msg.add_attachment(
                bytes(data), maintype, subtype, cte="7bit", filename=filename, params=params
            )
            return
        maintype, subtype = "application", "octet-stream"
    msg.add_attachment(b"", maintype, subtype, cte="base64", filename=filename, params=params)
    token = f"threadsync-attachment-{secrets.token_hex(16)}"
    parts = msg.get_payload()
    part = parts[-1] if isinstance(parts, list) else None
    if not isinstance(part, EmailMessage):
        raise InvalidInput("message could not be built: the attachment was not added")
    part.set_payload(token)
    placeholders[token.encode("ascii")] = bytes(data)


def _spliced(out: bytes, placeholders: dict[bytes, bytes]) -> bytes:
    """``out`` with each placeholder replaced by its content in base64 (RFC 2045:
    76-character lines, CRLF). Done here rather than by the ``email`` generator,
    which holds several copies of every attachment on the way: a message near the
    size limit then costs about two copies of itself instead of four."""
    if not placeholders:
        return out
    # BytesIO hands its buffer over on getvalue(): the message is made once.
    result = io.BytesIO()
    rest = out
    for token, data in placeholders.items():
        before, found, rest = rest.partition(token)
        if not found:
            raise InvalidInput("message could not be built: an attachment went missing")
        result.write(before)
        view = memoryview(data)
        for start in range(0, len(view), _B64_CHUNK):
            lines = base64.encodebytes(view[start : start + _B64_CHUNK])
            result.write(lines.replace(b"\n", b"\r\n"))
    result.write(rest)
    return result.getvalue()


#: Attachment bytes encoded at a time: whole 76-character lines (57 bytes each).
_B64_CHUNK = 57 * 1024


def build_message(
    *,
    sender: str,
    to: Sequence[str],
    cc: Sequence[str] = (),
    subject: str,
    text: str,
    html: str | None = None,
    attachments: Sequence[AttachmentIn] = (),
    message_id: str,
    in_reply_to: str | None = None,
    references: Sequence[str] = (),
    date: datetime | None = None,
    reply_to: str | None = None,
    sender_name: str | None = None,
) -> bytes:
    """The complete message as bytes (CRLF, 7-bit), ready for SMTP or IMAP APPEND.

    text only: text/plain; with ``html``: multipart/alternative; with attachments:
    multipart/mixed around that. A naive ``date`` is taken as UTC (default: now).
    Raises HeaderInjection (CR, LF, NUL in any header value) or InvalidInput.
    """
    for name, value in (("to", to), ("cc", cc), ("references", references)):
        if isinstance(value, str):
            raise InvalidInput(f"{name} must be a list, not a single string")
    if not isinstance(text, str) or not isinstance(html, str | None):
        raise InvalidInput("text and html must be text")
    text, html = _text(text), (None if html is None else _text(html))
    from_addr = check_address(sender, "sender address")
    to_addrs = [check_address(a, "to address") for a in to]
    cc_addrs = [check_address(a, "cc address") for a in cc]
    reply_addr = None if reply_to is None else check_address(reply_to, "reply-to address")
    display = "" if sender_name is None else _header_text(sender_name, "sender name").strip()
    subject_text = _header_text(subject, "subject")
    own_id = _message_ids([message_id], "message_id")
    if len(own_id) != 1:
        raise InvalidInput(f"message_id {message_id[:80]!r} must be exactly one Message-ID")
    parent = _message_ids([in_reply_to], "in_reply_to") if in_reply_to else []
    refs = _message_ids(references, "references")
    when = datetime.now(UTC) if date is None else date
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)

    msg = EmailMessage(policy=_POLICY)
    try:
        msg["From"] = _Folded("From", _mailbox_atoms(display, from_addr))
        if to_addrs:
            msg["To"] = [_address(a) for a in to_addrs]
        if cc_addrs:
            msg["Cc"] = [_address(a) for a in cc_addrs]
        if reply_addr is not None:
            msg["Reply-To"] = _address(reply_addr)
        msg["Subject"] = _Folded("Subject", _text_atoms(subject_text))
        msg["Date"] = when
        msg["Message-ID"] = _Folded("Message-ID", own_id)
        if parent:
            msg["In-Reply-To"] = _Folded("In-Reply-To", parent)
        if refs:
            msg["References"] = _Folded("References", refs)
        msg.set_content(text, subtype="plain", charset="utf-8", cte=_body_cte(text))
        if html is not None:
            msg.add_alternative(html, subtype="html", charset="utf-8", cte=_body_cte(html))
        placeholders: dict[bytes, bytes] = {}
        for attachment in attachments:
            _add_attachment(msg, attachment, placeholders)
    except (ValueError, TypeError, IndexError, MessageError) as exc:
        raise InvalidInput(f"message could not be built: {exc}") from exc
    for part in msg.walk():
        if part is not msg:
            del part["MIME-Version"]  # EmailMessage repeats it in every part
    return _spliced(msg.as_bytes(policy=_POLICY), placeholders)
