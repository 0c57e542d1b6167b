"""Parse received email, robustly, into what threadsync stores and shows.

Real mail is messy: LF-only files, 8-bit bytes in headers, unknown charsets, broken
base64, header lines far over 998 characters, header blocks over 16 KiB, address
groups, messages attached inside messages. :func:`parse_message` turns any bytes
into a :class:`ParsedMessage` and never raises, except
:class:`core.errors.MessageParseError` for empty input. What had to be repaired or
ignored is listed, for people, in ``ParsedMessage.defects``. :func:`summarize_headers`
reads the header block of each new message for the membership decision: the
threading ids at once, sender, subject and date only if they are used.

How, and why not simply ``email.message_from_bytes(raw, policy=default)``:

* Each header block is parsed by the stdlib parser with a compat32-based policy
  that hands back raw values; this module decodes them (8-bit bytes, RFC 2047
  encoded words, RFC 2231 parameters) in linear time. The header registry of the
  default policy parses eagerly on access and, on hostile input, raises
  (``RecursionError`` on a run of ``(``, ``AttributeError`` on some address groups)
  or takes hundreds of milliseconds on a single 16 KiB ``Content-Type``.
* Bodies are split at MIME boundaries here, by a regex that starts with the literal
  delimiter. The stdlib feed parser handles every body line in Python (about
  50 ms for 4 MB), re-checks every enclosing boundary on every line (so nesting
  multiplies the cost) and reaches the recursion limit near 1,000 levels.
  Splitting ourselves keeps attached messages (``message/rfc822``) byte-exact and
  lets us walk the tree ourselves (``iter_attachments()`` then ``get_content()``
  raises ``KeyError`` on nested multiparts).
* Attachment sizes are decoded byte counts, exactly: rule R8 measures those.
"""

from __future__ import annotations

import binascii
import hashlib
import itertools
import re
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta, timezone
from email.errors import MessageDefect, MessageError
from email.parser import BytesHeaderParser
from email.policy import Compat32
from typing import overload

from core.errors import MessageParseError
from core.mime_decode import (
    MIME_TYPE_RE,
    Notes,
    addresses,
    b64decode,
    clean,
    decode_bytes,
    header_text,
    mime_header,
    parse_date,
    parse_msgid_list,
    raw_text,
    unfold,
    uudecode,
)
from core.provider import HeaderSummary

#: MIME nesting deeper than this is not followed (real mail stays below 10 levels).
_MAX_DEPTH = 32
#: At most this many MIME parts are read per message; the rest is noted and skipped.
_MAX_PARTS = 2000


# ---- results -----------------------------------------------------------------------


@dataclass(frozen=True)
class ParsedAttachment:
    """One attachment or inline resource (image, attached message) of a message."""

    filename: str | None
    content_type: str
    size: int  # decoded bytes: what rule R8 measures
    sha256: str
    data: bytes
    inline: bool


@dataclass
class ParsedMessage:
    """What threadsync keeps of a received message (see :func:`parse_message`)."""

    message_id: str | None
    in_reply_to: tuple[str, ...]
    references: tuple[str, ...]
    sender: str | None
    sender_display: str | None
    to: tuple[str, ...]
    cc: tuple[str, ...]
    reply_to: tuple[str, ...]
    subject: str
    date: str | None
    text: str | None
    html: str | None
    attachments: tuple[ParsedAttachment, ...] = ()
    defects: tuple[str, ...] = ()

    @property
    def largest_attachment(self) -> int:
        """Decoded size of the largest attachment, 0 without attachments."""
        return max((a.size for a in self.attachments), default=0)


# ---- header blocks -----------------------------------------------------------------


class _RawHeaderPolicy(Compat32):
    """compat32 parsing, except that a fetched header is its raw value, unfolded.

    Only the parser itself fetches a header (``Content-Type`` once, when it closes);
    this module reads ``raw_items()`` and decodes values itself. Plain compat32
    would wrap 8-bit values in ``Header`` objects; the default policy would run its
    header registry parser.
    """

    def header_fetch_parse(self, name: str, value: str) -> str:
        return unfold(value)


