"""The command line where a newcomer stumbles first, as a real subprocess on the
embedded configuration: ``connect --help`` grouped by provider and an option of
another provider refused; a sub-account threadsync has never seen; ``send
--require-sync``; display-name addresses; ``status`` without a database."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tests.test_cli_globals import home, threadsync

__all__ = ["home"]  # the fixture, shared


def test_connect_help_is_grouped_by_provider_and_foreign_options_are_refused(
    home: Path,
) -> None:
    text = threadsync("connect", "--help", cwd=home).stdout
    sections = re.split(r"^(?=Options)", text, flags=re.M)
    by_title = {s.splitlines()[0]: s for s in sections if s.startswith("Options")}
    imap = next(s for t, s in by_title.items() if t.startswith("Options of --provider imap_smtp"))
    outlook = next(s for t, s in by_title.items() if t.startswith("Options of --provider outlook"))
    assert "--imap-host" in imap and "--device-code" not in imap
    assert "--device-code" in outlook and "--imap-host" not in outlook
    assert "--imap-host" not in by_title["Options:"] and "--provider" in by_title["Options:"]
    # Another provider's option: exit 2 before anything else, naming the options.
    err = threadsync(
        "connect", "acme", "u1", "--provider", "imap_smtp", "--email", "ann@example.test",
        "--imap-host", "127.0.0.1", "--smtp-host", "127.0.0.1", "--device-code", cwd=home,
        expect=2,
    ).stderr  # fmt: skip
    assert "provider imap_smtp does not take --device-code" in err
    assert "its options: --imap-host" in err and "--password-env" in err
    err = threadsync(
        "update-email", "acme", "u1", "--provider", "outlook", "--email", "ann@example.test",
        "--imap-host", "127.0.0.1", cwd=home, expect=2,
    ).stderr  # fmt: skip
    assert "provider outlook does not take --imap-host; its options: --device-code" in err


def test_status_without_a_database_file_does_not_create_it(home: Path) -> None:
    threadsync("init", cwd=home)
    database = home / "var" / "threadsync.db"
    database.unlink()
    err = threadsync("status", "acme", cwd=home, expect=6).stderr
    assert "does not exist: run `threadsync init`" in err
    assert not database.exists()
    threadsync("init", cwd=home)
    assert threadsync("status", "acme", cwd=home).stdout.strip() == "no connections"


def test_send_notes_an_unknown_subaccount_and_require_sync_exits_4(home: Path) -> None:
    threadsync("init", cwd=home)
    args = ["send", "acmee", "u1", "--to", "carla@customer.example", "--subject", "Hi"]
    first = json.loads(threadsync(*args, "--text", "one", "--json", cwd=home).stdout)
    assert (first["subaccount"], first["subaccount_known"]) == ("acmee", False)
    assert (first["synced"], first["reason"]) == (False, "labs_disabled")
    # Now it is known (the CRM sent mail for it); without Labs it does not sync.
    text = threadsync(*args, "--text", "two", cwd=home).stdout
    assert "not synced (labs_disabled)" in text and "unknown" not in text
    proc = threadsync(*args, "--text", "three", "--require-sync", cwd=home, expect=4)
    assert "not synced (labs_disabled)" in proc.stdout
    assert "did not sync (labs_disabled)" in proc.stderr
    unknown = threadsync("send", "acne", "u1", *args[3:], "--text", "x", cwd=home).stdout
    assert "sub-account 'acne' was unknown to threadsync" in unknown
    # The JSON of a refused --require-sync: the result on stdout, the error on stderr.
    proc = threadsync(*args, "--text", "four", "--require-sync", "--json", cwd=home, expect=4)
    assert json.loads(proc.stdout)["synced"] is False
    assert json.loads(proc.stderr.splitlines()[-1])["error"]["code"] == "refused"
