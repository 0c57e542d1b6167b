"""Tests for threadsync.core.mime: building outgoing mail and robustly parsing what arrives.

Messages are written out as raw bytes, shaped like the real mail that breaks naive
parsers (see the CPython ``email`` section of the pitfalls file).
"""

from __future__ import annotations

import base64
import binascii
import email
import hashlib
import os
import random
import re
import time
from datetime import UTC, datetime, timedelta, timezone
from email import policy

import pytest

from threadsync.core.errors import HeaderInjection, InvalidInput, MessageParseError
from threadsync.core.mime import (
    AttachmentIn,
    ParsedMessage,
    build_message,
    check_address,
    check_header_value,
    parse_message,
    parse_msgid_list,
    summarize_headers,
)

LIMIT = 3_145_728  # R8: 3 MB of decoded content


def crlf(raw: bytes) -> bytes:
    """Test messages are written with LF; real mail on the wire has CRLF."""
    return raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def simple(headers: bytes, body: bytes = b"Hello.\n") -> bytes:
    return crlf(
        b"From: Ann <ann@example.com>\nTo: bob@example.org\nMessage-ID: <m1@example.com>\n"
        + headers
        + b"\n"
        + body
    )


def build(**overrides: object) -> bytes:
    args: dict[str, object] = {
        "sender": "ann@example.com",
        "to": ["bob@example.org"],
        "subject": "Hello",
        "text": "Hello Bob.\n",
        "message_id": "<t1.abc@threadsync.local>",
    }
    args.update(overrides)
    return build_message(**args)  # type: ignore[arg-type]


def assert_safe(parsed: ParsedMessage) -> None:
    """What every parse must give: storable text (UTF-8, no NUL), one-line headers,
    exact attachment sizes and digests."""
    strings = [parsed.subject, parsed.text or "", parsed.html or ""]
    strings += [parsed.sender or "", parsed.sender_display or "", parsed.message_id or ""]
    strings += [*parsed.to, *parsed.cc, *parsed.reply_to, *parsed.in_reply_to]
    strings += [*parsed.references, *parsed.defects]
    strings += [a.filename or "" for a in parsed.attachments]
    for value in strings:
        assert isinstance(value, str)
        value.encode("utf-8")  # no lone surrogates
        assert "\x00" not in value
    for value in (parsed.subject, parsed.sender_display or "", *parsed.to, *parsed.cc):
        assert "\r" not in value and "\n" not in value
    for attachment in parsed.attachments:
        assert attachment.size == len(attachment.data)
        assert attachment.sha256 == hashlib.sha256(attachment.data).hexdigest()
        assert re.fullmatch(
            r"[a-z0-9!#$%&'*+.^_`{|}~-]+/[a-z0-9!#$%&'*+.^_`{|}~-]+", attachment.content_type
        )
    assert parsed.largest_attachment == max((a.size for a in parsed.attachments), default=0)


# ---- nested multiparts, digests, attached messages ------------------------------------

DIGEST = crlf(
    b"""From: Digest <list@example.org>
To: member@example.com
Subject: Digest V1 #42
Message-ID: <digest42@example.org>
Date: Tue, 02 Jan 2024 10:00:00 +0100
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="outer"

This is a multi-part message in MIME format.
--outer
Content-Type: text/plain; charset=us-ascii

Today's topics: 2
--outer
Content-Type: multipart/mixed; boundary="inner"

--inner
Content-Type: multipart/digest; boundary="dig"

--dig

From: a@example.org
Subject: first

First message.
--dig
Content-Type: message/rfc822

From: b@example.org
Subject: second
Content-Type: multipart/mixed; boundary="deep"

--deep
Content-Type: text/plain

Second.
--deep
Content-Type: application/pdf; name="inner.pdf"
Content-Transfer-Encoding: base64

JVBERi0xLjQK
--deep--
--dig--
--inner
Content-Type: image/png
Content-Disposition: attachment; filename="chart.png"
Content-Transfer-Encoding: base64

iVBORw0KGgo=
--inner--
--outer--
epilogue
"""
)


def test_stdlib_get_content_fails_on_this_digest() -> None:
    # The fixture reproduces the pitfall that makes us walk parts ourselves.
    msg = email.message_from_bytes(DIGEST, policy=policy.default)
    with pytest.raises(KeyError):
        for part in msg.iter_attachments():
            part.get_content()


def test_nested_multiparts_and_digest_are_walked() -> None:
    parsed = parse_message(DIGEST)
    assert_safe(parsed)
    assert parsed.text == "Today's topics: 2"
    assert parsed.html is None
    types = [(a.content_type, a.filename) for a in parsed.attachments]
    assert types == [
        ("message/rfc822", None),  # digest parts default to message/rfc822
        ("message/rfc822", None),
        ("image/png", "chart.png"),
    ]
    first, second, image = parsed.attachments
    assert first.data == b"From: a@example.org\r\nSubject: first\r\n\r\nFirst message."
    # The attached message is kept byte-exact; its own attachment is not listed.
    assert second.data.startswith(b"From: b@example.org\r\nSubject: second\r\n")
    assert second.data.endswith(b"JVBERi0xLjQK\r\n--deep--")
    assert image.data == b"\x89PNG\r\n\x1a\n"
    assert parsed.date == "2024-01-02T09:00:00Z"


def test_message_rfc822_attachment_is_exact_bytes() -> None:
    inner = crlf(b"From: c@example.net\nSubject: fwd\nMessage-ID: <inner@x>\n\nBody\n")
    raw = simple(
        b'Content-Type: multipart/mixed; boundary="b1"\n',
        b"--b1\nContent-Type: text/plain\n\nSee attached.\n--b1\n"
        b'Content-Type: message/rfc822\nContent-Disposition: attachment; filename="fwd.eml"\n\n'
        + inner
        + b"\n--b1--\n",
    )
    parsed = parse_message(raw)
    (attachment,) = parsed.attachments
    assert attachment.content_type == "message/rfc822"
    assert attachment.filename == "fwd.eml"
    assert attachment.data == inner
    assert attachment.size == len(inner)
    assert parsed.message_id == "<m1@example.com>"  # not the inner one