_HEADER_PARSER = BytesHeaderParser(policy=_RawHeaderPolicy())


@dataclass
class _Entity:
    """A message or MIME part: its raw headers and its still-encoded body."""

    headers: list[tuple[str, str]]  # (lower-case name, raw value), in order
    body: bytes
    defects: list[str] = field(default_factory=list)

    def get(self, name: str) -> str | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def get_all(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key == name]


_BLANK_LINE_RE = re.compile(rb"\n\r?\n")


def _split_head(data: bytes) -> tuple[bytes, bytes]:
    """Split an entity at its first empty line: (header lines, body)."""
    if data[:1] == b"\n":
        return b"", data[1:]
    if data[:2] == b"\r\n":
        return b"", data[2:]
    # One search for the first of "\n\n" and "\n\r\n": two finds would scan a whole
    # CRLF body for an "\n\n" that never comes.
    blank = _BLANK_LINE_RE.search(data)
    if blank is None:
        return data, b""
    return data[: blank.start() + 1], data[blank.end() :]


def _defect_text(defect: MessageDefect) -> str:
    doc = (type(defect).__doc__ or type(defect).__name__).strip().splitlines()[0]
    detail = str(defect)
    text = doc.rstrip(".")
    return f"{text}: {detail[:80]!r}" if detail else text


#: A line that is neither a header nor a continuation (nor an mbox "From " line),
#: as the stdlib parser's own pattern decides; it ends the header block early.
_NOT_HEADER_LINE_RE = re.compile(rb"^(?!From |[\x21-\x39\x3b-\x7e]*:|[ \t])", re.MULTILINE)


def _parse_entity(data: bytes) -> _Entity:
    head, body = _split_head(data)
    quick = _plain_headers(head) if head else None
    if quick is not None:  # then no line ends the block early either
        return _Entity(quick, body, [])
    odd = _NOT_HEADER_LINE_RE.search(head)
    if odd is not None and odd.start() < len(head):
        # Like the stdlib, read that line and all after it as body. Cut here rather
        # than ask the parser: its get_payload() re-decodes 8-bit text with the
        # charset parameter and raises TypeError on an RFC 2231 one.
        head, body = head[: odd.start()], data[odd.start() :]
        defects = ["headers end early, at a line that is not a header"]
    else:
        defects = []
    if not head:
        return _Entity([], body, defects)
    quick = _plain_headers(head)
    if quick is not None:
        return _Entity(quick, body, defects)
    try:
        msg = _HEADER_PARSER.parsebytes(head)
    except (MessageError, ValueError, TypeError, IndexError, LookupError) as exc:
        return _Entity([], data, [f"header block unreadable ({type(exc).__name__})"])
    headers = [(str(name).strip().lower(), str(value)) for name, value in msg.raw_items()]
    return _Entity(headers, body, defects + [_defect_text(d) for d in msg.defects])


#: One header field: a name (up to the first colon), the rest of its line and
#: its continuation lines.
_FIELD_RE = re.compile(r"([\x21-\x39\x3b-\x7e]+):[ \t]*([^\n]*\n?(?:[ \t][^\n]*\n?)*)")


def _plain_headers(head: bytes) -> list[tuple[str, str]] | None:
    """The headers of a plain block exactly as ``_HEADER_PARSER`` gives them, in
    a fraction of the time (a header summary is made for every new message);
    None when the block has what only the parser handles alike (a lone CR, a
    first line that is a continuation, a line without a name, an mbox ``From``
    line)."""
    text = head.decode("ascii", "surrogateescape")
    if "\r" in text and text.count("\r") != text.count("\r\n"):
        return None
    headers: list[tuple[str, str]] = []
    pos, end = 0, len(text)
    match = _FIELD_RE.match
    while pos < end:
        field = match(text, pos)
        if field is None:
            return None
        headers.append((field.group(1).lower(), field.group(2).rstrip("\r\n")))
        pos = field.end()
    return headers


@dataclass
class _Envelope:
    message_id: str | None
    in_reply_to: tuple[str, ...]
    references: tuple[str, ...]
    sender: str | None
    sender_display: str | None
    subject: str | None
    date: str | None
    to: tuple[str, ...] = ()
    cc: tuple[str, ...] = ()
    reply_to: tuple[str, ...] = ()


