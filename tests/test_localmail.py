"""``threadsync mailserver``: the local mail system as people and programs use it.

The command runs as a real subprocess: mail submitted over SMTP with AUTH is
in the user's INBOX over IMAP, with UIDs that survive a restart; wrong
passwords and relaying are refused; STARTTLS works with the generated CA; the
outside world keeps everything else and can be listed; SIGTERM and Ctrl-C
leave no process and no open port; and ``threadsync`` itself, configured as
the embedded ``config.toml``, connects, sends and syncs against it.
"""

from __future__ import annotations

import imaplib
import json
import os
import select
import shlex
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemonproc import port_open, processes_mentioning
from tests.servers import free_port
from threadsync.core.config import from_mapping
from threadsync.core.errors import ConfigError, InvalidInput
from threadsync.plugins.localmail import (
    MailserverSettings,
    MailSystemThread,
    from_config,
    parse_user,
)

ROOT = Path(__file__).resolve().parent.parent
ALICE, PASSWORD = "alice@example.test", "s3cret:with-colon"


def cli(
    *args: str, cwd: Path = ROOT, expect: int = 0, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), *args], cwd=cwd, capture_output=True, text=True,
        timeout=60, env={**os.environ, **(env or {})},
    )  # fmt: skip
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == expect, (proc.returncode, proc.stdout, proc.stderr)
    return proc


class Mailserver:
    """``threadsync --json mailserver ...`` in a child process."""

    def __init__(self, *args: str, cwd: Path = ROOT) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "cli.py"), "--json", "mailserver", *args], cwd=cwd,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 30)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"mailserver did not start: {self.proc.stderr.read()}")  # type: ignore[union-attr]
        self.info: dict[str, Any] = json.loads(line)
        self.host, self.smtp, self.imap = (
            self.info["host"],
            self.info["smtp_port"],
            self.info["imap_port"],
        )

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        """Signal the process and wait for it; idempotent."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(15)
        assert self.proc.stdout is not None and self.proc.stderr is not None
        if not self.proc.stderr.closed:
            self.proc.stdout.close()
            stderr = self.proc.stderr.read()
            self.proc.stderr.close()
            assert "Traceback" not in stderr, stderr
        return code

    def imap_client(self, tls: bool = False) -> imaplib.IMAP4:
        client = imaplib.IMAP4(self.host, self.imap, timeout=10)
        if tls:
            client.starttls(ssl.create_default_context(cafile=self.info["ca_file"]))
        return client


def message(mid: str, sender: str = ALICE, to: str = ALICE) -> bytes:
    return (
        f"From: {sender}\r\nTo: {to}\r\nSubject: test {mid}\r\nMessage-ID: <{mid}>\r\n\r\n"
        f"body of {mid}\r\n"
    ).encode()


def inbox_uids(server: Mailserver) -> tuple[int, dict[int, bytes]]:
    """(UIDVALIDITY, {uid: Message-ID header line}) of ALICE's INBOX over IMAP."""
    client = server.imap_client()
    try:
        client.login(ALICE, PASSWORD)
        client.select("INBOX", readonly=True)
        validity = int(client.response("UIDVALIDITY")[1][0] or 0)
        _, data = client.uid("FETCH", "1:*", "(UID BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
    finally:
        client.logout()
    found = {}
    for item in data:
        if isinstance(item, tuple):
            uid = int(item[0].split(b"UID ")[1].split()[0])
            found[uid] = item[1].strip()
    return validity, found


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Mailserver]:
    running = Mailserver(
        "--data-dir",
        str(tmp_path / "mail"),
        "--smtp-port",
        "0",
        "--imap-port",
        "0",
        "--user",
        f"{ALICE}:{PASSWORD}",
    )
    yield running
    running.stop()


def test_submitted_mail_is_in_the_inbox_and_uids_survive_a_restart(
    server: Mailserver, tmp_path: Path
) -> None:
    assert server.info["users"] == [ALICE]
    with smtplib.SMTP(server.host, server.smtp, timeout=10) as smtp:
        smtp.login(ALICE, PASSWORD)
        smtp.sendmail(ALICE, [ALICE], message("one@example.test"))
    validity, before = inbox_uids(server)
    assert before == {1: b"Message-ID: <one@example.test>"}
    assert server.stop() == 0
    assert not port_open(server.smtp) and not port_open(server.imap)

    # Users are kept (hashed) in the data folder: no --user needed now.
    again = Mailserver("--data-dir", str(tmp_path / "mail"), "--smtp-port", "0", "--imap-port", "0")
    try:
        assert again.info["users"] == [ALICE]
        with smtplib.SMTP(again.host, again.smtp, timeout=10) as smtp:
            smtp.login(ALICE, PASSWORD)
            smtp.sendmail(ALICE, [ALICE], message("two@example.test"))
        assert inbox_uids(again) == (validity, {1: before[1], 2: b"Message-ID: <two@example.test>"})
    finally:
        assert again.stop(signal.SIGINT) == 0
    assert not port_open(again.smtp) and not port_open(again.imap)
    assert processes_mentioning(str(tmp_path)) == []
    shadow = (tmp_path / "mail" / "mailboxes" / "pymap-etc-shadow").read_text()
    assert PASSWORD not in shadow and ALICE in shadow


