"""Parse received email, robustly, into what threadsync stores and shows.

Real mail is messy: LF-only files, 8-bit bytes in headers, unknown charsets, broken
base64, header lines far over 998 characters, header blocks over 16 KiB, address
groups, messages attached inside messages. :func:`parse_message` turns any bytes
into a :class:`ParsedMessage` and never raises, except
:class:`threadsync.core.errors.MessageParseError` for empty input. What had to be repaired or
ignored is listed, for people, in ``ParsedMessage.defects``. Header blocks are
read by :mod:`threadsync.core.mime.headers`, which also summarises the header block of each
new message for the membership decision.

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
from dataclasses import dataclass

from threadsync.core.errors import MessageParseError
from threadsync.core.mime.decode import (
    MIME_TYPE_RE,
    Notes,
    b64decode,
    clean,
    decode_bytes,
    mime_header,
    raw_text,
    uudecode,
)
from threadsync.core.mime.headers import Entity, envelope, parse_entity

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
        self, entity: Entity, default_type: str, label: str, depth: int
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
            sub_texts, sub_htmls = self.walk(parse_entity(data), child_type, sub_label, depth + 1)
            if ctype == "multipart/alternative":
                # One content in several forms; the last that has a form is the
                # preferred one (RFC 2046 5.1.4).
                texts, htmls = sub_texts or texts, sub_htmls or htmls
            else:
                texts += sub_texts
                htmls += sub_htmls
        return texts, htmls

    def _leaf(
        self, entity: Entity, ctype: str, params: dict[str, str], where: str
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

    def _payload(self, entity: Entity, where: str) -> bytes:
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
    entity = parse_entity(data)
    env = envelope(entity, notes, recipients=True)
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
