"""Decoding of header values and bodies of received mail, for threadsync.core.mime.parse.

Every function here accepts anything and never raises: 8-bit bytes where ASCII
belongs, unknown or mislabelled charsets, broken base64, RFC 2047 encoded words
split inside a character, RFC 2231 parameters, address groups, Message-IDs with
comments or without brackets. What had to be repaired goes to a :class:`Notes`.
All of it is linear in the input: a hostile header must not stall a sync pass.
"""

from __future__ import annotations

import binascii
import codecs
import re
from datetime import UTC, datetime
from email.utils import getaddresses, parsedate_to_datetime
from urllib.parse import unquote_to_bytes

#: At most this many defect notes are kept per message.
_MAX_NOTES = 50
#: A Message-ID must fit on one header line (RFC 5322: 998 characters).
_MAX_ID_LEN = 998
#: Longer address headers are scanned by pattern: the stdlib address parser is
#: linear but slow on hostile input (about 2 microseconds a character).
_MAX_ADDRESS_HEADER = 32 * 1024


class Notes:
    """Defect notes of one message: de-duplicated, in order, capped."""

    def __init__(self) -> None:
        self._items: dict[str, None] = {}
        self._dropped = 0

    def add(self, text: str) -> None:
        if text in self._items:
            return
        if len(self._items) >= _MAX_NOTES:
            self._dropped += 1
            return
        self._items[text] = None

    def result(self) -> tuple[str, ...]:
        items = list(self._items)
        if self._dropped:
            items.append(f"{self._dropped} further notes left out")
        return tuple(items)


def unfold(value: str) -> str:
    # The parser keeps folds as line breaks followed by blanks; dropping the line
    # breaks and keeping the blanks is RFC 5322 unfolding.
    return value.replace("\r", "").replace("\n", "")


# ---- text decoding -----------------------------------------------------------------

#: Labels that mail software commonly puts on text in a wider encoding.
_CHARSET_SUPERSETS = {
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "x-gbk": "gb18030",
    "ks_c_5601-1987": "cp949",
    "euc-kr": "cp949",
    "iso-8859-1": "cp1252",
    "iso8859-1": "cp1252",
    "latin1": "cp1252",
    "shift_jis": "cp932",
    "shift-jis": "cp932",
    "x-sjis": "cp932",
    "big5": "big5hkscs",
    "tis-620": "cp874",
    "unicode-1-1-utf-7": "utf-7",
}
#: Text codecs to Python, but never a mail charset.
_NOT_CHARSETS = frozenset({"idna", "punycode", "unicode-escape", "raw-unicode-escape", "undefined"})


def _text_codec(label: str) -> str | None:
    try:
        name = codecs.lookup(label).name
        b"a".decode(name)  # LookupError for bytes-to-bytes codecs (base64, zlib, ...)
    except UnicodeError:
        pass  # a text codec; "a" alone is just not valid in it (utf-16)
    except (LookupError, ValueError, TypeError):
        return None
    return None if name in _NOT_CHARSETS else name


def _codecs(charset: str) -> list[str]:
    """Python codecs for a MIME charset label: its wider superset first, then itself."""
    label = charset.strip().strip("\"'").lower()
    if not label or len(label) > 40:
        return []
    names: list[str] = []
    for candidate in (_CHARSET_SUPERSETS.get(label), label):
        name = _text_codec(candidate) if candidate else None
        if name is not None and name not in names:
            names.append(name)
    return names


def decode_bytes(data: bytes, charset: str | None) -> tuple[str, str | None]:
    """Decode ``data`` labelled ``charset``; never fails.

    Returns the text and, when the label could not be used as it is, a note. Order:
    the label; UTF-8 (usually the truth behind a wrong or missing label); the label
    with replacement characters; windows-1252; latin-1, which decodes any bytes.
    """
    if not charset:
        if data.isascii():
            return data.decode("ascii"), None
        charset = None
    names = _codecs(charset) if charset else []
    for name in names:
        try:
            return data.decode(name), None
        except (UnicodeError, LookupError):
            pass
    if not data.isascii():
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            pass
        else:
            return text, (None if charset is None else _why(charset, names, "utf-8"))
    for name in names:
        if name != "ascii":
            try:
                return data.decode(name, "replace"), _why(charset, names, f"{name} (replacing)")
            except (UnicodeError, LookupError):
                pass
    try:
        return data.decode("cp1252"), _why(charset, names, "windows-1252")
    except UnicodeDecodeError:
        return data.decode("latin-1"), _why(charset, names, "latin-1")


