"""Which new messages of a batch belong to a synced thread
(``threadsync.core.sync.ingest._classify``).

Membership is decided from our tables only (the membership rule): a
thread token inside a referenced Message-ID of ours, or a referenced Message-ID
already stored in the thread; only the connection's active threads count; a
message whose own Message-ID is stored already is left out; a later message of
the batch may reply to an earlier member. Checked on SQLite and PostgreSQL with
cases written out, against a one-message-at-a-time reading of the rule on a big
random batch (more ids than one query binds), and for what a batch costs: one
query per kind of id, none for a batch that refers to nothing.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, select, text
from sqlalchemy.orm import Session

from tests.kernelfixtures import make_settings
from threadsync.core import rules
from threadsync.core.api import Threadsync
from threadsync.core.kernel import Kernel
from threadsync.core.provider import HeaderSummary
from threadsync.core.store.models import Connection, Message, SubAccount, SyncedThread
from threadsync.core.sync.ingest import _MESSAGES_IN_ACTIVE_THREADS, _classify

OURS, OTHERS = 1, 2
SEEDED = random.Random(7)


def new_token(rng: random.Random = SEEDED) -> str:
    """A thread token as ``rules.new_token`` makes them, from a seeded source."""
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz234567") for _ in range(16))


def our_id(token: str, domain: str, rng: random.Random = SEEDED) -> str:
    """One of our Message-IDs, as ``rules.make_message_id`` makes them."""
    return f"<{rng.getrandbits(64):016x}.{token}@{domain}>"


@pytest.fixture
def kernel(tmp_path: Path, database_url: str) -> Iterator[Kernel]:
    settings = make_settings(tmp_path, database_url, relay_port=1)
    Threadsync.init(settings)
    k = Kernel.build(settings, load_entry_points=False)
    yield k
    k.store.dispose()


def add_threads(k: Kernel, threads: dict[str, tuple[int, str, list[str]]]) -> dict[str, str]:
    """Threads by id: (connection, state, stored Message-IDs); returns their tokens."""
    tokens = {tid: new_token() for tid in threads}

    def work(session: Session) -> None:
        if session.get(SubAccount, "acme") is None:
            session.add(SubAccount(id="acme", two_way_email_sync=True))
            session.flush()
            for conn_id, user in ((OURS, "u1"), (OTHERS, "u2")):
                session.add(
                    Connection(
                        id=conn_id,
                        subaccount_id="acme",
                        user_id=user,
                        provider="imap_smtp",
                        email=f"{user}@example.org",
                        state="connected",
                    )
                )
            session.flush()
        for tid, (conn_id, state, _) in threads.items():
            session.add(
                SyncedThread(
                    id=tid,
                    token=tokens[tid],
                    subaccount_id="acme",
                    user_id="u1" if conn_id == OURS else "u2",
                    connection_id=conn_id,
                    state=state,
                )
            )
        session.flush()
        for tid, (_, _, mids) in threads.items():
            for mid in mids:
                session.add(
                    Message(
                        thread_id=tid,
                        subaccount_id="acme",
                        message_id=mid,
                        direction="inbound",
                        origin="mailbox",
                        state="synced",
                    )
                )

    k.store.call(work)
    return tokens


def header(ref: str, own: str | None, *refs: str, replied: str | None = None) -> HeaderSummary:
    return HeaderSummary(
        ref=ref,
        message_id=own,
        in_reply_to=(replied,) if replied else (),
        references=refs,
    )


def classify(k: Kernel, headers: list[HeaderSummary]) -> list[tuple[str, str]]:
    return [(h.ref, thread) for h, thread in asyncio.run(_classify(k, OURS, headers))]


def test_membership_cases(kernel: Kernel) -> None:
    domain = kernel.settings.sync.message_id_domain
    tokens = add_threads(
        kernel,
        {
            "th_a": (OURS, "active", ["<copy@example.org>"]),
            "th_b": (OURS, "active", ["<b1@example.org>"]),
            "th_s": (OURS, "stopped", ["<s1@example.org>"]),
            "th_o": (OTHERS, "active", ["<o1@example.org>"]),
        },
    )
    root = rules.make_message_id(tokens["th_a"], domain)
    ours = {tid: rules.make_message_id(token, domain) for tid, token in tokens.items()}
    elsewhere = rules.make_message_id(tokens["th_a"], "elsewhere.example")
    headers = [
        header("1", "<r1@example.net>", root),  # our Message-ID, by its token
        header("2", "<r2@example.net>", replied="<b1@example.org>"),  # stored in th_b
        header("3", "<r3@example.net>", "<s1@example.org>", ours["th_s"]),  # stopped
        header("4", "<r4@example.net>", "<o1@example.org>", ours["th_o"]),  # not ours
        header("5", "<r5@example.net>", "<unknown@example.net>"),
        header("6", "<r6@example.net>", elsewhere),  # a token, but not our domain
        header("7", "<copy@example.org>", root),  # stored already
        header("8", "<copy@example.org>"),
        header("9", "<r9@example.net>", "<unknown@example.net>", replied="<r1@example.net>"),
        header("10", None, "<r9@example.net>"),  # replies to a member of this batch
        header("11", "<r11@example.net>", "<r5@example.net>"),  # ... not to a non-member
        header("12", "<r12@example.net>", "<b1@example.org>", root),  # the last one named
        header("13", "<r13@example.net>"),
    ]
    assert classify(kernel, headers) == [
        ("1", "th_a"),
        ("2", "th_b"),
        ("9", "th_a"),
        ("10", "th_a"),
        ("12", "th_a"),
    ]


def one_at_a_time(k: Kernel, headers: list[HeaderSummary]) -> list[tuple[str, str]]:
    """The rule read literally: each id looked up on its own, header by header."""
    domain = k.settings.sync.message_id_domain
    members: list[tuple[str, str]] = []
    in_batch: dict[str, str] = {}
    with k.store.session_scope() as session:

        def stored(mid: str) -> str | None:
            if mid in in_batch:
                return in_batch[mid]
            return session.scalar(
                select(Message.thread_id)
                .join(SyncedThread, SyncedThread.id == Message.thread_id)
                .where(
                    Message.message_id == mid,
                    SyncedThread.connection_id == OURS,
                    SyncedThread.state == "active",
                )
            )

        def by_token(mid: str) -> str | None:
            token = rules.token_of(mid, domain)
            if token is None:
                return None
            return session.scalar(
                select(SyncedThread.id).where(
                    SyncedThread.token == token,
                    SyncedThread.connection_id == OURS,
                    SyncedThread.state == "active",
                )
            )

        for h in headers:
            if h.message_id and stored(h.message_id):
                continue
            thread = None
            for mid in reversed(list(dict.fromkeys([*h.in_reply_to, *h.references]))):
                thread = stored(mid) or by_token(mid)  # the last one named that we know
                if thread is not None:
                    break
            if thread is not None:
                members.append((h.ref, thread))
                if h.message_id:
                    in_batch[h.message_id] = thread
    return members


def random_world(k: Kernel, rng: random.Random) -> list[HeaderSummary]:
    domain = k.settings.sync.message_id_domain
    layout = {
        f"th_{i}": (
            OTHERS if i % 7 == 0 else OURS,
            "stopped" if i % 5 == 0 else "active",
            [f"<s{i}.{j}@example.org>" for j in range(rng.randint(0, 6))],
        )
        for i in range(40)
    }
    tokens = add_threads(k, layout)
    stored = [mid for _, _, mids in layout.values() for mid in mids]
    ours = [our_id(token, domain, rng) for token in tokens.values()]
    strangers = [our_id(new_token(rng), domain, rng) for _ in range(2000)]
    headers: list[HeaderSummary] = []
    for n in range(1500):
        unknown = [f"<u{rng.randrange(3000)}@example.net>"]
        pools = [stored, ours, strangers, strangers, unknown]
        if headers:
            pools.append([h.message_id for h in headers[-50:] if h.message_id])
        named = [rng.choice(rng.choice(pools)) for _ in range(rng.choice([0, 0, 1, 1, 2, 4]))]
        own = rng.choice([f"<n{n}@example.net>"] * 6 + [rng.choice(stored), None])
        split = rng.randint(0, len(named))
        headers.append(
            HeaderSummary(
                ref=str(n),
                message_id=own,
                in_reply_to=tuple(named[:split]),
                references=tuple(named[split:]),
            )
        )
    return headers


def test_a_big_batch_is_classified_as_one_message_at_a_time(kernel: Kernel) -> None:
    headers = random_world(kernel, random.Random(31))
    expected = one_at_a_time(kernel, headers)
    assert 100 < len(expected) < len(headers) - 500
    assert classify(kernel, headers) == expected


def statements_of(k: Kernel, headers: list[HeaderSummary]) -> list[str]:
    seen: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append(statement)

    event.listen(k.store.engine, "before_cursor_execute", count)
    try:
        asyncio.run(_classify(k, OURS, headers))
    finally:
        event.remove(k.store.engine, "before_cursor_execute", count)
    return seen


def test_a_batch_costs_one_query_per_kind_of_id(kernel: Kernel) -> None:
    mixed = random_world(kernel, random.Random(32))[:250]  # tokens and stored ids
    assert len(statements_of(kernel, mixed)) == 2
    strangers = [header(str(i), f"<x{i}@example.net>", f"<y{i}@example.net>") for i in range(250)]
    assert len(statements_of(kernel, strangers)) == 1
    unthreaded = [header(str(i), f"<x{i}@example.net>") for i in range(250)]
    assert statements_of(kernel, unthreaded) == []


def test_stored_messages_are_looked_up_by_their_message_id(kernel: Kernel) -> None:
    """Not by the connection's active threads, which costs a probe per thread and id."""
    if kernel.store.engine.dialect.name != "sqlite":
        pytest.skip("the query plan is checked on SQLite")
    add_threads(kernel, {f"th_{i}": (OURS, "active", [f"<m{i}@x>"]) for i in range(30)})
    lookup = _MESSAGES_IN_ACTIVE_THREADS.params(mids=["<m1@x>", "<m2@x>"], conn_id=OURS)
    sql = str(lookup.compile(kernel.store.engine, compile_kwargs={"literal_binds": True}))
    with kernel.store.engine.connect() as conn:
        plan = " / ".join(str(row[-1]) for row in conn.execute(text("EXPLAIN QUERY PLAN " + sql)))
    assert plan.startswith("SEARCH messages USING INDEX ix_message_mid"), plan