# Most header values are plain: one ``Name <a@b>``, a date in the canonical form,
# Message-IDs in brackets. For those, the shortcuts below give exactly what the
# general decoders give (which add no note for them either); any other value goes
# to the decoders. They matter for header summaries, made for every new message.

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_PLAIN_ADDRESS = rf"{_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
_PLAIN_MAILBOX_RE = re.compile(
    rf"[ \t]*(?:(?P<name>{_ATEXT}(?:[ \t]+{_ATEXT})*)[ \t]*)?<(?P<addr>{_PLAIN_ADDRESS})>[ \t]*"
    rf"|[ \t]*(?P<bare>{_PLAIN_ADDRESS})[ \t]*"
)
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_PLAIN_DATE_RE = re.compile(
    rf"[ \t]*(?:(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun), )?(\d{{1,2}}) ({'|'.join(_MONTHS)}) "
    r"([1-9]\d{3}) (\d\d):(\d\d):(\d\d) ([+-])(\d\d)(\d\d)[ \t]*"
)
#: Ids in brackets, separated by blanks; no blank, quote or parenthesis inside.
_PLAIN_IDS_RE = re.compile(r"(?:[ \t]*<[!#-'*-;=?-~]+>)+[ \t]*")
_BRACKETED_RE = re.compile(r"<[^<>]*>")
#: The longest Message-ID kept (one header line, RFC 5322), as core.mime_decode.
_LONGEST_ID = 998


def _addresses(values: list[str], what: str, notes: Notes) -> list[tuple[str, str]]:
    """:func:`core.mime_decode.addresses`, quicker for one plain mailbox."""
    if len(values) == 1:
        plain = _PLAIN_MAILBOX_RE.fullmatch(unfold(values[0]))
        if plain is not None:
            name = plain.group("name") or ""
            address = plain.group("addr") or plain.group("bare")
            if "=?" not in name and len(address) <= 320:
                local, _, domain = address.rpartition("@")
                return [(" ".join(name.split()), f"{local}@{domain.lower()}")]
    return addresses(values, what, notes)


def _date(raw: str, notes: Notes) -> str | None:
    """:func:`core.mime_decode.parse_date`, quicker for the canonical form."""
    plain = _PLAIN_DATE_RE.fullmatch(unfold(raw))
    if plain is not None:
        day, month, year, hour, minute, second, sign, zone_h, zone_m = plain.groups()
        offset = (int(zone_h) * 3600 + int(zone_m) * 60) * (-1 if sign == "-" else 1)
        try:
            when = datetime(
                int(year),
                _MONTHS.index(month) + 1,
                int(day),
                int(hour),
                int(minute),
                int(second),
                tzinfo=timezone(timedelta(seconds=offset)),
            ).astimezone(UTC)
            return when.replace(tzinfo=None).isoformat(timespec="seconds") + "Z"
        except (ValueError, OverflowError):
            pass  # the decoder says what is wrong with it
    return parse_date(raw, notes)


def _ids(entity: _Entity, name: str, what: str, notes: Notes) -> tuple[str, ...]:
    return _id_list(entity.get_all(name), what, notes)


def _id_list(values: list[str], what: str, notes: Notes) -> tuple[str, ...]:
    """The Message-IDs in the raw values of one header field, in order."""
    if not values:
        return ()  # as parse_msgid_list(""), and nothing to note
    joined = " ".join(map(unfold, values))
    if _PLAIN_IDS_RE.fullmatch(joined):
        ids = tuple(dict.fromkeys(_BRACKETED_RE.findall(joined)))
        if max(map(len, ids)) <= _LONGEST_ID:
            return ids
    ids = parse_msgid_list(" ".join(raw_text(v, what, notes) for v in values))
    if values and not ids:
        notes.add(f"{what} holds no usable Message-ID")
    return ids