def _why(charset: str | None, names: list[str], used: str) -> str:
    if charset is None:
        return f"8-bit text without a charset, decoded as {used}"
    if not names:
        return f"unknown charset {charset[:40]!r}, decoded as {used}"
    return f"text not valid in {charset[:40]!r}, decoded as {used}"


_UNSAFE_RE = re.compile("[\x00\ud800-\udfff]")
_CONTROL_RE = re.compile("[\x00-\x08\x0a-\x1f\x7f\x85\u2028\u2029]+")


def clean(text: str) -> str:
    """Drop NUL and lone surrogates: neither survives UTF-8 or a Postgres text column."""
    if _UNSAFE_RE.search(text) is None:
        return text
    return _UNSAFE_RE.sub(lambda m: "" if m.group() == "\x00" else "\ufffd", text)


def one_line(text: str) -> str:
    # Decoded header text can hold encoded line breaks ("=0A"); a reply would then
    # carry them back into a header, so they become blanks.
    return _CONTROL_RE.sub(" ", clean(text)).strip()


def raw_text(value: str, what: str, notes: Notes) -> str:
    """A raw header value as text: unfolded, 8-bit bytes decoded."""
    text = unfold(value)
    if text.isascii():
        return text
    try:
        data = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return clean(text)
    decoded, problem = decode_bytes(data, None)
    if problem:
        notes.add(f"{what}: {problem}")
    return decoded


_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_NOT_B64 = bytes(sorted(set(range(256)) - set(_B64_ALPHABET + b"=")))
_BLANKS = b" \t\r\n\x0b\x0c"


def b64decode(data: bytes) -> tuple[bytes, list[str]]:
    """Tolerant base64: skips junk, repairs padding, exact decoded length."""
    problems: list[str] = []
    compact = data.translate(None, _BLANKS)
    try:  # the common case, well-formed: one C pass
        return binascii.a2b_base64(compact, strict_mode=True), problems
    except binascii.Error:
        pass
    alphabet = compact.translate(None, _NOT_B64)
    if len(alphabet) != len(compact):
        problems.append("invalid base64 characters ignored")
    core = alphabet.rstrip(b"=")
    if b"=" in core:
        # Padding inside the data: separately encoded pieces were concatenated.
        chunks = [chunk for chunk in core.split(b"=") if chunk]
        problems.append("base64 padding inside the data")
    else:
        chunks = [core]
        if len(alphabet) - len(core) != -len(core) % 4:
            problems.append("base64 padding repaired")
    out = []
    for chunk in chunks:
        rest = len(chunk) % 4
        if rest == 1:  # a lone trailing character carries no whole byte
            chunk = chunk[:-1]
            problems.append("truncated base64 data")
        elif rest:
            chunk += b"=" * (4 - rest)
        out.append(binascii.a2b_base64(chunk))
    return b"".join(out), problems


def uudecode(data: bytes) -> tuple[bytes, list[str]]:
    """x-uuencode bodies (old mailers); the stdlib's own uu support is deprecated."""
    out: list[bytes] = []
    started = False
    for line in data.splitlines():
        stripped = line.strip()
        if not started:
            started = line.startswith(b"begin")
            continue
        if stripped == b"end":
            break
        if stripped in (b"", b"`"):
            continue
        try:
            out.append(binascii.a2b_uu(line))
        except binascii.Error:
            # Some encoders pad lines: decode only what the length character announces.
            nbytes = (((line[0] - 32) & 63) * 4 + 5) // 3
            try:
                out.append(binascii.a2b_uu(line[:nbytes]))
            except binascii.Error:
                return b"".join(out), ["broken uuencoded line; data cut short"]
    if not started:
        return data, ["uuencoded data without a 'begin' line kept as it is"]
    return b"".join(out), []


_ENCODED_WORD_RE = re.compile(r"=\?([^?\s]{1,80})\?([bBqQ])\?([^?\s]*)\?=")


def decode_words(text: str, what: str, notes: Notes) -> str:
    """Decode RFC 2047 encoded words, joining adjacent ones of one charset first
    (encoders split multi-byte characters across words)."""
    if "=?" not in text:
        return text
    out: list[str] = []
    run = bytearray()
    run_charset: str | None = None  # not None while the last token was a word

    def flush() -> None:
        if run_charset is not None and run:
            decoded, problem = decode_bytes(bytes(run), run_charset)
            if problem:
                notes.add(f"{what}: {problem}")
            out.append(decoded)
        run.clear()

    pos = 0
    for match in _ENCODED_WORD_RE.finditer(text):
        gap = text[pos : match.start()]
        # Blanks between two encoded words are not part of the text (RFC 2047 6.2).
        if gap and (run_charset is None or gap.strip(" \t")):
            flush()
            run_charset = None
            out.append(gap)
        charset = match.group(1).split("*", 1)[0].lower()
        payload = match.group(3).encode("utf-8", "surrogateescape")
        if match.group(2) in "bB":
            data, _ = b64decode(payload)
        else:
            data = binascii.a2b_qp(payload, header=True)
        if charset != run_charset:
            flush()
        run_charset = charset
        run.extend(data)
        pos = match.end()
    flush()
    out.append(text[pos:])
    return "".join(out)


