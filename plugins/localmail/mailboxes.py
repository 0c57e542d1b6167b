"""The users' mailboxes: Maildir++ folders owned by pymap, changed only through pymap.

Users, their hashed passwords and their mail live under one folder in pymap's
maildir layout (``pymap-etc-passwd``, ``pymap-etc-shadow``, ``users/ADDR/``).
Every user has ``INBOX`` and a subscribed ``Sent`` (pymap has no SPECIAL-USE,
so IMAP clients find it by that name). Local delivery appends through a pymap
session, exactly like an IMAP ``APPEND``, so UIDs come from pymap's own
``dovecot-uidlist`` and stay stable across restarts, and a client in IDLE is told.

pymap works on the event loop it is started on (its "asyncio subsystem"): the
file work is small and local, and no thread pool has to be shut down.
"""

from __future__ import annotations

import os
import tempfile
from argparse import Namespace
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pymap.backend.maildir import Config as MaildirConfig
from pymap.backend.maildir import Identity, Login
from pymap.backend.maildir.users import PasswordsFile, UsersFile
from pymap.concurrent import Subsystem
from pymap.context import subsystem
from pymap.exceptions import MailboxConflict
from pymap.parsing.message import AppendMessage
from pymap.parsing.specials.flag import Flag
from pymap.user import UserMetadata
from pysasl.hashing import BuiltinHash

from threadsync.core.errors import ConfigError

INBOX = "INBOX"
SENT = "Sent"
#: PBKDF2 rounds of new password hashes: enough for throw-away test passwords,
#: few enough that a login costs milliseconds (pymap reads the count from each hash).
HASH_ROUNDS = 20_000


class LocalImapConfig(MaildirConfig):
    """pymap's maildir configuration, built from values instead of command-line
    arguments, with a fixed greeting (the default looks up the host's FQDN on
    every connection)."""

    @property
    def greeting(self) -> bytes:
        return b"threadsync local mail system ready"


def imap_config(root: Path, host: str, port: int, ssl_context: Any) -> LocalImapConfig:
    args = Namespace(passlib_cfg=None, proxy_protocol=None, inherited_sockets=None, debug=False)
    return LocalImapConfig(
        args,
        host=host,
        port=port,
        base_dir=str(root),
        layout="++",
        colon=None,
        subsystem=Subsystem.for_asyncio(),
        cpu_subsystem=Subsystem.for_asyncio(),
        ssl_context=ssl_context,
        tls_enabled=True,
        reject_dnsbl=False,
        hash_context=BuiltinHash(rounds=HASH_ROUNDS),
    )


def check_temp_dir(root: Path) -> None:
    """pymap writes its metadata files through the temporary folder and renames
    them into the mail store, which only works on one file system."""
    root.mkdir(parents=True, exist_ok=True)
    if os.stat(tempfile.gettempdir()).st_dev != os.stat(root).st_dev:
        raise ConfigError(
            f"the mail folder {root} is not on the file system of the temporary folder "
            f"{tempfile.gettempdir()}; set TMPDIR to a folder beside it"
        )


class Mailboxes:
    """Users and their folders under ``root``, through pymap's maildir backend."""

    def __init__(self, root: Path, config: LocalImapConfig) -> None:
        self.root = root
        self.config = config
        self.login = Login(config)
        self._hashes: dict[str, str] = {}

    async def load(self) -> None:
        """Read the stored users (call once on start, on the server's loop)."""
        (self.root / "users").mkdir(parents=True, exist_ok=True)
        async with PasswordsFile.with_read(str(self.root)) as passwords:
            self._hashes = {r.name: r.password for r in passwords.get_all()}

    @property
    def users(self) -> list[str]:
        return sorted(self._hashes)

    def has(self, email: str) -> bool:
        return email.lower() in self._hashes

    def check_password(self, email: str, password: str) -> bool:
        """What pymap checks at IMAP login, for SMTP AUTH (one user database)."""
        stored = self._hashes.get(email.lower())
        if stored is None:
            return False
        user = UserMetadata(self.config, email.lower(), password=stored)
        return bool(user.compare_secret(password))

    async def add(self, email: str, password: str) -> None:
        """Create a user with INBOX and a subscribed Sent, or set a new password."""
        email = email.lower()
        subsystem.set(self.config.subsystem)
        hashed = self.config.hash_context.hash(self.config.password_prep(password))
        async with (
            UsersFile.with_write(str(self.root)) as users,
            PasswordsFile.with_write(str(self.root)) as passwords,
        ):
            users.set(users.build_record(email, f"users/{email}"))
            passwords.set(passwords.build_record(email, hashed))
        self._hashes[email] = hashed
        async with self.session(email) as session:
            # pymap's maildir backend says "exists" with KeyError, not MailboxConflict
            # (a restart with --user on a folder it made before).
            with suppress(MailboxConflict, KeyError):
                await session.create_mailbox(SENT)
            await session.subscribe(SENT)

    @asynccontextmanager
    async def session(self, email: str) -> AsyncIterator[Any]:
        """A pymap session as ``email`` (no password: this is the server itself)."""
        subsystem.set(self.config.subsystem)
        identity = Identity(self.config, self.login.tokens, email.lower(), None, frozenset())
        async with identity.new_session() as session:
            yield session

    async def deliver(
        self, email: str, raw: bytes, folder: str = INBOX, *, seen: bool = False
    ) -> int:
        """Append ``raw`` to ``folder`` of ``email``; returns its UID."""
        flags = frozenset({Flag(b"\\Seen")}) if seen else frozenset()
        message = AppendMessage(raw, datetime.now(UTC), flags)
        async with self.session(email) as session:
            appended, _ = await session.append_messages(folder, [message])
        return int(next(iter(appended.uids)))

    def maildir(self, email: str) -> Path:
        return self.root / "users" / email.lower()