#: A field's start: its name, then a colon (as ``_FIELD_RE``).
_FIELD_START_RE = re.compile(r"[\x21-\x39\x3b-\x7e]+:")
#: A line after the first that neither starts a field nor continues one: where
#: :func:`_plain_headers` gives up. (Starting with the line break lets the regex
#: engine jump from line to line.)
_ODD_LINE_RE = re.compile(r"\n(?![\x21-\x39\x3b-\x7e]+:|[ \t])")
#: The fields that decide thread membership, as ``_FIELD_RE`` reads them.
_THREAD_FIELD_RE = re.compile(
    r"^(message-id|in-reply-to|references):[ \t]*([^\n]*\n?(?:[ \t][^\n]*\n?)*)",
    re.MULTILINE | re.IGNORECASE | re.ASCII,
)

_ThreadIds = tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]


def _plain_block(text: str) -> bool:
    """Whether :func:`_plain_headers` reads this (non-empty) header block: the
    first line starts a field, every later line starts or continues one, and no
    CR stands alone."""
    odd = _ODD_LINE_RE.search(text)
    return (
        _FIELD_START_RE.match(text) is not None
        and (odd is None or odd.end() == len(text))  # the block's last line break
        and ("\r" not in text or text.count("\r") == text.count("\r\n"))
    )


def _thread_ids(data: bytes) -> _ThreadIds:
    """(Message-IDs, In-Reply-To, References) of a header block, exactly as
    :func:`_envelope` reads them, without reading the other fields.

    A plain block is searched for the three fields alone: its lines are fields
    and their continuations only, so a field starts at every line start that is
    not blank, and each value ends where ``_FIELD_RE`` ends it. Any other block
    takes the general path.
    """
    head = _split_head(data)[0]
    text = head.decode("ascii", "surrogateescape")
    if _plain_block(text):
        values: dict[str, list[str]] = {"message-id": [], "in-reply-to": [], "references": []}
        for name, value in _THREAD_FIELD_RE.findall(text):
            values[name.lower()].append(value.rstrip("\r\n"))
        own, replied, referenced = values.values()
    else:
        entity = _parse_entity(data)
        own = entity.get_all("message-id")
        replied = entity.get_all("in-reply-to")
        referenced = entity.get_all("references")
    notes = Notes()  # a summary keeps no notes
    return (
        _id_list(own, "Message-ID", notes),
        _id_list(replied, "In-Reply-To", notes),
        _id_list(referenced, "References", notes),
    )


def _envelope(entity: _Entity, notes: Notes, *, recipients: bool) -> _Envelope:
    for name, value in entity.headers:
        if len(value) > 998 and any(len(line) > 998 for line in value.splitlines()):
            notes.add(f"header {name} has a line over 998 characters")
    message_ids = _ids(entity, "message-id", "Message-ID", notes)
    if entity.get("message-id") is None:
        notes.add("no Message-ID")
    elif len(message_ids) > 1:
        notes.add("several Message-IDs; the first is used")
    senders = _addresses(entity.get_all("from"), "From", notes)
    if not senders:
        notes.add("no usable From address")
    sender_name, sender = senders[0] if senders else ("", None)
    subject = entity.get("subject")
    date = entity.get("date")
    env = _Envelope(
        message_id=message_ids[0] if message_ids else None,
        in_reply_to=_ids(entity, "in-reply-to", "In-Reply-To", notes),
        references=_ids(entity, "references", "References", notes),
        sender=sender,
        sender_display=(f"{sender_name} <{sender}>" if sender_name else sender),
        subject=None if subject is None else header_text(subject, "Subject", notes),
        date=None if date is None else _date(date, notes),
    )
    if recipients:
        env.to = tuple(a for _, a in _addresses(entity.get_all("to"), "To", notes))
        env.cc = tuple(a for _, a in _addresses(entity.get_all("cc"), "Cc", notes))
        env.reply_to = tuple(
            a for _, a in _addresses(entity.get_all("reply-to"), "Reply-To", notes)
        )
    return env


# ---- MIME structure ----------------------------------------------------------------


#: What may follow "--boundary" on a delimiter line: "--" (closing), then blanks.
_DELIMITER_TAIL = rb"(--)?[ \t]*\r?(?=\n|\Z)"


