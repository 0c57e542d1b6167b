"""New messages of a mail folder through Graph delta queries, headers only (R5).

The cursor is ``{"link": ..., "since": ...}``: ``link`` is the
``@odata.nextLink`` (more pages in this round) or ``@odata.deltaLink`` (the
round is complete) exactly as Graph returned it. ``since`` is when the
connection was made: the first request of every round filters on
``receivedDateTime ge since`` (the one filter delta allows), so placing the
cursor at connect time walks only the last minutes, and a resync after ``410
Gone`` re-reads what arrived since the connection, never older history.

Membership needs ``In-Reply-To`` and ``References``. Received mail carries them
in ``internetMessageHeaders``, selected on the delta request. Mail that was not
received (the user's own sent mail, which has no transport headers) gets them
from the MAPI properties ``PidTagInReplyToId`` (0x1042) and
``PidTagInternetReferences`` (0x1039), read for those messages only through
``$batch`` (as many per request as the concurrency limit allows). Sent Items of
shared mailboxes can carry ``internetMessageHeaders`` without ``In-Reply-To`` or
``References``: there the properties are read whenever a threading header is
missing. Bodies are never read here.

A later round may list a message again with only ``id`` and the properties that
changed (``isRead``, ``parentFolderId``), and may replay an item. Such a partial
update is recognised by what it lacks (``internetMessageId`` and
``receivedDateTime`` never change, so an update never carries them) and
skipped without a request; an id listed twice in a page is read once. The first
round (placing the cursor, or resyncing after ``410 Gone``) asks for the newest
messages first: a filtered delta lists at most 5,000 messages, so what it cuts
off is the oldest.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

from threadsync.core.errors import ProviderProtocolError, TransientProviderError
from threadsync.core.mime import parse_msgid_list
from threadsync.core.provider import ChangeBatch, HeaderSummary
from threadsync.plugins.outlook.graph import GraphClient, GraphRequestError, json_object

log = logging.getLogger(__name__)

#: Fields read on every delta page; ``id`` always comes.
DELTA_SELECT = (
    "internetMessageId,subject,from,sentDateTime,receivedDateTime,isDraft,internetMessageHeaders"
)
IN_REPLY_TO_PROP = "String 0x1042"
REFERENCES_PROP = "String 0x1039"
#: Read through $batch for messages whose delta entry had no transport headers.
HEADER_QUERY = (
    "$select=internetMessageId,subject,from,sentDateTime,isDraft"
    f"&$expand=singleValueExtendedProperties($filter=id eq '{IN_REPLY_TO_PROP}'"
    f" or id eq '{REFERENCES_PROP}')"
)
#: How far before the connection the first round starts (clock skew between us
#: and Exchange); anything in it is read once, when the cursor is placed.
SINCE_MARGIN = timedelta(minutes=10)
#: Most messages a delta query with ``$filter`` lists (Microsoft's limit).
FILTERED_DELTA_CAP = 5000
#: The one order a message delta accepts: newest first.
NEWEST_FIRST = "receivedDateTime desc"
SENT_FOLDER = "sentitems"
_GONE_CODES = {"syncstatenotfound", "resyncrequired", "syncstateinvalid"}


@dataclass(frozen=True)
class DeltaCursor:
    link: str
    since: str

    @classmethod
    def read(cls, cursor: Mapping[str, Any]) -> DeltaCursor:
        link, since = cursor.get("link"), cursor.get("since")
        if not isinstance(link, str) or not isinstance(since, str) or not link:
            raise ProviderProtocolError(f"unusable outlook cursor {dict(cursor)!r}")
        return cls(link, since)

    def json(self) -> dict[str, Any]:
        return {"link": self.link, "since": self.since}


def _now_since() -> str:
    return (datetime.now(UTC) - SINCE_MARGIN).strftime("%Y-%m-%dT%H:%M:%SZ")


class FolderDelta:
    """Reads one folder's changes for one mailbox."""

    def __init__(self, graph: GraphClient, folder: str, page_size: int) -> None:
        self.graph = graph
        self.folder = folder
        self.page_size = page_size

    def first_link(self, since: str) -> str:
        return self.graph.url(
            f"{self.graph.root}/mailFolders/{quote(self.folder, safe='')}/messages/delta"
            f"?$select={DELTA_SELECT}&$filter=receivedDateTime ge {since}"
            f"&$orderby={NEWEST_FIRST}"
        )

    async def changes(self, cursor: Mapping[str, Any] | None, limit: int) -> ChangeBatch:
        size = max(1, min(limit, self.page_size))
        if cursor is None:
            return await self._place(size)
        state = DeltaCursor.read(cursor)
        reset = False
        try:
            page = await self._page(state.link, size)
        except _Gone:
            log.warning(
                "Graph delta state expired; resynchronising since the connection",
                extra={"mailbox": self.graph.mailbox, "folder": self.folder},
            )
            reset = True
            page = await self._page(self.first_link(state.since), size)
        headers, vanished = await self._summaries(page.get("value") or [])
        next_link, delta_link = page.get("@odata.nextLink"), page.get("@odata.deltaLink")
        link = next_link or delta_link
        if not isinstance(link, str):
            raise ProviderProtocolError("Graph delta page has neither nextLink nor deltaLink")
        return ChangeBatch(
            headers=headers,
            cursor=DeltaCursor(link, state.since).json(),
            more=bool(next_link),
            reset=reset,
            vanished=vanished,
        )

    async def _place(self, size: int) -> ChangeBatch:
        """Walk the current round to its end; what it lists (the last minutes' mail)
        is discarded: history is never offered to the kernel."""
        since = _now_since()
        link = self.first_link(since)
        for _ in range(10_000):
            page = await self._page(link, size)
            if isinstance(page.get("@odata.deltaLink"), str):
                return ChangeBatch(headers=[], cursor=DeltaCursor(page["@odata.deltaLink"],
                                                                  since).json())
            following = page.get("@odata.nextLink")
            if not isinstance(following, str):
                raise ProviderProtocolError("Graph delta page has neither nextLink nor deltaLink")
            link = following
        raise ProviderProtocolError("Graph delta did not end")

    async def _page(self, link: str, size: int) -> dict[str, Any]:
        try:
            response = await self.graph.request(
                "GET", link, prefer=[f"odata.maxpagesize={size}"]
            )
        except GraphRequestError as exc:
            if exc.status == 410 or exc.code.lower() in _GONE_CODES:
                raise _Gone() from None
            raise
        return json_object(response)

    async def _summaries(
        self, items: list[Any]
    ) -> tuple[list[HeaderSummary], list[str]]:
        found: list[tuple[str, int, HeaderSummary]] = []
        vanished: list[str] = []
        missing: list[tuple[int, dict[str, Any]]] = []
        seen: set[str] = set()
        for position, item in enumerate(items):
            if not isinstance(item, dict) or not isinstance(item.get("id"), str):
                continue
            if item["id"] in seen:
                continue  # replayed within the page
            seen.add(item["id"])
            if "@removed" in item:
                vanished.append(item["id"])
            elif is_partial(item):
                continue  # an update of a message listed before: nothing new
            elif item.get("isDraft") is True:
                continue  # a draft in this folder has not been sent or received
            elif self._complete(transport_headers(item)):
                found.append((_arrival(item), position, summary(item)))
            else:
                missing.append((position, item))
        if missing:
            paths = [f"{self.graph.root}/messages/{quote(i['id'], safe='')}?{HEADER_QUERY}"
                     for _, i in missing]
            for (position, item), (status, body) in zip(
                missing, await self.graph.batch_get(paths), strict=True
            ):
                if status == 200 and body.get("isDraft") is not True:
                    found.append((_arrival(item), position, summary({**item, **body})))
                elif status == 404:
                    vanished.append(item["id"])  # deleted since the delta page
                elif status != 200:
                    raise TransientProviderError(
                        f"Graph could not read the headers of a message ({status})"
                    )
        # Arrival order (delta's own order is not guaranteed): parents before
        # replies, so the kernel can chain replies within a batch.
        found.sort(key=lambda f: (f[0], f[1]))
        return [f[2] for f in found], vanished


    def _complete(self, headers: Mapping[str, str]) -> bool:
        """Whether the transport headers say all there is to know about threading.

        Received mail has them all (a missing In-Reply-To means none); the
        user's own mail has none, or, in shared mailboxes, some without the
        threading ones: then the MAPI properties are read.
        """
        if not headers:
            return False
        if self.folder.lower() != SENT_FOLDER:
            return True
        return "in-reply-to" in headers and "references" in headers


