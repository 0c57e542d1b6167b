"""Outlook benchmark: Graph requests per synced and per unrelated message.

``python benchmarks/outlook.py [--replies 1000] [--unrelated 10000] [--throttle 0.05]
[--json FILE]``

Starts the fake Microsoft cloud of the test suite (``tests/fakes``: identity
platform and Graph over HTTPS on loopback), connects one mailbox through the
real sign-in flow, starts CRM threads, then puts thread replies (mostly from the
contact, into the Inbox; some written by the user in Outlook, into Sent Items)
among many unrelated messages in both folders, and runs one sync pass
(``run --once``). It prints what Graph saw during that pass:

* HTTP requests (a ``$batch`` is one) and Graph requests (each ``$batch`` item
  counts, as it does against the throttling budget of 10,000 per 10 minutes);
* body (``$value``) requests for synced and for unrelated messages;
* requests per synced message and per unrelated message, the shared requests
  (delta pages, header batches) spread evenly over the messages they listed;
* the wall time of the pass, and the replies lost (expected but not stored).

It runs twice, printed side by side: once unthrottled, once against a
throttling Graph that refuses a share (``--throttle``) of all requests, batch
items included, with 429 and a short ``Retry-After``, on top of the 4-at-once
limit the fake always enforces (batch items count). The fake answers are what
the provider must ride out without losing a delta page.

Goals: no body request for unrelated mail; at most 2 requests per synced message
on average; 0 lost, throttled or not. Nothing here is asserted by the test
suite. Standalone: it does not use ``benchmarks/run.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from sqlalchemy import select  # noqa: E402

from tests.fakes import FakeMicrosoft  # noqa: E402
from tests.kernelfixtures import make_mail, make_settings, reply_to  # noqa: E402
from tests.servers.tlscerts import make_test_ca  # noqa: E402
from threadsync.core.api import Threadsync  # noqa: E402
from threadsync.core.outbox.compose import Draft  # noqa: E402
from threadsync.core.store.models import Message  # noqa: E402

SUB, USER = "bench", "u1"
MAILBOX = "ann@contoso.test"
CONTACTS = [f"contact{n}@example.org" for n in range(20)]


@dataclasses.dataclass
class Result:
    threads: int
    synced_expected: int
    unrelated: int
    synced_stored: int
    lost: int
    pass_seconds: float
    http_requests: int
    graph_requests: int
    delta_pages: int
    batch_http: int
    batch_items: int
    bodies_synced: int
    bodies_unrelated: int
    http_per_synced: float
    http_per_unrelated: float
    graph_per_synced: float
    graph_per_unrelated: float
    throttled_answers: int


def fill(ms: FakeMicrosoft, sent: list[dict[str, Any]], replies: int, unrelated: int,
         sent_share: float, seed: int) -> set[str]:
    """Replies to the CRM threads among unrelated mail; returns the replies' ids."""
    rng = random.Random(seed)
    kinds = ["reply"] * replies + ["other"] * unrelated
    rng.shuffle(kinds)
    members: set[str] = set()
    for n, kind in enumerate(kinds):
        own = rng.random() < sent_share
        if kind == "reply":
            parent = rng.choice(sent)
            contact = parent["to"]
            headers = reply_to(parent["message_id"])
            subject = "Re: Offer"
        else:
            contact = rng.choice(CONTACTS)
            headers, subject = {}, f"Unrelated {n}"
            if rng.random() < 0.3:  # personal threads: replies to personal mail
                headers = reply_to(f"<personal-{n}@mail.example.org>")
        sender, to = (MAILBOX, contact) if own else (contact, MAILBOX)
        raw, mid = make_mail(sender=sender, to=to, subject=subject,
                             body=f"message {n}\n" * 20, headers=headers)
        if own:
            ms.file_in_sent(MAILBOX, raw)
        else:
            ms.deliver(MAILBOX, raw)
        if kind == "reply":
            members.add(mid)
    return members