def test_bounce_with_address_groups_and_report_parts() -> None:
    raw = crlf(
        b"""From: MAILER-DAEMON@MX.Example.NET (Mail Delivery System)
To: undisclosed-recipients:;
Cc: Team: ann@example.com, "Doe, Bob" <BOB@Example.COM>;, carl@example.org
Reply-To: Empty:;
Subject: Undelivered Mail Returned to Sender
Message-ID: <bounce1@mx.example.net>
Content-Type: multipart/report; report-type=delivery-status; boundary="rpt"

--rpt
Content-Type: text/plain

This is the mail system at host mx.example.net.
--rpt
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.example.net

Final-Recipient: rfc822; gone@example.com
Action: failed
Status: 5.1.1
--rpt
Content-Type: text/rfc822-headers

From: ann@example.com
Subject: lost
--rpt--
"""
    )
    parsed = parse_message(raw)
    assert_safe(parsed)
    assert parsed.sender == "MAILER-DAEMON@mx.example.net"
    assert parsed.to == ()
    assert parsed.cc == ("ann@example.com", "BOB@example.com", "carl@example.org")
    assert parsed.reply_to == ()
    assert parsed.text == "This is the mail system at host mx.example.net."
    assert [a.content_type for a in parsed.attachments] == [
        "message/delivery-status",
        "text/rfc822-headers",
    ]


@pytest.mark.parametrize(
    "to",
    [
        b"undisclosed-recipients:",
        b"Group: <a@b.example",
        b":;",
        b"foo:bar@baz.example:;",
        b"a@b.example; c@d.example",
        b"(" * 5000 + b"a@b.example",
        b'"unclosed <a@b.example>',
        b"=?utf-8?q?Team?=: x@y.example;",
    ],
)
def test_odd_address_headers_do_not_crash(to: bytes) -> None:
    parsed = parse_message(simple(b"Cc: " + to + b"\n"))
    assert_safe(parsed)
    assert all("@" in addr for addr in parsed.cc)


def test_display_names_are_decoded() -> None:
    parsed = parse_message(
        crlf(
            b"From: =?utf-8?q?Zo=C3=AB_O=27Brien?= <Zoe@Example.COM>\n"
            b'To: "Lee, Ann" <ann@example.com>, bob@example.org (Bob)\nMessage-ID: <x@y>\n\nHi\n'
        )
    )
    assert parsed.sender == "Zoe@example.com"
    assert parsed.sender_display == "Zoë O'Brien <Zoe@example.com>"
    assert parsed.to == ("ann@example.com", "bob@example.org")


# ---- charsets and encodings ------------------------------------------------------------


@pytest.mark.parametrize(
    "charset",
    [b"x-unknown", b'"../../etc/passwd"', b"base64", b"zlib", b"idna", b"utf-99", b"x" * 300],
)
def test_unknown_charset_falls_back(charset: bytes) -> None:
    raw = simple(
        b"Content-Type: text/plain; charset=" + charset + b"\n", b"Caf\xc3\xa9 ol\xc3\xa9\n"
    )
    parsed = parse_message(raw)
    assert parsed.text == "Café olé\n"
    assert any("charset" in d for d in parsed.defects)


def test_unknown_charset_latin1_bytes() -> None:
    raw = simple(b"Content-Type: text/plain; charset=x-unknown\n", b"Caf\xe9 \x93quoted\x94\n")
    parsed = parse_message(raw)
    assert parsed.text == "Café “quoted”\n"  # windows-1252, then latin-1
    assert any("x-unknown" in d for d in parsed.defects)


def test_invalid_bytes_for_declared_charset() -> None:
    utf8 = parse_message(simple(b"Content-Type: text/plain; charset=utf-8\n", b"ok \xff\xfe.\n"))
    assert utf8.text == "ok \ufffd\ufffd.\n"
    assert any("not valid" in d for d in utf8.defects)
    ascii_label = parse_message(
        simple(b"Content-Type: text/plain; charset=us-ascii\n", b"\xc3\xa9\n")
    )
    assert ascii_label.text == "é\n"  # the usual truth behind a wrong label
    latin1 = parse_message(simple(b"Content-Type: text/plain; charset=iso-8859-1\n", b"\x81\xe9\n"))
    assert latin1.text == "\x81é\n"
    assert latin1.defects == ()


def test_utf7_and_iso2022jp_bodies() -> None:
    raw = simple(
        b'Content-Type: multipart/mixed; boundary="b"\n',
        b"--b\nContent-Type: text/plain; charset=utf-7\n\nHi Mom -+Jjo--!\n"
        b"--b\nContent-Type: text/html; charset=ISO-2022-JP\nContent-Transfer-Encoding: 7bit\n\n"
        + "<p>日本語のメール</p>".encode("iso2022_jp")
        + b"\n--b--\n",
    )
    parsed = parse_message(raw)
    assert parsed.text == "Hi Mom -☺-!"
    assert parsed.html == "<p>日本語のメール</p>"
    assert parsed.defects == ()


def _b_word(text: str, charset: str) -> bytes:
    encoded = base64.b64encode(text.encode(charset)).decode()
    return f"=?{charset}?B?{encoded}?=".encode()