def _split_multipart(body: bytes, boundary: str) -> tuple[list[bytes], bool] | None:
    """The parts of a multipart body and whether its closing delimiter was seen.

    None when no delimiter line is found. A delimiter line is ``--boundary`` at the
    start of a line, then ``--`` for the closing one, then only blanks (RFC 2046
    5.1.1); the line break before it belongs to it. The pattern starts with the
    literal line break and delimiter, which the regex engine finds at C speed, so
    a 4 MB body or a hostile one full of near-delimiters costs milliseconds.
    """
    delimiter = re.escape(b"--" + boundary.encode("utf-8", "surrogateescape"))
    first = re.match(delimiter + _DELIMITER_TAIL, body)
    later = re.finditer(rb"\n" + delimiter + _DELIMITER_TAIL, body)
    parts: list[bytes] = []
    start = -1  # where the current part begins; -1 before the first delimiter
    for match in itertools.chain([first] if first else [], later):
        if start >= 0:
            end = match.start()
            if end > start and body[end - 1] == 0x0D:
                end -= 1
            parts.append(body[start:end])
        if match.group(1) or len(parts) > _MAX_PARTS:  # the walker reads no more
            return parts, True
        start = min(match.end() + 1, len(body))
    if start < 0:
        return None
    parts.append(body[start:])
    return parts, False


#: The first "--token" line of a body: the boundary, when its parameter is broken.
_DELIMITER_LINE_RE = re.compile(rb"^--([!-~]{1,70}?)[ \t]*\r?$", re.MULTILINE)


def _guess_boundary(body: bytes) -> str | None:
    found = _DELIMITER_LINE_RE.search(body)
    return None if found is None else found.group(1).decode("ascii")


_CTE_TOKEN_RE = re.compile(r"[\s(;]")
_IDENTITY_CTES = frozenset({"", "7bit", "8bit", "binary"})
_UUENCODE_CTES = frozenset({"x-uuencode", "uuencode", "x-uue", "uue"})


def _safe_filename(name: str | None, where: str, notes: Notes) -> str | None:
    """The last path component only: a sender must not steer where a file lands."""
    if name is None:
        return None
    base = name.replace("\\", "/").rsplit("/", 1)[-1].strip()
    if base != name.strip():
        notes.add(f"{where}: directory part of filename {name[:60]!r} dropped")
    return None if base in ("", ".", "..") else base


