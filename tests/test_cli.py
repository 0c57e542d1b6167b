"""The command line as a person and a program use it: a real subprocess per
command against real servers, the documented JSON shapes, and errors that are a
clear line on stderr with a non-zero status, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.kernelfixtures import CONTACT, World, write_config

ROOT = Path(__file__).resolve().parent.parent


class Cli:
    def __init__(self, config: Path, env: dict[str, str]) -> None:
        self.config = config
        self.env = {**os.environ, **env}

    def run(self, *args: str, expect: int = 0) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, str(ROOT / "cli.py"), "--config", str(self.config), *args],
            cwd=self.config.parent,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert "Traceback" not in proc.stderr, proc.stderr
        assert proc.returncode == expect, (proc.returncode, proc.stdout, proc.stderr)
        return proc

    def json(self, *args: str, expect: int = 0) -> Any:
        return json.loads(self.run("--json", *args, expect=expect).stdout)


@pytest.fixture
def cli(world: World, tmp_path: Path) -> Cli:
    cfg = write_config(world, tmp_path / "config.toml", poll_interval_seconds=1)
    return Cli(cfg, {"MAILPW": world.password})


def connect_args(world: World, command: str = "connect") -> list[str]:
    o = world.options()
    return [
        command, "acme", "u1", "--provider", "imap_smtp", "--email", world.email,
        "--imap-host", o["imap_host"], "--imap-port", str(o["imap_port"]),
        "--smtp-host", o["smtp_host"], "--smtp-port", str(o["smtp_port"]),
        "--security", "none", "--password-env", "MAILPW",
    ]  # fmt: skip


def test_cli_whole_story_with_json_shapes(world: World, cli: Cli) -> None:
    assert cli.json("init")["database"] == "ready"
    assert cli.json("labs", "status", "acme") == {"subaccount": "acme", "two_way_email_sync": True}
    connected = cli.json(*connect_args(world))
    assert connected["state"] == "connected" and connected["email"] == world.email

    sent = cli.json(
        "send", "acme", "u1", "--to", CONTACT, "--subject", "Offer", "--text", "Our offer"
    )
    assert set(sent) >= {"thread_id", "message_id", "channel", "synced", "reason", "status"}
    assert (sent["channel"], sent["synced"], sent["status"], sent["reason"]) == (
        "mailbox", True, "sent", None,
    )  # fmt: skip
    world.contact_replies(sent)
    once = cli.json("run", "--once")
    assert once["stored"] == 1 and once["errors"] == []

    body = cli.config.parent / "reply.txt"
    body.write_text("Reply from the CRM\n", encoding="utf-8")
    replied = cli.json("reply", sent["thread_id"], "--text-file", str(body))
    assert replied["channel"] == "mailbox" and replied["status"] == "sent"

    threads = cli.json("threads", "acme", "u1")["threads"]
    assert len(threads) == 1
    assert set(threads[0]) >= {
        "thread_id", "subaccount", "user", "email", "state", "stop_reason", "subject",
        "message_count",
    }  # fmt: skip
    assert threads[0]["message_count"] == 3 and threads[0]["state"] == "active"

    thread = cli.json("thread", sent["thread_id"])
    assert [m["direction"] for m in thread["messages"]] == ["outbound", "inbound", "outbound"]
    keys = {"message_id", "direction", "origin", "from", "to", "cc", "subject", "date", "state",
            "reason", "text", "html", "attachments"}  # fmt: skip
    assert all(set(m) >= keys for m in thread["messages"])

    status = cli.json("status", "acme")["connections"][0]
    assert set(status) >= {"subaccount", "user", "provider", "email", "state", "paused", "since",
                           "last_error", "last_sync_at"}  # fmt: skip
    assert status["last_sync_at"] is not None and status["paused"] is False

    text = cli.run("thread", sent["thread_id"]).stdout
    assert "Offer" in text and CONTACT in text
    assert cli.json("disconnect", "acme", "u1")["state"] == "disconnected"
    assert cli.json("thread", sent["thread_id"])["stop_reason"] == "disconnected"
    assert "imap_smtp" in cli.run("plugins").stdout


def test_cli_errors_are_one_clear_line(world: World, cli: Cli, tmp_path: Path) -> None:
    cli.run("init")
    err = cli.run("thread", "th_nope", expect=3).stderr
    assert err.strip() == "error: thread 'th_nope' not found"
    assert (
        json.loads(cli.run("--json", "thread", "th_nope", expect=3).stderr)["error"]["code"]
        == "not_found"
    )
    cli.run("labs", "disable", "acme")
    assert "Labs" in cli.run(*connect_args(world), expect=4).stderr
    cli.run("labs", "enable", "acme")
    # A password that does not work is refused, and the secret is never shown.
    cli.env["MAILPW"] = "not-the-password"
    err = cli.run(*connect_args(world), expect=5).stderr
    assert "not-the-password" not in err and err.startswith("error:")
    # Plaintext towards a non-loopback host is refused before any network call.
    args = connect_args(world)
    args[args.index("--imap-host") + 1] = "mail.example.com"
    assert "loopback" in cli.run(*args, expect=2).stderr
    # Bad arguments, missing files, CR/LF in a header.
    cli.run("send", "acme", "u1", "--subject", "x", "--text", "y", expect=2)
    missing = cli.run(
        "send",
        "acme",
        "u1",
        "--to",
        CONTACT,
        "--subject",
        "x",
        "--text-file",
        "/nonexistent",
        expect=2,
    ).stderr
    assert "nonexistent" in missing
    cli.run("send", "acme", "u1", "--to", "x@y.test", "--subject", "a\nb", "--text", "y", expect=2)
    # A broken or missing config file.
    bad = tmp_path / "bad.toml"
    bad.write_text("[database\nurl=", encoding="utf-8")
    out = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), "--config", str(bad), "status", "acme"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2 and "not valid TOML" in out.stderr and "Traceback" not in out.stderr
    out = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), "--config", str(tmp_path / "none.toml"), "init"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2 and "not found" in out.stderr


def test_cli_uninitialised_database_says_run_init(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text('[database]\nurl = "sqlite:///fresh.db"\n', encoding="utf-8")
    out = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), "--config", str(cfg), "status", "acme"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "init" in out.stderr
