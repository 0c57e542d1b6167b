"""Autodiscover for the fake Exchange Server, and its HTTPS server thread.

POX autodiscover (``POST /autodiscover/autodiscover.xml``, Basic credentials,
"POX Autodiscover request/response reference": responseschema 2006a with the
EXCH and EXPR protocols carrying ``EwsUrl``) and SOAP autodiscover
(``/autodiscover/autodiscover.svc``, "GetUserSettings operation (SOAP)":
``InternalEwsUrl`` and ``ExternalEwsUrl``). :class:`EwsServerThread` is the
loopback HTTPS server; it tells the app which TCP connection each request came
on, because NTLM authenticates connections.
"""

from __future__ import annotations

import gc
import html
import warnings
from typing import Any
from urllib.parse import parse_qsl

from lxml import etree
from starlette.requests import Request
from starlette.responses import Response

from tests.fakes.server import Call, Reply, ServerThread


def autodiscover(call: Call, ews_url: str, login: str | None, challenge: str | None) -> Reply:
    """Answer an autodiscover request for the mailbox it names; ``challenge`` is
    the NTLM step to send back while a handshake is under way."""
    path = call.path.lower()
    if path.endswith("/autodiscover.xml"):
        if login is None:
            return Reply(401, b"", {"www-authenticate": challenge or 'Basic realm="autodiscover"'})
        try:
            root = etree.fromstring(call.body, etree.XMLParser(resolve_entities=False))
        except etree.XMLSyntaxError:
            return Reply.text(400, "bad request")
        address = root.findtext(".//{*}EMailAddress") or ""
        return Reply(200, pox_response(address, ews_url).encode(),
                     {"content-type": "text/xml; charset=utf-8"})
    if path.endswith("/autodiscover.svc"):
        if login is None:
            return Reply(401, b"", {
                "www-authenticate": challenge or 'NTLM, Basic realm="autodiscover"'})
        try:
            root = etree.fromstring(call.body, etree.XMLParser(resolve_entities=False))
        except etree.XMLSyntaxError:
            return Reply.text(400, "bad request")
        address = root.findtext(".//{*}Users/{*}User/{*}Mailbox") or login
        return Reply(200, soap_autodiscover_response(address, ews_url).encode(),
                     {"content-type": "text/xml; charset=utf-8"})
    return Reply.text(404, "Not Found")


def pox_response(address: str, ews_url: str) -> str:
    """A POX autodiscover answer for ``address`` (responseschema 2006a)."""
    a = html.escape(address)
    u = html.escape(ews_url)
    return (
        '<?xml version="1.0" encoding="utf-8"?>'
        '<Autodiscover xmlns="http://schemas.microsoft.com/exchange/autodiscover/responseschema/2006">'
        '<Response xmlns="http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a">'
        f"<User><DisplayName>{a}</DisplayName><AutoDiscoverSMTPAddress>{a}</AutoDiscoverSMTPAddress>"
        "</User><Account><AccountType>email</AccountType><Action>settings</Action>"
        f"<Protocol><Type>EXCH</Type><Server>exch01.contoso.test</Server><EwsUrl>{u}</EwsUrl></Protocol>"
        f"<Protocol><Type>EXPR</Type><Server>mail.contoso.test</Server><EwsUrl>{u}</EwsUrl></Protocol>"
        "</Account></Response></Autodiscover>"
    )


def soap_autodiscover_response(address: str, ews_url: str) -> str:
    """A GetUserSettings answer: the address, InternalEwsUrl and ExternalEwsUrl."""
    values = {"AutoDiscoverSMTPAddress": address, "UserDisplayName": address,
              "InternalEwsUrl": ews_url, "ExternalEwsUrl": ews_url}
    settings = "".join(
        f'<UserSetting i:type="StringSetting"><Name>{n}</Name>'
        f"<Value>{html.escape(v)}</Value></UserSetting>"
        for n, v in values.items()
    )
    return (
        '<?xml version="1.0" encoding="utf-8"?>'
        '<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" '
        'xmlns:a="http://www.w3.org/2005/08/addressing">'
        '<s:Header><a:Action s:mustUnderstand="1">'
        "http://schemas.microsoft.com/exchange/2010/Autodiscover/Autodiscover/GetUserSettingsResponse"
        "</a:Action><h:ServerVersionInfo xmlns:h=\"http://schemas.microsoft.com/exchange/2010/Autodiscover\">"
        "<h:MajorVersion>15</h:MajorVersion><h:MinorVersion>2</h:MinorVersion>"
        "<h:MajorBuildNumber>1118</h:MajorBuildNumber><h:MinorBuildNumber>7</h:MinorBuildNumber>"
        "<h:Version>Exchange2015</h:Version></h:ServerVersionInfo></s:Header>"
        '<s:Body><GetUserSettingsResponseMessage xmlns="http://schemas.microsoft.com/exchange/2010/Autodiscover">'
        '<Response xmlns:i="http://www.w3.org/2001/XMLSchema-instance"><ErrorCode>NoError</ErrorCode>'
        "<ErrorMessage/><UserResponses><UserResponse><ErrorCode>NoError</ErrorCode><ErrorMessage/>"
        '<RedirectTarget i:nil="true"/><UserSettingErrors/>'
        f"<UserSettings>{settings}</UserSettings>"
        f"</UserResponse></UserResponses></Response></GetUserSettingsResponseMessage></s:Body></s:Envelope>"
    )


class EwsServerThread(ServerThread):
    """:class:`ServerThread` that also tells the app which TCP connection a
    request came on (``call.ctx["connection"]``): NTLM authenticates connections.

    Stopping collects what the server's loop left behind: a TLS connection whose
    client went away during the graceful shutdown is dropped by uvicorn without
    closing its transport, which would surface as a ResourceWarning at an
    arbitrary later garbage collection.
    """

    def stop(self) -> None:
        super().stop()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()

    async def _asgi(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        request = Request(scope, receive)
        header_lists: dict[str, list[str]] = {}
        for name, value in request.headers.items():
            header_lists.setdefault(name.lower(), []).append(value)
        call = Call(
            method=request.method,
            path=request.url.path,
            query=dict(parse_qsl(request.url.query, keep_blank_values=True)),
            headers={k: ", ".join(v) for k, v in header_lists.items()},
            body=await request.body(),
            header_lists=header_lists,
        )
        call.ctx["connection"] = tuple(scope.get("client") or ())
        reply = await self.app(call)
        response = Response(reply.body, status_code=reply.status, headers=reply.headers)
        await response(scope, receive, send)



__all__ = ["EwsServerThread", "autodiscover", "pox_response", "soap_autodiscover_response"]
