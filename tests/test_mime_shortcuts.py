"""The shortcuts of threadsync.core.mime.headers give exactly what the general path gives.

Header summaries are made for every new message, so plain header blocks, plain
mailboxes, canonical dates and bracketed Message-IDs take a quicker path. Each
shortcut is checked here against the general decoder it stands in for (the
stdlib header parser, ``addresses``, ``parse_date``, ``parse_msgid_list``), on
plain values and on values just outside what the shortcut accepts, generated
from a fixed seed, including the notes the general path writes.

A summary reads only the threading ids of its block at once (the kernel needs
nothing else to decide membership) and sender, subject and date when they are
first read; both are checked against the full reading of every field, over
generated blocks, the tricky values of the Message-ID tests and the mutated
messages of the parser's fuzz test.
"""

from __future__ import annotations

import copy
import dataclasses
import pickle
import random

import pytest

from tests.test_mime import SNIPPETS, fuzz_bases, mutate
from threadsync.core.mime import headers as mime_headers
from threadsync.core.mime import summarize_headers
from threadsync.core.mime.decode import Notes, addresses, parse_date, parse_msgid_list, raw_text
from threadsync.core.provider import HeaderSummary

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
    msg = mime_headers._HEADER_PARSER.parsebytes(head)
    return [(str(n).strip().lower(), str(v)) for n, v in msg.raw_items()], list(msg.defects)


def test_plain_header_blocks_read_as_the_stdlib_parser_reads_them() -> None:
    quick = 0
    for head in header_blocks(3000):
        headers = mime_headers._plain_headers(head)
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
    assert mime_headers._addresses([value], "From", quick) == addresses([value], "From", general)
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
    assert mime_headers._date(value, quick) == parse_date(value, general)
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
    entity = mime_headers.Entity([("references", v) for v in values], b"")
    quick, general = Notes(), Notes()
    expected = parse_msgid_list(" ".join(raw_text(v, "References", general) for v in values))
    if values and not expected:
        general.add("References holds no usable Message-ID")
    assert mime_headers._ids(entity, "references", "References", quick) == expected
    assert quick.result() == general.result()


# ---- header summaries ------------------------------------------------------------------

THREAD_FIELDS = [
    b"Message-ID: <1.abc@mail.example.net>",
    b"MESSAGE-ID:<no.blank@example.net>",
    b"message-id: <a@example.net> <b@example.net>",
    b"Message-Id: (comment) <c@example.net>",
    b"Message-ID: <0123456789abcdef.abcdefghijklmnop@threadsync.local>",
    b"Message-ID:",
    b"Message-ID: not an id",
    b"Message-ID: <caf\xc3\xa9@example.net>",
    b"In-Reply-To: <p1@example.net>",
    b"In-Reply-To: =?utf-8?q?caf=C3=A9?= <p2@example.net>",
    b'In-Reply-To: Your message of "Mon, 1 Jan" <orig@example.net>',
    b"In-Reply-To:\r\n\t<folded@example.net>",
    b"in-reply-to: <a@example.net>,<c@example.net>,<a@example.net>",
    b"References: <a@example.net>\r\n <b@example.net>",
    b"References: <a@example.net>\n\t<b@example.net>\n <c@example.net>",
    b"References: <very\r\n long@host.example>",
    b"References: <a@b> (comment (nested) <x@y>) <c@d>",
    b"References: a@example.net",
    b"References: <>",
    b"References:",
    b"References: <a\x00b@example.net>",
    b"References: <" + b"x" * 1000 + b"@example.net>",
    b"References: (" + b"<a@b> " * 200,
    b"REFERENCES: <d@example.net>   ",
    b"References : <blank.before.colon@example.net>",
    b"X-References: <not.this@example.net>",
    b"Message-ID-Extra: <not.this@example.net>",
]


def thread_blocks(count: int) -> list[bytes]:
    """Header blocks as IMAP servers and Maildir files give them: any order,
    CRLF or LF, a blank line and maybe a body after them, maybe an odd line."""
    rng = random.Random(815)
    blocks = []
    for _ in range(count):
        lines = [rng.choice(THREAD_FIELDS + FIELDS) for _ in range(rng.randint(0, 7))]
        if rng.random() < 0.25:
            lines.insert(rng.randint(0, len(lines)), rng.choice(ODD_LINES))
        newline = rng.choice([b"\r\n", b"\n"])
        block = newline.join(line.replace(b"\r\n", b"\n").replace(b"\n", newline) for line in lines)
        block += rng.choice([b"", newline, newline * 2, newline * 2 + b"body line" + newline])
        blocks.append(rng.choice([b"", newline]) + block)
    return blocks


def mutated_messages(count: int) -> list[bytes]:
    rng = random.Random(2024)
    bases = fuzz_bases()
    return [mutate(rng, rng.choice(bases))[:2000] for _ in range(count)]


def random_bytes(count: int) -> list[bytes]:
    rng = random.Random(78)
    alphabet = b"".join(SNIPPETS) + bytes(range(256))
    return [bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 300))) for _ in range(count)]


