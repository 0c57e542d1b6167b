"""A stateful fake Exchange Server speaking Exchange Web Services (SOAP over HTTPS).

exchangelib talks to it unmodified, over a real loopback HTTPS connection checked
against the test CA (:class:`~tests.fakes.server.ServerThread`). It checks what a
real Exchange Server checks: the SOAP 1.1 envelope, the ``RequestServerVersion``
header, Basic or NTLM credentials on every request (401 otherwise), access to the
mailbox named in the request (the login's own, or any mailbox when the login holds
ApplicationImpersonation and sends ``ExchangeImpersonation``), and that a sync state
is one it issued for that folder. It answers ``ErrorServerBusy`` with
``BackOffMilliseconds`` on demand (:meth:`FakeEws.throttle`), can answer slowly
(:attr:`FakeEws.delay`) and can lose the answer of a send that went out
(:attr:`FakeEws.lose_next_send_answer`).

Operations: SyncFolderItems, GetItem (``item:MimeContent`` and the other
requested properties, extended properties 0x1042, 0x1039, 0x007D included),
CreateItem (``MessageDisposition="SendAndSaveCopy"`` from MimeContent, plus
BccRecipients), FindItem restricted on ``message:InternetMessageId``, pull
subscriptions (Subscribe / GetEvents / Unsubscribe), and autodiscover: the POX
endpoint (``/autodiscover/autodiscover.xml``) and the SOAP endpoint
(``/autodiscover/autodiscover.svc``, GetUserSettings ``ExternalEwsUrl`` and
``InternalEwsUrl``).

The XML shapes follow Microsoft's EWS reference, "EWS reference for Exchange"
(learn.microsoft.com/exchange/client-developer/web-service-reference/): the pages
"SyncFolderItems operation", "GetItem operation (email message)", "CreateItem
operation (email message)", "FindItem operation", "IsEqualTo", "Subscribe
operation", "GetEvents operation", "Unsubscribe operation", "ResponseCode"
(ErrorInvalidSyncStateData, ErrorServerBusy, ErrorItemNotFound,
ErrorSubscriptionNotFound, ErrorImpersonateUserDenied), "MessageXml" (the
``BackOffMilliseconds`` value of ErrorServerBusy), "RequestServerVersion",
"ExchangeImpersonation", "ServerVersionInfo", "ExtendedFieldURI"; the
autodiscover pages "POX Autodiscover request/response reference" and
"GetUserSettings operation (SOAP)"; and "Authentication and EWS in Exchange".
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import uuid
from collections.abc import Callable

from lxml import etree

from tests.fakes.ews_autodiscover import autodiscover
from tests.fakes.ews_items import (
    CHALLENGES,
    EWS_PATH,
    NO_FOLDER,
    VERSIONS,
    E,
    Logged,
    M,
    ResponseError,
    S,
    SoapFault,
    T,
    item_xml,
    q,
    shape,
)
from tests.fakes.ews_ntlm import NtlmGate
from tests.fakes.ews_store import EwsItem, EwsMailbox, EwsStore, Subscription, Transmission
from tests.fakes.server import Call, Reply


class FakeEws:
    """Fresh Exchange state served at ``{base}/EWS/Exchange.asmx``."""

    def __init__(self, base: str, store: EwsStore | None = None) -> None:
        self.base = base
        self.store = store or EwsStore()
        self.log: list[Logged] = []
        self.throttles: list[int] = []
        self.failures: list[str] = []
        self.delay = 0.0
        self.lose_next_send_answer = False
        #: sync states refused with ErrorInvalidSyncStateData
        self.invalid_sync_states = 0
        self.build = ("15", "2", "1118", "7")
        self.ntlm = NtlmGate(self.store)
        #: called with (operation) before each answer; tests use it to act mid-call
        self.before_answer: Callable[[str], None] | None = None

    @property
    def url(self) -> str:
        return self.base + EWS_PATH

    # ---- what the tests do -------------------------------------------------------------

    def fail_next(self, code: str, times: int = 1) -> None:
        """Answer the next ``times`` EWS requests with this error code (a SOAP
        fault), e.g. ErrorMailboxMoveInProgress, ErrorMailboxStoreUnavailable."""
        self.failures.extend([code] * times)

    def throttle(self, times: int, back_off_ms: int = 200) -> None:
        """Answer the next ``times`` EWS requests with ErrorServerBusy."""
        self.throttles.extend([back_off_ms] * times)

    def deliver(self, address: str, raw: bytes) -> EwsItem:
        box = self._box(address)
        item = box.add(raw, "inbox", transport=True)
        self.store.notify(box, item)
        return item

    def file_in_sent(self, address: str, raw: bytes) -> EwsItem:
        box = self._box(address)
        item = box.add(raw, "sentitems", transport=False)
        self.store.notify(box, item)
        return item

    def client_send(self, address: str, raw: bytes) -> EwsItem:
        """The user sends from Outlook: the message leaves, the copy is in Sent Items."""
        msg = email.message_from_bytes(raw)
        named = msg.get_all("To", []) + msg.get_all("Cc", [])
        rcpts = [a for _, a in email.utils.getaddresses(named)]
        self.store.transmissions.append(Transmission(address, msg.get("Message-ID"), rcpts, raw))
        return self.file_in_sent(address, raw)

    def sent(self, message_id: str | None = None) -> list[Transmission]:
        return [t for t in self.store.transmissions
                if message_id is None or t.message_id == message_id]

    def items(self, address: str, folder: str) -> list[EwsItem]:
        return self._box(address).in_folder(folder)

    def message_ids(self, address: str, folder: str) -> list[str | None]:
        return [i.internet_message_id for i in self.items(address, folder)]

    def id_of(self, address: str, message_id: str) -> str:
        box = self._box(address)
        return next(i.id for i in box.items.values() if i.internet_message_id == message_id)

    def bodies_read(self) -> set[str]:
        return {b for entry in self.log for b in entry.bodies}

    def count(self, operation: str | None = None) -> int:
        return sum(1 for e in self.log if operation is None or e.operation == operation)

    def _box(self, address: str) -> EwsMailbox:
        box = self.store.mailbox(address)
        assert box is not None, f"no mailbox {address}"
        return box

    # ---- HTTP ---------------------------------------------------------------------------

    async def handle(self, call: Call) -> Reply:
        path = call.path.lower()
        if path.startswith("/autodiscover/"):
            login, challenge = self._authenticate(call)
            reply = autodiscover(call, self.url, login, challenge)
            self.log.append(Logged("(autodiscover)", login, reply.status))
            return reply
        if path != EWS_PATH.lower():
            return Reply.text(404, "Not Found")
        if call.method != "POST":
            return Reply.text(405, "Method Not Allowed")
        login, challenge = self._authenticate(call)
        if login is None:
            self.log.append(Logged("(unauthorized)", None, 401))
            return Reply(401, b"401 - Unauthorized: Access is denied due to invalid credentials.",
                         {"content-type": "text/html",
                          "www-authenticate": challenge or CHALLENGES})
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.throttles:
            back_off = self.throttles.pop(0)
            self.log.append(Logged("(throttled)", login, 500))
            return self._fault("ErrorServerBusy", "The server cannot service this request "
                               "right now. Try again later.", back_off_ms=back_off)
        if self.failures:
            code = self.failures.pop(0)
            self.log.append(Logged(f"(fault {code})", login, 500))
            return self._fault(code, f"{code} (on demand)")
        try:
            root = etree.fromstring(call.body, etree.XMLParser(resolve_entities=False))
        except etree.XMLSyntaxError as exc:
            return self._fault("ErrorSchemaValidation",
                               f"The request failed schema validation: {exc}", status=400)
        try:
            op, body, logged = self._soap(root, login)
        except SoapFault as fault:
            self.log.append(Logged(f"(fault {fault.code})", login, fault.status))
            return self._fault(fault.code, fault.message, status=fault.status)
        self.log.append(logged)
        if self.before_answer is not None:
            self.before_answer(op)
        if op == "CreateItem" and self.lose_next_send_answer:
            self.lose_next_send_answer = False
            return Reply(502, b"<html><body>Bad Gateway</body></html>",
                         {"content-type": "text/html"})
        return self._envelope(body)

    def _authenticate(self, call: Call) -> tuple[str | None, str | None]:
        """(address of the login, None) or (None, a WWW-Authenticate challenge)."""
        header = call.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        if not header:
            return self.ntlm.connection_login(call), None
        if scheme.lower() == "basic":
            try:
                user, _, password = base64.b64decode(value).decode("utf-8").partition(":")
            except (ValueError, UnicodeDecodeError):
                return None, None
            return self.store.login(user, password), None
        if scheme.lower() == "ntlm":
            return self.ntlm.step(call, value)
        if scheme.lower() == "bearer":
            return self.store.bearer(value), None
        return None, None

    # ---- SOAP ---------------------------------------------------------------------------

    def _soap(self, root: etree._Element, login: str
              ) -> tuple[str, etree._Element, Logged]:
        if root.tag != q(S, "Envelope"):
            raise SoapFault("ErrorSchemaValidation", "The request is not a SOAP 1.1 envelope.", 400)
        header = root.find(q(S, "Header"))
        version = header.find(q(T, "RequestServerVersion")) if header is not None else None
        if version is None or version.get("Version") not in VERSIONS:
            raise SoapFault("ErrorInvalidServerVersion",
                            "The specified server version is invalid.")
        acting = login
        imp = header.find(q(T, "ExchangeImpersonation")) if header is not None else None
        if imp is not None:
            target = imp.findtext(f"{{{T}}}ConnectingSID/{{{T}}}PrimarySmtpAddress") or \
                imp.findtext(f"{{{T}}}ConnectingSID/{{{T}}}SmtpAddress")
            if login.lower() not in self.store.impersonators:
                raise SoapFault("ErrorImpersonateUserDenied",
                                "The account does not have permission to impersonate the "
                                "requested user.")
            if not target or self.store.mailbox(target) is None:
                raise SoapFault("ErrorNonExistentMailbox", "No mailbox with such guid.")
            acting = target
        body = root.find(q(S, "Body"))
        if body is None or len(body) == 0:
            raise SoapFault("ErrorSchemaValidation", "The request has no Body.", 400)
        request = body[0]
        op = etree.QName(request).localname
        if etree.QName(request).namespace != M:
            raise SoapFault("ErrorSchemaValidation", f"Unknown element {request.tag}", 400)
        handler = getattr(self, f"_op_{op}", None)
        if handler is None:
            raise SoapFault("ErrorInvalidOperation", f"{op} is not supported here.")
        logged = Logged(op, acting, 200)
        answer = handler(request, acting, logged)
        return op, answer, logged

    def _access(self, folder_ids: etree._Element | None, acting: str
                ) -> list[tuple[EwsMailbox, str]]:
        found = []
        if folder_ids is None:
            raise SoapFault("ErrorSchemaValidation", "Folder ids are missing.", 400)
        for fid in folder_ids:
            if fid.tag != q(T, "DistinguishedFolderId"):
                raise ResponseError("ErrorFolderNotFound", NO_FOLDER)
            name = fid.get("Id", "")
            address = fid.findtext(f"{{{T}}}Mailbox/{{{T}}}EmailAddress") or acting
            if address.lower() != acting.lower():
                raise ResponseError("ErrorAccessDenied", "Access is denied. Check credentials "
                                                         "and try again.")
            box = self.store.mailbox(address)
            if box is None:
                raise ResponseError("ErrorNonExistentMailbox", "No mailbox with such SMTP address.")
            if name not in box.folders:
                raise ResponseError("ErrorFolderNotFound", NO_FOLDER)
            found.append((box, name))
        return found

    @staticmethod
    def _message(op: str, build: Callable[[etree._Element], None] | None,
                 error: ResponseError | None = None) -> etree._Element:
        elem = etree.Element(q(M, f"{op}ResponseMessage"))
        if error is not None:
            elem.set("ResponseClass", "Error")
            etree.SubElement(elem, q(M, "MessageText")).text = error.message
            etree.SubElement(elem, q(M, "ResponseCode")).text = error.code
            etree.SubElement(elem, q(M, "DescriptiveLinkKey")).text = "0"
            if op == "SyncFolderItems":
                # SyncFolderItemsResponseMessageType: these follow in errors too.
                etree.SubElement(elem, q(M, "SyncState"))
                etree.SubElement(elem, q(M, "IncludesLastItemInRange")).text = "true"
            return elem
        elem.set("ResponseClass", "Success")
        etree.SubElement(elem, q(M, "ResponseCode")).text = "NoError"
        if build is not None:
            build(elem)
        return elem

    def _response(self, op: str, messages: list[etree._Element]) -> etree._Element:
        resp = etree.Element(q(M, f"{op}Response"), nsmap={"m": M, "t": T})
        container = etree.SubElement(resp, q(M, "ResponseMessages"))
        container.extend(messages)
        return resp

    def _single(self, op: str, build: Callable[[etree._Element], None]) -> etree._Element:
        try:
            message = self._message(op, build)
        except ResponseError as err:
            message = self._message(op, None, err)
        return self._response(op, [message])

    # ---- operations ---------------------------------------------------------------------

    def _op_SyncFolderItems(self, request: etree._Element, acting: str, logged: Logged
                            ) -> etree._Element:
        _, props = shape(request)
        max_changes = int(request.findtext(q(M, "MaxChangesReturned")) or "0")
        if not 1 <= max_changes <= 512:
            raise SoapFault("ErrorInvalidArgument", "MaxChangesReturned must be 1 to 512.")
        token = request.findtext(q(M, "SyncState"))

        def build(elem: etree._Element) -> None:
            ((box, folder),) = self._access(request.find(q(M, "SyncFolderId")), acting)
            start = 0
            if token:
                seq = self.store.check_sync_state(box, folder, token)
                if seq is None:
                    self.invalid_sync_states += 1
                    raise ResponseError("ErrorInvalidSyncStateData", "Synchronization state "
                                        "data is corrupt or otherwise invalid.")
                start = seq
            new = [i for i in box.in_folder(folder) if i.seq > start]
            page = new[:max_changes]
            reached = page[-1].seq if page else max(start, 0)
            if not page and not token:
                reached = 0
            etree.SubElement(elem, q(M, "SyncState")).text = self.store.issue_sync_state(
                box, folder, reached)
            etree.SubElement(elem, q(M, "IncludesLastItemInRange")).text = (
                "true" if len(new) <= max_changes else "false")
            changes = etree.SubElement(elem, q(M, "Changes"))
            for item in page:
                create = etree.SubElement(changes, q(T, "Create"))
                create.append(item_xml(item, props, logged))
            logged.items = len(page)

        return self._single("SyncFolderItems", build)

    def _op_GetItem(self, request: etree._Element, acting: str, logged: Logged) -> etree._Element:
        _, props = shape(request)
        ids = request.find(q(M, "ItemIds"))
        if ids is None or len(ids) == 0:
            raise SoapFault("ErrorSchemaValidation", "ItemIds is missing.", 400)
        box = self.store.mailbox(acting)
        messages = []
        for item_id in ids:
            item = box.items.get(item_id.get("Id", "")) if box else None
            if item is None:
                messages.append(self._message("GetItem", None, ResponseError(
                    "ErrorItemNotFound", "The specified object was not found in the store.")))
                continue

            def build(elem: etree._Element, item: EwsItem = item) -> None:
                items = etree.SubElement(elem, q(M, "Items"))
                items.append(item_xml(item, props, logged))

            messages.append(self._message("GetItem", build))
            logged.items += 1
        return self._response("GetItem", messages)

    def _op_CreateItem(self, request: etree._Element, acting: str, logged: Logged
                       ) -> etree._Element:
        disposition = request.get("MessageDisposition")
        if disposition not in ("SaveOnly", "SendOnly", "SendAndSaveCopy"):
            raise SoapFault("ErrorInvalidArgument", "MessageDisposition is required for messages.")

        def build(elem: etree._Element) -> None:
            saved = request.find(q(M, "SavedItemFolderId"))
            box = self.store.mailbox(acting)
            assert box is not None
            if saved is not None:
                ((box, folder),) = self._access(saved, acting)
            else:
                folder = "sentitems" if disposition == "SendAndSaveCopy" else "drafts"
            messages = request.find(q(M, "Items"))
            for message in messages if messages is not None else []:
                mime = message.findtext(q(T, "MimeContent"))
                if not mime:
                    raise ResponseError("ErrorInvalidArgument", "Only MimeContent is served here.")
                raw = base64.b64decode(mime)
                bcc = [a.text or "" for a in message.iterfind(
                    f"{{{T}}}BccRecipients/{{{T}}}Mailbox/{{{T}}}EmailAddress")]
                parsed = email.message_from_bytes(raw)
                _, sender = email.utils.parseaddr(parsed.get("From", ""))
                if sender and sender.lower() != box.owner.lower():
                    raise ResponseError("ErrorSendAsDenied",
                                        "The user account which was used to submit this request "
                                        "does not have the right to send mail on behalf of the "
                                        "specified sending account.")
                if disposition in ("SendOnly", "SendAndSaveCopy"):
                    rcpts = [a for _, a in email.utils.getaddresses(
                        parsed.get_all("To", []) + parsed.get_all("Cc", []))] + bcc
                    if not rcpts:
                        raise ResponseError("ErrorInvalidRecipients",
                                            "At least one recipient isn't valid.")
                    self.store.transmissions.append(
                        Transmission(box.owner, parsed.get("Message-ID"), rcpts, raw))
                if disposition != "SendOnly":
                    item = box.add(raw, folder, transport=False)
                    self.store.notify(box, item)
            etree.SubElement(elem, q(M, "Items"))

        return self._single("CreateItem", build)

    def _op_FindItem(self, request: etree._Element, acting: str, logged: Logged
                     ) -> etree._Element:
        shape(request)
        restriction = request.find(q(M, "Restriction"))
        wanted = None
        if restriction is not None:
            equal = restriction.find(q(T, "IsEqualTo"))
            uri = equal.find(q(T, "FieldURI")) if equal is not None else None
            if uri is None or uri.get("FieldURI") != "message:InternetMessageId":
                raise SoapFault("ErrorInvalidArgument", "Only IsEqualTo on InternetMessageId.")
            wanted = equal.find(f"{{{T}}}FieldURIOrConstant/{{{T}}}Constant").get("Value")

        def build(elem: etree._Element) -> None:
            found: list[EwsItem] = []
            for box, folder in self._access(request.find(q(M, "ParentFolderIds")), acting):
                found += [i for i in box.in_folder(folder)
                          if wanted is None or i.internet_message_id == wanted]
            root = etree.SubElement(elem, q(M, "RootFolder"), IndexedPagingOffset=str(len(found)),
                                    TotalItemsInView=str(len(found)),
                                    IncludesLastItemInRange="true")
            items = etree.SubElement(root, q(T, "Items"))
            for item in found:
                items.append(item_xml(item, [], logged))

        return self._single("FindItem", build)

    def _op_GetFolder(self, request: etree._Element, acting: str, logged: Logged
                      ) -> etree._Element:
        shape(request, "FolderShape")

        def build(elem: etree._Element) -> None:
            folders = etree.SubElement(elem, q(M, "Folders"))
            for box, name in self._access(request.find(q(M, "FolderIds")), acting):
                folder = etree.SubElement(folders, q(T, "Folder"))
                etree.SubElement(folder, q(T, "FolderId"), Id=f"AQMk{name}{box.owner}",
                                 ChangeKey="AQAAAA==")
                etree.SubElement(folder, q(T, "TotalCount")).text = str(len(box.in_folder(name)))

        return self._single("GetFolder", build)

    def _op_Subscribe(self, request: etree._Element, acting: str, logged: Logged
                      ) -> etree._Element:
        pull = request.find(q(M, "PullSubscriptionRequest"))
        if pull is None:
            raise SoapFault("ErrorInvalidSubscriptionRequest", "Only pull subscriptions here.")

        def build(elem: etree._Element) -> None:
            found = self._access(pull.find(q(T, "FolderIds")), acting)
            sub = Subscription(uuid.uuid4().hex, acting.lower(), tuple(n for _, n in found))
            self.store.subscriptions[sub.id] = sub
            etree.SubElement(elem, q(M, "SubscriptionId")).text = sub.id
            etree.SubElement(elem, q(M, "Watermark")).text = "W0"

        return self._single("Subscribe", build)

    def _op_GetEvents(self, request: etree._Element, acting: str, logged: Logged
                      ) -> etree._Element:
        sub_id = request.findtext(q(M, "SubscriptionId")) or ""
        watermark = request.findtext(q(M, "Watermark")) or ""

        def build(elem: etree._Element) -> None:
            sub = self.store.subscriptions.get(sub_id)
            if sub is None or sub.mailbox != acting.lower():
                raise ResponseError("ErrorSubscriptionNotFound",
                                    "The specified subscription was not found.")
            note = etree.SubElement(elem, q(M, "Notification"))
            etree.SubElement(note, q(T, "SubscriptionId")).text = sub.id
            etree.SubElement(note, q(T, "PreviousWatermark")).text = watermark
            etree.SubElement(note, q(T, "MoreEvents")).text = "false"
            events, sub.events = sub.events, []
            if not events:
                status = etree.SubElement(note, q(T, "StatusEvent"))
                etree.SubElement(status, q(T, "Watermark")).text = f"W{sub.watermark}"
            for kind, item_id, folder in events:
                sub.watermark += 1
                event = etree.SubElement(note, q(T, kind))
                etree.SubElement(event, q(T, "Watermark")).text = f"W{sub.watermark}"
                etree.SubElement(event, q(T, "TimeStamp")).text = "2026-01-01T00:00:00Z"
                etree.SubElement(event, q(T, "ItemId"), Id=item_id, ChangeKey="CQAAAA==")
                etree.SubElement(event, q(T, "ParentFolderId"), Id=f"AQMk{folder}",
                                 ChangeKey="AQAAAA==")

        return self._single("GetEvents", build)

    def _op_Unsubscribe(self, request: etree._Element, acting: str, logged: Logged
                        ) -> etree._Element:
        sub_id = request.findtext(q(M, "SubscriptionId")) or ""

        def build(elem: etree._Element) -> None:
            sub = self.store.subscriptions.get(sub_id)
            if sub is None or sub.mailbox != acting.lower():
                raise ResponseError("ErrorSubscriptionNotFound",
                                    "The specified subscription was not found.")
            del self.store.subscriptions[sub_id]

        return self._single("Unsubscribe", build)

    # ---- envelopes ----------------------------------------------------------------------

    def _envelope(self, body_content: etree._Element) -> Reply:
        env = etree.Element(q(S, "Envelope"), nsmap={"s": S})
        header = etree.SubElement(env, q(S, "Header"))
        major, minor, build, rev = self.build
        etree.SubElement(header, q(T, "ServerVersionInfo"), MajorVersion=major,
                         MinorVersion=minor, MajorBuildNumber=build, MinorBuildNumber=rev,
                         Version="V2017_07_11", nsmap={"h": T})
        body = etree.SubElement(env, q(S, "Body"))
        body.append(body_content)
        return Reply(200, etree.tostring(env, xml_declaration=True, encoding="utf-8"),
                     {"content-type": "text/xml; charset=utf-8"})

    def _fault(self, code: str, message: str, *, status: int = 500,
               back_off_ms: int | None = None) -> Reply:
        env = etree.Element(q(S, "Envelope"), nsmap={"s": S})
        body = etree.SubElement(env, q(S, "Body"))
        fault = etree.SubElement(body, q(S, "Fault"))
        etree.SubElement(fault, "faultcode").text = "a:" + code
        etree.SubElement(fault, "faultstring", {"{http://www.w3.org/XML/1998/namespace}lang":
                                                "en-US"}).text = message
        detail = etree.SubElement(fault, "detail")
        etree.SubElement(detail, q(E, "ResponseCode"), nsmap={"e": E}).text = code
        etree.SubElement(detail, q(E, "Message"), nsmap={"e": E}).text = message
        if back_off_ms is not None:
            xml = etree.SubElement(detail, q(T, "MessageXml"), nsmap={"t": T})
            etree.SubElement(xml, q(T, "Value"), Name="BackOffMilliseconds").text = str(back_off_ms)
        return Reply(status, etree.tostring(env, xml_declaration=True, encoding="utf-8"),
                     {"content-type": "text/xml; charset=utf-8"})


__all__ = ["EWS_PATH", "FakeEws", "Logged"]