def header_text(value: str, what: str, notes: Notes) -> str:
    """An unstructured header value (Subject) as one clean line of text."""
    return one_line(decode_words(raw_text(value, what, notes), what, notes))


# ---- MIME parameters ---------------------------------------------------------------

_PARAM_RE = re.compile(r';\s*([^\s=;"]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"?|([^;]*))', re.DOTALL)
_ESCAPE_RE = re.compile(r"\\(.)", re.DOTALL)
_EXTENDED_KEY_RE = re.compile(r"([^*]+)\*(\d{1,3})?(\*)?")
MIME_TYPE_RE = re.compile(r"[a-z0-9!#$%&'*+.^_`{|}~-]+/[a-z0-9!#$%&'*+.^_`{|}~-]+")


def mime_header(raw: str | None, what: str, notes: Notes) -> tuple[str, dict[str, str]]:
    """(first token lower-cased, parameters) of a Content-Type or -Disposition.

    Linear (a regex scan); the stdlib splitter is quadratic on an unclosed quote
    followed by many ``;`` (6 s for 64 KiB).
    """
    if raw is None:
        return "", {}
    text = raw_text(raw, what, notes)
    value, _, rest = text.partition(";")
    value = value.split("(", 1)[0].strip().lower()
    return value, (_parse_params(";" + rest, what, notes) if rest else {})


def _parse_params(text: str, what: str, notes: Notes) -> dict[str, str]:
    plain: dict[str, str] = {}
    extended: dict[str, dict[int, tuple[str, bool]]] = {}
    for match in _PARAM_RE.finditer(text):
        key = match.group(1).lower()
        quoted = match.group(2)
        value = _ESCAPE_RE.sub(r"\1", quoted) if quoted is not None else match.group(3).strip()
        ext = _EXTENDED_KEY_RE.fullmatch(key)
        if ext is None:
            plain.setdefault(key, value)
            continue
        # RFC 2231: name*=charset'lang'%XX..., or sections name*0*=, name*1=, ...
        encoded = ext.group(2) is None or ext.group(3) is not None
        sections = extended.setdefault(ext.group(1), {})
        sections.setdefault(int(ext.group(2) or 0), (value, encoded))
    params = {key: one_line(decode_words(value, what, notes)) for key, value in plain.items()}
    for key, sections in extended.items():
        params[key] = one_line(_join_rfc2231(sections, what, notes))
    return params


def _join_rfc2231(sections: dict[int, tuple[str, bool]], what: str, notes: Notes) -> str:
    data = bytearray()
    charset: str | None = None
    for index, number in enumerate(sorted(sections)):
        value, encoded = sections[number]
        raw = value.encode("utf-8", "surrogateescape")
        if encoded:
            if index == 0 and value.count("'") >= 2:
                charset, _, rest = value.split("'", 2)
                raw = rest.encode("utf-8", "surrogateescape")
            data += unquote_to_bytes(raw)
        else:
            data += raw
    text, problem = decode_bytes(bytes(data), charset or None)
    if problem:
        notes.add(f"{what}: parameter {problem}")
    return text


# ---- addresses, ids, dates -----------------------------------------------------------

_ADDRESS_SEPARATORS_RE = re.compile(r"[\s<>()\[\]\\,;:\"]+")


def _bare_address(addr: str) -> str | None:
    """``local@domain`` with the domain lower-cased, or None when implausible."""
    addr = addr.strip().strip("<>").strip()
    local, at, domain = addr.rpartition("@")
    if not at or not local or not domain or len(addr) > 320:
        return None
    if _CONTROL_RE.search(addr) or _UNSAFE_RE.search(addr) or "\t" in addr:
        return None
    if " " in addr and not local.startswith('"'):
        return None
    return f"{local}@{domain.lower()}"