@pytest.mark.parametrize(
    ("subject", "expected"),
    [
        (_b_word("日本語の件名", "iso-2022-jp"), "日本語の件名"),
        (b"=?utf-8?q?Gr=C3=BC=C3=9Fe_aus_K=C3=B6ln?=", "Grüße aus Köln"),
        # a character split across two words; the blank between words is dropped
        (b"=?utf-8?b?w6k=?= =?utf-8?b?qQ==?=", "é\ufffd"),
        (b"=?UTF-8?B?w6k=?=\n =?UTF-8?Q?=C3=A9t=C3=A9?=", "éété"),
        (b"=?utf-8?b?w6k?= =?utf-8?b?w6k?=", "éé"),  # missing padding
        (b"Re: =?iso-8859-1?q?caf=E9?= ok", "Re: café ok"),
        (b"=?utf-8*en?q?lang_tag?=", "lang tag"),
        (b"=?x-klingon?q?caf=C3=A9?=", "café"),
        (b"=?utf-8?q?line=0Abreak?=", "line break"),  # never a line break in a subject
        (b"=?utf-8?q?broken", "=?utf-8?q?broken"),
        (b"Caf\xe9 \xff", "Café ÿ"),  # raw 8-bit latin-1
        (b"Caf\xc3\xa9", "Café"),  # raw 8-bit UTF-8 (RFC 6532)
    ],
)
def test_subject_decoding(subject: bytes, expected: str) -> None:
    parsed = parse_message(simple(b"Subject: " + subject + b"\n"))
    assert parsed.subject == expected
    assert_safe(parsed)


def test_split_character_across_encoded_words() -> None:
    # Encoders split a multi-byte character between two words; bytes are joined
    # before decoding.
    parsed = parse_message(simple(b"Subject: =?utf-8?b?w6nD?= =?utf-8?b?qQ==?=\n"))
    assert parsed.subject == "éé"


def test_8bit_garbage_in_headers_and_body() -> None:
    raw = crlf(
        b"From: J\xc3\xbcrgen M\xfcller <jm@example.de>\n"
        b"To: b\xff@example.org, ok@example.org\n"
        b"Subject: \x00Hallo \xe4\xf6\xfc\x07\n"
        b"X-Junk: \x80\x81\x82\n"
        b"Message-ID: <8bit@example.de>\n"
        b"\n"
        b"Gr\xfc\xdfe\x00 und \xff\xfe\n"
    )
    parsed = parse_message(raw)
    assert_safe(parsed)
    assert parsed.sender == "jm@example.de"
    assert parsed.subject == "Hallo äöü"
    assert parsed.text == "Grüße und ÿþ\n"
    assert "ok@example.org" in parsed.to
    assert any("NUL" in d for d in parsed.defects)


# ---- structure oddities ----------------------------------------------------------------


def test_lf_only_message_parses_like_crlf() -> None:
    lf = DIGEST.replace(b"\r\n", b"\n")
    a, b = parse_message(lf), parse_message(DIGEST)
    assert (a.text, a.subject, a.date, a.message_id) == (b.text, b.subject, b.date, b.message_id)
    assert [x.content_type for x in a.attachments] == [x.content_type for x in b.attachments]
    assert a.attachments[2].data == b.attachments[2].data


def test_long_header_lines_and_big_header_block() -> None:
    refs = b" ".join(b"<ref%04d.%s@example.com>" % (i, b"x" * 20) for i in range(60))
    received = b"".join(
        b"Received: from relay%d.example.net (relay%d.example.net [192.0.2.%d])\n"
        b"\tby mx.example.com with ESMTPS id ABCDEF%d; Tue, 2 Jan 2024 10:00:00 +0000\n"
        % (i, i, i % 250, i)
        for i in range(300)
    )
    raw = crlf(
        received
        + b"From: ann@example.com\nSubject: "
        + b"long " * 700
        + b"\nReferences: "
        + refs
        + b"\nMessage-ID: <long@example.com>\nX-Long: "
        + b"y" * 5000
        + b"\n\nBody\n"
    )
    assert len(raw.split(b"\r\n\r\n")[0]) > 16 * 1024
    started = time.perf_counter()
    parsed = parse_message(raw)
    assert time.perf_counter() - started < 1.0
    assert parsed.subject == ("long " * 700).strip()
    assert len(parsed.references) == 60
    assert parsed.message_id == "<long@example.com>"
    assert parsed.text == "Body\n"
    assert any("998" in d for d in parsed.defects)


def test_missing_message_id_is_noted() -> None:
    parsed = parse_message(crlf(b"From: ann@example.com\nSubject: no id\n\nx\n"))
    assert parsed.message_id is None
    assert "no Message-ID" in parsed.defects


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"Tue, 02 Jan 2024 10:00:00 +0100", "2024-01-02T09:00:00Z"),
        (b"2 Jan 2024 10:00 -0000", "2024-01-02T10:00:00Z"),
        (b"Tue, 2 Jan 24 10:00:00 EST", "2024-01-02T15:00:00Z"),
        (b"Tue, 02 Jan 2024 10:00:00 +0000 (UTC)", "2024-01-02T10:00:00Z"),
        (b"2024-01-02T10:00:00+02:00", "2024-01-02T08:00:00Z"),
        (b"not a date", None),
        (b"Mon, 32 Foo 2024 99:99:99 +9999", None),
        (b"Fri, 31 Dec 9999 23:59:59 -1200", None),
        (b"", None),
    ],
)
def test_dates(value: bytes, expected: str | None) -> None:
    parsed = parse_message(simple(b"Date: " + value + b"\n"))
    assert parsed.date == expected
    if expected is None:
        assert any("Date" in d for d in parsed.defects)


def test_missing_date_is_none() -> None:
    assert parse_message(simple(b"")).date is None


PAYLOAD = bytes(range(256)) * 3 + b"tail"
GOOD_B64 = base64.encodebytes(PAYLOAD)


