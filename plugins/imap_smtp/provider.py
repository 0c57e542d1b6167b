"""``ImapSmtpProvider``: any mailbox reachable over IMAP (reading) and SMTP (sending).

Reading uses one IMAP session per provider, opened by :meth:`open` and reopened
on the next call after a network failure. Folder changes are found with UIDs:
the cursor is ``{"uidvalidity", "uidnext"}`` (plus ``"highestmodseq"`` when the
server has CONDSTORE), so a pass with no new mail is one ``STATUS`` round trip
(after an UNSELECT when the folder is still open, e.g. from IDLE), without SELECT
or SEARCH, whatever the size of the folder. New messages are read
with ``EXAMINE`` (read-only) and ``BODY.PEEK`` header fetches of at most 250
messages each, so ``\\Seen`` never changes, and only the header fields needed for
thread membership are fetched (R5). The bodies of members are fetched with
``BODY.PEEK[]`` too, up to 50 per ``UID FETCH``. Sending reuses one SMTP
connection per provider, closed after it sat idle for 30 s (``smtp_idle_seconds``
in the provider's settings; see :mod:`.smtp`).

Calls may come from several tasks: IMAP work is serialised by a lock, and an
IDLE in progress (:meth:`wait_for_changes`) is ended as soon as another call
needs the session.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple, TypeVar

from threadsync.core.errors import (
    ConfigError,
    ProviderProtocolError,
    TransientProviderError,
)
from threadsync.core.mime import summarize_headers
from threadsync.core.outbox import smtp
from threadsync.core.provider import (
    Account,
    ChangeBatch,
    Checkpoint,
    Folder,
    OutgoingMail,
    Provider,
    ProviderOption,
)
from threadsync.core.tls import client_context
from threadsync.plugins.imap_smtp.imap import ImapEndpoint, ImapSession
from threadsync.plugins.imap_smtp.imap_syntax import FetchedMessage, ListedMailbox, quote, uid_set
from threadsync.plugins.imap_smtp.options import OPTIONS, MailboxSettings, normalise, secrets_of

log = logging.getLogger(__name__)

T = TypeVar("T")

INBOX = "INBOX"
#: Tried in this order when the server marks no folder ``\\Sent``.
COMMON_SENT_NAMES = ("Sent", "Sent Items", "Sent Messages", "Sent Mail", "INBOX.Sent", "INBOX/Sent")
#: Header fields read to decide thread membership; nothing else is fetched.
HEADER_FIELDS = "MESSAGE-ID IN-REPLY-TO REFERENCES FROM SUBJECT DATE"
#: Most messages per UID FETCH, to keep every response short.
FETCH_CHUNK = 250
#: Most whole messages per UID FETCH of bodies.
BODY_CHUNK = 50
#: UIDs probed per UID SEARCH when looking for new messages, and probes per call.
SEARCH_WINDOW = 1000
SEARCH_ROUNDS = 16
_BARE_LF = re.compile(rb"(?<!\r)\n")


#: Key in ``Account.settings`` under which the Sent folder found at connect is kept:
#: on Dovecot a LIST before the first STATUS of a session makes that STATUS rescan
#: the whole folder (20 ms instead of 1 ms on 40,000 messages), so a pass must not
#: rediscover it.
SENT_FOUND = "sent_folder_found"


class ImapSmtpProvider(Provider):
    """IMAP for reading (IDLE when offered), SMTP for sending, password or XOAUTH2."""

    name: ClassVar[str] = "imap_smtp"
    title: ClassVar[str] = "Any IMAP/SMTP mailbox (password or XOAUTH2)"
    options: ClassVar[Sequence[ProviderOption]] = OPTIONS

    def __init__(self, account: Account, settings: Mapping[str, Any] | None = None) -> None:
        super().__init__(account, settings)
        self.config = MailboxSettings.from_account(account)
        self.timeout = float(self.settings.get("timeout", 30))
        self._session: ImapSession | None = None
        self._ssl: ssl.SSLContext | None = None
        self._lock = asyncio.Lock()
        self._waiters = 0
        self._wakeup = asyncio.Event()
        self._sent_folder: str | None = None
        self._smtp = smtp.SmtpSession(
            float(self.settings.get("smtp_idle_seconds", smtp.IDLE_SECONDS))
        )
        #: Per folder, (uidvalidity, uidnext) of the last cursor handed out.
        self._seen: dict[str, tuple[int, int]] = {}

    @classmethod
    def prepare(
        cls, email: str, options: Mapping[str, Any], credentials: Mapping[str, str]
    ) -> Account:
        """Check the options without touching the network (see :mod:`.options`)."""
        return normalise(super().prepare(email, options, credentials))

    # ---- session ------------------------------------------------------------------------

    async def open(self) -> None:
        async with self._imap():
            pass

    async def verify(self) -> None:
        """Log in to SMTP too, so bad SMTP settings fail at connect time."""
        await smtp.check_login(await self._smtp_endpoint())

    async def close(self) -> None:
        await self._smtp.close()
        async with self._exclusive():
            session, self._session = self._session, None
            if session is not None:
                await session.close()

    @contextlib.asynccontextmanager
    async def _exclusive(self) -> AsyncIterator[None]:
        """Hold the IMAP lock; a running IDLE is asked to end at once."""
        self._waiters += 1
        self._wakeup.set()
        try:
            await self._lock.acquire()
        finally:
            self._waiters -= 1
        try:
            yield
        finally:
            self._lock.release()

    @contextlib.asynccontextmanager
    async def _imap(self) -> AsyncIterator[ImapSession]:
        """Exclusive use of a logged-in session (reconnecting if it was lost)."""
        async with self._exclusive():
            yield await self._live_session()

    async def _live_session(self) -> ImapSession:
        if self._session is not None and self._session.alive:
            return self._session
        if self._session is not None:
            old, self._session = self._session, None
            await old.close()
        session = await ImapSession.connect(await self._imap_endpoint())
        try:
            password, token = secrets_of(self.account, self.config.auth)
            if token is not None:
                await session.xoauth2(self.config.username, token)
            elif password is not None:
                await session.login(self.config.username, password)
            else:
                raise ConfigError("imap_smtp has no credentials for this connection")
        except BaseException:
            await session.close()
            raise
        self._session = session
        return session

    async def _reading(self, operation: Callable[[ImapSession], Awaitable[T]]) -> T:
        """Run a read-only ``operation`` with the session; if the server dropped
        the connection meanwhile (idle timeout, restart, Dovecot closing a session
        whose folder changed UIDVALIDITY), run it once more on a new session.
        Reads are idempotent, so the retry is safe; writes never retry."""
        async with self._imap() as imap:
            try:
                return await operation(imap)
            except TransientProviderError:
                if imap.alive or imap.timed_out:
                    raise
                log.info("IMAP connection dropped; retrying once", extra=self._extra())
            return await operation(await self._live_session())

    async def _tls_context(self) -> ssl.SSLContext | None:
        if self.config.security == "none":
            return None
        if self._ssl is None:
            # Loading the trust store reads files: keep it off the event loop.
            self._ssl = await asyncio.to_thread(client_context, self.config.ca_file)
        return self._ssl

    async def _imap_endpoint(self) -> ImapEndpoint:
        c = self.config
        return ImapEndpoint(
            c.imap_host,
            c.imap_port,
            c.security,
            await self._tls_context(),
            self.timeout,
            network=self.account.network,
        )

    async def _smtp_endpoint(self) -> smtp.SmtpEndpoint:
        c = self.config
        password, token = secrets_of(self.account, c.auth)
        return smtp.SmtpEndpoint(
            host=c.smtp_host,
            port=c.smtp_port,
            security=c.security,
            ssl_context=await self._tls_context(),
            username=c.username,
            password=password,
            access_token=token,
            timeout=self.timeout,
            local_hostname=self.settings.get("local_hostname"),
            network=self.account.network,
        )

    def _extra(self, **fields: Any) -> dict[str, Any]:
        return {"mailbox": self.account.email, "provider": self.name, **fields}

    # ---- folders ------------------------------------------------------------------------

    async def folders(self) -> list[Folder]:
        sent = await self._reading(self._sent)
        return [Folder(INBOX, "inbox"), Folder(sent, "sent")]

    async def _sent(self, imap: ImapSession) -> str:
        """The Sent folder: the ``sent_folder`` option if given (it must exist),
        else the folder marked ``\\Sent`` (RFC 6154), else a common name."""
        if self._sent_folder is not None:
            return self._sent_folder
        wanted = self.config.sent_folder
        remembered = self.account.settings.get(SENT_FOUND)
        if isinstance(remembered, str) and wanted in (None, remembered):
            self._sent_folder = remembered
            return remembered
        if wanted is not None:
            listed = await imap.list_mailboxes(wanted)
            if not any(m.name == wanted and "\\noselect" not in m.attributes for m in listed):
                raise ProviderProtocolError(
                    f"the Sent folder {wanted!r} given by --sent-folder does not exist "
                    f"on {self.config.imap_host}"
                )
            self._sent_folder = wanted
            return wanted
        found: str | None = None
        if imap.has("SPECIAL-USE"):
            found = _marked_sent(await imap.list_mailboxes(special_use_only=True))
        if found is None:
            everything = [
                m
                for m in await imap.list_mailboxes()
                if "\\noselect" not in m.attributes and "\\nonexistent" not in m.attributes
            ]
            found = _marked_sent(everything)
            by_name = {m.name.lower(): m.name for m in everything}
            for name in COMMON_SENT_NAMES:
                if found is None and name.lower() in by_name:
                    found = by_name[name.lower()]
        if found is None:
            raise ProviderProtocolError(
                f"no Sent folder found on {self.config.imap_host}; pass --sent-folder NAME"
            )
        log.info("IMAP Sent folder found", extra=self._extra(folder=found))
        self._sent_folder = found
        self.account.settings[SENT_FOUND] = found  # stored by the kernel at connect
        return found

    # ---- reading ------------------------------------------------------------------------

    async def changes(
        self, folder: Folder, cursor: Mapping[str, Any] | None, limit: int = 250
    ) -> ChangeBatch:
        limit = max(1, int(limit))
        known = None if cursor is None else _Cursor.read(cursor)

        async def operation(imap: ImapSession) -> _Read:
            return await self._changes(imap, folder, known, limit)

        read = await self._reading(operation)
        # Summarised once the IMAP session is free again for other calls.
        headers = [
            summarize_headers(str(message.uid), message.body or b"", message.size)
            for message in read.fetched
        ]
        self._seen[folder.name] = (read.cursor["uidvalidity"], read.cursor["uidnext"])
        return ChangeBatch(headers=headers, cursor=read.cursor, more=read.more, reset=read.reset)

    async def _changes(
        self, imap: ImapSession, folder: Folder, known: _Cursor | None, limit: int
    ) -> _Read:
        view = imap.selected
        if (
            known is not None
            and view is not None
            and view.name == folder.name
            and view.uidvalidity == known.uidvalidity
            and view.uidnext is not None
            and known.uidnext < view.uidnext
        ):
            # The next batch of a series (``more``): the open view already lists
            # these UIDs, so neither STATUS nor a new EXAMINE is needed (EXAMINE
            # is the costly step on a big folder).
            return await self._read_range(
                imap,
                folder,
                known.uidvalidity,
                known.uidnext,
                view.uidnext,
                known.highestmodseq,
                limit,
            )
        items = ["UIDVALIDITY", "UIDNEXT"]
        if imap.has("CONDSTORE"):
            items.append("HIGHESTMODSEQ")
        status = await imap.fresh_status(folder.name, items)
        if "UIDVALIDITY" not in status or "UIDNEXT" not in status:
            raise ProviderProtocolError(
                f"IMAP STATUS of {folder.name!r} lacks UIDVALIDITY or UIDNEXT"
            )
        validity, uidnext = status["UIDVALIDITY"], status["UIDNEXT"]
        modseq = status.get("HIGHESTMODSEQ")
        if known is None:
            return _Read.at([], validity, uidnext, modseq)
        reset = known.uidvalidity != validity
        start = 1 if reset else known.uidnext
        if not reset and uidnext <= start:
            return _Read.at([], validity, start, modseq)  # the usual case
        selection = await imap.examine(folder.name)
        if selection.uidvalidity != validity:
            reset, start = True, 1  # it changed between STATUS and EXAMINE
        if reset:
            log.warning(
                "IMAP UIDVALIDITY changed; rereading folder headers",
                extra=self._extra(folder=folder.name),
            )
        end = max(selection.uidnext or uidnext, start)
        return await self._read_range(
            imap, folder, selection.uidvalidity, start, end, modseq, limit, reset=reset
        )

    async def _read_range(
        self,
        imap: ImapSession,
        folder: Folder,
        validity: int,
        start: int,
        end: int,
        modseq: int | None,
        limit: int,
        *,
        reset: bool = False,
    ) -> _Read:
        """Headers of at most ``limit`` messages with UIDs in ``start..end-1`` of
        the selected folder, and the cursor after them."""
        uids, searched_to = await self._find_uids(imap, start, end - 1, limit)
        taken = uids[:limit]
        headers = await self._headers(imap, taken)
        if len(uids) > limit:
            next_uid, more = taken[-1] + 1, True
        elif searched_to < end - 1:
            next_uid, more = searched_to + 1, True
        else:
            next_uid, more = end, False
        log.debug(
            "IMAP new headers", extra=self._extra(folder=folder.name, count=len(headers), more=more)
        )
        return _Read.at(headers, validity, next_uid, modseq, more=more, reset=reset)

    @staticmethod
    async def _find_uids(
        imap: ImapSession, low: int, high: int, limit: int
    ) -> tuple[list[int], int]:
        """UIDs in ``low..high`` (explicit bounds: ``n:*`` would match the last
        message when ``n`` is past it), searched in windows so no answer is huge;
        stops once more than ``limit`` are known. Returns them and the last UID
        searched."""
        found: list[int] = []
        searched = low - 1
        window = max(SEARCH_WINDOW, 4 * limit)
        for _ in range(SEARCH_ROUNDS):
            if searched >= high or len(found) > limit:
                break
            first, last = searched + 1, min(high, searched + window)
            found += [
                u for u in await imap.uid_search("UID", f"{first}:{last}") if first <= u <= last
            ]
            searched = last
        return found, searched

    @staticmethod
    async def _headers(imap: ImapSession, uids: list[int]) -> list[FetchedMessage]:
        """The header blocks of ``uids`` in UID order (bare-LF blocks from pymap
        are fine: the summary parser copes)."""
        found: list[FetchedMessage] = []
        items = f"(UID RFC822.SIZE BODY.PEEK[HEADER.FIELDS ({HEADER_FIELDS})])"
        for i in range(0, len(uids), FETCH_CHUNK):
            fetched = await imap.uid_fetch(uid_set(uids[i : i + FETCH_CHUNK]), items)
            found += sorted(fetched, key=lambda m: m.uid)
        return found

    async def fetch(self, folder: Folder, ref: str) -> bytes:
        return (await self._fetch_bodies(folder, [ref]))[ref]

    async def fetch_many(self, folder: Folder, refs: Sequence[str]) -> dict[str, bytes]:
        """Bodies by ``UID FETCH a,b,c (BODY.PEEK[])``, :data:`BODY_CHUNK` at a time."""
        if type(self).fetch is not ImapSmtpProvider.fetch:
            # A subclass that changes or observes fetch() keeps seeing every body.
            return await super().fetch_many(folder, refs)
        return await self._fetch_bodies(folder, refs)

    async def _fetch_bodies(self, folder: Folder, refs: Sequence[str]) -> dict[str, bytes]:
        for ref in refs:
            if not ref.isdigit():
                raise ProviderProtocolError(f"{ref!r} is not an IMAP UID")
        wanted = sorted({int(ref) for ref in refs})
        if not wanted:
            return {}

        async def operation(imap: ImapSession) -> dict[str, bytes]:
            found: dict[int, bytes] = {}
            reuse = imap.selected is not None and imap.selected.name == folder.name
            for again in (False, True):
                selection = imap.selected
                if selection is None or not reuse or again:
                    selection = await imap.examine(folder.name)
                known = self._seen.get(folder.name)
                if known is not None and known[0] != selection.uidvalidity:
                    # The UIDs may now name other messages, perhaps personal ones.
                    raise ProviderProtocolError(
                        f"UIDVALIDITY of {folder.name!r} changed; UID {wanted[0]} is stale"
                    )
                missing = [uid for uid in wanted if uid not in found]
                for i in range(0, len(missing), BODY_CHUNK):
                    chunk = missing[i : i + BODY_CHUNK]
                    asked = set(chunk)
                    for message in await imap.uid_fetch(uid_set(chunk), "(UID BODY.PEEK[])"):
                        if message.uid in asked and message.body is not None:
                            found[message.uid] = message.body
                if len(found) == len(wanted) or not reuse:
                    break  # a fresh EXAMINE already saw everything
            lost = [uid for uid in wanted if uid not in found]
            if lost:
                raise ProviderProtocolError(f"message {lost[0]} is not in {folder.name!r} any more")
            return {str(uid): body for uid, body in found.items()}

        bodies = await self._reading(operation)
        # Refs as given (a ref with leading zeros names the same UID).
        return {ref: bodies[str(int(ref))] for ref in refs}

    async def wait_for_changes(self, timeout: float) -> bool:
        """IDLE on INBOX when the server offers it (True on new mail), else sleep.

        Returns True at once if INBOX grew since the last :meth:`changes` of it,
        so mail that arrived between that call and IDLE is not missed. Returns
        False early when :meth:`wake` is called (also just before the wait) or
        when another call needs the IMAP session.
        """
        if timeout <= 0:
            return False
        async with self._lock:
            self._wakeup.clear()
            if self._waiters or self._woken.is_set():
                self._woken.clear()
                return False
            imap = await self._live_session()
            if imap.has("IDLE"):
                try:
                    selection = await imap.examine(INBOX)
                    seen = self._seen.get(INBOX)
                    if seen is not None and (
                        selection.uidvalidity != seen[0] or (selection.uidnext or 0) > seen[1]
                    ):
                        return True
                    return await imap.idle(timeout, self._wakeup)
                finally:
                    self._woken.clear()
        return await super().wait_for_changes(timeout)

    def wake(self) -> None:
        """End a running wait early (the kernel has work for this connection)."""
        super().wake()
        self._wakeup.set()

    # ---- writing ------------------------------------------------------------------------

    async def send(self, mail: OutgoingMail, checkpoint: Checkpoint) -> None:
        await self._smtp.send(await self._smtp_endpoint(), mail, checkpoint)

    async def store_sent_copy(self, mail: OutgoingMail) -> None:
        """APPEND ``mail`` to Sent, marked ``\\Seen`` (skipped if ``append_sent``
        is false because the server files sent mail itself)."""
        if not self.config.append_sent:
            return
        raw = _BARE_LF.sub(b"\r\n", mail.raw)
        async with self._imap() as imap:
            sent = await self._sent(imap)
            await imap.append(sent, raw, "(\\Seen)")
        log.info("IMAP sent copy stored", extra=self._extra(folder=sent))

    async def find_sent(self, message_id: str) -> bool:
        mid = message_id.strip()
        if not mid.startswith("<"):
            mid = f"<{mid}>"
        if not mid.isascii() or not mid.isprintable():
            raise ProviderProtocolError("a Message-ID must be printable ASCII")

        async def operation(imap: ImapSession) -> bool:
            await imap.examine(await self._sent(imap))
            return bool(await imap.uid_search("HEADER", "Message-ID", quote(mid)))

        return await self._reading(operation)


def _marked_sent(listed: Sequence[ListedMailbox]) -> str | None:
    for mailbox in listed:
        if "\\sent" in mailbox.attributes and "\\noselect" not in mailbox.attributes:
            return mailbox.name
    return None


class _Read(NamedTuple):
    """What one read of a folder found: raw header blocks and the cursor after them."""

    fetched: list[FetchedMessage]
    cursor: dict[str, Any]
    more: bool
    reset: bool

    @classmethod
    def at(
        cls,
        fetched: list[FetchedMessage],
        validity: int,
        uidnext: int,
        modseq: int | None,
        *,
        more: bool = False,
        reset: bool = False,
    ) -> _Read:
        cursor: dict[str, Any] = {"uidvalidity": validity, "uidnext": uidnext}
        if modseq is not None:
            cursor["highestmodseq"] = modseq
        return cls(fetched, cursor, more, reset)


class _Cursor(NamedTuple):
    """The kernel-held position in one folder (see :meth:`ImapSmtpProvider.changes`)."""

    uidvalidity: int
    uidnext: int
    highestmodseq: int | None

    @classmethod
    def read(cls, cursor: Mapping[str, Any]) -> _Cursor:
        try:
            validity, uidnext = int(cursor["uidvalidity"]), int(cursor["uidnext"])
            modseq = cursor.get("highestmodseq")
            highest = None if modseq is None else int(modseq)
        except (KeyError, TypeError, ValueError):
            raise ProviderProtocolError(f"unusable imap_smtp cursor {dict(cursor)!r}") from None
        if validity < 1 or uidnext < 1:
            raise ProviderProtocolError(f"unusable imap_smtp cursor {dict(cursor)!r}")
        return cls(validity, uidnext, highest)
