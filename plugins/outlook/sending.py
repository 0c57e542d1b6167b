"""Sending CRM mail through the user's mailbox with Graph: our MIME becomes a
draft, the draft is sent.

``POST /me/messages`` with ``Content-Type: text/plain`` and the base64 MIME keeps
our ``Message-ID``, ``In-Reply-To`` and ``References`` (JSON sends accept only
``x-`` headers), and answers with the draft's id and ``internetMessageId``; should
the id differ, it is set again (``internetMessageId`` is writable while the
message is a draft), because later replies are matched by it. Envelope-only
recipients go in as ``Bcc``, which Exchange keeps out of what it transmits.

A Graph request is capped near 4 MB, and base64 grows the MIME by a third. A
larger message is split: the draft is created without its biggest attachments,
which are added afterwards, each with one ``POST .../attachments`` when under
3 MB, else through an upload session (``createUploadSession`` and ranges under
4 MB). Each attachment the kernel lets through is at most 3 MB (R8).

``checkpoint()`` is awaited right before ``POST .../send``. Graph answers 202
before the message is sent, and the copy reaches Sent Items later; until then
the item can still read as a draft, and a second ``/send`` would send it again.
So when the answer to a send is lost (connection dropped after the request
left, gateway timeout), the draft is watched for up to ``send_settle_seconds``:
once it stops being a draft it was sent. Only a draft still a draft after that
window is sent again (Graph did not take it), at most :data:`SEND_ATTEMPTS`
times; after that, the message is treated as sent and its draft kept, since a
duplicate is worse than a gap (R9) and deleting it could withdraw a message on
its way. A connection that could not be made at all carried nothing and is
simply tried again. Graph files the copy in Sent Items.
"""

from __future__ import annotations

import asyncio
import base64
import email
import email.policy
import logging
from dataclasses import dataclass
from email.message import Message
from email.parser import BytesHeaderParser
from email.utils import getaddresses
from typing import Any
from urllib.parse import quote

from threadsync.core.errors import ProviderError, ProviderProtocolError
from threadsync.core.mime import parse_msgid_list
from threadsync.core.provider import Checkpoint, OutgoingMail
from threadsync.plugins.outlook.graph import (
    GraphAmbiguous,
    GraphClient,
    GraphRequestError,
    json_object,
)

log = logging.getLogger(__name__)

#: Raw MIME up to this size fits one create request once base64-encoded (< 4 MB).
MIME_INLINE_LIMIT = 2_900_000
#: Attachments under this size are added with one POST; larger ones are uploaded.
SIMPLE_ATTACHMENT_LIMIT = 3_000_000
#: Upload-session range size: a multiple of 320 KiB, under 4 MB.
UPLOAD_CHUNK = 10 * 320 * 1024
MAX_RECIPIENTS = 500
#: Sends of one draft whose answers were lost, at most.
SEND_ATTEMPTS = 3


@dataclass(frozen=True)
class DetachedPart:
    """An attachment taken out of the MIME, to be added to the draft on its own."""

    name: str
    content_type: str
    data: bytes
    inline: bool
    content_id: str | None


def _eol(raw: bytes) -> bytes:
    head = raw.split(b"\n\n", 1)[0]
    return b"\r\n" if b"\r\n" in head else b"\n"


def with_bcc(raw: bytes, recipients: tuple[str, ...]) -> bytes:
    """Add a ``Bcc`` header naming the envelope recipients not in To or Cc."""
    headers = BytesHeaderParser(policy=email.policy.compat32).parsebytes(raw)
    shown = {
        addr.lower()
        for _, addr in getaddresses([str(v) for v in headers.get_all("to", [])
                                     + headers.get_all("cc", [])])
    }
    hidden = [r for r in dict.fromkeys(recipients) if r.lower() not in shown]
    if not hidden:
        return raw
    eol = _eol(raw)
    line = b"Bcc: " + (b"," + eol + b" ").join(a.encode("ascii") for a in hidden) + eol
    return line + raw