@pytest.mark.parametrize(
    ("encoded", "expected", "problem"),
    [
        (GOOD_B64, PAYLOAD, None),
        (GOOD_B64.rstrip(b"=\n"), PAYLOAD, "padding"),  # padding missing
        (GOOD_B64.rstrip(b"\n") + b"==\n", PAYLOAD, "padding"),  # too much padding
        (GOOD_B64.replace(b"\n", b"!*\n", 3), PAYLOAD, "invalid base64"),
        # every line encoded on its own, each with its padding
        (
            b"\n".join(base64.b64encode(PAYLOAD[i : i + 50]) for i in range(0, len(PAYLOAD), 50)),
            PAYLOAD,
            "padding inside",
        ),
        # a stray character after whole groups carries no byte
        (base64.encodebytes(PAYLOAD[:-1]) + b"A", PAYLOAD[:-1], "truncated"),
        (b"", b"", None),
    ],
    ids=["good", "no-padding", "extra-padding", "junk", "per-line", "stray-char", "empty"],
)
def test_base64_repairs(encoded: bytes, expected: bytes, problem: str | None) -> None:
    raw = simple(
        b'Content-Type: multipart/mixed; boundary="b"\n',
        b"--b\nContent-Type: text/plain\n\nsee file\n--b\nContent-Type: application/pdf\n"
        b'Content-Disposition: attachment; filename="a.pdf"\nContent-Transfer-Encoding: base64\n\n'
        + encoded
        + b"\n--b--\n",
    )
    parsed = parse_message(raw)
    (attachment,) = parsed.attachments
    assert attachment.data == expected
    if problem is None:
        assert parsed.defects == ()
    else:
        assert any(problem in d for d in parsed.defects), parsed.defects


def test_winmail_dat_is_an_opaque_attachment() -> None:
    tnef = b"\x78\x9f\x3e\x22" + os.urandom(500)
    raw = simple(
        b'Content-Type: multipart/mixed; boundary="b"\n',
        b"--b\nContent-Type: text/plain\n\nPlease see the attached.\n--b\n"
        b'Content-Type: application/ms-tnef; name="winmail.dat"\n'
        b"Content-Transfer-Encoding: base64\n"
        b'Content-Disposition: attachment; filename="winmail.dat"\n\n'
        + base64.encodebytes(tnef)
        + b"--b--\n",
    )
    parsed = parse_message(raw)
    (attachment,) = parsed.attachments
    assert (attachment.filename, attachment.content_type) == ("winmail.dat", "application/ms-tnef")
    assert attachment.data == tnef
    assert attachment.inline is False


def test_inline_images() -> None:
    png = b"\x89PNG\r\n\x1a\n" + os.urandom(64)
    image = base64.encodebytes(png)
    raw = simple(
        b'Content-Type: multipart/related; boundary="rel"\n',
        b"--rel\nContent-Type: text/html; charset=utf-8\n\n"
        b'<img src="cid:logo@x"><img src="cid:sig@x">\n'
        b"--rel\nContent-Type: image/png\nContent-ID: <logo@x>\n"
        b'Content-Disposition: inline; filename="logo.png"\nContent-Transfer-Encoding: base64\n\n'
        + image
        + b"--rel\nContent-Type: image/png\nContent-ID: <sig@x>\n"
        b"Content-Transfer-Encoding: base64\n\n" + image + b"--rel\nContent-Type: image/png\n"
        b'Content-Disposition: attachment; filename="photo.png"\n'
        b"Content-Transfer-Encoding: base64\n\n" + image + b"--rel--\n",
    )
    parsed = parse_message(raw)
    assert parsed.html == '<img src="cid:logo@x"><img src="cid:sig@x">'
    assert [(a.filename, a.inline) for a in parsed.attachments] == [
        ("logo.png", True),
        (None, True),
        ("photo.png", False),
    ]
    assert all(a.data == png for a in parsed.attachments)


def test_alternative_prefers_last_form_and_mixed_joins_text() -> None:
    raw = simple(
        b'Content-Type: multipart/mixed; boundary="m"\n',
        b'--m\nContent-Type: multipart/alternative; boundary="a"\n\n'
        b"--a\nContent-Type: text/plain\n\nplain one\n"
        b"--a\nContent-Type: text/html\n\n<p>one</p>\n"
        b"--a--\n"
        b"--m\nContent-Type: image/jpeg\nContent-Disposition: inline\n\nJPEG\n"
        b"--m\nContent-Type: text/plain\n\nplain two\n"
        b'--m\nContent-Type: text/plain\nContent-Disposition: attachment; filename="notes.txt"\n\n'
        b"a file\n--m--\n",
    )
    parsed = parse_message(raw)
    assert parsed.text == "plain one\nplain two"
    assert parsed.html == "<p>one</p>"
    assert [(a.filename, a.data) for a in parsed.attachments] == [
        (None, b"JPEG"),
        ("notes.txt", b"a file"),
    ]


@pytest.mark.parametrize(
    ("disposition", "expected"),
    [
        (b"attachment; filename*=utf-8''%E2%82%AC%20rate.pdf", "€ rate.pdf"),
        (
            b"attachment; filename*0*=utf-8''Gr%C3%BC%C3%9Fe%20; filename*1=\"und \";"
            b" filename*2*=%C3%A4.pdf",
            "Grüße und ä.pdf",
        ),
        (b'attachment; filename="=?utf-8?b?w6QucGRm?="', "ä.pdf"),
        (b'attachment; filename="C:\\\\Users\\\\x\\\\report.pdf"', "report.pdf"),
        (b'attachment; filename="../../etc/passwd"', "passwd"),
        (b'attachment; filename=".."', None),
        (b'attachment; filename="a\\"b.pdf"', 'a"b.pdf'),
        (b'attachment; filename="unclosed.pdf', "unclosed.pdf"),
        (b"attachment; filename=plain.pdf; size=123", "plain.pdf"),
        (b"attachment; filename*=x-unknown''caf%E9.txt", "café.txt"),
        (b'attachment; filename="r\xc3\xa9sum\xc3\xa9.pdf"', "résumé.pdf"),
    ],
)
def test_attachment_filenames(disposition: bytes, expected: str | None) -> None:
    raw = simple(
        b'Content-Type: multipart/mixed; boundary="b"\n',
        b"--b\n\nbody\n--b\nContent-Type: application/octet-stream\nContent-Disposition: "
        + disposition
        + b"\n\nDATA\n--b--\n",
    )
    parsed = parse_message(raw)
    assert parsed.text == "body"
    (attachment,) = parsed.attachments
    assert attachment.filename == expected
    assert attachment.data == b"DATA"