class _Walker:
    """Walks the MIME tree once, collecting bodies, attachments and notes."""

    def __init__(self, notes: Notes) -> None:
        self.notes = notes
        self.attachments: list[ParsedAttachment] = []
        self.parts = 0

    def walk(
        self, entity: _Entity, default_type: str, label: str, depth: int
    ) -> tuple[list[str], list[str]]:
        """The text/plain and text/html bodies under ``entity``, in order."""
        where = f"part {label}" if label else "message"
        self.parts += 1
        for defect in entity.defects:
            self.notes.add(f"{where}: {defect}")
        raw_type = entity.get("content-type")
        ctype, params = mime_header(raw_type, f"{where} Content-Type", self.notes)
        if raw_type is None:
            ctype = default_type
        elif not MIME_TYPE_RE.fullmatch(ctype):
            self.notes.add(f"{where}: invalid Content-Type {ctype[:40]!r}")
            ctype = ""  # text/plain as a body (RFC 2045 5.2), octet-stream as a file
        if ctype.startswith("multipart/"):
            boundary = params.get("boundary", "")
            split = _split_multipart(entity.body, boundary) if boundary else None
            guess = None if split is not None else _guess_boundary(entity.body)
            if guess is not None:
                self.notes.add(f"{where}: boundary parameter unusable; found {guess[:40]!r}")
                split = _split_multipart(entity.body, guess)
            if split is None:
                self.notes.add(f"{where}: {ctype} without a usable boundary, read as text")
                ctype = "text/plain"
            elif depth >= _MAX_DEPTH:
                self.notes.add(f"MIME parts nested over {_MAX_DEPTH} levels deep ignored")
                return [], []
            else:
                if not split[1]:
                    self.notes.add(f"{where}: closing boundary missing")
                return self._children(split[0], ctype, label, depth)
        try:
            return self._leaf(entity, ctype, params, where)
        except Exception as exc:  # last resort: one undecodable part must not lose the rest
            self.notes.add(f"{where}: not decodable ({type(exc).__name__}), kept as it is")
            self._attach(entity.body, None, "application/octet-stream", inline=False)
            return [], []

    def _children(
        self, parts: list[bytes], ctype: str, label: str, depth: int
    ) -> tuple[list[str], list[str]]:
        child_type = "message/rfc822" if ctype == "multipart/digest" else "text/plain"
        texts: list[str] = []
        htmls: list[str] = []
        for number, data in enumerate(parts, 1):
            if self.parts >= _MAX_PARTS:
                self.notes.add(f"more than {_MAX_PARTS} MIME parts; the rest is ignored")
                break
            sub_label = f"{label}.{number}" if label else str(number)
            sub_texts, sub_htmls = self.walk(_parse_entity(data), child_type, sub_label, depth + 1)
            if ctype == "multipart/alternative":
                # One content in several forms; the last that has a form is the
                # preferred one (RFC 2046 5.1.4).
                texts, htmls = sub_texts or texts, sub_htmls or htmls
            else:
                texts += sub_texts
                htmls += sub_htmls
        return texts, htmls

    def _leaf(
        self, entity: _Entity, ctype: str, params: dict[str, str], where: str
    ) -> tuple[list[str], list[str]]:
        what = f"{where} Content-Disposition"
        disposition, disp_params = mime_header(entity.get("content-disposition"), what, self.notes)
        filename = disp_params.get("filename") or params.get("name")
        filename = _safe_filename(filename, where, self.notes)
        data = self._payload(entity, where)
        body_type = ctype or "text/plain"
        if (
            body_type in ("text/plain", "text/html")
            and disposition != "attachment"
            and not filename
        ):
            text, problem = decode_bytes(data, params.get("charset"))
            if problem:
                self.notes.add(f"{where}: {problem}")
            if "\x00" in text:
                self.notes.add(f"{where}: NUL characters removed")
            text = clean(text).replace("\r\n", "\n").replace("\r", "\n").removeprefix("\ufeff")
            return ([text], []) if body_type == "text/plain" else ([], [text])
        # Inline: shown in the body (Content-Disposition: inline, or a Content-ID
        # that the HTML refers to as cid:), not offered as a separate file.
        inline = disposition == "inline" or (
            not disposition and entity.get("content-id") is not None
        )
        self._attach(data, filename, ctype or "application/octet-stream", inline=inline)
        return [], []

    def _payload(self, entity: _Entity, where: str) -> bytes:
        """The body with its Content-Transfer-Encoding undone."""
        raw = entity.get("content-transfer-encoding")
        cte = "" if raw is None else raw_text(raw, where, self.notes).strip().strip('"').lower()
        cte = _CTE_TOKEN_RE.split(cte, maxsplit=1)[0]  # "base64 (comment)", "7bit;"
        if cte in _IDENTITY_CTES:
            return entity.body
        if cte == "quoted-printable":
            return binascii.a2b_qp(entity.body)
        if cte == "base64":
            data, problems = b64decode(entity.body)
        elif cte in _UUENCODE_CTES:
            data, problems = uudecode(entity.body)
        else:
            data, problems = entity.body, [f"unknown transfer encoding {cte[:40]!r}, kept as it is"]
        for problem in problems:
            self.notes.add(f"{where}: {problem}")
        return data

    def _attach(
        self, data: bytes, filename: str | None, content_type: str, *, inline: bool
    ) -> None:
        digest = hashlib.sha256(data).hexdigest()
        self.attachments.append(
            ParsedAttachment(filename, content_type, len(data), digest, data, inline)
        )


def _join_bodies(bodies: list[str]) -> str | None:
    if not bodies:
        return None
    pieces = [bodies[0]]
    for body in bodies[1:]:
        if pieces[-1] and not pieces[-1].endswith("\n"):
            pieces.append("\n")
        pieces.append(body)
    return "".join(pieces)


# ---- entry points ------------------------------------------------------------------