CORPUS = [
    *thread_blocks(4000),
    *header_blocks(1000),
    *mutated_messages(400),
    *random_bytes(200),
]


def full_summary(ref: str, block: bytes, size: int | None) -> HeaderSummary:
    """What a summary held when every field was decoded at once."""
    entity = mime_headers.parse_entity(block.lstrip(b"\r\n"))
    env = mime_headers.envelope(entity, Notes(), recipients=False)
    return HeaderSummary(
        ref=ref,
        message_id=env.message_id,
        in_reply_to=env.in_reply_to,
        references=env.references,
        sender=env.sender,
        subject=env.subject,
        date=env.date,
        size=size,
    )


def values(summary: HeaderSummary) -> list[object]:
    return [getattr(summary, f.name) for f in dataclasses.fields(HeaderSummary)]


def test_the_plain_block_test_is_the_one_plain_headers_makes() -> None:
    plain = 0
    for block in CORPUS:
        head = mime_headers._split_head(block.lstrip(b"\r\n"))[0]
        if head:
            text = head.decode("ascii", "surrogateescape")
            expected = mime_headers._plain_headers(head) is not None
            assert mime_headers._plain_block(text) == expected, head
            plain += expected
    assert 2000 < plain < len(CORPUS) - 1000  # both kinds are common


def test_thread_ids_read_as_the_full_path_reads_them() -> None:
    with_ids = 0
    for block in CORPUS:
        data = block.lstrip(b"\r\n")
        entity = mime_headers.parse_entity(data)
        notes = Notes()
        expected = (
            mime_headers._ids(entity, "message-id", "Message-ID", notes),
            mime_headers._ids(entity, "in-reply-to", "In-Reply-To", notes),
            mime_headers._ids(entity, "references", "References", notes),
        )
        assert mime_headers._thread_ids(data) == expected, block
        with_ids += bool(expected[1] or expected[2])
    assert with_ids > 1000


@pytest.mark.parametrize("first", ["sender", "subject", "date", "message_id"])
def test_summaries_hold_what_the_full_reading_gives(first: str) -> None:
    for i, block in enumerate(CORPUS):
        summary = summarize_headers(str(i), block, i % 7 or None)
        getattr(summary, first)  # whichever field is read first, the others follow
        expected = full_summary(str(i), block, i % 7 or None)
        assert values(summary) == values(expected), block
        assert summary == expected and expected == summary
        assert hash(summary) == hash(expected)


def test_sender_subject_and_date_are_decoded_once_and_only_when_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    decoded: list[object] = []
    envelope = mime_headers.envelope

    def counting(*args: object, **kwargs: object) -> object:
        decoded.append(args[0])
        return envelope(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(mime_headers, "envelope", counting)
    block = (
        b"From: =?utf-8?q?Bob_B=C3=A9?= <Bob@Example.ORG>\r\nSubject: Re: Offer\r\n"
        b"Date: Tue, 02 Jan 2024 10:00:00 +0100\r\nMessage-ID: <r1@example.org>\r\n"
        b"In-Reply-To: <t1@example.org>\r\n\r\n"
    )
    summaries = [summarize_headers(str(i), block, 10) for i in range(100)]
    assert [s.in_reply_to for s in summaries] == [("<t1@example.org>",)] * 100
    assert decoded == []
    one = summaries[0]
    read = ("Bob@example.org", "Re: Offer", "2024-01-02T09:00:00Z")
    assert (one.sender, one.subject, one.date) == read
    assert (one.date, one.subject, one.sender) == read[::-1]
    assert len(decoded) == 1


def test_a_block_summary_is_a_header_summary_like_any_other() -> None:
    block = b"From: ann@example.com\nSubject: Hi\nMessage-ID: <m@example.com>\n\n"
    expected = HeaderSummary("3", "<m@example.com>", sender="ann@example.com", subject="Hi")

    def fresh() -> HeaderSummary:
        return summarize_headers("3", block)

    assert isinstance(fresh(), HeaderSummary)
    assert fresh() == expected and expected == fresh() and fresh() == fresh()
    assert fresh() != dataclasses.replace(expected, subject="Other")
    assert dataclasses.replace(expected, subject="Other") != fresh()
    not_a_summary: object = dataclasses.astuple(expected)
    assert fresh() != not_a_summary
    assert {fresh(), expected, fresh()} == {expected}
    assert dataclasses.asdict(fresh()) == dataclasses.asdict(expected)
    assert dataclasses.astuple(fresh()) == dataclasses.astuple(expected)
    for copied in (copy.copy(fresh()), copy.deepcopy(fresh()), pickle.loads(pickle.dumps(fresh()))):
        assert values(copied) == values(expected)
    changed = dataclasses.replace(fresh(), ref="4", date="2024-01-02T09:00:00Z")
    assert values(changed) == values(dataclasses.replace(expected, ref="4", date=changed.date))
    assert "subject='Hi'" in repr(fresh()) and "ref='3'" in repr(fresh())
    summary = fresh()
    with pytest.raises(dataclasses.FrozenInstanceError):
        summary.sender = "mallory@example.com"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        summary.ref = "9"  # type: ignore[misc]
    assert summary.sender == "ann@example.com"
