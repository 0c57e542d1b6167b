"""HTTP API and webhook benchmark: ``python benchmarks/http_api.py [--database postgresql]``.

Runs the real daemon (``cli.py run``, serving the API with uvicorn beside the
sync loop) in its own process, the CRM's relay (aiosmtpd) in another, and the
load generator (httpx, ``--concurrency`` requests in flight) here, then prints:

1. ``POST /v1/subaccounts/{s}/users/{u}/send``: requests per second, each a CRM
   message stored with its outbox entry and delivered to aiosmtpd before the
   answer (the default channel: this sub-account has no mailbox connected);
2. ``GET /v1/threads/{id}`` of a five-message thread: requests per second;
   each beside its *floor*, the same call through the Python API in this process
   (no HTTP), so the API's own cost shows;
3. webhook delivery: ``--events`` events written to the event log at once,
   spread over 200 threads, until a loopback receiver has them all: events per
   second, end to end (enqueue, claim, sign, post, record).

Latencies are p50/p95 in milliseconds. Nothing here is asserted anywhere.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import httpx  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402

from benchmarks.smtp_process import SmtpProcess  # noqa: E402
from threadsync.core.api import Threadsync  # noqa: E402
from threadsync.core.config import load  # noqa: E402
from threadsync.core.host import apikeys  # noqa: E402
from threadsync.core.outbox.compose import Draft  # noqa: E402
from threadsync.core.store.models import Event  # noqa: E402

SUB, USER = "bench", "u1"
RELAY_USER, RELAY_PASSWORD = "relay@bench.test", "relay-password"
POSTGRES = os.environ.get(
    "THREADSYNC_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(home: Path, database_url: str, relay_port: int, listen: str) -> Path:
    path = home / "config.toml"
    path.write_text(
        f"""[database]
