"""The writing half of the fake Graph: drafts (from MIME or JSON), send,
``sendMail``, ``createReply``, attachments and attachment upload sessions.

Faithful where it matters to threadsync: a MIME draft keeps the Message-ID it
was given (unless ``rewrite_message_ids`` simulates Exchange choosing its own),
``internetMessageId`` can be changed while the message is a draft only, JSON
``internetMessageHeaders`` accept only ``x-`` headers (at most 5), a message goes
to at most 500 recipients, the sender must be the mailbox owner, a sent draft
moves to Sent Items keeping its immutable id and ``Bcc`` is not transmitted, and
an upload session URL refuses an ``Authorization`` header and ranges of 4 MB or
more. ``sendMail`` accepts ``{"message", "saveToSentItems"}`` in any casing (the
official SDK capitalises them). Create and ``createReply`` answer with the whole
message, recipients included.

``/send`` answers 202 Accepted before the message is sent
(https://learn.microsoft.com/graph/api/message-send: "returns 202 Accepted
response code"; the copy in Sent Items is saved asynchronously). With
``FakeGraph.sent_items_lag`` set, the message is transmitted at once but lands
in Sent Items only after the lag; until then it still reads as a draft where it
was, and a second ``/send`` transmits it again: a client that re-sends after a
lost answer sends twice.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import re
import secrets
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from typing import Any

from tests.fakes.graph import ID, FakeGraph
from tests.fakes.mailstore import FakeMailbox, FakeMessage, Transmission, parse_mime
from tests.fakes.server import Call, Reply

MAX_RECIPIENTS = 500
UPLOAD_RANGE_LIMIT = 4 * 1024 * 1024


def _ci(data: dict[str, Any], key: str, default: Any = None) -> Any:
    """A JSON property, matched case-insensitively (as Graph does)."""
    for k, v in data.items():
        if k.lower() == key.lower():
            return v
    return default


def _recipients(data: dict[str, Any], key: str) -> list[str]:
    found = []
    for item in _ci(data, key) or []:
        address = _ci(_ci(item, "emailAddress") or {}, "address")
        if address:
            found.append(str(address))
    return found


class GraphWrites:
    """Registers the write endpoints on a :class:`FakeGraph`."""

    def __init__(self, graph: FakeGraph) -> None:
        self.g = graph
        self.transmissions: list[Transmission] = []
        self.uploads: dict[str, dict[str, Any]] = {}
        r = graph.router
        r.add("POST", r"/me/messages", self.create)
        r.add("PATCH", r"/me/messages/" + ID, self.patch)
        r.add("DELETE", r"/me/messages/" + ID, self.delete)
        r.add("POST", r"/me/messages/" + ID + r"/send", self.send)
        r.add("POST", r"/me/sendMail", self.send_mail)
        r.add("POST", r"/me/messages/" + ID + r"/createReply", self.create_reply)
        r.add("POST", r"/me/messages/" + ID + r"/attachments", self.add_attachment)
        r.add("GET", r"/me/messages/" + ID + r"/attachments", self.list_attachments)
        r.add("POST", r"/me/messages/" + ID + r"/attachments/createUploadSession",
              self.create_upload_session)

    # ---- building messages ----------------------------------------------------------------

    def _from_json(self, box: FakeMailbox, data: dict[str, Any]) -> EmailMessage | Reply:
        headers = _ci(data, "internetMessageHeaders") or []
        if len(headers) > 5:
            return Reply.graph_error(400, "InvalidInternetMessageHeaderCollection",
                                     "Maximum number of headers in one message should be less "
                                     "than or equal to 5.")
        msg = EmailMessage()
        msg["From"] = box.owner
        for kind, key in (("To", "toRecipients"), ("Cc", "ccRecipients"),
                          ("Bcc", "bccRecipients")):
            if _recipients(data, key):
                msg[kind] = ", ".join(_recipients(data, key))
        msg["Subject"] = str(_ci(data, "subject") or "")
        msg["Message-ID"] = str(_ci(data, "internetMessageId") or box.exchange_message_id())
        for header in headers:
            name = str(_ci(header, "name") or "")
            if not name.lower().startswith("x-"):
                return Reply.graph_error(400, "InvalidInternetMessageHeader",
                                         f"The internet message header name '{name}' should "
                                         "start with 'x-' or 'X-'.")
            msg[name] = str(_ci(header, "value") or "")
        body = _ci(data, "body") or {}
        subtype = "html" if str(_ci(body, "contentType") or "").lower() == "html" else "plain"
        msg.set_content(str(_ci(body, "content") or ""), subtype=subtype)
        for attachment in _ci(data, "attachments") or []:
            content = base64.b64decode(str(_ci(attachment, "contentBytes") or ""))
            maintype, _, subtype2 = str(_ci(attachment, "contentType") or
                                        "application/octet-stream").partition("/")
            msg.add_attachment(content, maintype=maintype, subtype=subtype2 or "octet-stream",
                               filename=str(_ci(attachment, "name") or "attachment"))
        return msg

    def _from_mime(self, box: FakeMailbox, body: bytes) -> EmailMessage | Reply:
        try:
            raw = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            return Reply.graph_error(400, "ErrorMimeContentInvalidBase64String",
                                     "Invalid base64 string for MIME content.")
        if not raw.strip():
            return Reply.graph_error(400, "ErrorMimeContentInvalid", "MIME content is empty.")
        msg = parse_mime(raw)
        if self.g.rewrite_message_ids or msg.get("Message-ID") is None:
            del msg["Message-ID"]
            msg["Message-ID"] = box.exchange_message_id()
        return msg

    def _too_many(self, msg: EmailMessage) -> Reply | None:
        count = len({a.lower() for _, a in email.utils.getaddresses(
            [str(v) for k in ("To", "Cc", "Bcc") for v in msg.get_all(k, [])]) if a})
        if count > MAX_RECIPIENTS:
            return Reply.graph_error(400, "ErrorTooManyRecipients",
                                     f"A message can't have more than {MAX_RECIPIENTS} "
                                     "recipients.")
        return None

    def _mime_or_json(self, call: Call, box: FakeMailbox) -> EmailMessage | Reply:
        kind = call.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "text/plain":
            return self._from_mime(box, call.body)
        if kind == "application/json":
            try:
                data = call.json()
            except ValueError:
                return Reply.graph_error(400, "BadRequest", "Invalid JSON.")
            return self._from_json(box, _ci(data, "message", data) if isinstance(data, dict)
                                   else {})
        return Reply.graph_error(415, "UnsupportedMediaType", f"Content-Type {kind!r}")

    # ---- drafts ---------------------------------------------------------------------------

    async def create(self, call: Call) -> Reply:
        with self.g.lock:
            box = self.g.mailbox(call.ctx["mailbox"])
            msg = self._mime_or_json(call, box)
            if isinstance(msg, Reply):
                return msg
            refused = self._too_many(msg)
            if refused is not None:
                return refused
            draft = box.add(msg, "drafts", draft=True)
            return Reply.json(201, self.created_json(call, draft))

    def created_json(self, call: Call, msg: FakeMessage) -> dict[str, Any]:
        """What create and createReply answer: the whole message (recipients,
        body, ids), as in https://learn.microsoft.com/graph/api/user-post-messages
        and https://learn.microsoft.com/graph/api/message-createreply."""
        return {"@odata.context": f"{self.g.base}/v1.0/$metadata#users('{call.ctx['mailbox']}')"
                                  "/messages/$entity",
                **msg.json(None, call.ctx["mailbox"], call.ctx["immutable"])}

    def _found(self, call: Call, ref: str) -> tuple[FakeMailbox, FakeMessage] | Reply:
        box = self.g.mailbox(call.ctx["mailbox"])
        msg = box.find(ref)
        if msg is None:
            return Reply.graph_error(404, "ErrorItemNotFound",
                                     "The specified object was not found in the store.")
        return box, msg

    async def patch(self, call: Call, ref: str) -> Reply:
        with self.g.lock:
            found = self._found(call, ref)
            if isinstance(found, Reply):
                return found
            box, msg = found
            data = call.json() or {}
            draft_only = {"internetmessageid", "subject", "body", "torecipients"}
            if not msg.is_draft and draft_only & {k.lower() for k in data}:
                return Reply.graph_error(400, "ErrorInvalidPropertyUpdateSentMessage",
                                         "Update operation is invalid for sent messages.")
            if _ci(data, "internetMessageId"):
                del msg.mime["Message-ID"]
                msg.mime["Message-ID"] = str(_ci(data, "internetMessageId"))
            if _ci(data, "subject") is not None:
                del msg.mime["Subject"]
                msg.mime["Subject"] = str(_ci(data, "subject"))
            if _ci(data, "isRead") is not None:
                msg.is_read = bool(_ci(data, "isRead"))
            box.changed(msg, *data)
            return Reply.json(200, self.g.message_json(call, msg, select={
                "internetmessageid", "subject", "isdraft", "isread"}))

    async def delete(self, call: Call, ref: str) -> Reply:
        with self.g.lock:
            found = self._found(call, ref)
            if isinstance(found, Reply):
                return found
            box, msg = found
            box.delete(msg)
            return Reply(204)

    # ---- sending --------------------------------------------------------------------------

    def transmit(self, box: FakeMailbox, msg: EmailMessage) -> Reply | None:
        """Let ``msg`` leave the mailbox (checks the sender and the recipients)."""
        senders = [a.lower() for _, a in email.utils.getaddresses(
            [str(v) for v in msg.get_all("From", [])])]
        if senders and senders != [box.owner.lower()]:
            return Reply.graph_error(403, "ErrorSendAsDenied", "The user account which was "
                                     "used to submit this request does not have the right to "
                                     "send mail on behalf of the specified sending account.")
        refused = self._too_many(msg)
        if refused is not None:
            return refused
        recipients = [a for k in ("To", "Cc", "Bcc") for _, a in email.utils.getaddresses(
            [str(v) for v in msg.get_all(k, [])]) if a]
        if not recipients:
            return Reply.graph_error(400, "ErrorInvalidRecipients", "At least one recipient "
                                     "is not valid., A message can't be sent because it "
                                     "contains no recipients.")
        if msg.get("From") is None:
            msg["From"] = box.owner
        if msg.get("Date") is None:
            msg["Date"] = email.utils.formatdate()
        wire = parse_mime(msg.as_bytes())
        del wire["Bcc"]
        self.transmissions.append(Transmission(
            box.owner, " ".join(str(msg.get("Message-ID", "")).split()) or None,
            recipients, wire.as_bytes()))
        return None

    async def send(self, call: Call, ref: str) -> Reply:
        with self.g.lock:
            found = self._found(call, ref)
            if isinstance(found, Reply):
                return found
            box, msg = found
            if not msg.is_draft:
                return Reply.graph_error(400, "ErrorInvalidOperation",
                                         "The item was already sent.")
            refused = self.transmit(box, msg.mime)
            if refused is not None:
                return refused
            if self.g.sent_items_lag > 0:
                # Accepted and on its way; until the copy lands the item still
                # reads as a draft, and a second /send would send it again.
                msg.lands_at = datetime.now(UTC) + timedelta(seconds=self.g.sent_items_lag)
                return Reply(202)
            msg.is_draft = False
            msg.sent = msg.received = datetime.now(UTC)
            box.move(msg, "sentitems")
            self.g.on_created(box, msg)
            return Reply(202)

    async def send_mail(self, call: Call) -> Reply:
        with self.g.lock:
            box = self.g.mailbox(call.ctx["mailbox"])
            save = True
            if call.headers.get("content-type", "").startswith("application/json"):
                data = call.json() or {}
                if _ci(data, "message") is None:
                    return Reply.graph_error(400, "ErrorInvalidParameter",
                                             "The value of the parameter 'Message' is empty.")
                save = bool(_ci(data, "saveToSentItems", True))
            msg = self._mime_or_json(call, box)
            if isinstance(msg, Reply):
                return msg
            refused = self.transmit(box, msg)
            if refused is not None:
                return refused
            if save:
                copy = box.add(msg, "sentitems")
                self.g.on_created(box, copy)
            return Reply(202)

    def reply_to(self, box: FakeMailbox, original: FakeMessage, comment: str) -> EmailMessage:
        """What Outlook's Reply builds: threading headers from the original."""
        reply = EmailMessage()
        reply["From"] = box.owner
        sender = email.utils.getaddresses([str(original.mime.get("Reply-To") or
                                               original.mime.get("From") or "")])
        reply["To"] = ", ".join(a for _, a in sender if a)
        subject = original.header("Subject") or ""
        reply["Subject"] = subject if subject.lower().startswith("re:") else f"RE: {subject}"
        reply["Message-ID"] = box.exchange_message_id()
        parent = original.internet_message_id
        if parent:
            reply["In-Reply-To"] = parent
            chain = (original.header("References") or "").split()
            reply["References"] = " ".join([*chain[-8:], parent])
        reply.set_content(f"{comment}\n\n> (original message)\n")
        return reply

    async def create_reply(self, call: Call, ref: str) -> Reply:
        with self.g.lock:
            found = self._found(call, ref)
            if isinstance(found, Reply):
                return found
            box, original = found
            data = call.json() if call.body else {}
            draft = box.add(self.reply_to(box, original, str(_ci(data or {}, "comment") or "")),
                            "drafts", draft=True)
            return Reply.json(201, self.created_json(call, draft))

    # ---- attachments ----------------------------------------------------------------------

    def attach(self, box: FakeMailbox, msg: FakeMessage, name: str, content_type: str,
               data: bytes, inline: bool, content_id: str | None) -> None:
        maintype, _, subtype = content_type.partition("/")
        msg.mime.add_attachment(data, maintype=maintype or "application",
                                subtype=subtype or "octet-stream", filename=name,
                                disposition="inline" if inline else "attachment",
                                cid=f"<{content_id}>" if content_id else None)
        box.changed(msg, "hasAttachments")

    async def add_attachment(self, call: Call, ref: str) -> Reply:
        with self.g.lock:
            found = self._found(call, ref)
            if isinstance(found, Reply):
                return found
            box, msg = found
            data = call.json() or {}
            if _ci(data, "@odata.type") != "#microsoft.graph.fileAttachment":
                return Reply.graph_error(400, "ErrorInvalidParameter",
                                         "Only fileAttachment is supported here.")
            content = base64.b64decode(str(_ci(data, "contentBytes") or ""))
            name = str(_ci(data, "name") or "attachment")
            self.attach(box, msg, name, str(_ci(data, "contentType") or
                                            "application/octet-stream"),
                        content, bool(_ci(data, "isInline")), _ci(data, "contentId"))
            return Reply.json(201, {"@odata.type": "#microsoft.graph.fileAttachment",
                                    "id": secrets.token_urlsafe(16), "name": name,
                                    "size": len(content)})

    async def list_attachments(self, call: Call, ref: str) -> Reply:
        with self.g.lock:
            found = self._found(call, ref)
            if isinstance(found, Reply):
                return found
            _, msg = found
            call.ctx["body_of"] = msg.id
            return Reply.json(200, {"value": [
                {"@odata.type": "#microsoft.graph.fileAttachment", "name": p.get_filename(),
                 "contentType": p.get_content_type(),
                 "size": len(p.get_payload(decode=True) or b"")}
                for p in msg.attachments()]})

    async def create_upload_session(self, call: Call, ref: str) -> Reply:
        with self.g.lock:
            found = self._found(call, ref)
            if isinstance(found, Reply):
                return found
            box, msg = found
            item = _ci(call.json() or {}, "AttachmentItem") or {}
            size = int(_ci(item, "size") or 0)
            if _ci(item, "attachmentType") != "file" or not 0 < size <= 150 * 1024 * 1024:
                return Reply.graph_error(400, "ErrorInvalidParameter",
                                         "AttachmentItem needs attachmentType file and a size "
                                         "up to 150 MB.")
            session = secrets.token_urlsafe(16)
            self.uploads[session] = {
                "box": box, "msg": msg, "size": size, "data": bytearray(),
                "name": str(_ci(item, "name") or "attachment"),
                "content_type": str(_ci(item, "contentType") or "application/octet-stream"),
                "inline": bool(_ci(item, "isInline")), "content_id": _ci(item, "contentId"),
            }
            expires = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
            return Reply.json(201, {
                "@odata.context": f"{self.g.base}/v1.0/$metadata#microsoft.graph.uploadSession",
                "uploadUrl": f"{self.g.base}/upload/{session}?authtoken={secrets.token_hex(8)}",
                "expirationDateTime": expires,
                "nextExpectedRanges": ["0-"],
            })

    async def upload(self, call: Call) -> Reply:
        """``PUT`` to an upload URL (outside ``/v1.0``, no bearer token)."""
        if "authorization" in call.headers:
            return Reply.graph_error(401, "InvalidAuthenticationToken", "Do not send an "
                                     "Authorization header to the upload URL.")
        session_id = call.path.rsplit("/", 1)[-1]
        with self.g.lock:
            session = self.uploads.get(session_id)
            if session is None:
                return Reply.graph_error(404, "ItemNotFound", "Upload session not found.")
            match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", call.headers.get("content-range",
                                                                               ""))
            data: bytearray = session["data"]
            if match is None or int(match.group(1)) != len(data) or int(
                match.group(3)
            ) != session["size"] or int(match.group(2)) - int(match.group(1)) + 1 != len(
                call.body
            ):
                return Reply.graph_error(416, "InvalidRange", "The Content-Range is not the "
                                         "next expected range.")
            if len(call.body) >= UPLOAD_RANGE_LIMIT:
                return Reply.graph_error(413, "RequestEntityTooLarge",
                                         "Each range must be smaller than 4 MB.")
            data.extend(call.body)
            if len(data) < session["size"]:
                return Reply.json(200, {"expirationDateTime": "", "nextExpectedRanges":
                                        [f"{len(data)}-"]})
            del self.uploads[session_id]
            self.attach(session["box"], session["msg"], session["name"],
                        session["content_type"], bytes(data), session["inline"],
                        session["content_id"])
            return Reply(201, b"", {"location": f"{self.g.base}/v1.0/me/messages/"
                                                f"{session['msg'].id}/attachments/1"})
