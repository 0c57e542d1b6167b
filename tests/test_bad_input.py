"""Bad input that used to reach an internal error: JSON nested deeper than the
interpreter's recursion limit, CR/LF in mailbox credentials (HTTP API and CLI),
and the local mail system restarted with ``--user`` on a folder it already made.
Each must be a clear refusal (a problem answer, exit status 2) or just work."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.kernelfixtures import SUB, USER, World
from tests.test_cli import Cli, cli, connect_args  # noqa: F401 (fixtures)
from tests.test_http_api import connect_body, is_problem
from tests.test_http_api_support import Api, api_factory_fixture, api_fixture  # noqa: F401
from tests.test_localmail import ALICE, PASSWORD, Mailserver

CONN = f"/v1/subaccounts/{SUB}/users/{USER}/connection"


@pytest.mark.parametrize("depth", [500, 1_000, 100_000])
def test_deeply_nested_json_is_a_400_problem(
    api: Api, depth: int, caplog: pytest.LogCaptureFixture
) -> None:
    body = '{"to": ' + "[" * depth + "]" * depth + ', "subject": "x", "text": "y"}'
    with api.client(api.key) as c:
        r = c.post(
            f"/v1/subaccounts/{SUB}/users/{USER}/send",
            content=body,
            headers={"Content-Type": "application/json"},
        )
    problem = is_problem(r, 400, "invalid_json")
    assert "nested" in problem["detail"]
    assert not [rec for rec in caplog.records if rec.exc_info], "no traceback logged"


@pytest.mark.parametrize(
    ("where", "value"),
    [
        ("password", "right\r\nA1 LOGOUT"),
        ("password", "pw\nx"),
        ("username", "ann\r\nA2 DELETE INBOX"),
        ("username", "ann\x00"),
    ],
)
def test_cr_lf_in_credentials_is_422_over_http(
    api: Api, world: World, where: str, value: str
) -> None:
    body = connect_body(world)
    if where == "password":
        body["credentials"] = {"password": value}
    else:
        body["options"] = {**body["options"], "username": value}
    with api.client(api.key) as c:
        problem = is_problem(c.post(CONN, json=body), 422, "invalid_input")
        assert value not in problem["detail"] and where in problem["detail"]
        assert c.get(CONN).json()["connections"] == []


def test_cr_lf_in_credentials_is_exit_2_in_the_cli(world: World, cli: Cli) -> None:  # noqa: F811
    cli.run("init")
    cli.env["MAILPW"] = world.password + "\r\nA1 LOGOUT"
    err = cli.run(*connect_args(world), expect=2).stderr
    assert err.startswith("error:") and "password" in err and "LOGOUT" not in err
    cli.env["MAILPW"] = world.password
    args = [*connect_args(world), "--username", "u\nx"]
    assert "username" in cli.run(*args, expect=2).stderr
    assert cli.json("status", "acme")["connections"] == []


def test_the_local_mail_system_restarts_with_user_on_its_own_folder(tmp_path: Path) -> None:
    args = ("--data-dir", str(tmp_path / "mail"), "--smtp-port", "0", "--imap-port", "0")
    first = Mailserver(*args, "--user", f"{ALICE}:{PASSWORD}")
    assert first.stop() == 0
    again = Mailserver(*args, "--user", f"{ALICE}:{PASSWORD}", "--user", "bob@example.test:pw2")
    try:
        assert sorted(again.info["users"]) == [ALICE, "bob@example.test"]
        client = again.imap_client()
        try:
            client.login(ALICE, PASSWORD)
            status, folders = client.list()
            assert status == "OK" and any(b"Sent" in f for f in folders if f)
        finally:
            client.logout()
    finally:
        assert again.stop(signal.SIGINT) == 0
