"""Hostile MIME, generated: property-based tests of parsing and building.

Three properties, on MIME trees that hypothesis builds (nesting, every transfer
encoding, charsets right and wrong, inline and attached parts, mislabelled
types):

* parsing never raises, whatever is done to the bytes (truncation, NULs,
  broken or missing boundaries, huge headers, deep nesting, junk encodings),
  and what it returns can be built into a reply without an unexpected error;
* the attachment limit decision equals a reference computation over the
  decoded sizes the generator knows, and the parsed attachments are exactly
  the generated ones;
* a message built by threadsync parses back to the same content.

Profiles: ``ci`` (the default: a few dozen examples per property, no deadline)
runs with the suite; ``long`` (thousands of examples) runs on demand::

    THREADSYNC_HYPOTHESIS_PROFILE=long python -m pytest tests/test_mime_generated.py
"""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass
from datetime import UTC, datetime

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from threadsync.core import rules
from threadsync.core.errors import InvalidInput, MessageParseError
from threadsync.core.mime import (
    AttachmentIn,
    ParsedMessage,
    build_message,
    parse_message,
    summarize_headers,
)

settings.register_profile(
    "ci",
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    # The explain phase imports modules that warn (an error under this suite's filters).
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
)
settings.register_profile(
    "long",
    max_examples=3000,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    # The explain phase imports modules that warn (an error under this suite's filters).
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
)
PROFILE = settings.get_profile(os.environ.get("THREADSYNC_HYPOTHESIS_PROFILE", "ci"))


# ---- a MIME tree and what it means ------------------------------------------------------


@dataclass(frozen=True)
class Part:
    """A rendered MIME entity (headers and body, CRLF) and what a correct reader
    must find in it: the decoded attachment payloads, in order."""

    raw: bytes
    attachments: tuple[bytes, ...]


CHARSETS = ["utf-8", "iso-8859-1", "windows-1252", "us-ascii", "x-unknown", "utf-7", "koi8-r"]
ATTACHMENT_TYPES = [
    "application/pdf",
    "image/png",
    "application/octet-stream",
    "text/plain",  # a text file: an attachment because it has a file name
    "text/html",
    "message/rfc822",
    "application/x-made-up",
    "video",  # mislabelled: no subtype
]


#: File names as people give them: any printable text, no directory part.
file_names = st.text(
    st.characters(categories=["L", "N", "P", "S", "Zs"], exclude_characters="/\\"),
    min_size=1,
    max_size=40,
).filter(lambda s: s.strip() not in ("", ".", ".."))


def wrap(data: bytes, width: int) -> bytes:
    return b"\r\n".join(data[i : i + width] for i in range(0, len(data), width)) or b""


def encode(payload: bytes, cte: str, width: int) -> bytes:
    if cte == "base64":
        return wrap(base64.b64encode(payload), width)
    if cte == "quoted-printable":
        return binascii.b2a_qp(payload, istext=False).replace(b"\n", b"\r\n")
    return payload  # 7bit / 8bit / binary / none: as it is


@st.composite
def identity_payloads(draw: st.DrawFn) -> bytes:
    # Bytes a body may carry unencoded inside a multipart: no "=", so no boundary
    # (they all start with "=_") can occur; CR and LF only as CRLF.
    lines = draw(
        st.lists(st.binary(max_size=120).map(lambda b: b.translate(None, b"=\r\n")), max_size=12)
    )
    return b"\r\n".join(lines)


@st.composite
def attachment_parts(draw: st.DrawFn) -> Part:
    ctype = draw(st.sampled_from(ATTACHMENT_TYPES))
    cte = draw(st.sampled_from(["base64", "quoted-printable", "binary", "8bit", None]))
    if cte in ("base64", "quoted-printable"):
        payload = draw(st.binary(max_size=3000))
    else:
        payload = draw(identity_payloads())
    # A name a reader keeps (hostile names are the damaged-bytes test's business):
    # a text part whose name is unusable is read as a body, rightly.
    name = draw(file_names)
    how = draw(st.sampled_from(["attachment", "inline-cid", "name-param", "disposition-only"]))
    quoted = name.replace("\\", "\\\\").replace('"', '\\"')
    headers = []
    encoded_name = "=?utf-8?b?" + base64.b64encode(name.encode("utf-8", "replace")).decode() + "?="
    if how == "name-param":
        headers.append(f'Content-Type: {ctype}; name="{encoded_name}"')
    else:
        headers.append(f"Content-Type: {ctype}")
    if how == "attachment":
        headers.append(f"Content-Disposition: attachment; filename*=utf-8''{_pct(name)}")
    elif how == "inline-cid":
        headers.append(f'Content-Disposition: inline; filename="{encoded_name}"')
        headers.append("Content-ID: <part@example.org>")
    elif how == "disposition-only":
        headers.append(f'Content-Disposition: attachment; filename="{quoted[:0] or "f"}"')
    if cte is not None:
        headers.append(f"Content-Transfer-Encoding: {cte}")
    width = draw(st.sampled_from([76, 64, 998]))
    raw = "\r\n".join(headers).encode("ascii") + b"\r\n\r\n" + encode(payload, cte or "", width)
    return Part(raw, (payload,))


