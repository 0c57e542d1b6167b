"""docs/walkthrough.md as a newcomer types it: every ``sh`` block runs, in order,
in a folder holding the embedded config.toml, against the real local mail system,
the real daemon with its HTTP API and the receiver the page writes.

A block whose first line is ``# keeps running`` is started in the background (a
terminal of its own) and waited for on its ports; every other block runs in
``bash -e`` and must succeed. The only change to the text: the fixed ports
(2525, 1143, 8080, 8090) become free ones, here and in config.toml, so that the
test never meets another program on the default ports."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import free_port

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "walkthrough.md"
DEFAULT_PORTS = ("2525", "1143", "8080", "8090")


def blocks(text: str) -> list[str]:
    return re.findall(r"^```sh\n(.*?)^```", text, flags=re.M | re.S)


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"exited with {proc.returncode}"
        with socket.socket() as s:
            s.settimeout(1)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise AssertionError(f"nothing listens on {port} after {timeout}s")


@pytest.fixture
def folder(tmp_path: Path) -> Iterator[tuple[Path, dict[str, int], dict[str, str]]]:
    ports = {default: free_port() for default in DEFAULT_PORTS}
    embedded = (ROOT / "config.toml").read_text(encoding="utf-8")
    assert "port = 2525" in embedded
    (tmp_path / "config.toml").write_text(
        embedded.replace("port = 2525", f"port = {ports['2525']}")
        + f"\n[mailserver]\nimap_port = {ports['1143']}\n",
        encoding="utf-8",
    )
    # `threadsync` and `python3` are this interpreter's, as in an activated venv.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "threadsync"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{ROOT / "cli.py"}" "$@"\n')
    shim.chmod(0o755)
    (bin_dir / "python3").symlink_to(sys.executable)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    env.pop("THREADSYNC_CONFIG", None)
    yield tmp_path, ports, env


def test_the_walkthrough_runs_as_written(
    folder: tuple[Path, dict[str, int], dict[str, str]],
) -> None:
    cwd, ports, env = folder
    text = PAGE.read_text(encoding="utf-8")
    for default, port in ports.items():
        text = re.sub(rf"\b{default}\b", str(port), text)
    steps = blocks(text)
    assert len(steps) >= 6
    background: list[subprocess.Popen[bytes]] = []
    outputs: list[str] = []
    try:
        for step in steps:
            if step.startswith("# keeps running"):
                proc = subprocess.Popen(
                    ["bash", "-c", step], cwd=cwd, env=env, start_new_session=True,
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )  # fmt: skip
                background.append(proc)
                waits = [int(p) for p in re.findall(r"\b\d{4,5}\b", step)] or [
                    ports["2525"], ports["1143"],
                ]  # fmt: skip
                for port in waits:
                    wait_for_port(port, proc)
                continue
            done = subprocess.run(
                ["bash", "-e", "-o", "pipefail", "-c", step], cwd=cwd, env=env,
                capture_output=True, text=True, timeout=240,
            )  # fmt: skip
            assert "Traceback" not in done.stderr, done.stderr
            assert done.returncode == 0, (step, done.stdout, done.stderr)
            outputs.append(done.stdout)
    finally:
        for proc in background:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in background:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
    # What the page promises happened: Carla got the offer and the CRM's reply,
    # her replies synced, and the receiver got the event of the last one.
    outside = json.loads(
        subprocess.run(
            ["threadsync", "--json", "mailserver", "--list-outside"], cwd=cwd, env=env,
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout
    )["messages"]  # fmt: skip
    assert [m["subject"] for m in outside] == ["Our offer", "Re: Our offer"]
    assert all(m["delivered_to"] == "carla@customer.example" for m in outside)
    assert "Carla <carla@customer.example>" in outside[0]["to"]
    events = [json.loads(line) for line in (cwd / "received.jsonl").read_text().splitlines()]
    synced = [e for e in events if e["event"] == "message.synced"]
    assert synced and synced[-1]["message"]["direction"] == "inbound"
    thread = json.loads(
        subprocess.run(
            ["threadsync", "--json", "thread", synced[-1]["thread_id"]], cwd=cwd, env=env,
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout
    )  # fmt: skip
    assert [m["direction"] for m in thread["messages"]] == [
        "outbound", "inbound", "outbound", "inbound",
    ]  # fmt: skip
    assert thread["messages"][-1]["text"].strip() == "One more question."