async def bench(args: argparse.Namespace, workdir: Path, throttle: float) -> Result:
    ms = FakeMicrosoft(make_test_ca(workdir / "tls"))
    ts: Threadsync | None = None
    try:
        ms.add_user(MAILBOX)
        settings = make_settings(workdir, f"sqlite:///{workdir / 'bench.db'}", 9)
        outlook = ms.outlook_settings(page_size=args.page_size)
        settings = dataclasses.replace(
            settings, sync=dataclasses.replace(settings.sync, batch_size=args.batch_size),
            sections={"outlook": outlook},
        )
        Threadsync.init(settings)
        ts = Threadsync.from_settings(settings, environ=ms.environ())
        ts.labs(SUB, enabled=True)
        await ts.connect(SUB, USER, "outlook", email=MAILBOX, options={}, notify=ms.browser())
        await ms.settle()
        sent = []
        for n in range(args.threads):
            contact = CONTACTS[n % len(CONTACTS)]
            result = await ts.send(SUB, USER, Draft(to=[contact], subject="Offer",
                                                    text=f"Offer {n}"))
            sent.append({**result, "to": contact})
        members = fill(ms, sent, args.replies, args.unrelated, args.sent_share, args.seed)
        member_refs = {m.id for folder in ("inbox", "sentitems")
                       for m in ms.messages(MAILBOX, folder)
                       if m.internet_message_id in members}
        before = len(ms.requests())
        if throttle:
            chance = random.Random(args.seed + 1)
            ms.graph.throttle(10**9, retry_after=0.05,
                              when=lambda call: chance.random() < throttle)
        started = time.perf_counter()
        report = await ts.run_once()
        elapsed = time.perf_counter() - started
        log = ms.requests()[before:]
        stored = ts.kernel.store.call(lambda session: {
            m for m in session.scalars(select(Message.message_id))})
    finally:
        if ts is not None:
            await ts.aclose()
        ms.close()
    http = [e for e in log if not e.in_batch]
    items = [e for e in log if e.in_batch]
    delta = [e for e in http if e.path.endswith("/delta")]
    batches = [e for e in http if e.path == "/$batch"]
    bodies = [e.body_of for e in log if e.body_of]
    synced = len(members)
    listed = synced + args.unrelated
    shared_http = len(http) - len(bodies)
    shared_graph = shared_http - len(batches) + len(items)
    return Result(
        threads=args.threads,
        synced_expected=synced,
        unrelated=args.unrelated,
        synced_stored=report.stored,
        lost=len(members - stored),
        pass_seconds=round(elapsed, 2),
        http_requests=len(http),
        graph_requests=len(http) - len(batches) + len(items),
        delta_pages=len(delta),
        batch_http=len(batches),
        batch_items=len(items),
        bodies_synced=sum(b in member_refs for b in bodies),
        bodies_unrelated=sum(b not in member_refs for b in bodies),
        http_per_synced=round(1 + shared_http / listed, 3),
        http_per_unrelated=round(shared_http / listed, 3),
        graph_per_synced=round(1 + shared_graph / listed, 3),
        graph_per_unrelated=round(shared_graph / listed, 3),
        throttled_answers=sum(e.status == 429 for e in log),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=50, help="CRM threads started")
    parser.add_argument("--replies", type=int, default=1000, help="replies in those threads")
    parser.add_argument("--unrelated", type=int, default=10000, help="unrelated messages")
    parser.add_argument("--sent-share", type=float, default=0.1,
                        help="share of messages written by the user (Sent Items)")
    parser.add_argument("--page-size", type=int, default=100, help="[outlook] page_size")
    parser.add_argument("--batch-size", type=int, default=250, help="[sync] batch_size")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--throttle", type=float, default=0.05,
                        help="share of requests the throttled run refuses with 429")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    results = {}
    for name, share in (("unthrottled", 0.0), ("throttled", args.throttle)):
        workdir = Path(tempfile.mkdtemp(prefix="threadsync-outlook-bench-"))
        try:
            results[name] = dataclasses.asdict(asyncio.run(bench(args, workdir, share)))
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    width = max(len(k) for k in results["unthrottled"])
    print(f"{'':<{width}}  {'unthrottled':>12}  {'throttled':>12}")
    for key in results["unthrottled"]:
        print(f"{key:<{width}}  {results['unthrottled'][key]!s:>12}  "
              f"{results['throttled'][key]!s:>12}")
    ok = all(r["bodies_unrelated"] == 0 and r["http_per_synced"] <= 2
             and r["graph_per_synced"] <= 2 and r["lost"] == 0 for r in results.values())
    print(f"{'goal':<{width}}  {'met' if ok else 'NOT met'} (no body request for unrelated "
          "mail; <= 2 requests per synced message; 0 lost; throttled or not)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
