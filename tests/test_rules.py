"""The pure rules: routing table, attachment limit edge, Message-ID tokens, backoff."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from threadsync.core import rules

LIMIT = 3_145_728


@pytest.mark.parametrize(
    ("labs", "state", "sizes", "expected"),
    [
        (True, "connected", [], ("mailbox", True, None, False)),
        (True, "connected", [LIMIT], ("mailbox", True, None, False)),
        (True, "connected", [10, LIMIT + 1], ("default", False, "attachment_too_large", False)),
        (True, None, [], ("default", False, "no_connection", False)),
        (True, "disconnected", [], ("default", False, "disconnected", False)),
        (True, "replaced", [], ("default", False, "replaced", False)),
        (False, "connected", [], ("default", False, "labs_disabled", False)),
        (True, "needs_reauth", [], ("mailbox", True, None, True)),
        (True, "error", [], ("mailbox", True, None, True)),
    ],
)
def test_where_a_first_crm_message_goes(labs, state, sizes, expected) -> None:  # type: ignore[no-untyped-def]
    r = rules.route_first_message(
        labs_on=labs, connection_state=state, attachment_sizes=sizes, limit=LIMIT
    )
    assert (r.channel, r.synced, r.reason, r.queued) == expected


@pytest.mark.parametrize(
    ("thread", "labs", "state", "sizes", "expected"),
    [
        ("active", True, "connected", [], ("mailbox", True, None)),
        ("stopped", True, "connected", [], ("default", False, "thread_stopped")),
        ("unsynced", True, "connected", [], ("default", False, "thread_not_synced")),
        ("active", False, "connected", [], ("default", False, "labs_disabled")),
        ("active", True, "connected", [LIMIT + 1], ("default", False, "attachment_too_large")),
        ("active", True, "needs_reauth", [], ("mailbox", True, None)),
    ],
)
def test_where_a_crm_reply_goes(thread, labs, state, sizes, expected) -> None:  # type: ignore[no-untyped-def]
    r = rules.route_reply(
        thread_state=thread,
        labs_on=labs,
        connection_state=state,
        attachment_sizes=sizes,
        limit=LIMIT,
    )
    assert (r.channel, r.synced, r.reason) == expected


def test_message_ids_carry_the_thread_token_for_our_domain_only() -> None:
    token = rules.new_token()
    mid = rules.make_message_id(token, "crm.example")
    assert mid.startswith("<") and mid.endswith("@crm.example>")
    assert rules.token_of(mid, "crm.example") == token
    assert rules.token_of(mid, "CRM.example") == token
    assert rules.token_of(mid, "other.example") is None
    assert rules.token_of("<CAF=xyz@mail.gmail.com>", "crm.example") is None
    assert rules.make_message_id(token, "crm.example") != mid


def test_backoff_doubles_up_to_the_cap() -> None:
    now = datetime(2026, 1, 1)
    delays = [(rules.backoff(n, 5, 60, now) - now).total_seconds() for n in range(1, 7)]
    assert delays == [5, 10, 20, 40, 60, 60]
    assert rules.backoff(0, 5, 60, now) - now == timedelta(seconds=5)


def test_reply_subject_and_reference_trimming() -> None:
    assert rules.reply_subject("Offer") == "Re: Offer"
    assert rules.reply_subject("RE: Offer") == "RE: Offer"
    chain = [f"<{i}@x>" for i in range(30)]
    refs = rules.references_for_reply(chain, limit=5)
    assert refs == ["<0@x>", "<26@x>", "<27@x>", "<28@x>", "<29@x>"]


def test_fair_share_covers_every_connection_and_is_equal_rounded_up() -> None:
    assert rules.fair_share(20, 2) == 10
    assert rules.fair_share(21, 2) == 11
    assert rules.fair_share(3, 5) == 1
    assert rules.fair_share(0, 3) == 0
    assert rules.fair_share(7, 0) == 7  # no live worker counted yet: this one takes all
    for connections in range(0, 50):
        for workers in range(1, 8):
            assert rules.fair_share(connections, workers) * workers >= connections
            assert (rules.fair_share(connections, workers) - 1) * workers < connections