def detach_attachments(
    raw: bytes, limit: int = MIME_INLINE_LIMIT
) -> tuple[bytes, list[DetachedPart]]:
    """Take the biggest attachments out of ``raw`` until it is at most ``limit``."""
    msg = email.message_from_bytes(raw, policy=email.policy.SMTP)
    found: list[tuple[Message, Message, int]] = []

    def walk(container: Message) -> None:
        for part in container.get_payload():
            if not isinstance(part, Message):
                continue
            if part.is_multipart():
                walk(part)
            elif part.get_content_disposition() in ("attachment", "inline") and (
                part.get_filename() or part.get_content_maintype() != "text"
            ):
                data = part.get_payload(decode=True)
                found.append((container, part, len(data) if isinstance(data, bytes) else 0))

    if msg.is_multipart():
        walk(msg)
    detached: list[DetachedPart] = []
    current = raw
    for container, part, _size in sorted(found, key=lambda f: f[2], reverse=True):
        if len(current) <= limit:
            break
        payload = container.get_payload()
        assert isinstance(payload, list)
        payload.remove(part)
        data = part.get_payload(decode=True)
        content_id = part.get("Content-ID")
        detached.append(
            DetachedPart(
                name=part.get_filename() or "attachment",
                content_type=part.get_content_type(),
                data=data if isinstance(data, bytes) else b"",
                inline=part.get_content_disposition() == "inline",
                content_id=str(content_id).strip("<> ") if content_id else None,
            )
        )
        current = msg.as_bytes()
    if len(current) > limit:
        raise ProviderProtocolError(
            f"the message is {len(raw)} bytes; Graph takes at most about 4 MB per request "
            "and its body alone does not fit"
        )
    return current, detached


