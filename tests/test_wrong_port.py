"""Pointing a connection at the wrong kind of server answers at once and says what
answered: an SMTP port given as IMAP, an IMAP port given as SMTP, TLS against a
port that speaks plain text. No traceback, no wait for a timeout."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.kernelfixtures import World, write_config
from tests.test_cli import Cli, connect_args


@pytest.fixture
def cli(world: World, tmp_path: Path) -> Cli:
    return Cli(write_config(world, tmp_path / "config.toml"), {"MAILPW": world.password})


def _with(args: list[str], **values: str) -> list[str]:
    args = list(args)
    for flag, value in values.items():
        args[args.index("--" + flag.replace("_", "-")) + 1] = value
    return args


def _refused(cli: Cli, args: list[str]) -> str:
    cli.run("init")
    started = time.monotonic()
    err = cli.run(*args, expect=5).stderr
    assert time.monotonic() - started < 15  # well under the 30 s greeting timeout
    assert "Traceback" not in err and "never retrieved" not in err
    return err


def test_an_smtp_port_given_as_imap_says_so(world: World, cli: Cli) -> None:
    o = world.options()
    err = _refused(cli, _with(connect_args(world), imap_port=str(o["smtp_port"])))
    assert "speaks SMTP, not IMAP" in err and "--imap-port" in err


def test_an_imap_port_given_as_smtp_says_so(world: World, cli: Cli) -> None:
    o = world.options()
    err = _refused(cli, _with(connect_args(world), smtp_port=str(o["imap_port"])))
    assert "speaks IMAP, not SMTP" in err


def test_tls_against_a_plain_port_says_to_try_starttls(world: World, cli: Cli) -> None:
    err = _refused(cli, _with(connect_args(world), security="tls"))
    assert "did not start TLS" in err and "--security starttls" in err
