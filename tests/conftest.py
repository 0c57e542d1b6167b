"""Shared pytest fixtures for the threadsync test suite."""

from __future__ import annotations

# ==========================================================================
# Mail-server fixtures (tests/servers). Keep this block together; add other
# fixtures below the END marker.
#
#   test_ca      session   throwaway CA + server cert for 127.0.0.1/localhost
#   imap_server  session   one real IMAP server per session (and per kind);
#                          THREADSYNC_TEST_IMAP=dovecot|pymap picks the kind,
#                          "all" (or "dovecot,pymap") runs the tests for each;
#                          default: dovecot if installed, else pymap
#   mailbox      function  a fresh user (email, password) on imap_server,
#                          with INBOX and a special-use Sent folder
#   smtp_server  function  SMTP with AUTH (required) for the mailbox user,
#                          STARTTLS with test_ca, delivering to imap_server
# ==========================================================================
import itertools
import os
import secrets
from collections.abc import Iterator

import pytest

from tests.servers import (
    IMAP_KIND_ENV,
    ImapServer,
    available_imap_kinds,
    default_imap_kind,
    make_test_ca,
    start_imap_server,
)
from tests.servers.smtp import SmtpServer
from tests.servers.tlscerts import TestCA

pytest_plugins = ["tests.dbfixtures", "tests.kernelfixtures"]


def _imap_kinds() -> list[str]:
    wanted = os.environ.get(IMAP_KIND_ENV, "").strip().lower()
    if wanted in ("all", "both"):
        return available_imap_kinds() or [default_imap_kind()]
    if "," in wanted:
        return [kind.strip() for kind in wanted.split(",") if kind.strip()]
    return [default_imap_kind()]


_user_counter = itertools.count(1)


@pytest.fixture(scope="session")
def test_ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    """The CA whose server certificate every test server presents."""
    return make_test_ca(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="session", params=_imap_kinds())
def imap_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, test_ca: TestCA
) -> Iterator[ImapServer]:
    """A running IMAP server shared by the whole session (one per kind)."""
    kind: str = request.param
    server = start_imap_server(tmp_path_factory.mktemp(f"imap-{kind}"), kind, ca=test_ca)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def mailbox(imap_server: ImapServer) -> tuple[str, str]:
    """A new, empty user on ``imap_server``: ``(email, password)``."""
    email = f"user{next(_user_counter)}-{secrets.token_hex(4)}@threadsync.test"
    password = secrets.token_urlsafe(12)
    imap_server.add_user(email, password)
    return email, password


@pytest.fixture
def smtp_server(
    mailbox: tuple[str, str], imap_server: ImapServer, test_ca: TestCA
) -> Iterator[SmtpServer]:
    """SMTP requiring AUTH as the ``mailbox`` user; local mail lands in its INBOX."""
    email, password = mailbox
    server = SmtpServer(
        users={email: password}, ca=test_ca, require_auth=True, deliver_to=imap_server
    ).start()
    try:
        yield server
    finally:
        server.stop()


# ==========================================================================
# END mail-server fixtures
# ==========================================================================
