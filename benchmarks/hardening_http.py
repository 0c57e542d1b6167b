"""Hardening benchmark for webhooks and the API front door, at full size:
``python benchmarks/hardening_http.py [--database postgresql] [--quick]``.

Runs the real daemon (``cli.py run --listen``: the API and the webhook
dispatcher) in its own process, misbehaving webhook receivers as real loopback
servers (:mod:`tests.servers.webhook_peers`) and the clients here, then prints:

1. **Fair webhooks**: one tenant's 16 endpoints answer one byte every 5 s, with
   64 events each queued first; the delay until another tenant's webhook
   arrives (goal < 2 s).
2. **A huge answer**: a receiver answers 200 with a 400 MB body; the daemon's
   peak RSS (``VmHWM``) through the delivery (goal < 300 MB).
3. **Half-open connections**: 300 connections to the API that never send a
   request: how many the daemon still holds after 1 s and after the header
   timeout (goal: none after the timeout).
4. **Guessed keys**: 500 requests with unknown API keys from one address: how
   many were answered 401 (each a key lookup) and how many 429 (refused before
   any lookup).

Nothing here is asserted anywhere; read the numbers.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402

from tests.daemonproc import free_port, start, terminate, wait_ready  # noqa: E402
from tests.servers.webhook_peers import Peer  # noqa: E402
from threadsync.core.api import Threadsync  # noqa: E402
from threadsync.core.config import load  # noqa: E402
from threadsync.core.host import apikeys  # noqa: E402
from threadsync.core.store.models import Event  # noqa: E402

POSTGRES = os.environ.get(
    "THREADSYNC_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
HEADER_TIMEOUT = 10.0


def write_config(home: Path, database_url: str, listen: str) -> Path:
    path = home / "config.toml"
    path.write_text(
        f"""[database]
url = "{database_url}"
[security]
secret_key_file = "secret.key"
[outbound.default]
host = "127.0.0.1"
port = {free_port()}
security = "none"
from_address = "crm@bench.test"
[http]
listen = "{listen}"
rate_per_second = 1000000
burst = 1000000
header_timeout_seconds = {HEADER_TIMEOUT}
[webhooks]
allowed_networks = ["127.0.0.0/8"]  # the receivers run on loopback
poll_seconds = 0.2
settle_seconds = 1
""",
        encoding="utf-8",
    )
    return path


def rss_mb(pid: int) -> dict[str, float]:
    """The process's resident set now (VmRSS) and at its peak (VmHWM), in MB."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            found[name] = int(value.split()[0]) / 1024
    return found


class Innocent:
    """A well-behaved receiver that notes when each post arrived."""

    def __init__(self) -> None:
        self.arrived: list[float] = []
        arrived = self.arrived

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                arrived.append(time.monotonic())
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def add_events(ts: Threadsync, subaccount: str, threads: list[str]) -> None:
    def work(session: Any) -> None:
        session.add_all(
            Event(subaccount_id=subaccount, type="thread.stopped",
                  payload={"event": "thread.stopped", "subaccount": subaccount, "thread_id": t})
            for t in threads
        )  # fmt: skip

    ts.kernel.store.call(work)


def subscribe(api: httpx.Client, key: str, subaccount: str, url: str) -> int:
    r = api.post(
        f"/v1/subaccounts/{subaccount}/webhooks", json={"url": url},
        headers={"Authorization": f"Bearer {key}"},
    )  # fmt: skip
    r.raise_for_status()
    return int(r.json()["id"])


def fair_webhooks(api: httpx.Client, ts: Threadsync, endpoints: int, events: int) -> float:
    slow_key = apikeys.create(ts.kernel.store, "slow")["key"]
    calm_key = apikeys.create(ts.kernel.store, "calm")["key"]
    peers = [Peer("drip-headers", every=5.0).start() for _ in range(endpoints)]
    innocent = Innocent()
    try:
        ids = [subscribe(api, slow_key, "slow", p.url()) for p in peers]
        subscribe(api, calm_key, "calm", innocent.url)
        add_events(ts, "slow", [f"slow-{n}" for n in range(events)])
        time.sleep(3)  # the dispatcher has taken what it will of the slow tenant's
        sent = time.monotonic()
        add_events(ts, "calm", ["calm-1"])
        deadline = sent + 120
        while not innocent.arrived and time.monotonic() < deadline:
            time.sleep(0.02)
        delay = innocent.arrived[0] - sent if innocent.arrived else float("inf")
        hanging = sum(p.requests - p.finished for p in peers)
        print(f"   slow attempts hanging meanwhile: {hanging}", file=sys.stderr)
        for endpoint in ids:  # what is still pending for them goes dead
            api.delete(f"/v1/subaccounts/slow/webhooks/{endpoint}",
                       headers={"Authorization": f"Bearer {slow_key}"})  # fmt: skip
        return delay
    finally:
        for p in peers:
            p.stop()
        innocent.stop()