def test_filename_from_content_type_name() -> None:
    raw = simple(
        b'Content-Type: multipart/mixed; boundary="b"\n',
        b'--b\nContent-Type: application/pdf; name="old.pdf"\n\n%PDF\n--b--\n',
    )
    assert parse_message(raw).attachments[0].filename == "old.pdf"


def test_missing_closing_boundary_and_missing_boundary() -> None:
    unclosed = parse_message(
        simple(
            b'Content-Type: multipart/mixed; boundary="b"\n',
            b"--b\nContent-Type: text/plain\n\ntext\n--b\nContent-Type: application/zip\n\nZIP",
        )
    )
    assert unclosed.text == "text"
    assert unclosed.attachments[0].data == b"ZIP"
    assert any("closing boundary" in d for d in unclosed.defects)
    no_boundary = parse_message(simple(b"Content-Type: multipart/mixed\n", b"just text\n"))
    assert no_boundary.text == "just text\n"
    assert any("boundary" in d for d in no_boundary.defects)
    # A broken boundary parameter (seen in bounces): the first delimiter line is used.
    broken = parse_message(
        simple(
            b"Content-Type: multipart/report; report-type=delivery-status;\n\tbo\n",
            b"This is a MIME-encapsulated message\n\n--JAB03.98/mx.example\n\nfailed\n"
            b"--JAB03.98/mx.example\nContent-Type: message/delivery-status\n\nAction: failed\n"
            b"--JAB03.98/mx.example--\n",
        )
    )
    assert broken.text == "failed"
    assert [a.content_type for a in broken.attachments] == ["message/delivery-status"]
    assert any("JAB03.98/mx.example" in d for d in broken.defects)


def test_boundary_prefix_lines_are_content() -> None:
    parsed = parse_message(
        simple(
            b'Content-Type: multipart/mixed; boundary="b"\n',
            b"--b\n\nline\n--bb is not a delimiter\n --b neither\n--b  \n\nsecond\n--b--  \n",
        )
    )
    assert parsed.text == "line\n--bb is not a delimiter\n --b neither\nsecond"


def test_uuencoded_and_quoted_printable_parts() -> None:
    data = os.urandom(100)
    lines = [b"begin 644 data.bin"]
    lines += [binascii.b2a_uu(data[i : i + 45]).rstrip(b"\n") for i in range(0, 100, 45)]
    lines += [b"`", b"end"]
    raw = simple(
        b'Content-Type: multipart/mixed; boundary="b"\n',
        b"--b\nContent-Type: text/plain; charset=utf-8\n"
        b"Content-Transfer-Encoding: quoted-printable\n\n"
        b"caf=C3=A9 soft=\nbreak\n"
        b'--b\nContent-Type: application/octet-stream; name="data.bin"\n'
        b"Content-Transfer-Encoding: x-uuencode\n\n" + b"\n".join(lines) + b"\n--b--\n",
    )
    parsed = parse_message(raw)
    assert parsed.text == "café softbreak"
    assert parsed.attachments[0].data == data


def test_headers_only_and_odd_starts() -> None:
    assert parse_message(b"Subject: only headers\r\n").subject == "only headers"
    body_only = parse_message(b"no headers at all, just a line\n")
    assert body_only.text == "no headers at all, just a line\n"
    leading = parse_message(b"\r\n\r\nSubject: after blank lines\r\n\r\nbody")
    assert leading.subject == "after blank lines"
    assert leading.text == "body"
    mbox = parse_message(b"From ann@example.com Tue Jan  2 10:00:00 2024\nSubject: mbox\n\nx")
    assert mbox.subject == "mbox"


def test_header_line_without_colon_ends_headers() -> None:
    parsed = parse_message(
        crlf(b"Subject: ok\nthis is not a header\nTo: late@example.com\n\nbody\n")
    )
    assert parsed.subject == "ok"
    assert parsed.to == ()
    assert parsed.text == "this is not a header\nTo: late@example.com\n\nbody\n"
    assert any("not a header" in d for d in parsed.defects)


@pytest.mark.parametrize("raw", [b"", b"   ", b"\r\n\r\n", bytearray(b"")])
def test_empty_input_raises(raw: bytes) -> None:
    with pytest.raises(MessageParseError):
        parse_message(raw)


def test_bytes_like_input() -> None:
    raw = simple(b"Subject: view\n")
    assert parse_message(memoryview(raw)).subject == "view"  # type: ignore[arg-type]


# ---- sizes and speed (R8 is measured elsewhere; we must measure exactly) --------------


@pytest.mark.parametrize("size", [LIMIT, LIMIT + 1])
def test_decoded_attachment_size_is_exact(size: int) -> None:
    data = random.Random(size).randbytes(size)
    raw = build(attachments=[AttachmentIn("big.bin", "application/octet-stream", data)])
    parsed = parse_message(raw)
    (attachment,) = parsed.attachments
    assert attachment.size == size
    assert parsed.largest_attachment == size
    assert attachment.data == data
    assert (parsed.largest_attachment > LIMIT) is (size > LIMIT)


def test_four_megabyte_message_parses_fast() -> None:
    data = random.Random(4).randbytes(LIMIT)
    raw = build(
        html="<p>hi</p>",
        attachments=[
            AttachmentIn("big.bin", "application/octet-stream", data),
            AttachmentIn("notes.txt", "text/plain", b"x" * 100_000),
        ],
    )
    assert len(raw) > 4_000_000
    timings = []
    for _ in range(3):
        started = time.perf_counter()
        parsed = parse_message(raw)
        timings.append(time.perf_counter() - started)
    assert parsed.attachments[0].size == LIMIT
    assert min(timings) < 0.1, timings
    lf = raw.replace(b"\r\n", b"\n")
    started = time.perf_counter()
    assert parse_message(lf).attachments[0].data == data
    assert time.perf_counter() - started < 0.2


