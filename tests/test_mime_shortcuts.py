"""The shortcuts of core.mime_parse give exactly what the general path gives.

Header summaries are made for every new message, so plain header blocks, plain
mailboxes, canonical dates and bracketed Message-IDs take a quicker path. Each
shortcut is checked here against the general decoder it stands in for (the
stdlib header parser, ``addresses``, ``parse_date``, ``parse_msgid_list``), on
plain values and on values just outside what the shortcut accepts, generated
from a fixed seed, including the notes the general path writes.
"""

from __future__ import annotations

import random

import pytest

from core import mime_parse
from core.mime_decode import Notes, addresses, parse_date, parse_msgid_list, raw_text

FIELDS = [
    b"From: Sender 5 <sender@example.net>",
    b"Subject: Re: Offer",
    b"Subject:",
    b"Subject: ",
    b"Subject:\ttabbed",
    b"Date: Tue, 14 Nov 2023 22:13:20 +0000",
    b"Message-ID: <1.abc@mail.example.net>",
    b"In-Reply-To: <p1@example.net>",
    b"References: <a@example.net>\r\n <b@example.net>",
    b"References: <a@example.net>\n\t<b@example.net>",
    b"X-Odd-Name_[1]: value: with colon",
    b"X-Trailing: value   ",
    b"Subject: caf\xc3\xa9 8-bit",
    b"Subject: =?utf-8?q?caf=C3=A9?=",
    b"X-Empty-Continued:\r\n continued",
]
ODD_LINES = [
    b" starts with a blank",
    b"\tstarts with a tab",
    b"From someone@example.net Tue Nov 14 22:13:20 2023",
    b": no name",
    b"no colon at all",
    b"Bad\rLone-CR: x",
    b"Name With Space: x",
    b"X-\xff: 8-bit name",
    b"   ",
]


def header_blocks(count: int) -> list[bytes]:
    rng = random.Random(4711)
    blocks = []
    for _ in range(count):
        lines = [rng.choice(FIELDS) for _ in range(rng.randint(1, 6))]
        if rng.random() < 0.3:
            lines.insert(rng.randint(0, len(lines)), rng.choice(ODD_LINES))
        newline = rng.choice([b"\r\n", b"\n"])
        block = newline.join(line.replace(b"\r\n", newline) for line in lines)
        blocks.append(block + (newline if rng.random() < 0.8 else b""))
    return blocks


def stdlib_headers(head: bytes) -> tuple[list[tuple[str, str]], list[object]]:
    msg = mime_parse._HEADER_PARSER.parsebytes(head)
    return [(str(n).strip().lower(), str(v)) for n, v in msg.raw_items()], list(msg.defects)


def test_plain_header_blocks_read_as_the_stdlib_parser_reads_them() -> None:
    quick = 0
    for head in header_blocks(3000):
        headers = mime_parse._plain_headers(head)
        if headers is None:
            continue
        quick += 1
        assert (headers, []) == stdlib_headers(head), head
    assert 1000 < quick < 3000  # both paths were taken


@pytest.mark.parametrize(
    "value",
    [
        "Sender 5 <sender@example.net>",
        "  Sender   5\t<Sender.Name+tag@Mail.Example.NET>  ",
        "<sender@example.net>",
        "sender@EXAMPLE.net",
        "Sender's x <a@b>",
        "Sender5<a@b>",
        "=?utf-8?q?Caf=C3=A9?= <a@b>",
        "A=?x <a@b>",
        '"Smith, John" <john@example.org>',
        "J. Smith <j@example.org>",
        "a@b (comment)",
        "Name <a@b>,",
        "a@b, c@d",
        "team: a@x, b@y;",
        "undisclosed-recipients:;",
        "<@route:a@b>",
        "Name <a@[192.0.2.1]>",
        "Name <" + "x" * 330 + "@example.org>",
        "Name <a@b",
        "",
        "Sender\r\n 5 <a@b>",
        "no address at all",
    ],
)
def test_plain_mailboxes_read_as_addresses_reads_them(value: str) -> None:
    quick, general = Notes(), Notes()
    assert mime_parse._addresses([value], "From", quick) == addresses([value], "From", general)
    assert quick.result() == general.result()


DATES = [
    "Tue, 14 Nov 2023 22:13:20 +0000",
    "14 Nov 2023 22:13:20 +0000",
    "Tue, 4 Nov 2023 02:03:04 -0000",
    "Sun, 31 Dec 2023 23:30:00 -0130",
    "Mon, 01 Jan 2024 00:30:00 +0545",
    "  Tue, 14 Nov 2023 22:13:20 +0000  ",
    "Tue, 30 Feb 2023 22:13:20 +0000",
    "Tue, 14 Nov 2023 24:13:20 +0000",
    "Tue, 14 Nov 2023 22:13:60 +0000",
    "Tue, 14 Nov 2023 22:13:20 +2360",
    "Fri, 31 Dec 9999 23:59:59 -2359",
    "Mon, 01 Jan 1000 00:00:00 +2359",
    "Tue, 14 Nov 2023 22:13:20 +0000 (UTC)",
    "Tue, 14 Nov 2023 22:13 +0000",
    "Tue, 14 Nov 23 22:13:20 +0000",
    "Tue, 14 Nov 2023 22:13:20 GMT",
    "Tue, 14 nov 2023 22:13:20 +0000",
    "2023-11-14T22:13:20+00:00",
    "Tue,\r\n 14 Nov 2023 22:13:20 +0000",
    "not a date",
]


@pytest.mark.parametrize("value", DATES)
def test_canonical_dates_read_as_parse_date_reads_them(value: str) -> None:
    quick, general = Notes(), Notes()
    assert mime_parse._date(value, quick) == parse_date(value, general)
    assert quick.result() == general.result()


@pytest.mark.parametrize(
    "values",
    [
        [],
        ["<a@example.net>"],
        ["<a@example.net> <b@example.net>\r\n\t<a@example.net>"],
        ["<a@example.net>", "<b@example.net>"],
        ["  <a@example.net>  "],
        ["<a b@example.net>"],
        ["<a@example.net>, <b@example.net>"],
        ['<"quoted"@example.net>'],
        ["<(comment)a@example.net>"],
        ["(comment) <a@example.net>"],
        ["a@example.net"],
        ["<>"],
        ["<a@example.net"],
        ["<" + "x" * 997 + ">"],
        ["<" + "x" * 996 + ">"],
        ["<caf\udcc3\udca9@example.net>"],
        ["Your message of Tue <a@example.net>"],
    ],
)
def test_bracketed_ids_read_as_parse_msgid_list_reads_them(values: list[str]) -> None:
    entity = mime_parse._Entity([("references", v) for v in values], b"")
    quick, general = Notes(), Notes()
    expected = parse_msgid_list(" ".join(raw_text(v, "References", general) for v in values))
    if values and not expected:
        general.add("References holds no usable Message-ID")
    assert mime_parse._ids(entity, "references", "References", quick) == expected
    assert quick.result() == general.result()