def is_partial(item: Mapping[str, Any]) -> bool:
    """A delta entry that only says what changed in a message listed before."""
    return "internetMessageId" not in item and "receivedDateTime" not in item


class _Gone(Exception):
    """The delta state is no longer known (410 Gone / syncStateNotFound)."""


def _arrival(item: Mapping[str, Any]) -> str:
    return str(item.get("receivedDateTime") or item.get("sentDateTime") or "")


def transport_headers(item: Mapping[str, Any]) -> dict[str, str]:
    """``internetMessageHeaders`` as a dict of lower-case names (later ones joined)."""
    found: dict[str, str] = {}
    for header in item.get("internetMessageHeaders") or []:
        if isinstance(header, dict) and isinstance(header.get("name"), str):
            name = header["name"].lower()
            value = str(header.get("value") or "")
            found[name] = f"{found[name]} {value}" if name in found else value
    return found


def _props(item: Mapping[str, Any]) -> dict[str, str]:
    found: dict[str, str] = {}
    for prop in item.get("singleValueExtendedProperties") or []:
        if isinstance(prop, dict) and isinstance(prop.get("id"), str):
            found[prop["id"].lower()] = str(prop.get("value") or "")
    return found


def summary(item: Mapping[str, Any]) -> HeaderSummary:
    """A :class:`HeaderSummary` of one Graph message (ref = its immutable id)."""
    headers = transport_headers(item)
    props = _props(item)
    own = parse_msgid_list(str(item.get("internetMessageId") or ""))
    in_reply_to = headers.get("in-reply-to") or props.get(IN_REPLY_TO_PROP.lower())
    references = headers.get("references") or props.get(REFERENCES_PROP.lower())
    sender = None
    origin = item.get("from")
    if isinstance(origin, dict) and isinstance(origin.get("emailAddress"), dict):
        sender = origin["emailAddress"].get("address") or None
    return HeaderSummary(
        ref=str(item["id"]),
        message_id=own[0] if own else None,
        in_reply_to=parse_msgid_list(in_reply_to),
        references=parse_msgid_list(references),
        sender=str(sender) if sender else None,
        subject=str(item["subject"]) if item.get("subject") is not None else None,
        date=str(item["sentDateTime"]) if item.get("sentDateTime") else None,
    )