def _pct(text: str) -> str:
    from urllib.parse import quote

    return quote(text.encode("utf-8", "replace"), safe="")


@st.composite
def text_parts(draw: st.DrawFn) -> Part:
    subtype = draw(st.sampled_from(["plain", "html"]))
    charset = draw(st.sampled_from(CHARSETS))
    cte = draw(st.sampled_from(["7bit", "8bit", "quoted-printable", "base64", None]))
    text = draw(st.text(max_size=400))
    data = text.encode("utf-8", "surrogatepass")  # mislabelled when charset is not utf-8
    if cte in ("7bit", "8bit", None):
        data = data.translate(None, b"=\r\n")
    headers = [f"Content-Type: text/{subtype}; charset={charset}"]
    if cte is not None:
        headers.append(f"Content-Transfer-Encoding: {cte}")
    raw = "\r\n".join(headers).encode("ascii") + b"\r\n\r\n" + encode(data, cte or "", 76)
    return Part(raw, ())


def multipart(children: list[Part], subtype: str, label: int) -> Part:
    boundary = f"=_b{label}_{len(children)}"
    body = b"preamble, ignored\r\n"
    for child in children:
        body += b"--" + boundary.encode() + b"\r\n" + child.raw + b"\r\n"
    body += b"--" + boundary.encode() + b"--\r\nepilogue\r\n"
    head = f'Content-Type: multipart/{subtype}; boundary="{boundary}"\r\n\r\n'.encode()
    found = tuple(a for child in children for a in child.attachments)
    return Part(head + body, found)


@st.composite
def trees(draw: st.DrawFn, depth: int = 0) -> Part:
    leaf = st.one_of(text_parts(), attachment_parts())
    if depth >= 4 or not draw(st.booleans()):
        return draw(leaf)
    children = draw(st.lists(st.deferred(lambda: trees(depth + 1)), min_size=1, max_size=4))
    subtype = draw(st.sampled_from(["mixed", "alternative", "related", "x-unknown"]))
    return multipart(children, subtype, depth * 10 + draw(st.integers(0, 9)))


def message(part: Part, extra_headers: bytes = b"") -> bytes:
    top = (
        b"From: Contact <contact@example.org>\r\n"
        b"To: user@example.test\r\n"
        b"Subject: generated\r\n"
        b"Message-ID: <gen@example.org>\r\n"
        b"MIME-Version: 1.0\r\n" + extra_headers
    )
    return top + part.raw


# ---- 1. the attachment decision ---------------------------------------------------------


@PROFILE
@given(tree=trees(), limit=st.integers(0, 3100))
def test_attachment_decision_matches_the_decoded_sizes(tree: Part, limit: int) -> None:
    parsed = parse_message(message(tree))
    assert [a.data for a in parsed.attachments] == list(tree.attachments)
    sizes = [len(p) for p in tree.attachments]
    assert [a.size for a in parsed.attachments] == sizes
    assert rules.over_limit((a.size for a in parsed.attachments), limit) == any(
        s > limit for s in sizes
    )


# ---- 2. hostile bytes never make parsing raise -------------------------------------------


@st.composite
def damaged(draw: st.DrawFn) -> bytes:
    raw = message(draw(trees()))
    how = draw(
        st.sampled_from(
            ["truncate", "nuls", "boundary", "closing", "huge-header", "parens", "nest",
             "junk-cte", "bare-lf", "flip"]
        )
    )
    if how == "truncate":
        raw = raw[: draw(st.integers(1, len(raw)))]
    elif how == "nuls":
        at = draw(st.lists(st.integers(0, len(raw)), min_size=1, max_size=20))
        for i in sorted(at, reverse=True):
            raw = raw[:i] + b"\x00" + raw[i:]
    elif how == "boundary":
        raw = raw.replace(b'boundary="=_b', b'boundary="=_x', draw(st.integers(1, 3)))
    elif how == "closing":
        raw = raw.replace(b"--\r\nepilogue", b"\r\nepilogue")
    elif how == "huge-header":
        size = draw(st.sampled_from([1000, 20_000, 100_000]))
        words = b"Subject: =?utf-8?q?" + b"=41" * 3000 + b"?=\r\n"
        raw = b"X-Big: " + b"a" * size + b"\r\n" + words + raw
    elif how == "parens":
        raw = b"From: " + b"(" * 5000 + b"a@b.c\r\nTo: x:;\r\nCc: g: a@b.c, (;\r\n" + raw
    elif how == "nest":
        levels = draw(st.integers(30, 300))
        head = b"".join(
            b'Content-Type: multipart/mixed; boundary="=_n%d"\r\n\r\n--=_n%d\r\n' % (i, i)
            for i in range(levels)
        )
        raw = b"Subject: deep\r\n" + head + b"Content-Type: text/plain\r\n\r\ndeep\r\n"
    elif how == "junk-cte":
        raw = raw.replace(b"base64", b"base64 (junk);x").replace(b"quoted-printable", b"x-uue")
        raw = raw.replace(b"\r\n\r\n", b"\r\n\r\n!!*\xff==\r\n", 2)
    elif how == "bare-lf":
        raw = raw.replace(b"\r\n", b"\n")
    else:
        at = draw(st.lists(st.integers(0, len(raw) - 1), min_size=1, max_size=30))
        data = bytearray(raw)
        for i in at:
            data[i] = draw(st.integers(0, 255))
        raw = bytes(data)
    return raw