def addresses(values: list[str], what: str, notes: Notes) -> list[tuple[str, str]]:
    """(display name, bare address) pairs of address headers; groups flattened."""
    found: dict[str, str] = {}
    for value in values:
        text = raw_text(value, what, notes)
        pairs: list[tuple[str, str]] = []
        if len(text) > _MAX_ADDRESS_HEADER:
            notes.add(f"{what}: over {_MAX_ADDRESS_HEADER} characters; read by pattern")
        else:
            try:
                # getaddresses flattens groups ("team: a@x, b@y;") and skips empty
                # ones ("undisclosed-recipients:;"), unlike msg["to"].addresses.
                pairs = getaddresses([text])
            except (RecursionError, ValueError, IndexError, TypeError, AttributeError):
                notes.add(f"{what}: not parseable as addresses; read by pattern")
        if not pairs and "@" in text:
            tokens = _ADDRESS_SEPARATORS_RE.split(text)
            pairs = [("", token) for token in tokens if token.count("@") == 1]
        for name, addr in pairs:
            bare = _bare_address(addr)
            if bare is None:
                if addr.strip():
                    notes.add(f"{what}: implausible address {addr[:60]!r} ignored")
                continue
            found.setdefault(bare, one_line(decode_words(name, what, notes)))
    return [(name, addr) for addr, name in found.items()]


#: An id in brackets (kept) or an innermost (comment) outside brackets (dropped).
_BRACKETS_OR_COMMENT_RE = re.compile(r"<[^<>]*>|\((?:[^()\\]|\\.)*\)")
#: Nested comments deeper than this are left as they are (each level is a pass).
_MAX_COMMENT_NESTING = 4


def _strip_comments(text: str) -> str:
    """Replace (comments) outside <...> by a blank (RFC 5322 CFWS), nested ones too.

    A stray unclosed "(" stays an ordinary character, so it cannot swallow the ids
    after it. Regex passes, linear each: a 1 MB References stays cheap.
    """
    for _ in range(_MAX_COMMENT_NESTING):
        stripped = _BRACKETS_OR_COMMENT_RE.sub(
            lambda m: m.group() if m.group().startswith("<") else " ", text
        )
        if stripped == text or "(" not in stripped:
            return stripped
        text = stripped
    return text


#: Tokens: <id>, a quoted phrase (which never runs past < or >, so a stray quote
#: cannot hide ids, and never fails, which keeps the scan linear), or a bare word.
_ID_TOKEN_RE = re.compile(r'<([^<>]*)>|"(?:[^"\\<>]|\\[^<>])*"?|[^\s,;<>"]+')
_BARE_ID_RE = re.compile(r"[^\s<>()\[\]\\,;:\"@]+@[^\s<>()\\,;:\"@]+")
_ID_CONTROL_RE = re.compile("[\x00-\x1f\x7f\ud800-\udfff]")


def parse_msgid_list(value: str | None) -> tuple[str, ...]:
    """Message-IDs in a Message-ID, In-Reply-To or References value.

    Accepts ids separated by blanks, commas or folds, with (comments) and quoted
    phrases around them (old-style In-Reply-To); whitespace inside brackets is
    dropped; an id without brackets is repaired when it looks like ``left@right``.
    Returns ids with angle brackets, de-duplicated, in order.
    """
    if not value:
        return ()
    text = unfold(value)
    if "(" in text:
        text = _strip_comments(text)
    ids: dict[str, None] = {}
    for match in _ID_TOKEN_RE.finditer(text):
        token = match.group(0)
        if token.startswith("<"):
            inner = "".join(match.group(1).split())
        elif token.startswith('"') or not _BARE_ID_RE.fullmatch(token):
            continue  # a quoted phrase, or a word of one ("Your message of ...")
        else:
            inner = token
        if inner and len(inner) + 2 <= _MAX_ID_LEN and not _ID_CONTROL_RE.search(inner):
            ids.setdefault(f"<{inner}>", None)
    return tuple(ids)


def parse_date(raw: str, notes: Notes) -> str | None:
    """ISO 8601 UTC (``2024-05-01T09:30:00Z``), or None when unparseable."""
    text = one_line(raw_text(raw, "Date", notes))[:200]  # real dates are short
    try:
        when = parsedate_to_datetime(text)
    except (ValueError, TypeError, IndexError, OverflowError):
        try:
            when = datetime.fromisoformat(text)
        except ValueError:
            notes.add(f"unparseable Date {text[:60]!r} ignored")
            return None
        notes.add("Date is ISO 8601, not RFC 5322")
    if when.tzinfo is None:  # "-0000": the zone is unknown; UTC is the best guess
        when = when.replace(tzinfo=UTC)
    try:
        when = when.astimezone(UTC)
    except (OverflowError, ValueError):
        notes.add(f"Date {text[:60]!r} out of range, ignored")
        return None
    return when.replace(tzinfo=None).isoformat(timespec="seconds") + "Z"
