"""threadsync benchmarks: ``python benchmarks/run.py [--quick] [--database postgresql]``.

Starts its own Dovecot and SMTP submission server on loopback and measures, side
by side in one run:

1. the cost of a pass with no new mail on a small and on a large mailbox
   (goal: large/small <= 1.2, "cursors, not scans");
2. ingesting thread replies hidden among many unrelated new messages, against a
   bare aioimaplib script doing the least protocol work for the same result
   (goal: <= 1.5x);
3. sending CRM messages through the mailbox (SMTP + APPEND to Sent), through the
   API and through the daemon's outbox, against a bare aiosmtplib + aioimaplib
   loop (goal: <= 1.3x).

It prints a table of absolute numbers, ratios and goals. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import re
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import counters, floor, mailstore  # noqa: E402
from benchmarks.environment import PASSWORD, SUB, BenchEnvironment  # noqa: E402
from benchmarks.profiling import profiled  # noqa: E402
from threadsync.core.api import Threadsync  # noqa: E402
from threadsync.core.outbox.compose import Draft  # noqa: E402

USER = "u1"
#: CRM sends timed on each mailbox of benchmark 1.
SENDS_ON_BOX = 10
#: Pause before the no-new-mail passes (see bench_no_new_mail).
SETTLE_SECONDS = 3.0


@dataclass(frozen=True)
class Sizes:
    small_mailbox: int
    large_mailbox: int
    passes: int
    threads: int
    replies: int
    unrelated: int
    send_threads: int
    sends: int


FULL = Sizes(small_mailbox=1_000, large_mailbox=50_000, passes=40, threads=50, replies=1_000,
             unrelated=10_000, send_threads=100, sends=500)
QUICK = Sizes(small_mailbox=1_000, large_mailbox=5_000, passes=20, threads=10, replies=100,
              unrelated=1_000, send_threads=10, sends=50)


@dataclass
class Row:
    """One line of the result table."""

    key: str
    what: str
    threadsync: float
    reference: float
    reference_label: str
    goal: float | None
    #: Messages handled, for the msgs/s columns (None: not a throughput).
    messages: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.threadsync / self.reference if self.reference else float("inf")

    @property
    def result(self) -> str:
        if self.goal is None:
            return "info"
        return "PASS" if self.ratio <= self.goal else "MISS"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:,.1f} ms" if seconds < 10 else f"{seconds:,.2f} s"


def _rate(count: int | None, seconds: float) -> str:
    return f"{count / seconds:,.0f}/s" if count and seconds > 0 else "-"


async def _timed(coro: Awaitable[Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = await coro
    return time.perf_counter() - start, result


@dataclass
class Measured:
    """Wall time, this process's CPU time (event loop and worker threads; the
    servers run in other processes) and the counters of one measured block."""

    seconds: float
    cpu: float
    counts: dict[str, float]
    result: Any = None


async def _measure(coro: Awaitable[Any]) -> Measured:
    before = counters.snapshot()
    cpu, start = time.process_time(), time.perf_counter()
    result = await coro
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return Measured(seconds, cpu, counters.since(before), result)


def _offer(i: int) -> Draft:
    text = (f"Hello,\n\nas discussed, here is offer number {i}. " + "The details follow. " * 30
            + "\n\nKind regards")
    return Draft(to=[f"contact{i}@example.org"], subject=f"Offer {i}", text=text)


def _reply(i: int) -> Draft:
    return Draft(text=f"Following up on our offer ({i}). " + "One more detail. " * 25)


def _check_report(report: Any, what: str, **expected: int) -> None:
    if report.errors:
        raise RuntimeError(f"{what}: run_once reported errors: {report.errors}")
    for name, value in expected.items():
        if getattr(report, name) != value:
            raise RuntimeError(f"{what}: run_once {name}={getattr(report, name)}, "
                               f"expected {value} ({report})")


def _per_pass(m: Measured, passes: int) -> str:
    """Average cost of one of ``passes`` measured repetitions."""
    c = {k: v / passes for k, v in m.counts.items()}
    imap = sorted(((k[5:], v) for k, v in c.items() if k.startswith("imap:")),
                  key=lambda kv: -kv[1])
    commands = ", ".join(f"{name} {n:g} ({c.get('imap_s:' + name, 0) * 1000:.1f} ms)"
                         for name, n in imap)
    return (
        f"{c.get('imap_commands', 0):.0f} IMAP commands [{commands}] on "
        f"{c.get('imap_connections', 0):.0f} new connection(s) "
        f"(connect+greeting {c.get('imap_s:connect', 0) * 1000:.1f} ms), "
        f"{c.get('db_transactions', 0):.0f} DB transactions "
        f"({c.get('db_seconds', 0) * 1000:.1f} ms), client CPU {m.cpu / passes * 1000:.1f} ms"
    )


def _breakdown(m: Measured) -> str:
    """Where the wall time went: client CPU, IMAP waits by command, SMTP steps, DB."""
    c = m.counts
    imap = sorted(((k[5:], int(v)) for k, v in c.items() if k.startswith("imap:")),
                  key=lambda kv: -kv[1])
    imap_text = ", ".join(f"{name} {n:,} ({c.get('imap_s:' + name, 0):.2f} s)"
                          for name, n in imap)
    smtp_text = ", ".join(f"{k[7:]} {v:.2f} s" for k, v in sorted(c.items())
                          if k.startswith("smtp_s:"))
    return (
        f"wall {m.seconds:.2f} s, client CPU {m.cpu:.2f} s ({m.cpu / m.seconds:.0%}); "
        f"IMAP: {int(c.get('imap_connections', 0))} connection(s) "
        f"(connect+greeting {c.get('imap_s:connect', 0):.2f} s), "
        f"{int(c.get('imap_commands', 0)):,} commands: {imap_text or 'none'}; "
        f"SMTP: {int(c.get('smtp_connections', 0))} connection(s)"
        + (f" ({smtp_text})" if smtp_text else "")
        + f"; DB: {int(c.get('db_transactions', 0)):,} transactions "
        f"({c.get('db_seconds', 0):.2f} s inside them)"
    )


# ---- 1. no-new-mail pass ----------------------------------------------------------------------


def _fill_history(env: BenchEnvironment, email: str, total: int) -> None:
    """``total`` messages: 80 % in INBOX, 20 % in Sent (both counts include the seed)."""
    assert env.imap is not None
    mailstore.ensure_folders(env.imap, email, ["INBOX", "Sent"])
    inbox = total * 4 // 5
    sent = total - inbox
    rng = random.Random(total)
    mailstore.write_messages(
        env.imap, email, "INBOX",
        (mailstore.unrelated_mail(rng, i, email).raw for i in range(inbox - 1)), seen=True)
    mailstore.write_messages(
        env.imap, email, "Sent",
        (mailstore.make_mail(rng, i, sender=email, to=f"person{i % 997}@example.net",
                             subject=f"Note {i}").raw for i in range(sent - 1)), seen=True)
    mailstore.index(env.imap, email, {"INBOX": inbox, "Sent": sent})


@dataclass
class _Box:
    """One populated mailbox with a connected threadsync user."""

    total: int
    email: str
    ts: Threadsync
    fill_seconds: float
    times: list[float] = field(default_factory=list)
    send_times: list[float] = field(default_factory=list)
    floor_times: list[float] = field(default_factory=list)
    passes: Measured | None = None
    polls: Measured | None = None
    sends: Measured | None = None


async def _prepare_box(env: BenchEnvironment, total: int) -> _Box:
    email = env.user(f"box{total}")
    start = time.perf_counter()
    _fill_history(env, email, total)
    fill = time.perf_counter() - start
    ts = env.threadsync(f"nnm-{total}")
    await env.connect(ts, USER, email)  # after the fill: the cursor starts at the end

    sent = await ts.send(SUB, USER, _offer(0))  # warm-up: finds Sent, fills caches
    if sent["status"] != "sent":
        raise RuntimeError(f"send on the {total}-message mailbox: {sent}")
    _check_report(await ts.run_once(), "catch-up pass", stored=0)
    for _ in range(2):  # warm-up: caches, the first STATUS after the catch-up
        _check_report(await ts.run_once(), "warm-up pass", stored=0, duplicates=0)
    return _Box(total, email, ts, fill)


async def _interleaved(
    boxes: list[_Box], rounds: int, one: Callable[[_Box], Awaitable[Any]], into: str
) -> list[Measured]:
    """``rounds`` timed calls of ``one`` per box, alternating boxes and their order,
    so drift and noise on the machine hit every box alike."""
    measured = [Measured(0.0, 0.0, {}) for _ in boxes]
    for r in range(rounds):
        order = list(enumerate(boxes))
        if r % 2:
            order.reverse()
        for i, box in order:
            m = await _measure(one(box))
            getattr(box, into).append(m.seconds)
            total = measured[i]
            total.seconds += m.seconds
            total.cpu += m.cpu
            for k, v in m.counts.items():
                total.counts[k] = total.counts.get(k, 0) + v
    return measured


async def bench_no_new_mail(
    env: BenchEnvironment, sizes: Sizes, profile_dir: Path | None
) -> list[Row]:
    assert env.imap is not None
    imap = env.imap
    boxes = [await _prepare_box(env, sizes.small_mailbox),
             await _prepare_box(env, sizes.large_mailbox)]
    # Dovecot rescans a Maildir folder whose directory changed within the last
    # couple of seconds on every access (it cannot trust same-second mtimes): let
    # the warm-up APPENDs to Sent settle, so the passes measure the steady state.
    await asyncio.sleep(SETTLE_SECONDS)
    for box in boxes:
        _check_report(await box.ts.run_once(), "warm-up pass", stored=0, duplicates=0)

    async def one_pass(box: _Box) -> None:
        report = await box.ts.run_once()
        _check_report(report, "no-new-mail pass", stored=0, duplicates=0, connections=1)

    async def one_poll(box: _Box) -> None:
        await floor.poll(floor.Login(imap.host, imap.port, box.email, PASSWORD))

    measured = await _interleaved(boxes, sizes.passes, one_pass, "times")
    for box, m in zip(boxes, measured, strict=True):
        box.passes = m
    for box in boxes:
        await one_poll(box)  # warm-up
    measured = await _interleaved(boxes, sizes.passes, one_poll, "floor_times")
    for box, m in zip(boxes, measured, strict=True):
        box.polls = m

    async def one_send(box: _Box) -> None:
        sent = await box.ts.send(SUB, USER, _offer(len(box.send_times)))
        if sent["status"] != "sent":
            raise RuntimeError(f"send on the {box.total}-message mailbox: {sent}")

    measured = await _interleaved(boxes, SENDS_ON_BOX, one_send, "send_times")
    for box, m in zip(boxes, measured, strict=True):
        box.sends = m

    if profile_dir is not None:
        for box in boxes:
            with profiled(f"1-no-new-mail-{box.total}", profile_dir):
                for _ in range(sizes.passes):
                    await box.ts.run_once()

    small, large = boxes
    assert small.passes and large.passes and large.polls and small.sends and large.sends
    s, b = f"{small.total:,}", f"{large.total:,}"
    med = statistics.median

    def spread(box: _Box) -> str:
        return (f"median {_ms(med(box.times))} (min {_ms(min(box.times))}, "
                f"max {_ms(max(box.times))})")

    return [
        Row("1", f"no-new-mail run_once, {b} vs {s} msgs (median of {sizes.passes})",
            med(large.times), med(small.times), f"{s}-msg mailbox", 1.2, notes=[
                f"{s} msgs: {spread(small)}; per pass: {_per_pass(small.passes, sizes.passes)}",
                f"{b} msgs: {spread(large)}; per pass: {_per_pass(large.passes, sizes.passes)}",
                f"mailbox fill by direct Maildir writes + one doveadm sync: "
                f"{large.fill_seconds:.1f} s for {b} messages",
            ]),
        Row("1b", f"no-new-mail run_once vs bare login+STATUS x2 ({b} msgs)",
            med(large.times), med(large.floor_times), "bare poll", None, notes=[
                f"bare poll, {box.total:,} msgs: median {_ms(med(box.floor_times))}; per pass: "
                f"{_per_pass(box.polls, sizes.passes)}"
                for box in (small, large) if box.polls is not None
            ]),
        Row("1c", f"CRM send on {b} vs {s} msgs mailbox (Sent {large.total // 5:,} vs "
            f"{small.total // 5:,}; median of {SENDS_ON_BOX})",
            med(large.send_times), med(small.send_times), f"{s}-msg mailbox", None, notes=[
                f"{box.total:,} msgs: median {_ms(med(box.send_times))}; per send: "
                f"{_per_pass(box.sends, SENDS_ON_BOX)}; of which the Sent Message-ID SEARCH "
                f"{box.sends.counts.get('imap_s:SEARCH', 0) / SENDS_ON_BOX * 1000:.1f} ms"
                for box in (small, large) if box.sends is not None
            ]),
    ]


# ---- 2. ingest -------------------------------------------------------------------------------


def _ingest_bag(to: str, roots: list[str], sizes: Sizes) -> list[mailstore.Mail]:
    rng = random.Random(20240601)
    bag = [
        mailstore.reply_mail(rng, i, to, roots[i % len(roots)],
                             f"contact{i % len(roots)}@example.org")
        for i in range(sizes.replies)
    ]
    bag += [mailstore.unrelated_mail(rng, sizes.replies + i, to) for i in range(sizes.unrelated)]
    rng.shuffle(bag)
    return bag


def _deliver_bag(env: BenchEnvironment, email: str, bag: list[mailstore.Mail],
                 sent_copies: list[bytes]) -> int:
    """Give ``email`` the same Sent folder and INBOX ``bag`` as the threadsync user;
    returns the INBOX UIDNEXT before the bag (the floor's cursor)."""
    assert env.imap is not None
    mailstore.ensure_folders(env.imap, email, ["INBOX", "Sent"])
    mailstore.write_messages(env.imap, email, "Sent", sent_copies, seen=True)
    before = mailstore.index(env.imap, email, {"INBOX": 1, "Sent": 1 + len(sent_copies)})
    mailstore.write_messages(env.imap, email, "INBOX", (m.raw for m in bag), as_new=True)
    mailstore.index(env.imap, email, {"INBOX": 1 + len(bag)})
    return before["INBOX"]


async def _ingest_threadsync(
    env: BenchEnvironment, name: str, sizes: Sizes, bag_for: Callable[[str, list[str]], Any]
) -> tuple[Threadsync, list[mailstore.Mail], list[str], str]:
    assert env.imap is not None
    email = env.user(name)
    mailstore.ensure_folders(env.imap, email, ["INBOX", "Sent"])
    ts = env.threadsync(name)
    await env.connect(ts, USER, email)
    roots = []
    for i in range(sizes.threads):
        sent = await ts.send(SUB, USER, _offer(i))
        if sent["status"] != "sent":
            raise RuntimeError(f"thread {i} was not sent: {sent}")
        roots.append(sent["message_id"])
    _check_report(await ts.run_once(), "catch-up pass", stored=0)
    bag = bag_for(email, roots)
    mailstore.write_messages(env.imap, email, "INBOX", (m.raw for m in bag), as_new=True)
    mailstore.index(env.imap, email, {"INBOX": 1 + len(bag)})
    return ts, bag, roots, email


async def bench_ingest(env: BenchEnvironment, sizes: Sizes, profile_dir: Path | None) -> list[Row]:
    assert env.imap is not None
    new = sizes.replies + sizes.unrelated
    bags: dict[str, list[mailstore.Mail]] = {}

    def bag_for(to: str, roots: list[str]) -> list[mailstore.Mail]:
        bags["bag"] = _ingest_bag(to, roots, sizes)
        return bags["bag"]

    ts, bag, roots, ts_email = await _ingest_threadsync(env, "ingest-ts", sizes, bag_for)
    ts_m = await _measure(ts.run_once())
    _check_report(ts_m.result, "ingest", stored=sizes.replies, skipped=0)
    stored = ts.threads(SUB, USER)
    synced = sum(len(ts.thread(t["thread_id"], SUB)["messages"]) for t in stored["threads"])
    if synced != sizes.threads + sizes.replies:
        raise RuntimeError(f"ingest stored {synced} messages in threads, expected "
                           f"{sizes.threads + sizes.replies}")

    sent_copies = env.imap.messages(ts_email, "Sent")[1:]
    floors: dict[int, Measured] = {}
    for body_chunk, name in ((50, "ingest-floor"), (1, "ingest-floor1")):
        email = env.user(name)
        start_uid = _deliver_bag(env, email, bag, sent_copies)
        login = floor.Login(env.imap.host, env.imap.port, email, PASSWORD)
        floors[body_chunk] = await _measure(
            floor.ingest(login, start_uid, roots, body_chunk=body_chunk))
        if len(floors[body_chunk].result) != sizes.replies:
            raise RuntimeError(f"floor found {len(floors[body_chunk].result)} members, "
                               f"expected {sizes.replies}")

    if profile_dir is not None:
        ts_p, *_ = await _ingest_threadsync(
            env, "ingest-prof", sizes, lambda to, roots: _ingest_bag(to, roots, sizes))
        with profiled("2-ingest", profile_dir):
            await ts_p.run_once()

    batched, single = floors[50], floors[1]
    label = f"{sizes.replies:,} replies among {new:,} new msgs"
    return [
        Row("2", f"ingest {label} (one run_once)", ts_m.seconds, batched.seconds,
            "bare aioimaplib", 1.5, new, notes=[
                f"threadsync: {_rate(new, ts_m.seconds)} new msgs scanned, "
                f"{_rate(sizes.replies, ts_m.seconds)} members stored; {_breakdown(ts_m)}",
                f"floor (50 bodies per UID FETCH): {_rate(new, batched.seconds)} new msgs "
                f"scanned, {_rate(sizes.replies, batched.seconds)} members fetched; "
                f"{_breakdown(batched)}",
            ]),
        Row("2b", f"ingest {label} vs floor fetching bodies one by one",
            ts_m.seconds, single.seconds, "floor, 1 body/FETCH", None, new, notes=[
                f"floor (1 body per UID FETCH): {_rate(sizes.replies, single.seconds)} "
                f"members; {_breakdown(single)}",
            ]),
    ]


# ---- 3. send ---------------------------------------------------------------------------------


async def _send_plan(ts: Threadsync, sizes: Sizes, expect: str) -> list[str]:
    """``send_threads`` new threads, then replies round-robin until ``sends``."""
    statuses, thread_ids = [], []
    for i in range(sizes.send_threads):
        sent = await ts.send(SUB, USER, _offer(i))
        statuses.append(sent["status"])
        thread_ids.append(sent["thread_id"])
    for j in range(sizes.sends - sizes.send_threads):
        sent = await ts.reply(thread_ids[j % len(thread_ids)], _reply(j))
        statuses.append(sent["status"])
    if any(s != expect for s in statuses):
        raise RuntimeError(f"expected every message {expect}, got "
                           f"{ {s: statuses.count(s) for s in set(statuses)} }")
    return thread_ids


_TO = re.compile(rb"^To:\s*(.*?)\r\n(?![ \t])", re.I | re.M | re.S)
_ADDR = re.compile(rb"[\w.+-]+@[\w.-]+")


def _outgoing(raw: bytes, sender: str) -> floor.Outgoing:
    match = _TO.search(raw.split(b"\r\n\r\n", 1)[0])
    rcpts = tuple(a.decode() for a in _ADDR.findall(match.group(1))) if match else ()
    return floor.Outgoing(sender, rcpts, raw)


async def _api_sends(env: BenchEnvironment, name: str, sizes: Sizes) -> tuple[Measured, str]:
    assert env.imap is not None and env.smtp is not None
    email = env.user(name)
    mailstore.ensure_folders(env.imap, email, ["INBOX", "Sent"])
    ts = env.threadsync(name)
    await env.connect(ts, USER, email)
    received = env.smtp.received()
    measured = await _measure(_send_plan(ts, sizes, "sent"))
    if env.smtp.received() - received != sizes.sends:
        raise RuntimeError("the SMTP server did not receive every message")
    if mailstore.message_count(env.imap, email, "Sent") != 1 + sizes.sends:
        raise RuntimeError("Sent does not hold every sent copy")
    return measured, email


async def _queue_for_daemon(env: BenchEnvironment, name: str, sizes: Sizes) -> Threadsync:
    assert env.imap is not None and env.smtp is not None
    email = env.user(name)
    mailstore.ensure_folders(env.imap, email, ["INBOX", "Sent"])
    ts = env.threadsync(name)
    await env.connect(ts, USER, email)
    env.smtp.stop()  # unreachable: the first send fails, the rest wait in the outbox
    try:
        await _send_plan(ts, sizes, "queued")
    finally:
        env.smtp.start()  # same port
    await asyncio.sleep(0.7)  # past the connection's backoff (0.5 s at most here)
    return ts


async def bench_send(env: BenchEnvironment, sizes: Sizes, profile_dir: Path | None) -> list[Row]:
    assert env.imap is not None and env.smtp is not None
    api, api_email = await _api_sends(env, "send-api", sizes)

    ts_d = await _queue_for_daemon(env, "send-daemon", sizes)
    received = env.smtp.received()
    daemon = await _measure(ts_d.run_once())
    _check_report(daemon.result, "daemon delivery", sent=sizes.sends)
    if env.smtp.received() - received != sizes.sends:
        raise RuntimeError("the daemon did not deliver every message")

    floor_email = env.user("send-floor")
    mailstore.ensure_folders(env.imap, floor_email, ["INBOX", "Sent"])
    mails = [_outgoing(raw, floor_email) for raw in env.imap.messages(api_email, "Sent")[1:]]
    login = floor.Login(env.imap.host, env.imap.port, floor_email, PASSWORD)
    received = env.smtp.received()
    bare = await _measure(floor.send_all(login, env.smtp.host, env.smtp.port, mails))
    if bare.result != sizes.sends or env.smtp.received() - received != sizes.sends:
        raise RuntimeError("the floor did not send every message")

    if profile_dir is not None:
        with profiled("3-send-api", profile_dir):
            await _api_sends(env, "send-api-prof", sizes)
        ts_p = await _queue_for_daemon(env, "send-daemon-prof", sizes)
        with profiled("3-send-daemon", profile_dir):
            await ts_p.run_once()

    n = sizes.sends
    what = f"{n} CRM msgs ({sizes.send_threads} send + {n - sizes.send_threads} reply)"
    return [
        Row("3a", f"send {what}, API (provider per call)", api.seconds, bare.seconds,
            "bare SMTP+APPEND", 1.3, n, notes=[
                f"API: {_rate(n, api.seconds)}; {_breakdown(api)}",
                f"floor: {_rate(n, bare.seconds)}; {_breakdown(bare)}",
            ]),
        Row("3b", f"send {what}, daemon run_once (one provider)", daemon.seconds,
            bare.seconds, "bare SMTP+APPEND", 1.3, n, notes=[
                f"daemon: {_rate(n, daemon.seconds)} (includes reading the {n} new Sent "
                f"headers back); {_breakdown(daemon)}",
            ]),
    ]


# ---- output ----------------------------------------------------------------------------------


def print_table(rows: list[Row], title: str) -> None:
    header = ("#", "measurement", "threadsync", "floor / reference", "ratio", "goal", "result",
              "msgs/s ts | floor")
    cells = [
        (r.key, r.what, _ms(r.threadsync), f"{_ms(r.reference)} ({r.reference_label})",
         f"{r.ratio:.2f}x", f"<= {r.goal:.1f}x" if r.goal is not None else "-", r.result,
         f"{_rate(r.messages, r.threadsync)} | {_rate(r.messages, r.reference)}"
         if r.messages else "-")
        for r in rows
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    print()
    print(title)
    print(line.format(*header))
    print(line.format(*("-" * w for w in widths)))
    for c in cells:
        print(line.format(*c))
    print()
    for r in rows:
        for note in r.notes:
            print(f"  [{r.key}] {note}")


async def main_async(args: argparse.Namespace) -> list[Row]:
    sizes = QUICK if args.quick else FULL
    counters.install()
    users = [f"box{sizes.small_mailbox}", f"box{sizes.large_mailbox}", "ingest-ts",
             "ingest-floor", "ingest-floor1", "ingest-prof", "send-api", "send-daemon",
             "send-floor", "send-api-prof", "send-daemon-prof"]
    env = BenchEnvironment(args.database, users, keep=args.keep).start()
    profile_dir = Path(args.profile).resolve() if args.profile else None
    rows: list[Row] = []
    timings: dict[str, float] = {}
    try:
        for name, bench in (("1", bench_no_new_mail), ("2", bench_ingest), ("3", bench_send)):
            if args.only and name not in args.only:
                continue
            start = time.perf_counter()
            rows += await bench(env, sizes, profile_dir)
            timings[name] = time.perf_counter() - start
            print(f"benchmark {name} done in {timings[name]:.1f} s", flush=True)
    finally:
        env.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="small sizes, a smoke check (about a minute)")
    parser.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--only", nargs="*", choices=("1", "2", "3"),
                        help="run only these benchmarks")
    parser.add_argument("--profile", metavar="DIR",
                        help="also profile threadsync's part of each benchmark into DIR "
                             "(a separate, untimed repetition)")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON too")
    parser.add_argument("--keep", action="store_true",
                        help="keep the working directory (mail store, databases)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")

    start = time.perf_counter()
    rows = asyncio.run(main_async(args))
    total = time.perf_counter() - start
    sizes = QUICK if args.quick else FULL
    title = (f"threadsync benchmarks ({'quick' if args.quick else 'full'}, {args.database}, "
             f"Python {sys.version.split()[0]}; total {total:.0f} s)")
    print_table(rows, title)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"sizes": asdict(sizes), "database": args.database, "total_seconds": total,
             "rows": [{**asdict(r), "ratio": r.ratio, "result": r.result} for r in rows]},
            indent=2))
    return 0  # a MISS is a result to read, not a failure of the run


if __name__ == "__main__":
    sys.exit(main())