def test_deep_nesting_and_many_parts_stay_cheap() -> None:
    depth = 400
    head = b"".join(
        b'Content-Type: multipart/mixed; boundary="b%d"\n\n--b%d\n' % (i, i) for i in range(depth)
    )
    tail = b"".join(b"\n--b%d--\n" % i for i in reversed(range(depth)))
    deep = b"From: a@example.com\n" + head + b"Content-Type: text/plain\n\ndeep" + tail
    started = time.perf_counter()
    parsed = parse_message(deep)
    assert any("nested" in d for d in parsed.defects)
    many = b'Content-Type: multipart/mixed; boundary="b"\n\n' + b"".join(
        b"--b\nContent-Type: application/octet-stream\n\n%d\n" % i for i in range(5000)
    )
    parsed = parse_message(many + b"--b--\n")
    assert 0 < len(parsed.attachments) <= 2000
    assert any("MIME parts" in d for d in parsed.defects)
    assert time.perf_counter() - started < 2.0


@pytest.mark.parametrize(
    "header",
    [
        b'Content-Type: text/plain; a="' + b";" * 65536 + b"\n",
        b"Content-Type: text/plain;" + b" a=b;" * 13000 + b"\n",
        b"Content-Type: text/plain; " + b"(" * 65536 + b"\n",
        b'Content-Disposition: attachment; filename="' + b'\\"' * 30000 + b"\n",
        b"To: " + b"a@" * 30000 + b"\n",
        b"Cc: " + b"(" * 60000 + b"\n",
        b"References: " + b'"\\' * 30000 + b"\n",
        b"References: (" + b"<a@b> " * 10000 + b"\n",
        b"In-Reply-To: " + b"(((((" * 10000 + b"<a@b>" + b")" * 50000 + b"\n",
        b"Subject: " + b"=?utf-8?q?" * 10000 + b"\n",
        b"Date: " + b"1 " * 30000 + b"\n",
    ],
    ids=lambda header: header[:24].decode(errors="replace"),
)
def test_hostile_headers_are_linear(header: bytes) -> None:
    started = time.perf_counter()
    parsed = parse_message(crlf(b"From: a@example.com\n" + header + b"\nbody\n"))
    assert time.perf_counter() - started < 0.5
    assert_safe(parsed)


@pytest.mark.parametrize(
    "body",
    [b"--a--a" * 200_000, b"--ab\n" * 200_000, b"\n--a\n" * 100_000, b"--a\n\n" * 100_000],
    ids=["one-line", "near-delimiters", "empty-parts", "headerless-parts"],
)
def test_hostile_multipart_bodies_are_linear(body: bytes) -> None:
    started = time.perf_counter()
    parsed = parse_message(simple(b"Content-Type: multipart/mixed; boundary=a\n", body))
    assert time.perf_counter() - started < 2.0
    assert_safe(parsed)


# ---- Message-IDs and header summaries --------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("<a@b> <c@d>", ("<a@b>", "<c@d>")),
        ("<a@b>,<c@d>,<a@b>", ("<a@b>", "<c@d>")),
        ("<a@b>\r\n\t<c@d>", ("<a@b>", "<c@d>")),
        ("<a@b> (comment (nested) <x@y>) <c@d>", ("<a@b>", "<c@d>")),
        ("<very\r\n long@host.example>", ("<verylong@host.example>",)),
        ("a@b", ("<a@b>",)),
        ("  <a@b>  ", ("<a@b>",)),
        ("<a@b", ("<a@b>",)),
        ('Your message of "Mon, 1 Jan" <orig@host>', ("<orig@host>",)),
        ('"Joe" <joe@host> (stray', ("<joe@host>",)),
        ("<12345.local>", ("<12345.local>",)),
        ("not an id", ()),
        ("<>", ()),
        ("", ()),
        (None, ()),
        ("<a\x00b@c>", ()),
        ("<" + "x" * 1000 + "@y>", ()),
    ],
)
def test_parse_msgid_list(value: str | None, expected: tuple[str, ...]) -> None:
    assert parse_msgid_list(value) == expected


def test_summarize_headers_from_pymap_style_block() -> None:
    block = (
        b"Message-ID:\n <reply.1@example.org>\n"
        b"In-Reply-To: <t1.abc@threadsync.local>\n"
        b"References: <t0@threadsync.local>\n <t1.abc@threadsync.local>\n"
        b"From: =?utf-8?q?Bob_B=C3=A9?= <Bob@Example.ORG>\n"
        b"Subject: Re: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\n"
        b"Date: Tue, 02 Jan 2024 10:00:00 +0100\n"
        b"\n"
    )
    summary = summarize_headers("42", block, size=1234)
    assert summary.ref == "42"
    assert summary.message_id == "<reply.1@example.org>"
    assert summary.in_reply_to == ("<t1.abc@threadsync.local>",)
    assert summary.references == ("<t0@threadsync.local>", "<t1.abc@threadsync.local>")
    assert summary.sender == "Bob@example.org"
    assert summary.subject == "Re: Grüße"
    assert summary.date == "2024-01-02T09:00:00Z"
    assert summary.size == 1234


def test_summarize_headers_of_nothing() -> None:
    summary = summarize_headers("7", b"")
    assert (summary.message_id, summary.sender, summary.subject, summary.date) == (None,) * 4
    assert summarize_headers("8", b"\xff\xfe\x00garbage").message_id is None


# ---- building ----------------------------------------------------------------------------


