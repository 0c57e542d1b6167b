"""Hardening benchmark: ``python benchmarks/hardening.py [--sends 4]``.

Runs the real daemon (``cli.py run`` serving the HTTP API) in its own process and
the CRM's relay (aiosmtpd) in another, then makes ``--sends`` concurrent sends of
the largest message the defaults accept (a body of almost ``[http]
max_body_bytes``, one attachment that keeps the encoded message under ``[sync]
max_message_bytes``). A send answered ``503`` (the API's byte budget is taken)
is retried after its ``Retry-After``, as a client should. Printed: the daemon's
resident memory after start-up and its peak (``VmHWM``) through the sends, how
many sends were told to wait, and how long all of them took; the goal is a peak
under 300 MB. Nothing here is asserted anywhere.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import httpx  # noqa: E402

from benchmarks.http_api import RELAY_PASSWORD, RELAY_USER, free_port, write_config  # noqa: E402
from benchmarks.smtp_process import SmtpProcess  # noqa: E402
from threadsync.core.api import Threadsync  # noqa: E402
from threadsync.core.config import load  # noqa: E402
from threadsync.core.host import apikeys  # noqa: E402

SUB, USER = "bench", "u1"
GOAL_MB = 300


def memory_mb(pid: int, field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of a process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


async def largest_sends(url: str, key: str, sends: int, attachment_bytes: int) -> dict[str, float]:
    content = base64.b64encode(os.urandom(attachment_bytes)).decode()
    body = {
        "to": ["contact@example.org"],
        "subject": "The largest message",
        "text": "See the attachment.",
        "attachments": [
            {"filename": "big.bin", "content_type": "application/octet-stream",
             "content_base64": content},
        ],
    }  # fmt: skip
    waits = 0
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=300) as client:

        async def send() -> None:
            nonlocal waits
            while True:
                r = await client.post(f"/v1/subaccounts/{SUB}/users/{USER}/send", json=body)
                if r.status_code != 503:
                    assert r.status_code == 201, r.text
                    return
                waits += 1
                await asyncio.sleep(float(r.headers.get("retry-after", "1")))

        started = time.perf_counter()
        await asyncio.gather(*(send() for _ in range(sends)))
        return {"seconds": time.perf_counter() - started, "waits": waits}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sends", type=int, default=4)
    parser.add_argument(
        "--attachment-mb", type=float, default=18.0,
        help="decoded attachment size (18 MiB: about 24 MiB of JSON, 24.6 MiB encoded)",
    )  # fmt: skip
    parser.add_argument(
        "--inflight-mb", type=float, default=None,
        help="[http] max_inflight_body_bytes in MiB (default: the product's default)",
    )  # fmt: skip
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="threadsync-hardening-"))
    relay = SmtpProcess({RELAY_USER: RELAY_PASSWORD}).start()
    listen = f"127.0.0.1:{free_port()}"
    cfg = write_config(home, f"sqlite:///{home / 'threadsync.db'}", relay.port, listen)
    if args.inflight_mb is not None:
        text = cfg.read_text(encoding="utf-8").replace(
            "[http]\n", f"[http]\nmax_inflight_body_bytes = {int(args.inflight_mb * 2**20)}\n"
        )
        cfg.write_text(text, encoding="utf-8")
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
        idle = memory_mb(daemon.pid, "VmRSS")
        size = int(args.attachment_mb * 1024 * 1024)
        result = asyncio.run(largest_sends(url, key, args.sends, size))
        peak = memory_mb(daemon.pid, "VmHWM")
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=30)
        relay.stop()
        ts.close()
    print(f"threadsync hardening, {os.cpu_count()} cores: {args.sends} concurrent sends of "
          f"{args.attachment_mb:g} MiB attachments through the HTTP API")  # fmt: skip
    print(f"daemon RSS after start-up  {idle:8.0f} MB")
    print(f"daemon peak RSS (VmHWM)    {peak:8.0f} MB   (goal < {GOAL_MB} MB: "
          f"{peak / GOAL_MB:.2f} of it)")  # fmt: skip
    print(f"sends told to wait (503)   {result['waits']:8.0f}")
    print(f"all sends done in          {result['seconds']:8.1f} s")
    print(f"(daemon log: {home / 'daemon.log'})")


if __name__ == "__main__":
    main()
