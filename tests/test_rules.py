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


def test_state_names_are_the_strings_stored_and_shown() -> None:
    assert [s.value for s in rules.ConnectionState] == [
        "connected", "needs_reauth", "error", "disconnected", "replaced",
    ]  # fmt: skip
    assert [s.value for s in rules.ThreadState] == ["active", "stopped", "unsynced"]
    assert [s.value for s in rules.MessageState] == ["synced", "skipped"]
    assert [s.value for s in rules.OutboxStatus] == [
        "pending", "claimed", "transmitting", "sent", "failed",
    ]  # fmt: skip
    # A string read back from the database is equal to its name, also as a key.
    assert "error" in rules.WORKING_STATES and "needs_reauth" not in rules.WORKING_STATES
    assert {rules.ConnectionState.ERROR: 1}["error"] == 1
    assert f"{rules.OutboxStatus.SENT}" == "sent"


def test_the_one_live_connection_index_covers_exactly_the_live_states() -> None:
    from threadsync.core.store.models import Connection

    index = next(i for i in Connection.__table__.indexes if i.name == "uq_connection_live")
    expected = "state IN (" + ", ".join(f"'{s}'" for s in rules.LIVE_STATES) + ")"
    for dialect in ("sqlite", "postgresql"):
        assert str(index.dialect_options[dialect]["where"]) == expected


NOW = datetime(2026, 1, 1, 12, 0)


def failure(failures: int, *, rejected: bool = False, retry_after: float | None = None):  # type: ignore[no-untyped-def]
    return rules.after_failure(
        failures=failures,
        next_attempt_at=NOW - timedelta(minutes=1),
        credentials_rejected=rejected,
        retry_after=retry_after,
        base=5,
        cap=60,
        now=NOW,
    )


def test_rejected_credentials_wait_for_the_user_and_keep_everything() -> None:
    change = failure(3, rejected=True)
    assert change == rules.ConnectionChange(
        rules.ConnectionState.NEEDS_REAUTH, 3, NOW - timedelta(minutes=1)
    )


def test_a_transient_failure_backs_off_and_honours_retry_after() -> None:
    assert failure(0) == rules.ConnectionChange(
        rules.ConnectionState.ERROR, 1, NOW + timedelta(seconds=5)
    )
    assert failure(3).next_attempt_at == NOW + timedelta(seconds=40)
    assert failure(0, retry_after=30).next_attempt_at == NOW + timedelta(seconds=30)
    # A Retry-After shorter than the backoff does not shorten it.
    assert failure(5, retry_after=1).next_attempt_at == NOW + timedelta(seconds=60)


@pytest.mark.parametrize(
    ("state", "wait", "recovers"),
    [
        ("error", None, True),
        ("error", -1, True),
        ("error", 0, True),
        ("error", 1, False),  # failed again in this same pass: backoff first
        ("connected", None, False),
        ("needs_reauth", None, False),
    ],
)
def test_a_completed_pass_recovers_an_error_past_its_backoff(  # type: ignore[no-untyped-def]
    state, wait, recovers
) -> None:
    when = None if wait is None else NOW + timedelta(seconds=wait)
    change = rules.after_success(state=state, next_attempt_at=when, now=NOW)
    assert change == (rules.connected() if recovers else None)
    assert rules.connected() == rules.ConnectionChange(rules.ConnectionState.CONNECTED, 0, None)


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


def test_message_size_limit() -> None:
    assert not rules.message_too_large(1000, 1000)  # exactly the limit passes
    assert rules.message_too_large(1001, 1000)
    assert not rules.message_too_large(None, 1000)  # unknown: measured once fetched
    # Attachments count base64-encoded, with line breaks.
    assert rules.encoded_size(10, 0, [3_000_000]) > 4_000_000
    assert rules.encoded_size(10, 5, []) == 15
