"""The global options of the command line as people write them: ``--json``,
``--config`` and ``-v`` before or after the command name, for the kernel's
commands, their subcommands and the commands plugins add; option values that
merely look like global options stay values; ``--log-format json`` gives one
JSON object per line; ``-v`` shows no migration noise. Every command runs as a
real subprocess on the embedded configuration in a fresh folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.servers import free_port

ROOT = Path(__file__).resolve().parent.parent


def threadsync(
    *args: str, cwd: Path, expect: int = 0, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), *args], cwd=cwd, capture_output=True, text=True,
        timeout=60, env={**os.environ, **(env or {})},
    )  # fmt: skip
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == expect, (args, proc.returncode, proc.stdout, proc.stderr)
    return proc


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A folder with the embedded config.toml, as a newcomer's clone has."""
    embedded = (ROOT / "config.toml").read_text(encoding="utf-8")
    # The CRM's relay on a port where nothing listens: default-channel sends queue.
    (tmp_path / "config.toml").write_text(
        embedded.replace("port = 2525", f"port = {free_port()}"), encoding="utf-8"
    )
    return tmp_path


def test_global_options_after_the_command_name(home: Path) -> None:
    assert json.loads(threadsync("init", "--json", cwd=home).stdout)["database"] == "ready"
    assert json.loads(threadsync("labs", "status", "acme", "--json", cwd=home).stdout) == {
        "subaccount": "acme", "two_way_email_sync": False,
    }  # fmt: skip
    assert threadsync("status", "acme", "-v", cwd=home).stdout.strip() == "no connections"
    # Commands that plugins add, and their subcommands.
    outside = threadsync("mailserver", "--list-outside", "--json", cwd=home).stdout
    assert json.loads(outside) == {"messages": []}
    assert json.loads(threadsync("apikey", "list", "--json", cwd=home).stdout) == {"keys": []}
    # --config after the command, from another folder.
    elsewhere = home / "elsewhere"
    elsewhere.mkdir()
    cfg = str(home / "config.toml")
    labs = threadsync("labs", "enable", "acme", "--config", cfg, "--json", cwd=elsewhere)
    assert json.loads(labs.stdout)["two_way_email_sync"] is True
    labs = threadsync("labs", "status", "acme", f"--config={cfg}", cwd=elsewhere)
    assert labs.stdout.strip() == "acme: two_way_email_sync is on"
    # The old place still works.
    assert threadsync("--json", "labs", "status", "acme", cwd=home).stdout.startswith("{")


def test_values_that_look_like_global_options_stay_values(home: Path) -> None:
    threadsync("init", cwd=home)
    # Labs is off: the message is queued for the default channel, with its text.
    sent = json.loads(
        threadsync(
            "send", "acme", "u1", "--to", "carla@customer.example", "--subject", "-v",
            "--text", "--json", "--json", cwd=home,
        ).stdout
    )  # fmt: skip
    assert sent["channel"] == "default" and sent["synced"] is False
    thread = json.loads(threadsync("thread", sent["thread_id"], "--json", cwd=home).stdout)
    (message,) = thread["messages"]
    assert (message["subject"], message["text"].strip()) == ("-v", "--json")
    # After "--" nothing is an option.
    assert threadsync("status", "acme", "--", "-v", cwd=home).stdout.strip() == "no connections"


def test_log_format_json_and_no_migration_noise(home: Path) -> None:
    proc = threadsync("init", "-vv", cwd=home)
    assert "alembic" not in proc.stderr and "Context impl" not in proc.stderr
    proc = threadsync(
        "send", "acme", "u1", "--to", "carla@customer.example", "--subject", "Hi", "--text",
        "secret body", "-v", "--log-format", "json", cwd=home,
    )  # fmt: skip
    lines = [json.loads(line) for line in proc.stderr.splitlines()]
    assert lines and all({"time", "level", "logger", "message"} <= set(e) for e in lines)
    assert not any(entry["logger"].startswith("alembic") for entry in lines)
    # The relay is down: the failure is logged with the outbox entry as a field.
    assert any("outbox_id" in entry for entry in lines), lines
    assert "secret body" not in proc.stderr
