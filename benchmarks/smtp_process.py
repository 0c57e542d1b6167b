"""The users' SMTP submission server, in a child process.

The test suite's :class:`tests.servers.smtp.SmtpServer` (aiosmtpd) runs in a
thread; inside the benchmark process that thread would compete for the GIL with
the client being measured, which slows both and flatters a thin client most. So
the benchmark runs it here, in its own interpreter: ``SmtpProcess.start()``
spawns ``python -m benchmarks.smtp_process``, which starts an ``SmtpServer``
(AUTH required, plaintext on loopback) on the requested port and reports the
port on stdout. ``stop()`` closes its stdin; the child then stops the server and
exits. A restart on the same port is how a benchmark makes the server
unreachable for a while.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


class SmtpProcess:
    """Parent side: start, count received messages, stop."""

    def __init__(self, users: dict[str, str], host: str = "127.0.0.1") -> None:
        self.users = dict(users)
        self.host = host
        self.port = 0
        self._process: subprocess.Popen[str] | None = None

    def start(self) -> SmtpProcess:
        if self._process is not None:
            return self
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
        process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.smtp_process", str(self.port), self.host],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO_ROOT,
            env=env,
        )
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(json.dumps(self.users) + "\n")
        process.stdin.flush()
        line = process.stdout.readline().split()
        if len(line) != 2 or line[0] != "READY":
            process.kill()
            process.wait()
            raise RuntimeError(f"SMTP server process did not start: {line!r}")
        self.port = int(line[1])
        self._process = process
        return self

    def received(self) -> int:
        """How many messages the server accepted since it (re)started."""
        process = self._process
        assert process is not None and process.stdin and process.stdout
        process.stdin.write("count\n")
        process.stdin.flush()
        return int(process.stdout.readline())

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        try:
            assert process.stdin is not None
            process.stdin.close()
            process.wait(timeout=15)
        except (OSError, subprocess.TimeoutExpired):
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


def _child(port: int, host: str) -> None:
    import logging

    # aiosmtpd logs a deprecation warning about its own attribute on every AUTH.
    logging.getLogger("mail.log").setLevel(logging.ERROR)
    from tests.servers.smtp import SmtpServer

    users = json.loads(sys.stdin.readline())
    server = SmtpServer(users=users, require_auth=True, host=host)
    server.port = port  # 0 picks a free one; a restart keeps the old one
    server.start()
    print("READY", server.port, flush=True)
    try:
        for line in sys.stdin:
            if line.strip() == "count":
                print(len(server.received), flush=True)
    finally:
        server.stop()


if __name__ == "__main__":
    _child(int(sys.argv[1]), sys.argv[2])
