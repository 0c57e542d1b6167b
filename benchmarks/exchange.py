"""Exchange benchmark: EWS requests per synced and per unrelated message.

``python benchmarks/exchange.py [--replies 1000] [--unrelated 10000] [--json FILE]``

Starts the fake Exchange Server of the test suite (``tests/fakes``: EWS over
HTTPS on loopback, Basic credentials), connects one mailbox through the
``exchange`` provider, starts CRM threads, then puts thread replies (mostly from
the contact, into the Inbox; some written by the user in Outlook, into Sent
Items) among many unrelated messages in both folders, and runs one sync pass
(``run --once``). It prints what the server saw during that pass:

* EWS requests (SOAP calls), SyncFolderItems pages, GetItem requests;
* item bodies (``item:MimeContent``) returned for synced and for unrelated mail;
* requests per synced message and per unrelated message, the shared requests
  (SyncFolderItems pages, which carry only ids and threading fields) spread
  evenly over the messages they listed, the GetItem requests over synced ones.

Goals: no body for unrelated mail; at most 2 EWS requests per synced message on
average. Nothing here is asserted by the test suite. Standalone: it does not use
``benchmarks/run.py``.
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

from tests.fakes.ews import FakeEws  # noqa: E402
from tests.fakes.ews_autodiscover import EwsServerThread  # noqa: E402
from tests.fakes.server import Call, Reply  # noqa: E402
from tests.kernelfixtures import make_mail, make_settings, reply_to  # noqa: E402
from tests.servers.tlscerts import make_test_ca  # noqa: E402
from threadsync.core.api import Threadsync  # noqa: E402
from threadsync.core.outbox.compose import Draft  # noqa: E402

SUB, USER = "bench", "u1"
MAILBOX = "ann@contoso.test"
PASSWORD = "Bench-Pass-1"
CONTACTS = [f"contact{n}@example.org" for n in range(20)]


@dataclasses.dataclass
class Result:
    threads: int
    synced_expected: int
    unrelated: int
    synced_stored: int
    pass_seconds: float
    ews_requests: int
    sync_pages: int
    getitem_requests: int
    bodies_synced: int
    bodies_unrelated: int
    requests_per_synced: float
    requests_per_unrelated: float


def fill(ews: FakeEws, sent: list[dict[str, Any]], replies: int, unrelated: int,
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
            ews.file_in_sent(MAILBOX, raw)
        else:
            ews.deliver(MAILBOX, raw)
        if kind == "reply":
            members.add(mid)
    return members


async def bench(args: argparse.Namespace, workdir: Path) -> Result:
    ca = make_test_ca(workdir / "tls")

    async def idle(call: Call) -> Reply:
        return Reply.text(503, "starting")

    server = EwsServerThread(idle, ca).start()
    ews = FakeEws(server.base)
    server.app = ews.handle
    ews.store.add_user(MAILBOX, PASSWORD)
    ts: Threadsync | None = None
    try:
        settings = make_settings(workdir, f"sqlite:///{workdir / 'bench.db'}", 9)
        settings = dataclasses.replace(
            settings, sync=dataclasses.replace(settings.sync, batch_size=args.batch_size),
            sections={"exchange": {"timeout_seconds": 60}},
        )
        Threadsync.init(settings)
        ts = Threadsync.from_settings(settings, environ={"EXCHANGE_PW": PASSWORD})
        ts.labs(SUB, enabled=True)
        await ts.connect(SUB, USER, "exchange", email=MAILBOX, options={
            "ews_url": ews.url, "auth": "basic", "password_env": "EXCHANGE_PW",
            "ca_file": str(ca.ca_file)})
        sent = []
        for n in range(args.threads):
            contact = CONTACTS[n % len(CONTACTS)]
            result = await ts.send(SUB, USER, Draft(to=[contact], subject="Offer",
                                                    text=f"Offer {n}"))
            sent.append({**result, "to": contact})
        members = fill(ews, sent, args.replies, args.unrelated, args.sent_share, args.seed)
        member_refs = {i.id for folder in ("inbox", "sentitems")
                       for i in ews.items(MAILBOX, folder) if i.internet_message_id in members}
        before = len(ews.log)
        started = time.perf_counter()
        report = await ts.run_once()
        elapsed = time.perf_counter() - started
        log = ews.log[before:]
    finally:
        if ts is not None:
            await ts.aclose()
        server.stop()
    pages = [e for e in log if e.operation == "SyncFolderItems"]
    gets = [e for e in log if e.operation == "GetItem"]
    bodies = [b for e in log for b in e.bodies]
    synced = len(members)
    listed = synced + args.unrelated
    shared = len(log) - len(gets)
    return Result(
        threads=args.threads,
        synced_expected=synced,
        unrelated=args.unrelated,
        synced_stored=report.stored,
        pass_seconds=round(elapsed, 2),
        ews_requests=len(log),
        sync_pages=len(pages),
        getitem_requests=len(gets),
        bodies_synced=sum(b in member_refs for b in bodies),
        bodies_unrelated=sum(b not in member_refs for b in bodies),
        requests_per_synced=round(len(gets) / max(synced, 1) + shared / listed, 3),
        requests_per_unrelated=round(shared / listed, 3),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=50, help="CRM threads started")
    parser.add_argument("--replies", type=int, default=1000, help="replies in those threads")
    parser.add_argument("--unrelated", type=int, default=10000, help="unrelated messages")
    parser.add_argument("--sent-share", type=float, default=0.1,
                        help="share of messages written by the user (Sent Items)")
    parser.add_argument("--batch-size", type=int, default=250, help="[sync] batch_size")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="threadsync-exchange-bench-"))
    try:
        result = asyncio.run(bench(args, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    data = dataclasses.asdict(result)
    width = max(len(k) for k in data)
    for key, value in data.items():
        print(f"{key:<{width}}  {value}")
    ok = result.bodies_unrelated == 0 and result.requests_per_synced <= 2
    print(f"{'goal':<{width}}  {'met' if ok else 'NOT met'} "
          "(no body for unrelated mail; <= 2 EWS requests per synced message)")
    if args.json:
        args.json.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
