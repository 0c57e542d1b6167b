"""``threadsync --provider exchange`` as a person runs it: real subprocesses of
the command line connect to the fake Exchange Server over HTTPS (test CA), send
through the mailbox, run one sync pass and show the thread."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.fakes.ews import FakeEws
from tests.fakes.ews_world import MAILBOX, PASSWORD
from tests.kernelfixtures import CONTACT, make_mail, reply_to
from tests.servers.tlscerts import TestCA
from threadsync.core.api import Threadsync
from threadsync.core.config import load

pytest_plugins = ["tests.fakes.ews_fixtures"]
ROOT = Path(__file__).resolve().parent.parent.parent


class Cli:
    def __init__(self, config: Path, env: dict[str, str]) -> None:
        self.config = config
        self.env = {**os.environ, **env}

    def run(self, *args: str, expect: int = 0) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, str(ROOT / "cli.py"), "--config", str(self.config), *args],
            cwd=self.config.parent, env=self.env, capture_output=True, text=True, timeout=120,
        )
        assert "Traceback" not in proc.stderr, proc.stderr
        assert proc.returncode == expect, (proc.returncode, proc.stdout, proc.stderr)
        return proc

    def json(self, *args: str, expect: int = 0) -> Any:
        return json.loads(self.run("--json", *args, expect=expect).stdout)


def make_cli(tmp_path: Path) -> Cli:
    path = tmp_path / "config.toml"
    path.write_text(
        f'[database]\nurl = "sqlite:///{tmp_path / "ts.db"}"\n'
        f'[security]\nsecret_key_file = "{tmp_path / "secret.key"}"\n'
        "[exchange]\ntimeout_seconds = 10\nmax_retry_wait_seconds = 2\n",
        encoding="utf-8",
    )
    settings = load(path)
    Threadsync.init(settings)
    ts = Threadsync.from_settings(settings)
    ts.labs("acme", enabled=True)
    ts.close()
    return Cli(path, {"EXCHANGE_PW": PASSWORD})


def connect_args(ews: FakeEws, ca: TestCA, *extra: str) -> list[str]:
    return ["connect", "acme", "u1", "--provider", "exchange", "--email", MAILBOX,
            "--ews-url", ews.url, "--auth", "basic", "--password-env", "EXCHANGE_PW",
            "--ca-file", str(ca.ca_file), *extra]


def test_cli_connect_send_run_once_and_thread(
    ews: FakeEws, test_ca: TestCA, tmp_path: Path
) -> None:
    cli = make_cli(tmp_path)
    assert "exchange" in cli.run("plugins").stdout
    connected = cli.json(*connect_args(ews, test_ca))
    assert (connected["provider"], connected["email"], connected["state"]) == (
        "exchange", MAILBOX, "connected")

    sent = cli.json("send", "acme", "u1", "--to", CONTACT, "--subject", "Offer",
                    "--text", "Our offer")
    assert (sent["channel"], sent["synced"], sent["status"]) == ("mailbox", True, "sent")
    assert [t.recipients for t in ews.sent(sent["message_id"])] == [[CONTACT]]
    assert ews.message_ids(MAILBOX, "sentitems") == [sent["message_id"]]

    raw, reply = make_mail(sender=CONTACT, to=MAILBOX, subject="Re: Offer",
                           body="Thanks from the contact", headers=reply_to(sent))
    ews.deliver(MAILBOX, raw)
    once = cli.json("run", "--once")
    assert once["stored"] == 1 and once["errors"] == []

    thread = cli.json("thread", sent["thread_id"])
    assert [(m["message_id"], m["direction"]) for m in thread["messages"]] == [
        (sent["message_id"], "outbound"), (reply, "inbound")]
    assert thread["messages"][1]["text"].strip() == "Thanks from the contact"
    text = cli.run("thread", sent["thread_id"]).stdout
    assert "Offer" in text and CONTACT in text
    assert PASSWORD not in json.dumps(cli.json("status", "acme"))


def test_cli_refuses_exchange_online_and_a_wrong_password(
    ews: FakeEws, test_ca: TestCA, tmp_path: Path
) -> None:
    cli = make_cli(tmp_path)
    args = connect_args(ews, test_ca)
    args[args.index("--ews-url") + 1] = "https://outlook.office365.com/EWS/Exchange.asmx"
    err = cli.run(*args, expect=2).stderr
    assert "--provider outlook" in err and err.startswith("error:")
    assert ews.log == []  # refused before any request
    cli.env["EXCHANGE_PW"] = "not-the-password"
    err = cli.run(*connect_args(ews, test_ca), expect=5).stderr
    assert "not-the-password" not in err and err.startswith("error:")
    assert cli.json("status", "acme")["connections"] == []
