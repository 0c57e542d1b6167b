"""IMAP syntax: quoting arguments, modified UTF-7 mailbox names, parsing responses.

aioimaplib hands back a response as a list of lines: ``bytes`` for protocol text
and ``bytearray`` for each literal (``{n}`` followed by ``n`` raw bytes), with the
tagged status text last. This module turns those lines into plain Python values
(:func:`tokenize`) and reads the few responses the session needs (LIST, STATUS,
EXAMINE, SEARCH, FETCH). It never logs and has no I/O, so it is tested directly.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

#: One parsed value: an atom (``str``), a string (``bytes``, quoted or literal),
#: ``NIL`` (``None``) or a parenthesised list.
Token = str | bytes | None | list["Token"]


class ImapSyntaxError(ValueError):
    """A server response that does not follow the IMAP grammar."""


# ---- arguments ----------------------------------------------------------------------

_FORBIDDEN = re.compile(r"[\x00\r\n]")


def quote(value: str) -> str:
    """``value`` as an IMAP quoted string (RFC 3501 section 9).

    Raises ``ValueError`` for NUL, CR or LF, which no quoted string may carry.
    """
    if _FORBIDDEN.search(value):
        raise ValueError("NUL, CR and LF cannot be sent in an IMAP string")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def encode_mailbox(name: str) -> str:
    """Modified UTF-7 (RFC 3501 section 5.1.3) of a Unicode mailbox name."""
    out: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            raw = "".join(pending).encode("utf-16-be")
            b64 = base64.b64encode(raw).decode("ascii").rstrip("=").replace("/", ",")
            out.append("&" + b64 + "-")
            pending.clear()

    for ch in name:
        if 0x20 <= ord(ch) <= 0x7E:
            flush()
            out.append("&-" if ch == "&" else ch)
        else:
            pending.append(ch)
    flush()
    return "".join(out)


def decode_mailbox(name: str) -> str:
    """The Unicode name of a modified UTF-7 mailbox name; unchanged if invalid."""
    out: list[str] = []
    i = 0
    while i < len(name):
        ch = name[i]
        if ch != "&":
            out.append(ch)
            i += 1
            continue
        end = name.find("-", i + 1)
        if end < 0:
            return name
        if end == i + 1:
            out.append("&")
        else:
            b64 = name[i + 1 : end].replace(",", "/")
            try:
                out.append(base64.b64decode(b64 + "=" * (-len(b64) % 4)).decode("utf-16-be"))
            except (ValueError, UnicodeDecodeError):
                return name
        i = end + 1
    return "".join(out)


def mailbox_arg(name: str) -> str:
    """A Unicode mailbox name ready to put on a command line."""
    return quote(encode_mailbox(name))


def uid_set(uids: Sequence[int]) -> str:
    """A compact UID set (``1:3,7,9:10``) for sorted, distinct ``uids``."""
    if not uids:
        raise ValueError("empty UID set")
    parts: list[str] = []
    start = prev = uids[0]
    for uid in uids[1:]:
        if uid == prev + 1:
            prev = uid
            continue
        parts.append(f"{start}:{prev}" if prev != start else str(start))
        start = prev = uid
    parts.append(f"{start}:{prev}" if prev != start else str(start))
    return ",".join(parts)


# ---- tokens ---------------------------------------------------------------------------

_LITERAL_AT_END = re.compile(rb"\{(\d+)\+?\}$")


def tokenize(pieces: Iterable[bytes | bytearray]) -> list[Token]:
    """Parse one response (its text pieces and literals) into tokens."""
    root: list[Token] = []
    stack: list[list[Token]] = [root]
    expect_literal = False
    for piece in pieces:
        if isinstance(piece, bytearray):
            if not expect_literal:
                raise ImapSyntaxError("literal without a {n} announcement")
            stack[-1].append(bytes(piece))
            expect_literal = False
            continue
        if expect_literal:
            raise ImapSyntaxError("announced literal is missing")
        expect_literal = _scan(bytes(piece), stack)
    if expect_literal or len(stack) != 1:
        raise ImapSyntaxError("response ends inside a list or before a literal")
    return root


def _scan(text: bytes, stack: list[list[Token]]) -> bool:
    """Tokenize one text piece into ``stack``; True if it ends announcing a literal."""
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == 0x20:
            i += 1
        elif c == 0x28:  # (
            child: list[Token] = []
            stack[-1].append(child)
            stack.append(child)
            i += 1
        elif c == 0x29:  # )
            if len(stack) == 1:
                raise ImapSyntaxError("unbalanced ')'")
            stack.pop()
            i += 1
        elif c == 0x22:  # "
            i = _quoted(text, i + 1, stack[-1])
        elif c == 0x7B and _LITERAL_AT_END.match(text, i):  # {n} closing the piece
            return True
        else:
            i = _atom(text, i, stack[-1])
    return False


#: The rest of a quoted string after its opening quote, and a backslash escape.
_QUOTED_REST = re.compile(rb'((?:[^"\\]|\\.)*)"', re.DOTALL)
_ESCAPED = re.compile(rb"\\(.)", re.DOTALL)
#: An atom: up to a blank or parenthesis, except inside a section such as
#: ``BODY[HEADER.FIELDS (A B)]`` (which runs to the first ``]``).
_ATOM = re.compile(rb"(?:[^ ()\[]|\[[^\]]*\])*")


def _quoted(text: bytes, i: int, into: list[Token]) -> int:
    rest = _QUOTED_REST.match(text, i)
    if rest is None:
        raise ImapSyntaxError("unterminated quoted string")
    value = rest.group(1)
    into.append(_ESCAPED.sub(rb"\1", value) if b"\\" in value else value)
    return rest.end()


def _atom(text: bytes, i: int, into: list[Token]) -> int:
    atom_end = _ATOM.match(text, i)
    end = atom_end.end() if atom_end is not None else i
    if end < len(text) and text[end] == 0x5B:
        raise ImapSyntaxError("unterminated '['")
    atom = text[i:end].decode("utf-8", "replace")
    into.append(None if atom.upper() == "NIL" else atom)
    return end


def as_text(token: Token) -> str:
    """An atom or string as text (strings are decoded as UTF-8)."""
    if isinstance(token, str):
        return token
    if isinstance(token, bytes):
        return token.decode("utf-8", "replace")
    raise ImapSyntaxError(f"expected an atom or string, got {token!r}")


def as_int(token: Token) -> int:
    """A number atom as ``int``."""
    if isinstance(token, str) and token.isdigit():
        return int(token)
    raise ImapSyntaxError(f"expected a number, got {token!r}")


def split_responses(
    lines: Sequence[bytes | bytearray], starts: Callable[[bytes], bool]
) -> list[list[bytes | bytearray]]:
    """Group response pieces into untagged responses.

    ``lines`` are a command's data lines (the tagged status text already removed);
    a new response begins at each text piece for which ``starts`` is true.
    """
    groups: list[list[bytes | bytearray]] = []
    for line in lines:
        if not isinstance(line, bytearray) and starts(line):
            groups.append([line])
        elif groups:
            groups[-1].append(line)
    return groups


# ---- responses --------------------------------------------------------------------------


@dataclass(frozen=True)
class ListedMailbox:
    """One LIST answer: the Unicode name, its attributes (lower case) and delimiter."""

    name: str
    attributes: frozenset[str]
    delimiter: str | None


def parse_list(lines: Sequence[bytes | bytearray]) -> list[ListedMailbox]:
    """LIST responses (each piece group starts with the attribute list)."""
    found: list[ListedMailbox] = []
    for group in split_responses(lines, lambda line: line.startswith(b"(")):
        tokens = tokenize(group)
        if len(tokens) < 3 or not isinstance(tokens[0], list):
            raise ImapSyntaxError("malformed LIST response")
        attributes = frozenset(as_text(a).lower() for a in tokens[0])
        delimiter = None if tokens[1] is None else as_text(tokens[1])
        found.append(ListedMailbox(decode_mailbox(as_text(tokens[2])), attributes, delimiter))
    return found


def parse_status(lines: Sequence[bytes | bytearray]) -> dict[str, int]:
    """The item list of a STATUS response, e.g. ``{"UIDNEXT": 12, ...}``."""
    tokens = tokenize(lines)
    if not tokens or not isinstance(tokens[-1], list):
        raise ImapSyntaxError("malformed STATUS response")
    items = tokens[-1]
    return {as_text(items[k]).upper(): as_int(items[k + 1]) for k in range(0, len(items) - 1, 2)}


_RESP_CODE = re.compile(rb"^OK \[(UIDVALIDITY|UIDNEXT|HIGHESTMODSEQ) (\d+)\]", re.I)
_EXISTS = re.compile(rb"^(\d+) EXISTS", re.I)


def parse_select(lines: Sequence[bytes | bytearray]) -> dict[str, int]:
    """UIDVALIDITY, UIDNEXT, HIGHESTMODSEQ and EXISTS from a SELECT/EXAMINE answer."""
    found: dict[str, int] = {}
    for line in lines:
        if isinstance(line, bytearray):
            continue
        code = _RESP_CODE.match(line)
        if code:
            found[code.group(1).decode("ascii").upper()] = int(code.group(2))
            continue
        exists = _EXISTS.match(line)
        if exists:
            found["EXISTS"] = int(exists.group(1))
    return found


_NOT_PLAIN_SEARCH = re.compile(rb'[()"\[{]')


def parse_search(lines: Sequence[bytes | bytearray]) -> list[int]:
    """The numbers of SEARCH responses, sorted (a ``(MODSEQ n)`` suffix is ignored)."""
    numbers: set[int] = set()
    for line in lines:
        if isinstance(line, bytearray):
            continue
        if line.isascii() and not _NOT_PLAIN_SEARCH.search(line):
            # Only atoms between blanks (the usual answer): no need to tokenize.
            numbers.update(int(word) for word in line.split(b" ") if word.isdigit())
            continue
        for token in tokenize([line]):
            if isinstance(token, str) and token.isdigit():
                numbers.add(int(token))
    return sorted(numbers)


@dataclass(frozen=True)
class FetchedMessage:
    """What one FETCH response said about a message (only what was asked)."""

    uid: int
    size: int | None
    body: bytes | None


_FETCH_START = re.compile(rb"^\d+ FETCH \(", re.I)
#: The usual FETCH response: number items, then one section as a literal.
_PLAIN_FETCH = re.compile(
    rb"\d+ FETCH \(((?:[A-Z0-9.]+ \d+ )*)BODY\[[^\]]*\](?:<\d+>)? \{\d+\+?\}", re.I
)


def _plain_fetch(group: Sequence[bytes | bytearray]) -> FetchedMessage | None:
    """What :func:`parse_fetch` reads from ``group`` when it has the usual shape
    (``n FETCH (UID u RFC822.SIZE s BODY[...] {k}``, the literal, ``)``), without
    tokenizing; None for any other shape."""
    if len(group) != 3 or not isinstance(group[1], bytearray) or group[2] != b")":
        return None
    plain = _PLAIN_FETCH.fullmatch(group[0])
    if plain is None:
        return None
    words = plain.group(1).split()
    items = {words[k].upper(): int(words[k + 1]) for k in range(0, len(words) - 1, 2)}
    uid = items.get(b"UID")
    if uid is None:
        return None
    return FetchedMessage(uid, items.get(b"RFC822.SIZE"), bytes(group[1]))


def parse_fetch(lines: Sequence[bytes | bytearray]) -> list[FetchedMessage]:
    """FETCH responses with a UID; responses without one (unsolicited flag
    updates from other sessions) are skipped. The body is the first ``BODY[...]``
    item, whether the server sent it as a literal or a quoted string."""
    found: list[FetchedMessage] = []
    for group in split_responses(lines, lambda line: bool(_FETCH_START.match(line))):
        plain = _plain_fetch(group)
        if plain is not None:
            found.append(plain)
            continue
        tokens = tokenize(group)
        if len(tokens) < 3 or not isinstance(tokens[2], list):
            raise ImapSyntaxError("malformed FETCH response")
        items = tokens[2]
        uid: int | None = None
        size: int | None = None
        body: bytes | None = None
        for k in range(0, len(items) - 1, 2):
            key = as_text(items[k]).upper()
            value = items[k + 1]
            if key == "UID":
                uid = as_int(value)
            elif key == "RFC822.SIZE":
                size = as_int(value)
            elif key.startswith("BODY[") and body is None:
                body = (
                    value.encode("utf-8")
                    if isinstance(value, str)
                    else (value if isinstance(value, bytes) else b"")
                )
        if uid is not None:
            found.append(FetchedMessage(uid, size, body))
    return found
