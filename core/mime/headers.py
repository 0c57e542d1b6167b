"""Header blocks of received mail: parsed into raw fields, decoded into the
envelope (sender, recipients, subject, date, threading ids), and summarised for
the membership decision (:func:`summarize_headers`).

Part of :mod:`threadsync.core.mime.parse`, which reads the bodies; the reasons for parsing
this way (raw values from the stdlib parser, decoded here in linear time) are
given there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta, timezone
from email.errors import MessageDefect, MessageError
from email.parser import BytesHeaderParser
from email.policy import Compat32
from typing import overload

from threadsync.core.mime.decode import (
    Notes,
    addresses,
    header_text,
    parse_date,
    parse_msgid_list,
    raw_text,
    unfold,
)
from threadsync.core.provider import HeaderSummary

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
class Entity:
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


def parse_entity(data: bytes) -> Entity:
    head, body = _split_head(data)
    quick = _plain_headers(head) if head else None
    if quick is not None:  # then no line ends the block early either
        return Entity(quick, body, [])
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
        return Entity([], body, defects)
    quick = _plain_headers(head)
    if quick is not None:
        return Entity(quick, body, defects)
    try:
        msg = _HEADER_PARSER.parsebytes(head)
    except (MessageError, ValueError, TypeError, IndexError, LookupError) as exc:
        return Entity([], data, [f"header block unreadable ({type(exc).__name__})"])
    headers = [(str(name).strip().lower(), str(value)) for name, value in msg.raw_items()]
    return Entity(headers, body, defects + [_defect_text(d) for d in msg.defects])


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
#: The longest Message-ID kept (one header line, RFC 5322), as threadsync.core.mime.decode.
_LONGEST_ID = 998


def _addresses(values: list[str], what: str, notes: Notes) -> list[tuple[str, str]]:
    """:func:`threadsync.core.mime.decode.addresses`, quicker for one plain mailbox."""
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
    """:func:`threadsync.core.mime.decode.parse_date`, quicker for the canonical form."""
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


def _ids(entity: Entity, name: str, what: str, notes: Notes) -> tuple[str, ...]:
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
    :func:`envelope` reads them, without reading the other fields.

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
        entity = parse_entity(data)
        own = entity.get_all("message-id")
        replied = entity.get_all("in-reply-to")
        referenced = entity.get_all("references")
    notes = Notes()  # a summary keeps no notes
    return (
        _id_list(own, "Message-ID", notes),
        _id_list(replied, "In-Reply-To", notes),
        _id_list(referenced, "References", notes),
    )


def envelope(entity: Entity, notes: Notes, *, recipients: bool) -> _Envelope:
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


# ---- summaries for the membership decision ------------------------------------------


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
        env = envelope(parse_entity(summary._head), Notes(), recipients=False)
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