def test_wrong_passwords_and_relaying_are_refused(server: Mailserver) -> None:
    with (
        smtplib.SMTP(server.host, server.smtp, timeout=10) as smtp,
        pytest.raises(smtplib.SMTPAuthenticationError),
    ):
        smtp.login(ALICE, "wrong")
    client = server.imap_client()
    try:
        with pytest.raises(imaplib.IMAP4.error):
            client.login(ALICE, "wrong")
    finally:
        client.shutdown()
    with smtplib.SMTP(server.host, server.smtp, timeout=10) as smtp:
        # Without a login: to a local user yes, to the outside world no...
        smtp.sendmail("someone@example.org", [ALICE], message("in@example.org", "someone@x"))
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            smtp.sendmail("someone@example.org", ["bob@example.org"], message("relay@x"))
    with smtplib.SMTP(server.host, server.smtp, timeout=10) as smtp:
        # ...except for the CRM's own address (the default relay of config.toml).
        smtp.sendmail("crm@threadsync.local", ["bob@example.org"], message("crm@x"))
    with smtplib.SMTP(server.host, server.smtp, timeout=10) as smtp:
        smtp.login(ALICE, PASSWORD)
        with pytest.raises(smtplib.SMTPSenderRefused):
            smtp.sendmail("boss@example.test", ["bob@example.org"], message("spoof@x"))
    assert set(inbox_uids(server)[1].values()) == {b"Message-ID: <in@example.org>"}


def test_starttls_with_the_generated_ca_and_the_outside_world(
    server: Mailserver, tmp_path: Path
) -> None:
    context = ssl.create_default_context(cafile=server.info["ca_file"])
    with smtplib.SMTP(server.host, server.smtp, timeout=10) as smtp:
        smtp.starttls(context=context)
        smtp.login(ALICE, PASSWORD)
        smtp.sendmail(ALICE, ["bob@example.org", "carol@example.org"], message("out@x", to="b"))
    client = server.imap_client(tls=True)
    try:
        client.login(ALICE, PASSWORD)
        listed = client.list()[1]
        folders = [line.rsplit(b" ", 1)[-1] for line in listed if isinstance(line, bytes)]
        assert folders == [b"INBOX", b"Sent"]
    finally:
        client.logout()
    listed = json.loads(
        cli("--json", "mailserver", "--data-dir", str(tmp_path / "mail"), "--list-outside").stdout
    )["messages"]
    assert [(m["envelope_from"], m["delivered_to"], m["message_id"]) for m in listed] == [
        (ALICE, "bob@example.org", "<out@x>"), (ALICE, "carol@example.org", "<out@x>"),
    ]  # fmt: skip
    text = cli("mailserver", "--data-dir", str(tmp_path / "mail"), "--list-outside").stdout
    assert "2 message(s)" in text and "carol@example.org" in text