def reply_from(parsed: ParsedMessage) -> bytes:
    """What threadsync would build from what it parsed: every field of the parsed
    message goes back into a message (the CRM replying, forwarding the files)."""
    return build_message(
        sender="user@example.test",
        to=["contact@example.org"],
        subject="Re: " + parsed.subject,
        text=parsed.text or "",
        html=parsed.html,
        attachments=[
            AttachmentIn(a.filename or "file", a.content_type, a.data) for a in parsed.attachments
        ],
        message_id="<reply@threadsync.test>",
        in_reply_to=parsed.message_id,
        references=list(parsed.references),
    )


@PROFILE
@given(raw=damaged())
def test_hostile_mime_never_raises(raw: bytes) -> None:
    try:
        parsed = parse_message(raw)
    except MessageParseError:
        assert not raw.strip()  # only empty input is refused
        return
    assert isinstance(parsed.defects, tuple)
    assert "\x00" not in (parsed.text or "") + (parsed.html or "") + parsed.subject
    summary = summarize_headers("1", raw.split(b"\r\n\r\n", 1)[0])
    assert summary is not None
    try:
        rebuilt = reply_from(parsed)
    except InvalidInput:
        return  # a refused header value (an id or subject we cannot send) is a clean error
    again = parse_message(rebuilt)
    assert [a.data for a in again.attachments] == [a.data for a in parsed.attachments]


# ---- 3. what threadsync builds parses back to the same content --------------------------

body_text = st.text(
    st.characters(exclude_categories=["Cs"]), max_size=600
)
addresses = st.from_regex(
    r"[a-z0-9]{1,8}(\.[a-z0-9+]{1,8})?@[a-z][a-z0-9]{0,10}\.(org|test|example)", fullmatch=True
)
files = st.builds(
    AttachmentIn,
    filename=file_names,
    content_type=st.sampled_from(
        ["application/pdf", "image/png", "text/plain; charset=utf-8", "text/csv", "", "x/y/z",
         "application/octet-stream"]
    ),
    data=st.binary(max_size=4000),
)


def same_text(built: str) -> str:
    """A body as a reader sees it: line breaks as LF, no NUL, and the one final
    line break a MIME body always has."""
    text = built.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")
    return text if text.endswith("\n") else text + "\n"


@PROFILE
@given(
    subject=st.text(st.characters(categories=["L", "M", "N", "P", "S", "Zs"]), max_size=300),
    text=body_text,
    html=st.none() | body_text,
    attachments=st.lists(files, max_size=4),
    to=st.lists(addresses, min_size=1, max_size=3, unique=True),
    cc=st.lists(addresses, max_size=2, unique=True),
)
def test_built_messages_parse_back_to_the_same_content(
    subject: str,
    text: str,
    html: str | None,
    attachments: list[AttachmentIn],
    to: list[str],
    cc: list[str],
) -> None:
    raw = build_message(
        sender="user@example.test",
        to=to,
        cc=cc,
        subject=subject,
        text=text,
        html=html,
        attachments=attachments,
        message_id="<m1.token@threadsync.test>",
        in_reply_to="<parent@example.org>",
        references=["<root@example.org>", "<parent@example.org>"],
        date=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
    )
    assert raw.isascii()
    parsed = parse_message(raw)
    # The one repair allowed: NUL cannot be stored, so a body loses it (and says so).
    has_nul = "\x00" in text + (html or "")
    assert all("NUL characters removed" in d for d in parsed.defects)
    assert bool(parsed.defects) == has_nul
    assert parsed.message_id == "<m1.token@threadsync.test>"
    assert parsed.in_reply_to == ("<parent@example.org>",)
    assert parsed.references == ("<root@example.org>", "<parent@example.org>")
    assert list(parsed.to) == to and list(parsed.cc) == cc
    assert parsed.subject == subject.strip()
    assert parsed.text == same_text(text)
    assert parsed.html == (None if html is None else same_text(html))
    assert [a.data for a in parsed.attachments] == [a.data for a in attachments]
    assert [a.filename for a in parsed.attachments] == [a.filename.strip() for a in attachments]
