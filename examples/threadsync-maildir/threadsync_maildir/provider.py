"""``MaildirProvider``: a mailbox that is a Maildir on disk, sending through a pickup folder.

Reading: INBOX is the Maildir itself, Sent is its ``.Sent`` sub-folder
(Maildir++), numbered by :mod:`threadsync_maildir.folder`. The cursor is
``{"uidvalidity", "next"}``; only the header block of a file is read in
``changes``, and files are never renamed, so nothing is marked as read.

Sending: the message is written into ``pickup_dir/tmp`` first; the kernel's
checkpoint is awaited; then the file is renamed into ``pickup_dir/new``, which
is the moment it has left (whatever delivers mail from the pickup folder takes
it from there). Each file starts with ``Return-Path`` and ``X-Envelope-To``
lines carrying the envelope, as a pickup program expects.

All file work runs in a worker thread; ``OSError`` becomes
``TransientProviderError``, a reference or cursor this provider cannot use
becomes ``ProviderProtocolError``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping
from email.parser import BytesHeaderParser
from email.policy import compat32
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from threadsync import (
    Account,
    ChangeBatch,
    Checkpoint,
    ConfigError,
    Folder,
    OutgoingMail,
    Provider,
    ProviderOption,
    ProviderProtocolError,
    TransientProviderError,
    summarize_headers,
)
from threadsync_maildir.folder import MaildirFolder, read_headers, unique_name

T = TypeVar("T")

INBOX = Folder("INBOX", "inbox")
SENT = Folder("Sent", "sent")


class MaildirProvider(Provider):
    """Read a local Maildir, send through a pickup folder. No credentials."""

    name: ClassVar[str] = "maildir"
    title: ClassVar[str] = "A local Maildir, sending through a pickup folder (example plugin)"
    options: ClassVar[tuple[ProviderOption, ...]] = (
        ProviderOption(
            "maildir", "path of the mailbox's Maildir (Sent is its .Sent)", required=True
        ),
        ProviderOption(
            "pickup_dir", "folder where outgoing mail is dropped for delivery", required=True
        ),
    )

    def __init__(self, account: Account, settings: Mapping[str, Any] | None = None) -> None:
        super().__init__(account, settings)
        root = Path(account.settings["maildir"])
        self.folders_by_name = {
            INBOX.name: MaildirFolder(root),
            SENT.name: MaildirFolder(root / ".Sent"),
        }
        self.pickup = Path(account.settings["pickup_dir"])

    @classmethod
    def prepare(
        cls, email: str, options: Mapping[str, Any], credentials: Mapping[str, str]
    ) -> Account:
        account = super().prepare(email, options, credentials)
        for key in ("maildir", "pickup_dir"):
            path = str(account.settings[key]).strip()
            if not path:
                raise ConfigError(f"the maildir provider needs --{key.replace('_', '-')}")
            account.settings[key] = os.path.abspath(os.path.expanduser(path))
        return account

    @staticmethod
    async def _disk(work: Callable[[], T], what: str) -> T:
        try:
            return await asyncio.to_thread(work)
        except OSError as exc:
            raise TransientProviderError(f"{what} failed: {exc.strerror or exc}") from None

    def _folder(self, folder: Folder) -> MaildirFolder:
        try:
            return self.folders_by_name[folder.name]
        except KeyError:
            raise ProviderProtocolError(f"no folder {folder.name!r} in this Maildir") from None

    # ---- session ------------------------------------------------------------------------

    async def open(self) -> None:
        def check() -> list[str]:
            places = [*self.folders_by_name.values(), MaildirFolder(self.pickup)]
            return [str(p.path) for p in places if not p.exists()]

        missing = await self._disk(check, "looking at the Maildir")
        if missing:
            raise TransientProviderError(f"not a Maildir (cur, new, tmp): {', '.join(missing)}")

    async def close(self) -> None:
        """Nothing to release: every call opens and closes its own files."""

    async def folders(self) -> list[Folder]:
        return [INBOX, SENT]

    # ---- reading ------------------------------------------------------------------------

    async def changes(
        self, folder: Folder, cursor: Mapping[str, Any] | None, limit: int = 250
    ) -> ChangeBatch:
        box = self._folder(folder)
        listing = await self._disk(box.scan, f"reading {folder.name}")
        if cursor is None:
            return ChangeBatch([], {"uidvalidity": listing.uidvalidity, "next": listing.next_uid})
        try:
            validity, start = int(cursor["uidvalidity"]), int(cursor["next"])
        except (KeyError, TypeError, ValueError):
            raise ProviderProtocolError(f"unusable maildir cursor {dict(cursor)!r}") from None
        reset = validity != listing.uidvalidity
        if reset:
            start = 1
        uids = sorted(uid for uid in listing.files if uid >= start)
        taken, more = uids[: max(1, limit)], len(uids) > max(1, limit)

        def headers() -> list[Any]:
            return [
                summarize_headers(
                    str(uid), read_headers(listing.files[uid]), listing.files[uid].stat().st_size
                )
                for uid in taken
            ]

        found = await self._disk(headers, f"reading headers in {folder.name}")
        following = taken[-1] + 1 if more else listing.next_uid
        return ChangeBatch(
            found, {"uidvalidity": listing.uidvalidity, "next": following}, more=more, reset=reset
        )

    async def fetch(self, folder: Folder, ref: str) -> bytes:
        if not ref.isdigit():
            raise ProviderProtocolError(f"{ref!r} is not a message number of this Maildir")
        box = self._folder(folder)

        def read() -> bytes | None:
            path = box.scan().files.get(int(ref))
            return path.read_bytes() if path is not None else None

        raw = await self._disk(read, f"reading message {ref}")
        if raw is None:
            raise ProviderProtocolError(f"message {ref} is not in {folder.name} any more")
        return raw

    # ---- writing ------------------------------------------------------------------------

    async def send(self, mail: OutgoingMail, checkpoint: Checkpoint) -> None:
        name = unique_name()
        staged = self.pickup / "tmp" / name
        envelope = (
            f"Return-Path: <{mail.sender}>\r\nX-Envelope-To: {', '.join(mail.recipients)}\r\n"
        ).encode()
        await self._disk(lambda: staged.write_bytes(envelope + mail.raw), "staging the message")
        try:
            await checkpoint()
        except BaseException:
            await self._disk(lambda: staged.unlink(missing_ok=True), "dropping the message")
            raise
        await self._disk(lambda: os.rename(staged, self.pickup / "new" / name), "sending")

    async def store_sent_copy(self, mail: OutgoingMail) -> None:
        sent = self.folders_by_name[SENT.name]
        await self._disk(lambda: sent.add(mail.raw, seen=True), "filing the copy in Sent")

    async def find_sent(self, message_id: str) -> bool:
        wanted = message_id.strip().strip("<>")
        sent = self.folders_by_name[SENT.name]
        parser = BytesHeaderParser(policy=compat32)

        def search() -> bool:
            for path in sent.message_files().values():
                value = parser.parsebytes(read_headers(path)).get("Message-ID")
                if value is not None and str(value).strip().strip("<>") == wanted:
                    return True
            return False

        return await self._disk(search, "searching Sent")