def test_threadsync_runs_against_it_with_the_embedded_config(tmp_path: Path) -> None:
    """The embedded config.toml, with only its relay port moved to a free one: the
    mail server follows [outbound.default] and is the CRM's relay too."""
    relay = free_port()
    embedded = (ROOT / "config.toml").read_text(encoding="utf-8")
    assert "port = 2525" in embedded
    config = tmp_path / "config.toml"
    config.write_text(
        embedded.replace("port = 2525", f"port = {relay}") + "\n[mailserver]\nimap_port = 0\n",
        encoding="utf-8",
    )
    server = Mailserver("--user", f"{ALICE}:{PASSWORD}", cwd=tmp_path)
    try:
        assert server.smtp == relay
        assert Path(server.info["data_dir"]) == tmp_path / "var" / "mail"
        env = {"MAILPW": PASSWORD}
        cli("init", cwd=tmp_path)
        cli("labs", "enable", "acme", cwd=tmp_path)
        cli(
            "connect",
            "acme",
            "u1",
            "--provider",
            "imap_smtp",
            "--email",
            ALICE,
            "--imap-host",
            "127.0.0.1",
            "--imap-port",
            str(server.imap),
            "--smtp-host",
            "127.0.0.1",
            "--smtp-port",
            str(server.smtp),
            "--security",
            "none",
            "--password-env",
            "MAILPW",
            cwd=tmp_path,
            env=env,
        )
        sent = json.loads(
            cli(
                "--json",
                "send",
                "acme",
                "u1",
                "--to",
                "carla@example.org",
                "--subject",
                "Offer",
                "--text",
                "Hello",
                cwd=tmp_path,
            ).stdout
        )
        assert (sent["channel"], sent["status"]) == ("mailbox", "sent")
        big = tmp_path / "big.bin"
        big.write_bytes(b"x" * (3 * 1024 * 1024 + 1))  # over the limit: the CRM's relay
        relayed = json.loads(
            cli(
                "--json",
                "send",
                "acme",
                "u1",
                "--to",
                "dan@example.org",
                "--subject",
                "Hi",
                "--text",
                "Hi",
                "--attach",
                str(big),
                cwd=tmp_path,
            ).stdout
        )
        assert (relayed["channel"], relayed["status"]) == ("default", "sent")
        once = json.loads(cli("--json", "run", "--once", cwd=tmp_path).stdout)
        assert once["errors"] == [] and once["connections"] == 1
        outside = json.loads(cli("--json", "mailserver", "--list-outside", cwd=tmp_path).stdout)[
            "messages"
        ]
        assert [(m["envelope_from"], m["delivered_to"]) for m in outside] == [
            (ALICE, "carla@example.org"), ("crm@threadsync.local", "dan@example.org"),
        ]  # fmt: skip
    finally:
        assert server.stop() == 0


def test_a_taken_port_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = MailserverSettings(data_dir=tmp_path, smtp_port=port, imap_port=0)
        with pytest.raises(ConfigError, match="another mail server"):
            MailSystemThread(settings).start()
        err = cli(
            "mailserver", "--data-dir", str(tmp_path), "--smtp-port", str(port), expect=2
        ).stderr
        assert err.startswith("error:") and "--smtp-port" in err


def test_settings_from_config_and_options(tmp_path: Path) -> None:
    raw = {
        "outbound": {"default": {"port": 2600, "from_address": "crm@acme.test"}},
        "mailserver": {
            "data_dir": "mail",
            "imap_port": 1993,
            "users": [{"email": "Bob@Example.test", "password_env": "BOB_PW"}],
        },
    }
    settings = from_config(
        from_mapping(raw, base=tmp_path, path=tmp_path / "config.toml"), {"BOB_PW": "pw"}
    )
    assert (settings.smtp_port, settings.imap_port) == (2600, 1993)
    assert settings.data_dir == tmp_path / "mail" and settings.relay_senders == ("crm@acme.test",)
    assert [(u.email, u.password) for u in settings.users] == [("bob@example.test", "pw")]
    assert "pw" not in repr(settings)
    with pytest.raises(ConfigError, match="BOB_PW"):
        from_config(from_mapping(raw, base=tmp_path), {})
    assert parse_user("a@b.test:x:y").password == "x:y"
    for bad in ("a@b.test", "not-an-address:pw", "a@b.test:"):
        with pytest.raises(InvalidInput):
            parse_user(bad)
    assert "ADDRESS:PASSWORD" in cli("mailserver", "--user", "nobody", expect=2).stderr


def test_the_banner_says_how_to_log_in_and_how_a_contact_replies(tmp_path: Path) -> None:
    """The text a person reads: the ``export MAILPW=...`` line the connect command
    relies on (quoted for the shell) and the ``mailserver reply`` helper."""
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "cli.py"), "mailserver", "--data-dir", str(tmp_path / "m"),
         "--smtp-port", "0", "--imap-port", "0", "--user", f"{ALICE}:{PASSWORD}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    banner: list[str] = []
    # Lines are read as they come (select would not see what the reader buffered);
    # a timer ends a process that never prints the last line.
    watchdog = threading.Timer(60, proc.kill)
    watchdog.start()
    try:
        assert proc.stdout is not None
        while not banner or banner[-1].strip() != "threadsync run":
            line = proc.stdout.readline()
            assert line, banner
            banner.append(line.rstrip("\n"))
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
    text = "\n".join(banner)
    assert f"  export MAILPW={shlex.quote(PASSWORD)}" in banner, text
    assert "--password-env MAILPW" in text
    assert "threadsync mailserver reply --from" in text and "--thread-of MESSAGE_ID" in text