def test_round_trip() -> None:
    pdf = os.urandom(5000)
    eml = crlf(b"From: c@example.net\nSubject: fwd\n\nBody\n")
    refs = [f"<ref{i}.{'z' * 30}@example.com>" for i in range(30)] + ["<t1.abc@threadsync.local>"]
    raw = build_message(
        sender="Ann.Lee@Example.COM",
        sender_name='Zoë O\'Brien, "Sales"',
        to=["bob@example.org", "Carl@Example.NET"],
        cc=["dora@example.com"],
        reply_to="replies@example.com",
        subject="Grüße aus Köln — 日本語 ✓ " + "long " * 30,
        text="Hallo Bob,\n\nschöne Grüße — 日本語.\n" + "long line " * 100 + "\n",
        html="<p>Hallo <b>Bob</b> — schöne Grüße</p>\n",
        attachments=[
            AttachmentIn("Angebot März.pdf", "application/pdf", pdf),
            AttachmentIn("list.csv", "text/csv; charset=utf-8", "a;b\nä;ö\n".encode()),
            AttachmentIn("fwd.eml", "message/rfc822", eml),
            AttachmentIn("", "", b"no name"),
        ],
        message_id="<t2.abc@threadsync.local>",
        in_reply_to="<t1.abc@threadsync.local>",
        references=refs,
        date=datetime(2024, 3, 1, 12, 30, tzinfo=timezone(timedelta(hours=1))),
    )
    parsed = parse_message(raw)
    assert parsed.defects == ()
    assert parsed.subject == ("Grüße aus Köln — 日本語 ✓ " + "long " * 30).strip()
    assert parsed.sender == "Ann.Lee@example.com"
    assert parsed.sender_display == 'Zoë O\'Brien, "Sales" <Ann.Lee@example.com>'
    assert parsed.to == ("bob@example.org", "Carl@example.net")
    assert parsed.cc == ("dora@example.com",)
    assert parsed.reply_to == ("replies@example.com",)
    assert parsed.text == "Hallo Bob,\n\nschöne Grüße — 日本語.\n" + "long line " * 100 + "\n"
    assert parsed.html == "<p>Hallo <b>Bob</b> — schöne Grüße</p>\n"
    assert parsed.message_id == "<t2.abc@threadsync.local>"
    assert parsed.in_reply_to == ("<t1.abc@threadsync.local>",)
    assert parsed.references == tuple(refs)
    assert parsed.date == "2024-03-01T11:30:00Z"
    got = [(a.filename, a.content_type, a.data, a.inline) for a in parsed.attachments]
    assert got == [
        ("Angebot März.pdf", "application/pdf", pdf, False),
        ("list.csv", "text/csv", "a;b\nä;ö\n".encode(), False),
        ("fwd.eml", "message/rfc822", eml, False),
        (None, "application/octet-stream", b"no name", False),
    ]


def test_round_trip_text_only_and_with_html() -> None:
    plain = parse_message(build(text="only text, ascii\n"))
    assert (plain.text, plain.html, plain.attachments) == ("only text, ascii\n", None, ())
    both = parse_message(build(text="t\n", html="<p>h</p>\n"))
    assert (both.text, both.html) == ("t\n", "<p>h</p>\n")


def test_long_non_ascii_subjects_and_names_keep_their_blanks() -> None:
    # EmailMessage's own folding moves a blank out of two encoded words, where
    # decoders drop it ("Söhne März" -> "SöhneMärz"); build_message encodes itself.
    rng = random.Random(8)
    words = ["Grüße", "aus", "Köln", "März", "über", "日本語", "€", "&", "-", "Re:", "a,b", '"q"']
    for _ in range(300):
        subject = " ".join(rng.choice(words) for _ in range(rng.randint(1, 40)))
        name = " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))
        raw = build(subject=subject, sender_name=name)
        assert all(len(line) <= 78 for line in raw.split(b"\r\n\r\n")[0].split(b"\r\n"))
        parsed = parse_message(raw)
        assert parsed.subject == subject
        assert parsed.sender_display == f"{name} <ann@example.com>"
        assert email.message_from_bytes(raw, policy=policy.default)["subject"] == subject


def test_built_message_is_7bit_crlf_and_folded() -> None:
    refs = [f"<{'r' * 60}{i}@example.com>" for i in range(40)]
    raw = build(
        subject="Ünïcödé " * 40,
        text="ü" * 3000 + "\n",
        references=refs,
        in_reply_to="<" + "p" * 100 + "@example.com>",
        attachments=[AttachmentIn("x.bin", "application/octet-stream", os.urandom(10_000))],
    )
    assert raw.isascii()
    assert b"\n" not in raw.replace(b"\r\n", b"")
    assert b"\r" not in raw.replace(b"\r\n", b"")
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))
    head = raw.split(b"\r\n\r\n", 1)[0].decode()
    assert "Bcc" not in head and "=?" not in head.split("Subject:")[0]
    assert raw.count(b"MIME-Version") == 1
    references = re.search(r"References: (.*?)\r\n(?=\S)", head, re.DOTALL)
    assert references is not None
    folded = references.group(1).split("\r\n ")
    assert " ".join(folded).split() == refs
    assert all(len(line) <= 78 or " " not in line for line in folded)
    assert "In-Reply-To: <" + "p" * 100 + "@example.com>\r\n" in head  # never RFC 2047


def test_build_defaults_and_controls() -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    parsed = parse_message(build(subject="tab\there\u2028and\x0bmore", text="nul\x00 and \x1b\n"))
    assert parsed.subject == "tab\there and more"
    assert parsed.date is not None
    assert datetime.fromisoformat(parsed.date) >= before - timedelta(seconds=1)
    assert parsed.text == "nul and \x1b\n"  # NUL travelled quoted-printable, dropped on parse
    naive = parse_message(build(date=datetime(2024, 1, 1, 8, 0)))
    assert naive.date == "2024-01-01T08:00:00Z"


def test_non_seven_bit_attached_message_goes_as_file() -> None:
    raw = build(
        attachments=[AttachmentIn("m.eml", "message/rfc822", b"Subject: \xff\r\n\r\nx\r\n")]
    )
    (attachment,) = parse_message(raw).attachments
    assert attachment.content_type == "application/octet-stream"
    assert attachment.data == b"Subject: \xff\r\n\r\nx\r\n"


@pytest.mark.parametrize(
    "overrides",
    [
        {"subject": "Hi\r\nBcc: evil@example.com"},
        {"subject": "Hi\nthere"},
        {"subject": "Hi\x00"},
        {"sender_name": "Ann\rBcc: x@y.z"},
        {"sender": "ann@example.com\r\nBcc: x@y.z"},
        {"to": ["bob@example.org\n"]},
        {"cc": ["c@example.org\x00"]},
        {"reply_to": "r@example.org\r\n"},
        {"attachments": [AttachmentIn("a\r\n.pdf", "application/pdf", b"x")]},
        {"attachments": [AttachmentIn("a.pdf", "application/pdf\r\nX-Evil: 1", b"x")]},
        {"message_id": "<a@b>\r\nBcc: x@y.z"},
        {"in_reply_to": "<a@b>\n"},
        {"references": ["<a@b>", "<c@d>\r\n"]},
    ],
)
def test_build_refuses_header_injection(overrides: dict[str, object]) -> None:
    with pytest.raises(HeaderInjection):
        build(**overrides)