url = "{database_url}"
[security]
secret_key_file = "secret.key"
[outbound.default]
host = "127.0.0.1"
port = {relay_port}
security = "none"
from_address = "{RELAY_USER}"
username = "{RELAY_USER}"
password_env = "BENCH_RELAY_PASSWORD"
[http]
listen = "{listen}"
rate_per_second = 1000000
burst = 1000000
[webhooks]
allowed_networks = ["127.0.0.0/8"]  # the receiver runs on loopback
poll_seconds = 0.2
concurrency = 32
batch_size = 400
""",
        encoding="utf-8",
    )
    return path


async def hammer(
    client: httpx.AsyncClient, seconds: float, concurrency: int, request: Any
) -> dict[str, float]:
    """``concurrency`` loops calling ``request(client)`` for ``seconds``."""
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def loop() -> None:
        nonlocal errors
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            response = await request(client)
            if response.status_code >= 300:
                errors += 1
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    ordered = sorted(latencies)
    return {
        "requests": len(latencies),
        "errors": errors,
        "per_second": len(latencies) / elapsed,
        "p50_ms": statistics.median(ordered) * 1000,
        "p95_ms": ordered[int(len(ordered) * 0.95) - 1] * 1000,
    }


async def floor(args: argparse.Namespace, call: Any) -> dict[str, float]:
    """``call()`` from ``concurrency`` loops for ``seconds``, timed like :func:`hammer`."""

    class Ok:
        status_code = 200

    async def request(_client: Any) -> Any:
        await call()
        return Ok()

    return await hammer(None, args.seconds, args.concurrency, request)  # type: ignore[arg-type]


class Receiver:
    """A minimal keep-alive HTTP/1.1 receiver on loopback that counts posts."""

    def __init__(self) -> None:
        self.count = 0
        self.done = asyncio.Event()
        self.expected = 0
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/hook"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                await reader.readexactly(length)
                self.count += 1
                if self.count >= self.expected:
                    self.done.set()
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.writers.discard(writer)
            writer.close()

    async def close(self) -> None:
        for writer in list(self.writers):
            writer.close()
        await asyncio.sleep(0.1)
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def measure(args: argparse.Namespace, url: str, ts: Threadsync, key: str) -> dict[str, Any]:
    results: dict[str, Any] = {}
    headers = {"Authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=args.concurrency)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=60) as c:
        send_url = f"/v1/subaccounts/{SUB}/users/{USER}/send"
        body = {"to": ["contact@example.org"], "subject": "Offer", "text": "Hello " * 50}
        first = (await c.post(send_url, json=body)).json()
        thread_url = f"/v1/threads/{first['thread_id']}"
        for n in range(4):
            await c.post(f"{thread_url}/reply", json={"text": f"reply {n}"})

        async def send(client: httpx.AsyncClient) -> httpx.Response:
            return await client.post(send_url, json=body)

        async def read(client: httpx.AsyncClient) -> httpx.Response:
            return await client.get(thread_url)

        await hammer(c, 1.0, args.concurrency, read)  # warm up
        print("measuring send", file=sys.stderr)
        results["POST send"] = await hammer(c, args.seconds, args.concurrency, send)
        print("measuring thread", file=sys.stderr)
        results["GET thread"] = await hammer(c, args.seconds, args.concurrency, read)

        # The floor: the same work through the Python API in this process, no HTTP.
        draft = Draft(to=body["to"], subject=body["subject"], text=body["text"])
        results["floor send"] = await floor(args, lambda: ts.send(SUB, USER, draft))
        thread_id = first["thread_id"]
        results["floor thread"] = await floor(args, lambda: asyncio.to_thread(ts.thread, thread_id))

        print("measuring webhooks", file=sys.stderr)
        receiver = Receiver()
        hook = await receiver.start()
        made = await c.post(f"/v1/subaccounts/{SUB}/webhooks", json={"url": hook})
        assert made.status_code == 201, made.text
        receiver.expected = args.events

        def write_events() -> None:
            def work(session: Any) -> None:
                session.add_all(
                    Event(
                        subaccount_id=SUB,
                        type="thread.stopped",
                        payload={
                            "event": "thread.stopped",
                            "subaccount": SUB,
                            "user": USER,
                            "thread_id": f"th_bench{i % 200}",
                            "reason": "disconnected",
                        },
                    )
                    for i in range(args.events)
                )

            ts.kernel.store.call(work)

        started = time.perf_counter()
        await asyncio.to_thread(write_events)
        await asyncio.wait_for(receiver.done.wait(), 600)
        elapsed = time.perf_counter() - started
        await receiver.close()
        results["webhooks"] = {"events": args.events, "per_second": args.events / elapsed}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="threadsync-http-bench-"))
    schema = "bench_" + secrets.token_hex(4)
    if args.database == "sqlite":
        database_url = f"sqlite:///{home / 'threadsync.db'}"
    else:
        admin = create_engine(POSTGRES)
        with admin.begin() as conn:
            conn.execute(text(f"CREATE SCHEMA {schema}"))
        database_url = f"{POSTGRES}?options=-csearch_path%3D{schema}"
    relay = SmtpProcess({RELAY_USER: RELAY_PASSWORD}).start()
    listen = f"127.0.0.1:{free_port()}"
    cfg = write_config(home, database_url, relay.port, listen)
    env = {**os.environ, "BENCH_RELAY_PASSWORD": RELAY_PASSWORD}
    settings = load(cfg)
    Threadsync.init(settings)
    ts = Threadsync.from_settings(settings, environ=env)
    ts.labs(SUB, enabled=True)
    key = apikeys.create(ts.kernel.store, SUB)["key"]
    daemon = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "cli.py"), "--config", str(cfg), "run"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=(home / "daemon.log").open("wb"),
    )
    try:
        url = f"http://{listen}"
        for _ in range(300):
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        results = asyncio.run(measure(args, url, ts, key))
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=30)
        print(f"(daemon log: {home / 'daemon.log'})", file=sys.stderr)
        relay.stop()
        ts.close()
        if args.database == "postgresql":
            with admin.begin() as conn:
                conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
            admin.dispose()

    print(f"threadsync HTTP API on {args.database}, {os.cpu_count()} cores, "
          f"{args.concurrency} requests in flight, {args.seconds:.0f} s each")  # fmt: skip
    print(f"{'measurement':<14} {'req/s':>9} {'p50 ms':>8} {'p95 ms':>8} {'requests':>9}")
    for name in ("POST send", "floor send", "GET thread", "floor thread"):
        r = results[name]
        errors = f"  ({r['errors']} errors)" if r["errors"] else ""
        print(f"{name:<14} {r['per_second']:>9.0f} {r['p50_ms']:>8.1f} {r['p95_ms']:>8.1f} "
              f"{r['requests']:>9d}{errors}")  # fmt: skip
    w = results["webhooks"]
    print(f"{'webhooks':<14} {w['per_second']:>9.0f} events/s delivered end to end "
          f"({w['events']} events, 200 threads)")  # fmt: skip
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(results, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
