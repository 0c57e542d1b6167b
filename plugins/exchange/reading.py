"""Reading an Exchange folder through EWS: SyncFolderItems headers, GetItem MIME.

``changes`` asks SyncFolderItems for item ids and the threading fields only:
``message:InternetMessageId`` and ``message:References`` of the item, plus the
MAPI properties PR_IN_REPLY_TO_ID (0x1042) and PR_INTERNET_REFERENCES (0x1039),
which Exchange keeps for sent mail too (Sent Items carry no transport headers).
The cursor is the folder's sync state and the time the connection started
reading. A new connection first walks the folder to its end with ids only
(nothing of the history is returned). When the server no longer accepts the sync
state (``ErrorInvalidSyncStateData``) the folder is synced again from scratch and
only items received since the connection time are returned, with ``reset`` set,
so that the kernel deduplicates them by Message-ID.

``fetch_many`` asks GetItem for the MIME of several items in one request; only
the kernel's thread members ever get here (R5).
"""

from __future__ import annotations

import email.utils
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from exchangelib import ExtendedProperty, Message
from exchangelib import errors as ews_errors
from exchangelib.fields import FieldPath
from exchangelib.folders.base import BaseFolder
from exchangelib.properties import ItemId
from exchangelib.services import GetItem, SyncFolderItems

from threadsync.core.errors import ProviderProtocolError
from threadsync.core.provider import ChangeBatch, HeaderSummary
from threadsync.plugins.exchange.ews import EwsSession

#: Most changes one SyncFolderItems request may return (the server's maximum).
MAX_SYNC_PAGE = 512
CURSOR_VERSION = 1


class InReplyToId(ExtendedProperty):  # type: ignore[misc]
    """PR_IN_REPLY_TO_ID: the In-Reply-To header as Exchange stores it."""

    property_tag = 0x1042
    property_type = "String"


class InternetReferences(ExtendedProperty):  # type: ignore[misc]
    """PR_INTERNET_REFERENCES: the References header as Exchange stores it."""

    property_tag = 0x1039
    property_type = "String"


_EXTENDED = {"threadsync_in_reply_to": InReplyToId, "threadsync_references": InternetReferences}
for _name, _cls in _EXTENDED.items():
    if _name not in {f.name for f in Message.FIELDS}:
        Message.register(_name, _cls)


def _paths(*names: str) -> list[FieldPath]:
    return [FieldPath(field=Message.get_field_by_fieldname(n)) for n in names]


HEADER_FIELDS = _paths("message_id", "references", "threadsync_in_reply_to",
                       "threadsync_references", "subject", "author", "datetime_received", "size")
MIME_FIELDS = _paths("mime_content")


def _ids(value: str | None) -> tuple[str, ...]:
    if not value:
        return ()
    return tuple("<" + part.strip("<>") + ">" for part in value.replace(",", " ").split()
                 if part.strip("<>"))


def summary(item: Message) -> HeaderSummary:
    """The kernel's view of one synced item."""
    author = item.author
    sender = None
    if author is not None and author.email_address:
        sender = email.utils.formataddr((author.name or "", author.email_address))
    received = item.datetime_received
    return HeaderSummary(
        ref=str(item.id),
        message_id=item.message_id or None,
        in_reply_to=_ids(getattr(item, "threadsync_in_reply_to", None))[:1],
        references=_ids(item.references or getattr(item, "threadsync_references", None)),
        sender=sender,
        subject=item.subject,
        date=email.utils.format_datetime(received) if received is not None else None,
        size=item.size,
    )


def _check_cursor(cursor: Mapping[str, Any]) -> tuple[str, datetime]:
    try:
        if cursor.get("v") != CURSOR_VERSION:
            raise ValueError("version")
        state = str(cursor["state"])
        since = datetime.fromisoformat(str(cursor["since"]))
    except (KeyError, TypeError, ValueError):
        raise ProviderProtocolError("this cursor was not made by the Exchange provider") from None
    return state, since


def _cursor(state: str | None, since: datetime) -> dict[str, Any]:
    return {"v": CURSOR_VERSION, "state": state or "", "since": since.isoformat()}


class FolderSync:
    """SyncFolderItems over one folder of one session (blocking: run it in a worker)."""

    def __init__(self, session: EwsSession, folder: BaseFolder) -> None:
        self.session = session
        self.folder = folder
        #: EWS requests made (for the benchmark and tests).
        self.requests = 0

    def _page(self, state: str | None, limit: int, fields: list[FieldPath]
              ) -> tuple[list[Message], str, bool]:
        svc = SyncFolderItems(account=self.session.account)
        items = []
        for change_type, item in svc.call(
            folder=self.folder, shape="IdOnly", additional_fields=fields, sync_state=state,
            ignore=None, max_changes_returned=min(max(limit, 1), MAX_SYNC_PAGE),
            sync_scope="NormalItems",
        ):
            if change_type == SyncFolderItems.CREATE and isinstance(item, Message):
                items.append(item)
        self.requests += 1
        return items, str(svc.sync_state), bool(svc.includes_last_item_in_range)

    def to_the_end(self) -> ChangeBatch:
        """A new connection: walk to the folder's end, ids only, and return nothing."""
        state: str | None = None
        while True:
            _, state, last = self._page(state, MAX_SYNC_PAGE, [])
            if last:
                return ChangeBatch(headers=[], cursor=_cursor(state, datetime.now(UTC)))

    def changes(self, cursor: Mapping[str, Any], limit: int) -> ChangeBatch:
        state, since = _check_cursor(cursor)
        reset = False
        try:
            items, new_state, last = self._page(state or None, limit, HEADER_FIELDS)
        except ews_errors.ErrorInvalidSyncStateData:
            # The server forgot this sync state: start over, keep only what arrived
            # since the connection started reading; the kernel deduplicates.
            reset = True
            items, new_state, last = self._page(None, limit, HEADER_FIELDS)
        if reset or cursor.get("resync"):
            # DateTimeReceived comes in whole seconds: keep the connection's
            # second entirely (the kernel ignores what is not a thread member).
            floor = since.replace(microsecond=0)
            items = [i for i in items
                     if i.datetime_received is None or i.datetime_received >= floor]
        batch = ChangeBatch(headers=[summary(i) for i in items],
                            cursor=_cursor(new_state, since), more=not last, reset=reset)
        if (reset or cursor.get("resync")) and not last:
            batch.cursor["resync"] = True
        return batch


def fetch_mime(session: EwsSession, refs: Sequence[str]) -> dict[str, bytes]:
    """The MIME of ``refs`` in one GetItem request (blocking: run it in a worker)."""
    found: dict[str, bytes] = {}
    answers = GetItem(account=session.account).call(
        items=[ItemId(id=ref) for ref in refs], additional_fields=MIME_FIELDS, shape="IdOnly")
    for ref, answer in zip(refs, answers, strict=True):
        if isinstance(answer, Exception):
            if isinstance(answer, ews_errors.ErrorItemNotFound):
                raise ProviderProtocolError(f"message {ref[:24]}... is no longer in the mailbox")
            raise answer
        if not isinstance(answer, Message) or answer.mime_content is None:
            raise ProviderProtocolError(f"Exchange returned no MIME for {ref[:24]}...")
        mime = answer.mime_content
        found[ref] = mime if isinstance(mime, bytes) else str(mime).encode("utf-8")
    return found


__all__ = ["HEADER_FIELDS", "MAX_SYNC_PAGE", "FolderSync", "fetch_mime", "summary"]