class Sender:
    """Sends :class:`OutgoingMail` through one mailbox."""

    def __init__(self, graph: GraphClient, settle_seconds: float = 30.0) -> None:
        self.graph = graph
        self.settle_seconds = settle_seconds

    async def send(self, mail: OutgoingMail, checkpoint: Checkpoint) -> None:
        if len(set(mail.recipients)) > MAX_RECIPIENTS:
            raise ProviderProtocolError(f"Graph sends to at most {MAX_RECIPIENTS} recipients")
        raw = with_bcc(mail.raw, mail.recipients)
        detached: list[DetachedPart] = []
        if len(raw) > MIME_INLINE_LIMIT:
            raw, detached = detach_attachments(raw)
        draft_id = await self._create_draft(raw, mail.message_id)
        try:
            for part in detached:
                await self._attach(draft_id, part)
            await checkpoint()
        except BaseException:
            # Not sent: no draft should linger in the user's Drafts folder.
            await self._discard(draft_id)
            raise
        await self._send_draft(draft_id)

    async def _create_draft(self, raw: bytes, message_id: str) -> str:
        response = await self.graph.request(
            "POST", f"{self.graph.root}/messages", content=base64.b64encode(raw),
            headers={"Content-Type": "text/plain"},
        )
        draft = json_object(response)
        draft_id = draft.get("id")
        if not isinstance(draft_id, str):
            raise ProviderProtocolError("Graph created a draft without an id")
        try:
            if _same_id(draft.get("internetMessageId"), message_id):
                return draft_id
            # Exchange chose its own Message-ID; ours must survive (thread membership).
            patched = json_object(
                await self.graph.request(
                    "PATCH", _message(self.graph, draft_id), json={"internetMessageId": message_id}
                )
            )
            if not _same_id(patched.get("internetMessageId"), message_id):
                raise ProviderProtocolError("Graph did not keep the message's Message-ID")
        except BaseException:
            await self._discard(draft_id)
            raise
        return draft_id

    async def _attach(self, draft_id: str, part: DetachedPart) -> None:
        if len(part.data) < SIMPLE_ATTACHMENT_LIMIT:
            body: dict[str, Any] = {
                "@odata.type": "#microsoft.graph.fileAttachment",
                "name": part.name,
                "contentType": part.content_type,
                "contentBytes": base64.b64encode(part.data).decode("ascii"),
                "isInline": part.inline,
            }
            if part.content_id:
                body["contentId"] = part.content_id
            await self.graph.request(
                "POST", _message(self.graph, draft_id) + "/attachments", json=body
            )
            return
        item: dict[str, Any] = {
            "attachmentType": "file",
            "name": part.name,
            "size": len(part.data),
            "contentType": part.content_type,
            "isInline": part.inline,
        }
        if part.content_id:
            item["contentId"] = part.content_id
        session = json_object(
            await self.graph.request(
                "POST",
                _message(self.graph, draft_id) + "/attachments/createUploadSession",
                json={"AttachmentItem": item},
            )
        )
        upload_url = session.get("uploadUrl")
        if not isinstance(upload_url, str) or not upload_url.startswith("https://"):
            raise ProviderProtocolError("Graph gave no usable attachment upload URL")
        total = len(part.data)
        for start in range(0, total, UPLOAD_CHUNK):
            await self.graph.upload_range(
                upload_url, part.data[start : start + UPLOAD_CHUNK], start, total
            )

    async def _send_draft(self, draft_id: str) -> None:
        for _ in range(SEND_ATTEMPTS):
            try:
                await self.graph.request(
                    "POST", _message(self.graph, draft_id) + "/send", content=b"",
                    idempotent=False,
                )
                return
            except GraphAmbiguous:
                if await self._left(draft_id):
                    return
            except ProviderError:
                # Graph answered: it refused, or throttled without acting.
                if await self.draft_state(draft_id) == "sent":
                    return
                await self._discard(draft_id)
                raise
        log.warning("Graph send outcome unknown; treating as sent (draft kept)",
                    extra={"mailbox": self.graph.mailbox})

    async def _left(self, draft_id: str) -> bool:
        """After a lost answer: whether the draft stops being a draft within the
        settle window (sent; also when it can no longer be told: R9)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settle_seconds
        delay = 0.25
        while True:
            if await self.draft_state(draft_id) != "draft":
                return True
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 2, 5.0)

    async def draft_state(self, draft_id: str) -> str:
        """``draft``, ``sent``, ``gone`` or ``unknown``."""
        try:
            data = await self.graph.get_json(_message(self.graph, draft_id), {"$select": "isDraft"})
        except GraphRequestError as exc:
            return "gone" if exc.status == 404 else "unknown"
        except ProviderError:
            return "unknown"
        return "draft" if data.get("isDraft") is True else "sent"

    async def _discard(self, draft_id: str) -> None:
        """Delete a draft that will not be sent (best effort: a leftover draft is
        visible to the user but never sent)."""
        try:
            await self.graph.request("DELETE", _message(self.graph, draft_id))
        except ProviderError as exc:
            log.warning("could not delete an unsent draft: %s", exc,
                        extra={"mailbox": self.graph.mailbox})

    async def find_sent(self, message_id: str) -> bool:
        wanted = message_id.strip()
        if not wanted.startswith("<"):
            wanted = f"<{wanted}>"
        if not wanted.isascii() or not wanted.isprintable():
            raise ProviderProtocolError("a Message-ID must be printable ASCII")
        literal = wanted.replace("'", "''")
        data = await self.graph.get_json(
            f"{self.graph.root}/mailFolders/sentitems/messages",
            {"$filter": f"internetMessageId eq '{literal}'", "$select": "id", "$top": "1"},
        )
        return bool(data.get("value"))


def _message(graph: GraphClient, message_id: str) -> str:
    return f"{graph.root}/messages/{quote(message_id, safe='')}"


def _same_id(got: Any, wanted: str) -> bool:
    have, want = parse_msgid_list(str(got or "")), parse_msgid_list(wanted)
    return bool(have) and bool(want) and have[0] == want[0]