def huge_answer(api: httpx.Client, ts: Threadsync, pid: int, size: int) -> dict[str, float]:
    key = apikeys.create(ts.kernel.store, "big")["key"]
    peer = Peer("big", size=size).start()
    try:
        subscribe(api, key, "big", peer.url())
        before = rss_mb(pid)
        add_events(ts, "big", ["big-1"])
        deadline = time.monotonic() + 120
        status = "pending"
        while time.monotonic() < deadline:
            got = api.get("/v1/subaccounts/big/webhook-deliveries",
                          headers={"Authorization": f"Bearer {key}"}).json()  # fmt: skip
            if got["deliveries"] and got["deliveries"][0]["status"] != "pending":
                status = got["deliveries"][0]["status"]
                break
            time.sleep(0.2)
        after = rss_mb(pid)
        return {
            "rss_before_mb": before["VmRSS"],
            "peak_rss_mb": after["VmHWM"],
            "answer_bytes_sent_mb": sum(peer.sent) / 1e6,
            "delivered": float(status == "delivered"),
        }
    finally:
        peer.stop()


def still_open(socks: list[socket.socket]) -> int:
    """How many of ``socks`` the server still holds (neither closed nor refused 503)."""
    held = 0
    for s in socks:
        s.setblocking(False)
        try:
            data = s.recv(4096)
        except BlockingIOError:
            held += 1
        except OSError:
            pass
        else:
            held += data != b"" and not data.startswith(b"HTTP/1.1 503")
    return held


def half_open(host: str, port: int, count: int) -> dict[str, int]:
    socks = []
    for _ in range(count):
        try:
            socks.append(socket.create_connection((host, port), timeout=5))
        except OSError:
            break
    try:
        time.sleep(1)
        after_1s = still_open(socks)
        time.sleep(HEADER_TIMEOUT + 2)
        after_timeout = still_open(socks)
    finally:
        for s in socks:
            s.close()
    return {"opened": len(socks), "held_after_1s": after_1s, "held_after_timeout": after_timeout}


def guessed_keys(url: str, count: int) -> tuple[Counter[int], float]:
    codes: Counter[int] = Counter()
    started = time.perf_counter()
    with httpx.Client(base_url=url, timeout=10) as c:
        for n in range(count):
            try:
                r = c.get("/v1/subaccounts/calm/connections",
                          headers={"Authorization": f"Bearer tsk_guess_{n}"})  # fmt: skip
            except httpx.HTTPError:
                codes[0] += 1  # no answer in time
                if codes[0] >= 3:
                    break
                continue
            codes[r.status_code] += 1
    return codes, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a smoke check)")
    args = parser.parse_args()
    endpoints, events = (4, 8) if args.quick else (16, 64)
    size = (40 if args.quick else 400) * 1024 * 1024
    connections, guesses = (50, 100) if args.quick else (300, 500)

    home = Path(tempfile.mkdtemp(prefix="ts-hardening-"))
    schema = None
    if args.database == "postgresql":
        schema = f"bench_{os.getpid()}"
        engine = create_engine(POSTGRES, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(text(f"CREATE SCHEMA {schema}"))
        database_url = f"{POSTGRES}?options=-csearch_path%3D{schema}"
    else:
        database_url = f"sqlite:///{home / 'threadsync.db'}"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cfg = write_config(home, database_url, f"127.0.0.1:{port}")
    Threadsync.init(load(cfg))
    ts = Threadsync.from_config(cfg)
    proc = start(cfg, f"127.0.0.1:{port}", {})
    try:
        wait_ready(url, proc)
        with httpx.Client(base_url=url, timeout=30) as api:
            print(f"1. fair webhooks ({endpoints} dripping endpoints)", file=sys.stderr)
            delay = fair_webhooks(api, ts, endpoints, events)
            print(f"   innocent tenant's delay: {delay:.2f} s", file=sys.stderr)
            print(f"2. a {size // 2**20} MB webhook answer", file=sys.stderr)
            big = huge_answer(api, ts, proc.pid, size)
            print(f"   peak RSS: {big['peak_rss_mb']:.0f} MB", file=sys.stderr)
        print(f"3. {connections} half-open connections", file=sys.stderr)
        held = half_open("127.0.0.1", port, connections)
        print(f"   {held}", file=sys.stderr)
        print(f"4. {guesses} requests with unknown keys", file=sys.stderr)
        codes, seconds = guessed_keys(url, guesses)
    finally:
        err = terminate(proc)
        ts.close()
        if schema is not None:
            with create_engine(POSTGRES, isolation_level="AUTOCOMMIT").connect() as conn:
                conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
    if b"Traceback" in err:
        print(err.decode(errors="replace")[-3000:], file=sys.stderr)

    print(f"\nhardening benchmark ({args.database}{', quick' if args.quick else ''})")
    print(f"1  innocent tenant's webhook delay while {endpoints} endpoints drip: "
          f"{delay:.2f} s (goal < 2 s)")  # fmt: skip
    print(f"2  daemon RSS {big['rss_before_mb']:.0f} MB before, peak {big['peak_rss_mb']:.0f} MB "
          f"through a {size // 2**20} MB answer (goal < 300 MB); "
          f"{big['answer_bytes_sent_mb']:.1f} MB of it sent before the hang-up; "
          f"delivered: {bool(big['delivered'])}")  # fmt: skip
    print(f"3  half-open connections: {held['opened']} opened, {held['held_after_1s']} held "
          f"after 1 s, {held['held_after_timeout']} held after the {HEADER_TIMEOUT:g} s header "
          f"timeout (goal 0)")  # fmt: skip
    print(f"4  {guesses} unknown-key requests in {seconds:.1f} s: {codes.get(401, 0)} "
          f"answered 401 (a key lookup each), {codes.get(429, 0)} refused 429 before any "
          f"lookup, {codes.get(0, 0)} unanswered within 10 s")  # fmt: skip


if __name__ == "__main__":
    main()