@pytest.mark.parametrize(
    "overrides",
    [
        {"to": "bob@example.org"},
        {"sender": "not-an-address"},
        {"cc": ["a b@example.org"]},
        {"message_id": "garbage"},
        {"message_id": "<a@b> <c@d>"},
        {"in_reply_to": "<caf\u00e9@example.org>"},
        {"references": ["no id here"]},
        {"text": b"bytes"},
    ],
)
def test_build_refuses_invalid_input(overrides: dict[str, object]) -> None:
    with pytest.raises(InvalidInput) as info:
        build(**overrides)
    assert not isinstance(info.value, HeaderInjection)


def test_check_header_value() -> None:
    assert check_header_value("Grüße\tok", "subject") == "Grüße\tok"
    for bad in ("a\rb", "a\nb", "a\x00b"):
        with pytest.raises(HeaderInjection, match="subject"):
            check_header_value(bad, "subject")


@pytest.mark.parametrize(
    ("addr", "expected"),
    [
        ("Ann.Lee@Example.COM", "Ann.Lee@example.com"),
        (" <bob+tag@example.org> ", "bob+tag@example.org"),
        ("user@bücher.de", "user@xn--bcher-kva.de"),
        ("o'neil@example.ie", "o'neil@example.ie"),
        ("admin@localhost", "admin@localhost"),
        ("u@[192.0.2.1]", "u@[192.0.2.1]"),
        ("u@[IPv6:2001:db8::1]", "u@[IPv6:2001:db8::1]"),
    ],
)
def test_check_address_normalises(addr: str, expected: str) -> None:
    assert check_address(addr, "to address") == expected


@pytest.mark.parametrize(
    "addr",
    [
        "",
        "plain",
        "@example.com",
        "ann@",
        "a@b@c.com",
        "Ann <ann@example.com>",
        "a, b@example.com",
        '"quoted local"@example.com',
        "ännä@example.com",
        "ann..lee@example.com",
        "ann@-example.com",
        "ann@example..com",
        "ann@[999.1.1.1]",
        "x" * 65 + "@example.com",
    ],
)
def test_check_address_rejects(addr: str) -> None:
    with pytest.raises(InvalidInput) as info:
        check_address(addr, "to address")
    assert not isinstance(info.value, HeaderInjection)
    assert "to address" in str(info.value)


def test_check_address_injection() -> None:
    with pytest.raises(HeaderInjection):
        check_address("a@b.com\r\nBcc: c@d.com", "to address")


# ---- parse never raises ----------------------------------------------------------------

SNIPPETS = [
    b"\r\n",
    b"\n",
    b"\r",
    b"\r\n\r\n",
    b"--",
    b"=?",
    b"?=",
    b"=?utf-8?b?",
    b"(",
    b")",
    b'"',
    b"<",
    b">",
    b"\x00",
    b"\xff\xfe",
    b"=",
    b";",
    b":",
    b"\\",
    b"*0*=",
    b"charset=x-unknown",
    b"Content-Type: multipart/mixed; boundary=x\r\n",
    b"Content-Transfer-Encoding: base64\r\n",
    b"Content-Type: message/rfc822\r\n\r\n",
    b"\r\n--x\r\n",
    b"\r\n--x--\r\n",
]


def mutate(rng: random.Random, base: bytes) -> bytes:
    data = bytearray(base)
    for _ in range(rng.randint(1, 8)):
        if not data:
            data = bytearray(b"x")
        pos = rng.randrange(len(data))
        op = rng.randrange(6)
        if op == 0:
            data[pos] = rng.randrange(256)
        elif op == 1:
            del data[pos : pos + rng.randint(1, 200)]
        elif op == 2:
            data[pos:pos] = rng.choice(SNIPPETS) * rng.choice((1, 1, 3, 50))
        elif op == 3:
            data[pos:pos] = data[rng.randrange(len(data)) :][: rng.randint(1, 500)]
        elif op == 4:
            del data[rng.randint(pos, len(data)) :]
        else:
            data[pos : pos + 300] = bytes(data[pos : pos + 300]).replace(b"\r\n", b"\n")
    return bytes(data)


def fuzz_bases() -> list[bytes]:
    built = build(
        subject="Grüße =?utf-8?q?x?=",
        sender_name="Zoë",
        html="<p>é</p>",
        attachments=[
            AttachmentIn("ä.pdf", "application/pdf", bytes(range(256)) * 4),
            AttachmentIn("m.eml", "message/rfc822", b"From: a@b.c\r\n\r\nx\r\n"),
        ],
        references=["<a@b>", "<c@d>"],
        in_reply_to="<c@d>",
    )
    return [built, DIGEST, DIGEST.replace(b"\r\n", b"\n")]


@pytest.mark.parametrize("seed", range(4))
def test_parse_never_raises_on_mutations(seed: int) -> None:
    rng = random.Random(1000 + seed)
    bases = fuzz_bases()
    for _ in range(100):
        raw = mutate(rng, rng.choice(bases))
        if not raw.strip():
            continue
        parsed = parse_message(raw)
        assert_safe(parsed)
        summary = summarize_headers("1", raw[:2000])
        assert summary.ref == "1"


def test_parse_never_raises_on_random_bytes() -> None:
    rng = random.Random(77)
    alphabet = b"".join(SNIPPETS) + bytes(range(256))
    for _ in range(200):
        raw = bytes(rng.choice(alphabet) for _ in range(rng.randint(1, 600)))
        if raw.strip():
            assert_safe(parse_message(raw))
