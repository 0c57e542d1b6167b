"""Items of the fake Exchange Server as EWS XML: the shared namespaces, error
types, the request log entry, the ItemShape of a request and the ``t:Message``
of an item with exactly the properties asked for (FieldURI and ExtendedFieldURI,
"ItemShape", "AdditionalProperties", "ExtendedFieldURI" and "MimeContent" in
Microsoft's EWS reference). Returning ``item:MimeContent`` is recorded in the
log entry: tests tell bodies read from headers read.
"""

from __future__ import annotations

import base64
import email.utils
from dataclasses import dataclass, field

from lxml import etree

from tests.fakes.ews_store import EwsItem

S = "http://schemas.xmlsoap.org/soap/envelope/"
M = "http://schemas.microsoft.com/exchange/services/2006/messages"
T = "http://schemas.microsoft.com/exchange/services/2006/types"
E = "http://schemas.microsoft.com/exchange/services/2006/errors"
VERSIONS = {"Exchange2010", "Exchange2010_SP1", "Exchange2010_SP2", "Exchange2013",
            "Exchange2013_SP1", "Exchange2016", "Exchange2019", "V2017_07_11"}
EWS_PATH = "/EWS/Exchange.asmx"
CHALLENGES = 'NTLM, Basic realm="exch01.contoso.test"'
NO_FOLDER = "The specified folder could not be found."
#: The extended properties threading is read from (PidTag...).
PROPS = {"0x1042": "In-Reply-To", "0x1039": "References"}
#: PR_TRANSPORT_MESSAGE_HEADERS: only mail received from outside has them.
TRANSPORT_HEADERS = "0x007d"


class SoapFault(Exception):
    def __init__(self, code: str, message: str, status: int = 500) -> None:
        super().__init__(message)
        self.code, self.message, self.status = code, message, status


class ResponseError(Exception):
    """An error answered inside a ResponseMessage (ResponseClass="Error")."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


@dataclass
class Logged:
    operation: str
    mailbox: str | None
    status: int
    #: ids whose MIME was returned (GetItem with item:MimeContent)
    bodies: list[str] = field(default_factory=list)
    items: int = 0


def q(ns: str, tag: str) -> str:
    return f"{{{ns}}}{tag}"


def format_tag(tag: str) -> str:
    """``0x1042`` for any spelling of a property tag (``0x1042``, ``0X1042``, ``4162``)."""
    value = int(tag, 16) if tag.lower().startswith("0x") else int(tag)
    return f"0x{value:04x}"


def shape(request: etree._Element, tag: str = "ItemShape") -> tuple[str, list[etree._Element]]:
    shape = request.find(q(M, tag))
    if shape is None:
        raise SoapFault("ErrorSchemaValidation", f"{tag} is missing.", 400)
    base = shape.findtext(q(T, "BaseShape")) or ""
    if base not in ("IdOnly", "Default", "AllProperties"):
        raise SoapFault("ErrorSchemaValidation", f"Bad BaseShape {base!r}.", 400)
    extra = shape.find(q(T, "AdditionalProperties"))
    return base, list(extra) if extra is not None else []

def item_xml(item: EwsItem, props: list[etree._Element], logged: Logged
              ) -> etree._Element:
    msg = etree.Element(q(T, "Message"))
    etree.SubElement(msg, q(T, "ItemId"), Id=item.id, ChangeKey=item.change_key)
    extended: list[etree._Element] = []
    for prop in props:
        if prop.tag == q(T, "ExtendedFieldURI"):
            tag = format_tag(prop.get("PropertyTag") or "0")
            value = (item.transport_headers if tag == TRANSPORT_HEADERS
                     else item.header(PROPS[tag]) if tag in PROPS else None)
            if value is not None:
                ext = etree.Element(q(T, "ExtendedProperty"))
                etree.SubElement(ext, q(T, "ExtendedFieldURI"), dict(prop.attrib))
                etree.SubElement(ext, q(T, "Value")).text = value
                extended.append(ext)
            continue
        uri = prop.get("FieldURI")
        if uri == "item:MimeContent":
            mime = etree.SubElement(msg, q(T, "MimeContent"), CharacterSet="UTF-8")
            mime.text = base64.b64encode(item.raw()).decode("ascii")
            logged.bodies.append(item.id)
        elif uri == "item:Subject":
            etree.SubElement(msg, q(T, "Subject")).text = item.header("Subject") or ""
        elif uri == "item:DateTimeReceived":
            etree.SubElement(msg, q(T, "DateTimeReceived")).text = item.received.strftime(
                "%Y-%m-%dT%H:%M:%SZ")
        elif uri == "item:Size":
            etree.SubElement(msg, q(T, "Size")).text = str(len(item.raw()))
        elif uri == "message:InternetMessageId":
            if item.internet_message_id:
                etree.SubElement(msg, q(T, "InternetMessageId")).text = item.internet_message_id
        elif uri == "message:References":
            if item.header("References"):
                etree.SubElement(msg, q(T, "References")).text = item.header("References")
        elif uri == "message:IsRead":
            etree.SubElement(msg, q(T, "IsRead")).text = "true" if item.is_read else "false"
        elif uri in ("message:From", "message:Sender"):
            name, address = email.utils.parseaddr(item.header("From") or "")
            tag = "From" if uri == "message:From" else "Sender"
            holder = etree.SubElement(msg, q(T, tag))
            box = etree.SubElement(holder, q(T, "Mailbox"))
            etree.SubElement(box, q(T, "Name")).text = name or address
            etree.SubElement(box, q(T, "EmailAddress")).text = address
            etree.SubElement(box, q(T, "RoutingType")).text = "SMTP"
        elif uri == "item:DateTimeSent":
            etree.SubElement(msg, q(T, "DateTimeSent")).text = item.received.strftime(
                "%Y-%m-%dT%H:%M:%SZ")
        else:
            raise SoapFault("ErrorSchemaValidation", f"Unknown FieldURI {uri!r}.", 400)
    msg.extend(extended)
    return msg


__all__ = [
    "E",
    "Logged",
    "M",
    "ResponseError",
    "S",
    "SoapFault",
    "T",
    "format_tag",
    "item_xml",
    "q",
    "shape",
]