def parse_message(raw: bytes) -> ParsedMessage:
    """Parse a whole message (RFC 5322 bytes, CRLF or bare LF line endings).

    Never raises for any bytes, except :class:`MessageParseError` for empty or
    blank input. Repairs and omissions are listed in ``defects``.
    """
    if not isinstance(raw, bytes):
        raw = bytes(raw)  # bytearray, memoryview
    if not raw or raw.isspace():
        raise MessageParseError("empty message")
    notes = Notes()
    data = raw.lstrip(b"\r\n")
    if len(data) != len(raw):
        notes.add("blank lines before the headers skipped")
    entity = _parse_entity(data)
    env = _envelope(entity, notes, recipients=True)
    walker = _Walker(notes)
    texts, htmls = walker.walk(entity, "text/plain", "", 0)
    return ParsedMessage(
        message_id=env.message_id,
        in_reply_to=env.in_reply_to,
        references=env.references,
        sender=env.sender,
        sender_display=env.sender_display,
        to=env.to,
        cc=env.cc,
        reply_to=env.reply_to,
        subject=env.subject or "",
        date=env.date,
        text=_join_bodies(texts),
        html=_join_bodies(htmls),
        attachments=tuple(walker.attachments),
        defects=notes.result(),
    )


def summarize_headers(ref: str, header_bytes: bytes, size: int | None = None) -> HeaderSummary:
    """A :class:`HeaderSummary` from a raw header block (CRLF or bare LF, as pymap
    sends ``BODY[HEADER.FIELDS ...]``). Never raises; missing fields are None.

    The threading ids are read at once; ``sender``, ``subject`` and ``date`` when
    first read (see :class:`_BlockSummary`), with the same values.
    """
    data = bytes(header_bytes).lstrip(b"\r\n")
    own, in_reply_to, references = _thread_ids(data)
    return _BlockSummary.of(ref, own[0] if own else None, in_reply_to, references, size, data)


class _Decoded:
    """``sender``, ``subject`` or ``date`` of a :class:`_BlockSummary`: decoded
    with the other two on first read, then an ordinary instance attribute (this
    descriptor has no ``__set__``, so a value in the instance wins)."""

    name: str

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, summary: None, owner: type | None = None) -> _Decoded: ...

    @overload
    def __get__(self, summary: _BlockSummary, owner: type | None = None) -> str | None: ...

    def __get__(
        self, summary: _BlockSummary | None, owner: type | None = None
    ) -> _Decoded | str | None:
        if summary is None:
            return self
        env = _envelope(_parse_entity(summary._head), Notes(), recipients=False)
        decoded = vars(summary)  # a frozen dataclass: filled in once, like a cache
        decoded.update(sender=env.sender, subject=env.subject, date=env.date)
        value: str | None = decoded[self.name]
        return value


class _BlockSummary(HeaderSummary):
    """A :class:`HeaderSummary` of a raw header block whose ``sender``, ``subject``
    and ``date`` are decoded when first read.

    Summaries are made for every new message, but the kernel reads those three
    fields only for the members of synced threads (about one new message in ten).
    Otherwise it is a :class:`HeaderSummary` like any other: it compares equal to
    one built with the same values, hashes, copies and pickles alike, and
    ``dataclasses.replace`` gives one with every value set.
    """

    _head: bytes  # the header block the three fields are decoded from

    sender = _Decoded()
    subject = _Decoded()
    date = _Decoded()

    @classmethod
    def of(
        cls,
        ref: str,
        message_id: str | None,
        in_reply_to: tuple[str, ...],
        references: tuple[str, ...],
        size: int | None,
        head: bytes,
    ) -> _BlockSummary:
        summary = cls.__new__(cls)
        # Not through __init__, which would set the decoded fields to None.
        vars(summary).update(
            ref=ref,
            message_id=message_id,
            in_reply_to=in_reply_to,
            references=references,
            size=size,
            _head=head,
        )
        return summary

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, HeaderSummary):
            return NotImplemented
        return _summary_values(self) == _summary_values(other)

    __hash__ = HeaderSummary.__hash__


def _summary_values(summary: HeaderSummary) -> tuple[object, ...]:
    return tuple(getattr(summary, f.name) for f in fields(HeaderSummary))
